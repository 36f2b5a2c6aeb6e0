"""Benchmark: the shard reader's cost per image, the way `toolkit.data.stream` decodes a sample now
(JPEGs through torchvision's libjpeg-turbo call, `.attr.npy` read in place) against the way it did
before (PIL for every image, np.load for every vector), on the same shards in one run.

  decode     `stream.decode` alone over the split's samples, already read from the tars
  epoch      one epoch of `epoch_batches` (tar reading, shuffle, decode, batching), num_workers 0,
             with the new and then the old decode patched in: what one loader worker does

Both ways give the same tensors (checked here on every sample, and in tests/data/test_stream.py).
The data: generated CelebA-format JPEGs made into 64x64 shards (centre crop 148), as bench/train.py.

    .venv/bin/python bench/feed.py [--images 4000] [--work DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shards import make_folder  # noqa: E402  (bench/shards.py)
from toolkit.data import stream  # noqa: E402
from toolkit.data.build import ImageSpec, build_shards  # noqa: E402
from toolkit.data.celeba import read_celeba  # noqa: E402


def decode_before(sample: dict, with_keys: bool = False, expected_size=None) -> tuple:
    """stream.decode as it was: PIL for the image, np.load for the vector."""
    ext = "png" if "png" in sample else "jpg"
    image = Image.open(io.BytesIO(sample[ext]))
    if expected_size and 0 not in expected_size and image.size != (expected_size[1], expected_size[0]):
        raise stream.WrongSize("wrong size")
    image = image.convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)
    attributes = np.load(io.BytesIO(sample["attr.npy"]), allow_pickle=False)
    decoded = (pixels, torch.from_numpy(attributes.astype(np.float32)))
    return (*decoded, sample["__key__"]) if with_keys else decoded


def samples(shards: Path) -> list[dict]:
    found = {}
    for path in sorted((shards / "train").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                found.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
    return list(found.values())


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--work", type=Path, help="keep the generated folder and shards here")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cvae-bench-feed-"))
    root, shards = work / "celeba", work / "shards64"
    if not (root / "list_attr_celeba.txt").exists():
        make_folder(root, args.images)
    if not (shards / "train" / "manifest.json").exists():
        build_shards(read_celeba(root), shards, ImageSpec.parse("64", "center:148"), overwrite=True, progress=False)

    loaded = samples(shards)
    for sample in loaded:  # the same tensors both ways
        for new, old in zip(
            stream.decode(sample, expected_size=(64, 64)), decode_before(sample, expected_size=(64, 64))
        ):
            assert torch.equal(new, old), sample["__key__"]
    count = len(loaded)
    per_image = {}
    for label, decode in (("now", stream.decode), ("before", decode_before)):
        seconds = best_of(args.repeats, lambda: [decode(sample, False, (64, 64)) for sample in loaded])
        per_image[label] = seconds / count * 1e6
    real = stream.decode
    epoch = {}
    try:
        for label, decode in (("now", real), ("before", decode_before)):
            stream.decode = decode

            def one_epoch():
                for _ in stream.epoch_batches(shards, "train", 64, num_workers=0):
                    pass

            epoch[label] = count / best_of(args.repeats, one_epoch)
    finally:
        stream.decode = real
    print(f"{count} train images, 64x64 JPEG shards; best of {args.repeats}")
    print(
        f"decode per image: now {per_image['now']:.0f} us, before {per_image['before']:.0f} us, "
        f"{per_image['before'] / per_image['now']:.2f}x faster"
    )
    print(
        f"one epoch, one process: now {epoch['now']:.0f} images/s, before {epoch['before']:.0f} images/s, "
        f"{epoch['now'] / epoch['before']:.2f}x"
    )


if __name__ == "__main__":
    main()
