"""Benchmark: CelebA-format folder (178 x 218 JPEGs) -> 64 x 64 WebDataset shards.

Compares, in one run, on the same generated folder:
  plain     a decode -> resize -> encode loop in one process (full-size decode, no shards)
  build x1  `cvae-tk shards celeba` with 1 process
  build xN  `cvae-tk shards celeba` with every core
and prints images/s and the ratios; writes bench/results/shards.json.

    .venv/bin/python bench/shards.py [--images 8000] [--size 64] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.data.build import ImageSpec, build_shards  # noqa: E402
from toolkit.data.celeba import read_celeba  # noqa: E402

NAMES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]


def make_folder(root: Path, count: int) -> None:
    """A CelebA-layout folder of photo-like 178x218 JPEGs (smooth shapes + grain, quality 90, ~8-12 kB)."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases = []
    for _ in range(16):  # a few distinct smooth backgrounds, varied per image by grain and shift
        field = rng.integers(0, 256, (28, 23, 3), dtype=np.uint8)
        bases.append(Image.fromarray(field).resize((178, 218), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3)))
    attributes = ["%d" % count, " ".join(NAMES)]
    partition = []
    for index in range(count):
        name = f"{index + 1:06d}.jpg"
        base = np.asarray(bases[index % 16], dtype=np.int16)
        grain = rng.integers(-12, 13, base.shape, dtype=np.int16)
        pixels = np.clip(np.roll(base, index % 37, axis=1) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / name, quality=90)
        values = rng.choice(["-1", " 1"], len(NAMES))
        attributes.append(name + " " + " ".join(values))
        partition.append(f"{name} {0 if index % 10 < 8 else 1 if index % 10 == 8 else 2}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attributes) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")


def plain_loop(paths: list[Path], size: int) -> float:
    """The naive way: full-size decode, resize, encode, one image after another. Returns images/s."""
    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        image.save(io.BytesIO(), format="JPEG", quality=95)
    return len(paths) / (time.perf_counter() - start)


def timed_build(root: Path, out: Path, size: int, workers: int) -> float:
    start = time.perf_counter()
    table = read_celeba(root)
    manifests = build_shards(table, out, ImageSpec.parse(str(size)), workers=workers, overwrite=True, progress=False)
    elapsed = time.perf_counter() - start
    return sum(m["count"] for m in manifests.values()) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each way; the median counts")
    parser.add_argument("--keep", type=Path, help="keep the generated folder and shards here")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="cvae-bench-"))
    root = work / "celeba"
    if not (root / "list_attr_celeba.txt").exists():
        make_folder(root, args.images)
    paths = sorted((root / "img_align_celeba").glob("*.jpg"))[: args.images]
    cores = os.cpu_count() or 1
    try:
        runs = {"plain": [], "one": [], "many": []}
        for _ in range(args.repeats):  # interleaved, so a noisy moment hits every way alike
            runs["plain"].append(plain_loop(paths[: min(len(paths), 1500)], args.size))
            runs["one"].append(timed_build(root, work / "shards1", args.size, workers=1))
            runs["many"].append(timed_build(root, work / "shardsN", args.size, workers=cores))
        plain, one, many = (statistics.median(runs[k]) for k in ("plain", "one", "many"))
        same = all(
            (work / "shards1" / split / name).read_bytes() == (work / "shardsN" / split / name).read_bytes()
            for split in ("train", "val", "test")
            for name in json.loads((work / "shards1" / split / "manifest.json").read_text())["shards"]
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("plain decode-resize-encode loop, 1 process", plain),
        ("cvae-tk shards, 1 process", one),
        (f"cvae-tk shards, {cores} processes", many),
    ]
    print(
        f"\n{len(paths)} CelebA-format JPEGs 178x218 -> {args.size}x{args.size} shards, {cores} cores, "
        f"median of {args.repeats} interleaved runs"
    )
    print(f"{'way':48} {'images/s':>10}")
    for name, rate in rows:
        print(f"{name:48} {rate:10.0f}")
    print(
        f"speed-up 1 -> {cores} processes: {many / one:.2f}x; all cores vs plain loop: {many / plain:.2f}x; "
        f"shards identical across worker counts: {same}"
    )
    peak_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak resident memory: main process {peak_main:.0f} MiB, largest worker {peak_worker:.0f} MiB")
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "images": len(paths),
        "size": args.size,
        "cores": cores,
        "plain_loop_images_per_s": plain,
        "build_1_process_images_per_s": one,
        "build_all_cores_images_per_s": many,
        "speedup_1_to_all": many / one,
        "identical_across_workers": same,
        "runs": runs,
        "peak_rss_main_mib": peak_main,
        "peak_rss_worker_mib": peak_worker,
    }
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "shards.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
