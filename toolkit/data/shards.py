"""Write samples into WebDataset tar shards plus one `manifest.json` per split.

Layout (one folder per data set):

    OUT/train/train-000000.tar ... OUT/train/manifest.json
    OUT/test/test-000000.tar   ... OUT/test/manifest.json

Each sample in a tar: `<key>.png` (or `.jpg`): the encoded image bytes as given; `<key>.attr.npy`:
the 0/1 attribute vector (uint8, length A). Keys are dot-free, as WebDataset requires.

Nothing half-written looks valid: the split's old manifest is removed first, every tar is written
under a `.tmp` name and renamed when complete, and the manifest is written last. A split without a
manifest is incomplete, and the reader refuses it. Tars have fixed mtime/owner, so the same
input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds

MANIFEST = "manifest.json"
IMAGE_EXTS = ("png", "jpg")


@dataclass
class Sample:
    key: str  # unique, dot-free
    image: bytes  # encoded PNG or JPEG
    ext: str  # "png" or "jpg"
    attributes: np.ndarray  # uint8 0/1, one per attribute name


def encode_attributes(attributes: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(attributes, dtype=np.uint8), allow_pickle=False)
    return buffer.getvalue()


def _check(sample: Sample, num_attributes: int) -> None:
    if not sample.key or "." in sample.key or "/" in sample.key:
        raise ValueError(f"sample key {sample.key!r}: expected a non-empty name without '.' or '/'")
    if sample.ext not in IMAGE_EXTS:
        raise ValueError(f"sample {sample.key}: image extension {sample.ext!r}, expected one of {IMAGE_EXTS}")
    attributes = np.asarray(sample.attributes)
    if attributes.shape != (num_attributes,):
        raise ValueError(f"sample {sample.key}: {attributes.shape[0] if attributes.ndim else 0} attribute values, expected {num_attributes}")
    if not np.isin(attributes, (0, 1)).all():
        raise ValueError(f"sample {sample.key}: attribute values must be 0 or 1")


class _ShardFile:
    """One tar written under `<name>.tmp`, renamed to `<name>` by `commit()`."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.stream = open(self.tmp, "wb")
        # fixed mtime: the same samples give the same bytes
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0.0)
        self.count = 0

    def write(self, sample: Sample) -> None:
        self.writer.write({"__key__": sample.key, sample.ext: sample.image, "attr.npy": encode_attributes(sample.attributes)})
        self.count += 1

    def commit(self) -> None:
        self.writer.close()  # also closes the stream
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def write_split(
    samples: Iterable[Sample],
    out: str | Path,
    split: str,
    attributes: list[str],
    image_size: tuple[int, int],
    source: str,
    shard_size: int = 10_000,
) -> dict:
    """Write one split to `out/split/` and return its manifest."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # the split is incomplete until the new one lands
    counts: dict[str, int] = {}
    shard: _ShardFile | None = None
    seen: set[str] = set()
    try:
        for sample in samples:
            _check(sample, len(attributes))
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r}")
            seen.add(sample.key)
            if shard is None:
                shard = _ShardFile(folder / f"{split}-{len(counts):06d}.tar")
            shard.write(sample)
            if shard.count == shard_size:
                shard.commit()
                counts[shard.path.name], shard = shard.count, None
        if shard is not None:
            shard.commit()
            counts[shard.path.name], shard = shard.count, None
    finally:
        if shard is not None:
            shard.abort()
    for stale in folder.glob(f"{split}-*.tar"):  # left by an earlier, larger build
        if stale.name not in counts:
            stale.unlink()
    manifest = {
        "attributes": list(attributes),
        "count": sum(counts.values()),
        "shards": counts,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "source": source,
        "split": split,
        "fields": {"image": "png|jpg", "attributes": "attr.npy (uint8 0/1)"},
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest
