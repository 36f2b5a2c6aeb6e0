"""The WebDataset pipeline that feeds training and evaluation.

Batches are (images float32 [B, 3, H, W] in [0, 1], attributes float32 [B, A]).

- `train_batches`: an endless stream. Shards are *resampled* (drawn with replacement, seeded by
  seed, rank and worker), so every rank always has a next batch and step-based training never
  hangs on uneven shards; samples are shuffled in a buffer before they are decoded. An "epoch" is
  therefore a number of samples, not a pass that sees each sample exactly once.
- `epoch_batches`: one epoch for one rank of N. Shards are shuffled per epoch with the seed and dealt
  to ranks, then to workers; each sample is seen at most once per epoch across all ranks (disjoint),
  and every rank gets exactly the same number of batches (the smallest any rank can fill), because
  an unequal count hangs DDP. The samples that do not fill those batches wait for another epoch.
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


def _is_url(shards: str | Path) -> bool:
    text = str(shards)
    return "://" in text or text.startswith("pipe:")


def read_manifest(shards: str | Path, split: str) -> dict:
    """The split's manifest.json, from a folder or from beside shards at a URL (`pipe:...`, `http://...`)."""
    location = _join(shards, split, MANIFEST)
    if _is_url(shards):
        try:
            with wds.gopen(location, "rb") as stream:
                manifest = json.loads(stream.read())
        except Exception as error:
            raise UserError(f"could not read {location}: {' '.join(str(error).split())}") from None
    else:
        path = Path(location)
        if not path.is_file():
            raise UserError(
                f"no {split} split in {shards}: expected {path} (run `cvae-tk shards ... --out {shards}`; "
                "a split without a manifest was not finished)"
            )
        manifest = json.loads(path.read_text())
    if not manifest.get("shards"):
        raise UserError(f"{location} lists no shards: the {split} split is empty")
    return manifest


def shard_urls(shards: str | Path, split: str) -> list[str]:
    manifest = read_manifest(shards, split)
    return [_join(shards, split, name) for name in manifest["shards"]]


def _join(shards: str | Path, split: str, name: str) -> str:
    # A URL (pipe:..., http://...) is joined as text, a local folder as a path.
    text = str(shards)
    if "{}" in text:  # a command with the path in the middle: pipe:aws s3 cp s3://bucket/celeba64/{} -
        return text.replace("{}", f"{split}/{name}")
    return f"{text.rstrip('/')}/{split}/{name}" if _is_url(shards) else str(Path(shards) / split / name)


def decode(sample: dict, with_keys: bool = False) -> tuple:
    """(image float [3, H, W] in [0, 1], attributes float [A]) and, with_keys, the sample's key."""
    ext = "png" if "png" in sample else "jpg"
    image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)
    attributes = np.load(io.BytesIO(sample["attr.npy"]), allow_pickle=False)
    decoded = (pixels, torch.from_numpy(attributes.astype(np.float32)))
    return (*decoded, sample["__key__"]) if with_keys else decoded


def _worker_shuffle(source, bufsize: int, seed: int):
    """Buffer shuffle whose seed differs per rank and worker (copies of one RNG would repeat each other)."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(seed * 1_000_003 + rank * 1_009 + worker)
    yield from wds.filters._shuffle(source, bufsize, min(bufsize, 100), rng)


def train_batches(
    shards: str | Path, batch_size: int, seed: int = 0, num_workers: int = 1, shuffle_buffer: int = 1000, with_keys: bool = False
):
    """Endless shuffled batches from the train split (see the module docstring)."""
    urls = shard_urls(shards, "train")
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        partial(_worker_shuffle, bufsize=shuffle_buffer, seed=seed),
        wds.map(partial(decode, with_keys=with_keys)),
        wds.batched(batch_size, collation_fn=default_collate, partial=False),
    )
    # Its own generator: creating a loader iterator must not draw from the global RNG (exact resume).
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(seed))


def deal_shards(names: list[str], epoch: int, seed: int, rank: int, world: int, worker: int, workers: int) -> list[str]:
    """The shards one worker of one rank reads in `epoch`: a seeded shuffle, dealt round-robin."""
    order = list(names)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[rank::world][worker::workers]


class _EpochShards(torch.utils.data.IterableDataset):
    def __init__(self, urls: list[str], epoch: int, seed: int, rank: int, world: int):
        super().__init__()
        self.urls, self.epoch, self.seed, self.rank, self.world = urls, epoch, seed, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in deal_shards(self.urls, self.epoch, self.seed, self.rank, self.world, worker, workers):
            yield {"url": url}


def batches_per_rank(counts: dict[str, int], batch_size: int, epoch: int, seed: int, world: int, workers: int) -> int:
    """How many full batches every rank can fill in `epoch` (each worker batches its own shards)."""
    names, per_rank = list(counts), []
    for rank in range(world):
        per_rank.append(
            sum(
                sum(counts[name] for name in deal_shards(names, epoch, seed, rank, world, worker, workers)) // batch_size
                for worker in range(workers)
            )
        )
    return min(per_rank)


def epoch_batches(
    shards: str | Path,
    split: str = "train",
    batch_size: int = 64,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    with_keys: bool = False,
):
    """One epoch of shuffled batches for `rank` of `world` (see the module docstring); has len()."""
    manifest = read_manifest(shards, split)
    urls = [_join(shards, split, name) for name in manifest["shards"]]
    workers = max(num_workers, 1)
    counts = dict(zip(urls, manifest["shards"].values()))
    count = batches_per_rank(counts, batch_size, epoch, seed, world, workers)
    if count == 0:
        raise UserError(
            f"{split} split of {shards} cannot give {world} rank(s) x {workers} worker(s) a batch of {batch_size} each: "
            f"{len(urls)} shard(s), {manifest['count']} samples; use a smaller batch_size or rebuild with a smaller --shard-size"
        )
    pipeline = wds.DataPipeline(
        _EpochShards(urls, epoch, seed, rank, world),
        wds.tarfile_to_samples(),
        partial(_worker_shuffle, bufsize=shuffle_buffer, seed=seed * 7919 + epoch),
        wds.map(partial(decode, with_keys=with_keys)),
        wds.batched(batch_size, collation_fn=default_collate, partial=False),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    return loader.with_epoch(count).with_length(count, silent=True)


def eval_batches(shards: str | Path, split: str = "test", batch_size: int = 256):
    """One ordered pass over `split`: every sample exactly once, in shard order."""
    urls = shard_urls(shards, split)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.map(decode),
        wds.batched(batch_size, collation_fn=default_collate, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=0, generator=torch.Generator().manual_seed(0))
