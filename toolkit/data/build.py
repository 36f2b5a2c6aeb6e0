"""Build shards from a reader's table: decode, crop, resize and encode images in worker processes.

    table = read_celeba("data/celeba")
    build_shards(table, "shards/celeba", ImageSpec.parse("64", "center:148"), workers=0)

- Every core is used (`workers=0`); results come back in input order, so the same input and
  options give byte-identical shards whatever the number of workers.
- JPEGs are decoded at reduced size when shrinking (PIL's draft mode: the decoder skips the
  DCT detail it would throw away), which is most of the speed.
- Memory stays flat: workers get index ranges into compact arrays of the records (not the
  table's Python objects), results are written as they arrive; no list of decoded images.
- A corrupt or truncated image is skipped, counted and listed in the manifest (`strict=True`
  fails instead, writing no manifest).
"""

from __future__ import annotations

import gc
import io
import json
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from toolkit.data.shards import MANIFEST, EncodedSample, Sample, serialize, write_split
from toolkit.data.sources import Record, SourceTable
from toolkit.errors import UserError



@dataclass(frozen=True)
class ImageSpec:
    """What happens to each image: optional centre crop (a square of `crop` pixels), then resize to `size`."""

    size: tuple[int, int] | None  # (H, W); None keeps the original file's bytes untouched
    crop: int | None = None
    quality: int = 95  # JPEG quality of re-encoded images

    @staticmethod
    def parse(size: str, crop: str | None = None) -> "ImageSpec":
        text = size.strip().lower()
        if text == "original":
            parsed = None
        else:
            try:
                parts = [int(p) for p in text.split("x")] if "x" in text else [int(text)] * 2
            except ValueError:
                parsed = None
                parts = []
            if len(parts) != 2 or min(parts) < 4:
                raise UserError(f"--size '{size}': expected N (N x N), HxW (e.g. 218x178) or original, sides >= 4")
            parsed = (parts[0], parts[1])
        side = None
        if crop:
            kind, _, value = crop.partition(":")
            if kind != "center" or not value.isdigit() or int(value) < 1:
                raise UserError(f"--crop '{crop}': expected center:N (a centred N x N square, e.g. center:148)")
            side = int(value)
        if parsed is None and side is not None:
            raise UserError("--crop needs a --size other than original (cropping re-encodes the image)")
        return ImageSpec(parsed, side)


@dataclass
class Skipped:
    key: str
    reason: str


def bbox_region(bbox: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """The region (left, top, right, bottom) kept around an object box (x, y, w, h) of a width x height image.

    The convention of the CUB text-to-image work, from StackGAN (Zhang et al. 2017: `custom_crop` in
    misc/utils.py of the TensorFlow code, `TextDataset.get_img` in StackGAN-Pytorch's
    code/miscc/datasets.py), kept by AttnGAN (`get_imgs` in code/datasets.py) and its successors: a
    square of side 2r, r = int(0.75 * max(w, h)), i.e. 1.5 x the box's longer side, around the box
    centre, clipped to the image; whole pixels, truncated as there (they also read the boxes as
    ints). So a square output never stretches the bird and keeps some context around it; only where
    the square meets the image border is the region narrower than square (then resized to the
    output, as there). A non-square --size HxW gets the same region, resized to HxW.
    """
    x, y, w, h = (int(v) for v in bbox)
    r = int(max(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    region = (max(0, cx - r), max(0, cy - r), min(width, cx + r), min(height, cy + r))
    if region[2] <= region[0] or region[3] <= region[1]:  # a box off the image: nothing to keep
        raise ValueError(f"bounding box {' '.join(f'{v:g}' for v in bbox)} lies outside the {width}x{height} image")
    return region


def _decode(path: Path, spec: ImageSpec, bbox) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Open (at reduced size where possible) and return the image with the region to keep, in its pixels."""
    image = Image.open(path)
    full_w, full_h = image.size
    # Region of the original image that ends up in the output, in original pixels (even when the
    # decode below is reduced: the box is scaled to the decoded pixels at the end).
    if bbox is not None:
        box = tuple(float(v) for v in bbox_region(bbox, full_w, full_h))
    else:
        box = (0.0, 0.0, float(full_w), float(full_h))
    if spec.crop is not None:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half = spec.crop / 2
        box = (cx - half, cy - half, cx + half, cy + half)
    if image.format == "JPEG" and spec.size is not None:
        # Ask the decoder for the smallest scale (1/2, 1/4, 1/8) that keeps the region >= the target.
        out_h, out_w = spec.size
        scale = max(out_w / max(box[2] - box[0], 1), out_h / max(box[3] - box[1], 1))
        image.draft("RGB", (math.ceil(full_w * scale), math.ceil(full_h * scale)))
    # The reduced decode rounds each side up, so the two axes scale slightly differently.
    fx, fy = image.size[0] / full_w, image.size[1] / full_h
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)


def encode_record(record: Record, spec: ImageSpec, num_attributes: int) -> EncodedSample | Skipped:
    """One record -> a sample serialized as tar members, or a reason to skip it (corrupt or unreadable image)."""
    sample = _encode_image(record, spec)
    return sample if isinstance(sample, Skipped) else serialize(sample, num_attributes)


def _encode_image(record: Record, spec: ImageSpec) -> Sample | Skipped:
    try:
        if spec.size is None and record.bbox is None:
            data = record.path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
                image.draft("RGB", (1, 1))  # decode at 1/8 scale: cheap, still catches truncated files
                image.load()
            if fmt not in ("JPEG", "PNG"):
                return Skipped(record.key, f"{record.path.name}: {fmt} image, expected JPEG or PNG for --size original")
            return Sample(record.key, data, "jpg" if fmt == "JPEG" else "png", record.attributes, (height, width))
        image, box = _decode(record.path, spec, record.bbox)
        if spec.size is None:  # bounding box only: keep its pixels
            image = image.crop(tuple(round(v) for v in box))
        else:
            # Crop and resize in one step (box in sub-pixel precision). PIL's bilinear filter widens
            # with the scale factor (antialiased); after the draft decode the remaining factor is
            # < 2, where it is close to bicubic at about half the cost.
            image = image.resize((spec.size[1], spec.size[0]), Image.BILINEAR, box=box)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=spec.quality)
        return Sample(record.key, buffer.getvalue(), "jpg", record.attributes, (image.height, image.width))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return Skipped(record.key, f"{record.path.name}: {' '.join(str(error).split()) or type(error).__name__}")


class _Records:
    """One split's records as a few numpy arrays. Forked workers read these instead of the table's
    Python objects: reading an object writes its reference count, which copies its memory page
    into the worker; array buffers stay shared, so a worker's memory does not grow with the data set."""

    def __init__(self, records: list[Record]):
        self.keys = np.array([r.key.encode() for r in records], dtype=np.bytes_)
        self.paths = np.array([os.fsencode(r.path) for r in records], dtype=np.bytes_)
        self.attributes = np.stack([r.attributes for r in records]) if records else np.zeros((0, 0), np.uint8)
        self.bboxes = np.array([r.bbox if r.bbox is not None else (np.nan,) * 4 for r in records], dtype=np.float64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Record:
        bbox = self.bboxes[index]
        return Record(self.keys[index].decode(), Path(os.fsdecode(self.paths[index])), self.attributes[index],
                      None if np.isnan(bbox[0]) else tuple(float(v) for v in bbox))


# Worker state: the records and options arrive once per worker (inherited under fork), so a task
# is just (split, start, stop) and a result one bytes object per chunk: little pickling per image.
_WORKER: dict = {}
CHUNK = 64


def _init_worker(splits: dict[str, _Records], spec: ImageSpec, num_attributes: int) -> None:
    _WORKER.update(splits=splits, spec=spec, num_attributes=num_attributes)


def _encode_chunk(task: tuple[str, int, int]) -> tuple[bytes, list]:
    """Encode records [start, stop) of a split. Returned packed (one bytes object plus a small
    index), which crosses the process boundary far cheaper than a list of objects."""
    split, start, stop = task
    records, spec, num_attributes = _WORKER["splits"][split], _WORKER["spec"], _WORKER["num_attributes"]
    blobs, index = [], []
    for position in range(start, stop):
        result = encode_record(records[position], spec, num_attributes)
        if isinstance(result, Skipped):
            index.append((result.key, -1, result.reason))
        else:
            blobs.append(result.data)
            index.append((result.key, len(result.data), result.size))
    return b"".join(blobs), index


def _unpack(packed: tuple[bytes, list]) -> list[EncodedSample | Skipped]:
    blob, index = packed
    results, offset = [], 0
    for key, length, info in index:
        if length < 0:
            results.append(Skipped(key, info))
        else:
            results.append(EncodedSample(key, blob[offset : offset + length], info))
            offset += length
    return results


def _chunks(table: SourceTable, pool) -> Iterator[list[EncodedSample | Skipped]]:
    """Encoded chunks of every split, in input order. Tasks are index ranges (tiny), and results
    are written as fast as they arrive, so memory stays flat; one stream over all splits keeps
    every worker busy up to the very end (no drain between splits)."""
    tasks = [(split, i, min(i + CHUNK, len(records))) for split, records in table.splits.items() for i in range(0, len(records), CHUNK)]
    return map(_unpack, pool.imap(_encode_chunk, tasks) if pool is not None else map(_encode_chunk, tasks))


def _split_samples(chunks, count: int, name: str, strict: bool, skipped: list, extra: dict, bar) -> Iterator[EncodedSample]:
    """The next `count` chunks' samples; skips are listed (or fatal with strict), then `extra` is filled."""
    sizes: set = set()
    for _ in range(count):
        chunk = next(chunks)
        bar.update(len(chunk))
        for result in chunk:
            if isinstance(result, Skipped):
                if strict:
                    raise UserError(f"corrupt image in {name}: {result.reason} (--strict)")
                skipped.append({"key": result.key, "reason": result.reason})
                continue
            if len(sizes) < 2:  # one size, or "varied": no need to keep more
                sizes.add(result.size)
            yield result
    if skipped and not sizes:
        raise UserError(f"every image of {name} was skipped, e.g. {skipped[-1]['reason']}")
    extra["skipped"] = {"count": len(skipped), "samples": skipped}
    if extra["build"]["image"]["size"] is None:  # original images: one size, or null when they vary
        extra["image_size"] = list(sizes.pop()) if len(sizes) == 1 else None


def auto_shard_size(count: int) -> int:
    """Samples per shard when none is given: about 256 shards per split, so that even 8 GPUs x 8
    loader workers each read several (each reader fills only whole batches from its shards), but
    never under 100 or over 1,000 samples (a few MB of small images: cheap to open per epoch).
    CelebA's 162,770 train images: 256 shards of 636; CUB's 5,994: 60 of 100."""
    return min(1000, max(100, -(-count // 256)))


def _options(table: SourceTable, spec: ImageSpec, shard_size: int | None) -> dict:
    options = {"source": table.source, "image": asdict(spec), "shard_size": shard_size}
    if any(r.bbox is not None for records in table.splits.values() for r in records):
        options["bbox_crop"] = "square 1.5 x longer side"  # bbox_region's convention: another crop is another build
    # as JSON would give it back, so it compares equal to what a manifest holds
    return json.loads(json.dumps(options))


def check_output(out: Path, options: dict, overwrite: bool) -> None:
    """Refuse to mix with shards that another build finished in `out`, unless overwrite."""
    if overwrite or not out.exists():
        return
    for manifest in sorted(out.glob(f"*/{MANIFEST}")):
        try:
            previous = json.loads(manifest.read_text()).get("build")
        except ValueError:
            previous = None
        if previous != options:
            raise UserError(
                f"{out} already holds shards from another build ({manifest}); choose another --out or pass --overwrite"
            )


def build_shards(
    table: SourceTable,
    out: str | Path,
    spec: ImageSpec,
    workers: int = 0,
    shard_size: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Write every split of `table` under `out`; returns {split: manifest}. workers=0: all cores;
    shard_size None: `auto_shard_size` of each split."""
    out = Path(out)
    options = _options(table, spec, shard_size)
    check_output(out, options, overwrite)
    workers = workers or os.cpu_count() or 1
    manifests = {}
    state = ({split: _Records(records) for split, records in table.splits.items()}, spec, len(table.attributes))
    _init_worker(*state)  # the in-process path (workers=1) reads the same state
    # fork: workers inherit the imported modules and the records, so the pool starts in milliseconds;
    # frozen, the parent's objects are never visited by a worker's garbage collector (which would
    # write to, and so copy, their pages)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    gc.freeze()
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=state) if workers > 1 else None
    finally:
        gc.unfreeze()
    total = sum(len(records) for records in table.splits.values())
    try:
        with tqdm(total=total, desc=f"shards {table.source}", unit="img", disable=not progress, mininterval=1) as bar:
            chunks = _chunks(table, pool)
            for split, records in table.splits.items():
                skipped = [{"key": s.split(":", 1)[0], "reason": s} for s in table.skipped.get(split, [])]
                extra: dict = {"build": options}
                samples = _split_samples(chunks, -(-len(records) // CHUNK), f"{table.source} {split}", strict, skipped, extra, bar)
                size = spec.size or (0, 0)  # original: filled in from the images themselves
                manifests[split] = write_split(samples, out, split, table.attributes, size, table.source, shard_size or auto_shard_size(len(records)), extra=extra)
    finally:
        _WORKER.clear()
        if pool is not None:
            pool.terminate()
    return manifests
