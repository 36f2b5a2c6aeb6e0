"""The embedded demo data set: scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes).

It installs with scikit-learn and needs no network. Each digit becomes a white-on-black RGB PNG
upscaled to `size` x `size`, conditioned on a one-hot vector named digit_0 ... digit_9.
Split: every tenth image (index % 10 == 9) is test, the rest train (fixed, so rebuilds match).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from toolkit.data.shards import Sample, output_lock, prepare_output, write_split

ATTRIBUTES = [f"digit_{i}" for i in range(10)]
SPLITS = ("train", "test")
SOURCE = "scikit-learn digits"


def _load():
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return digits.images, digits.target


def digit_samples(split: str, size: int = 32) -> Iterator[Sample]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _load()
    for index, (pixels, label) in enumerate(zip(images, labels)):
        if (index % 10 == 9) != (split == "test"):
            continue
        gray = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
        rgb = gray.resize((size, size), Image.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG", optimize=False)
        attributes = np.zeros(len(ATTRIBUTES), dtype=np.uint8)
        attributes[int(label)] = 1
        yield Sample(key=f"digits_{index:06d}", image=buffer.getvalue(), ext="png", attributes=attributes)


def write_digits(out: str | Path, size: int = 32, shard_size: int = 100, overwrite: bool = False) -> dict[str, dict]:
    """Both splits as shards under `out`, which the build owns as `build_shards` does: a folder
    holding anything but shards, or shards of another build (unless overwrite), is refused, and no
    older split or shard is left beside the new ones. Returns {split: manifest}."""
    build = {"source": SOURCE, "size": size, "shard_size": shard_size}
    with output_lock(out):
        prepare_output(out, SPLITS, build, overwrite)
        return {
            split: write_split(
                digit_samples(split, size),
                out,
                split,
                ATTRIBUTES,
                (size, size),
                SOURCE,
                shard_size,
                extra={"build": build},
            )
            for split in SPLITS
        }
