"""Benchmark: the shard reader's cost, now against before, on the same shards in one run.

  decode     a sample's decode alone (the split's samples, already read from the tars): now JPEGs
             through torchcodec's libjpeg-turbo call and `.attr.npy` read in place, before PIL for
             every image and np.load for every vector
  epoch      one epoch of `epoch_batches` (tar reading, shuffle, decode, batching), num_workers 0,
             with the new and then the old decode patched in: what one loader worker does
  crossing   one epoch with --workers loader workers: the main process's CPU time per batch (what
             a trainer's process spends receiving a batch) with the images crossing from the workers
             as uint8 (now, for batches bound for a GPU: converted where they land) against float32
             (for the CPU; before, for every device: converted image by image in the workers)
  raw        one epoch as `epoch` (num_workers 0) from a copy of the shards whose images are stored
             uncompressed (planar RGB bytes under the same member names, read by a decode patched
             in): what storing small images uncompressed would give a worker, at what size. Not a
             format cvae-tk writes: this measures whether it should
  gpu        (CUDA only) the split's JPEGs decoded on the GPU by nvJPEG, in batches of --gpu-batch
             per call (torchcodec's decode_jpeg, the call the shard reader makes on the CPU): images/s
             against one CPU core's `decode`, and the largest difference from the CPU's pixels. Not a
             way cvae-tk reads: this measures whether it should (the issue's "decode on the GPU")

Both ways give the same tensors (checked here on every sample, and in tests/data/test_stream.py). The data: generated CelebA-format JPEGs made into 64x64 shards
(centre crop 148), as bench/train.py.

    .venv/bin/python bench/feed.py [--images 4000] [--work DIR] [--repeats 3] [--workers 2]
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
from torchcodec.decoders import decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shards import make_folder  # noqa: E402  (bench/shards.py)
from toolkit.data import stream  # noqa: E402
from toolkit.data.build import ImageSpec, build_shards  # noqa: E402
from toolkit.data.celeba import read_celeba  # noqa: E402


def decode_before(sample: dict, with_keys: bool = False, expected_size=None) -> tuple:
    """A sample's decode as it was (uint8 pixels, as the loader hands them over now): PIL for the
    image, np.load for the vector."""
    ext = "png" if "png" in sample else "jpg"
    image = Image.open(io.BytesIO(sample[ext]))
    if expected_size and 0 not in expected_size and image.size != (expected_size[1], expected_size[0]):
        raise stream.WrongSize("wrong size")
    image = image.convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
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


def write_raw_copy(shards: Path, out: Path) -> int:
    """The train split of `shards` with every image stored as planar RGB bytes [3, H, W] under its
    member name (the reader's field filter takes the same names); returns the tars' bytes."""
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "train" / "manifest.json").write_bytes((shards / "train" / "manifest.json").read_bytes())
    for path in sorted((shards / "train").glob("*.tar")):
        with tarfile.open(path) as source, tarfile.open(out / "train" / path.name, "w") as target:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                if member.name.endswith((".jpg", ".png")):
                    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                    data = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
                    member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    return sum(f.stat().st_size for f in (out / "train").glob("*.tar"))


def raw_pixels(data: bytes, expected_size) -> torch.Tensor:
    """What reading an uncompressed image would cost: its bytes viewed as uint8 [3, H, W]."""
    height, width = expected_size
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(3, height, width)


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def crossing(shards: Path, workers: int, repeats: int, device) -> tuple[float, float]:
    """One epoch with `workers` loader workers, the batches bound for `device`: None, the CPU (the
    images cross as float32, converted in the workers) or "meta" (they cross as uint8, as for a
    GPU, and the conversion goes where the batches land: on a GPU it is not the main process's CPU
    time; on "meta" it costs nothing). Returns (the main process's CPU ms per batch, images/s),
    the best of `repeats`."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        loader = iter(stream.epoch_batches(shards, "train", 64, num_workers=workers, device=device))
        next(loader)  # the workers started and running
        start, cpu, count = time.perf_counter(), time.process_time(), 0
        for _ in loader:
            count += 1
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        best = min(best, (cpu / count * 1e3, count * 64 / wall))
    return best


def gpu_decode(loaded: list[dict], batch: int, repeats: int, device: str = "cuda") -> tuple[float, int]:
    """(images/s, largest grey-level difference from the CPU decoder's pixels) of the samples' JPEGs
    decoded on `device` in batches of `batch`, one decode_jpeg call per batch (nvJPEG's batched
    decode: the way its documentation says is fast). The encoded bytes stay in CPU memory, as a
    loader worker would hand them over."""
    encoded = [torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8) for sample in loaded]
    groups = [encoded[start : start + batch] for start in range(0, len(encoded) - batch + 1, batch)]

    def decode_all():
        for group in groups:
            torch.stack(decode_jpeg(group, mode="RGB", device=device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    decode_all()  # warm-up: nvJPEG's handles and buffers are made on first use
    seconds = best_of(repeats, decode_all)
    on_device = torch.stack(decode_jpeg(groups[0], mode="RGB", device=device)).cpu()
    on_cpu = torch.stack([stream._decode_image(sample["jpg"], None) for sample in loaded[:batch]])
    return len(groups) * batch / seconds, int((on_device.int() - on_cpu.int()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--work", type=Path, help="keep the generated folder and shards here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the crossing measurement")
    parser.add_argument("--gpu-batch", type=int, default=256, help="JPEGs per nvJPEG call (the gpu way)")
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
            stream._decode_sample(sample, expected_size=(64, 64)), decode_before(sample, expected_size=(64, 64))
        ):
            assert torch.equal(new, old), sample["__key__"]
    count = len(loaded)
    per_image = {}
    for label, decode in (("now", stream._decode_sample), ("before", decode_before)):
        seconds = best_of(args.repeats, lambda: [decode(sample, False, (64, 64)) for sample in loaded])
        per_image[label] = seconds / count * 1e6
    real, real_image = stream._decode_sample, stream._decode_image
    epoch = {}
    try:
        for label, decode in (("now", real), ("before", decode_before)):
            stream._decode_sample = decode

            def one_epoch():
                for _ in stream.epoch_batches(shards, "train", 64, num_workers=0):
                    pass

            epoch[label] = count / best_of(args.repeats, one_epoch)
    finally:
        stream._decode_sample = real
    raw = work / "shards64-raw"
    raw_bytes, jpeg_bytes = write_raw_copy(shards, raw), sum(f.stat().st_size for f in shards.glob("train/*.tar"))
    stored = {"jpeg": shards, "raw": raw}
    first = {}
    try:
        for label in ("jpeg", "raw"):
            if label == "raw":
                stream._decode_image = raw_pixels

            def one_raw_epoch():
                for _ in stream.epoch_batches(stored[label], "train", 64, num_workers=0):
                    pass

            epoch[label] = count / best_of(args.repeats, one_raw_epoch)
            first[label] = next(iter(stream.epoch_batches(stored[label], "train", 64, num_workers=0)))
    finally:
        stream._decode_image = real_image
    assert all(torch.equal(a, b) for a, b in zip(first["jpeg"], first["raw"]))  # the same batches both ways
    crossed = {
        label: crossing(shards, args.workers, args.repeats, device)
        for label, device in (("now", "meta"), ("before", None))
    }
    print(f"{count} train images, 64x64 JPEG shards; best of {args.repeats}")
    print(
        f"decode per image: now {per_image['now']:.0f} us, before {per_image['before']:.0f} us, "
        f"{per_image['before'] / per_image['now']:.2f}x faster"
    )
    print(
        f"one epoch, one process: now {epoch['now']:.0f} images/s, before {epoch['before']:.0f} images/s, "
        f"{epoch['now'] / epoch['before']:.2f}x"
    )
    print(
        f"stored uncompressed, one epoch, one process: {epoch['raw']:.0f} images/s against JPEG {epoch['jpeg']:.0f}, "
        f"{epoch['raw'] / epoch['jpeg']:.2f}x; train tars {raw_bytes / 2**20:.1f} MB against {jpeg_bytes / 2**20:.1f} MB, "
        f"{raw_bytes / jpeg_bytes:.1f}x the bytes"
    )
    (now_ms, now_rate), (before_ms, before_rate) = crossed["now"], crossed["before"]
    print(
        f"crossing from {args.workers} workers, main process CPU per batch of 64: uint8 (bound for a GPU) "
        f"{now_ms:.3f} ms, float32 (bound for the CPU, as before for every device) {before_ms:.3f} ms, "
        f"{before_ms / now_ms:.2f}x less; images/s {now_rate:.0f} vs {before_rate:.0f}"
    )
    if not torch.cuda.is_available():
        print("decoded on the GPU: no CUDA device here")
    else:  # last, after the lines above are out: an optional way that may fail on a given host
        rate, difference = gpu_decode(loaded, args.gpu_batch, args.repeats)
        one_core = 1e6 / per_image["now"]
        print(
            f"decoded on the GPU (nvJPEG, {args.gpu_batch} per call): {rate:.0f} images/s, {rate / one_core:.1f}x "
            f"one CPU core's decode ({one_core:.0f}/s); largest difference from the CPU's pixels {difference} grey levels"
        )


if __name__ == "__main__":
    main()
