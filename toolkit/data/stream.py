"""The WebDataset pipeline that feeds training and evaluation.

Batches are (images float32 [B, 3, H, W] in [0, 1], attributes float32 [B, A]).

- `train_batches`: an endless stream. Shards are *resampled* (drawn with replacement, seeded by
  seed, rank and worker), so every rank always has a next batch and step-based training never
  hangs on uneven shards; samples are shuffled in a buffer before they are decoded. An "epoch" is
  therefore a number of samples, not a pass that sees each sample exactly once.
- `eval_batches`: one ordered pass over a split, every sample exactly once (for metrics, grids).

The loaders are already rank- and worker-aware: do not hand them to `accelerator.prepare`.
"""

from __future__ import annotations

import io
import json
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import default_collate

from toolkit.data.shards import MANIFEST
from toolkit.errors import UserError


def read_manifest(shards: str | Path, split: str) -> dict:
    path = Path(shards) / split / MANIFEST
    if not path.is_file():
        raise UserError(
            f"no {split} split in {shards}: expected {path} (run `cvae-tk shards ... --out {shards}`; "
            "a split without a manifest was not finished)"
        )
    manifest = json.loads(path.read_text())
    if not manifest.get("shards"):
        raise UserError(f"{path} lists no shards: the {split} split is empty")
    return manifest


def shard_urls(shards: str | Path, split: str) -> list[str]:
    manifest = read_manifest(shards, split)
    return [str(Path(shards) / split / name) for name in manifest["shards"]]


def decode(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ext = "png" if "png" in sample else "jpg"
    image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)
    attributes = np.load(io.BytesIO(sample["attr.npy"]), allow_pickle=False)
    return pixels, torch.from_numpy(attributes.astype(np.float32))


def _worker_shuffle(source, bufsize: int, seed: int):
    """Buffer shuffle whose seed differs per rank and worker (copies of one RNG would repeat each other)."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(seed * 1_000_003 + rank * 1_009 + worker)
    yield from wds.filters._shuffle(source, bufsize, min(bufsize, 100), rng)


def train_batches(shards: str | Path, batch_size: int, seed: int = 0, num_workers: int = 1, shuffle_buffer: int = 1000):
    """Endless shuffled batches from the train split (see the module docstring)."""
    urls = shard_urls(shards, "train")
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        partial(_worker_shuffle, bufsize=shuffle_buffer, seed=seed),
        wds.map(decode),
        wds.batched(batch_size, collation_fn=default_collate, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


def eval_batches(shards: str | Path, split: str = "test", batch_size: int = 256):
    """One ordered pass over `split`: every sample exactly once, in shard order."""
    urls = shard_urls(shards, split)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.map(decode),
        wds.batched(batch_size, collation_fn=default_collate, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=0)
