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
- Nothing hangs: a worker that dies (the kernel's out-of-memory killer sends SIGKILL) ends the
  build at once with one line (a `concurrent.futures` pool notices a dead worker, where
  `multiprocessing.Pool` waits forever); Ctrl-C stops the workers; workers whose main process was
  killed exit by themselves. A split is finished only when its manifest is written, so a re-run
  finishes an interrupted build.
- Mistakes are refused before any image is encoded: an --out that cannot be written or holds
  other things than shards, sizes that would not fit in memory, file extensions no reader takes.

One image on its way, and why each form is there:
1. `Record` (the reader's: key, path, attributes, box), kept in `_Records`' arrays while the
   workers run (forked workers reading Python objects would copy them: memory) and read back as a
   Record by the worker that encodes it.
2. `encode_record`: decoded, cropped, resized, re-encoded (a `Sample`: the image file's bytes and
   the attributes, what any producer gives `write_split`), then laid out as its tar members (an
   `EncodedSample`: the worker does the serializing, the writer only appends bytes).
3. `Chunk`: a task's samples packed as one bytes object to cross back from the worker (one buffer
   pickles far cheaper than a list of objects), unpacked as EncodedSamples (or `Skipped`) for
   `write_split`.
"""

from __future__ import annotations

import gc
import io
import json
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from toolkit import images
from toolkit.atomic import check_output as check_writable
from toolkit.atomic import describe_os_error
from toolkit.data.shards import EncodedSample, Sample, output_lock, prepare_output, serialize, write_split
from toolkit.data.sources import Record, SourceTable, first_few
from toolkit.errors import UserError, cut, dimensions, printable
from toolkit.images import original_bytes, readable_extensions
from toolkit.memory import check_fits, gib

# The largest side libjpeg (so Pillow) writes: every re-encoded image is a JPEG.
MAX_SIDE = 65_500


# What ImageSpec.parse reads (ASCII only: re.IGNORECASE alone would also take the Kelvin sign for 'k').
_SIZE = re.compile(r"([0-9]+)(?:[ \t]*x[ \t]*([0-9]+))?", re.ASCII | re.IGNORECASE)
_CROP = re.compile(r"center[ \t]*:[ \t]*([0-9]+)", re.ASCII | re.IGNORECASE)


def _number(digits: str | None) -> int | None:
    """The value of a run of digits 0-9, None when it is beyond any side (int() refuses 4,300 digits)."""
    if digits is None or len(digits.lstrip("0")) > 9:
        return None
    return int(digits)


@dataclass(frozen=True)
class ImageSpec:
    """What happens to each image: optional centre crop (a square of `crop` pixels), then resize to `size`."""

    size: tuple[int, int] | None  # (H, W); None keeps the original file's bytes untouched
    crop: int | None = None
    quality: int = 95  # JPEG quality of re-encoded images

    @staticmethod
    def parse(size: str, crop: str | None = None) -> "ImageSpec":
        """`--size` and `--crop` as documented: `original`, `N` (N x N) or `HxW`, sides from 4 to
        MAX_SIDE; `center:N`, N from 1 to MAX_SIDE. Numbers are written with the digits 0-9 (no sign,
        no '_', no other script's digits, all of which int() takes: '+64' and '6_4' are 64);
        'x', 'original' and 'center' in either case; blanks around the text and around 'x' or ':'
        are ignored. Anything else is one UserError quoting the text."""
        text = size.strip()
        if text.isascii() and text.lower() == "original":
            parsed = None
        else:
            found = _SIZE.fullmatch(text)
            sides = [_number(found[1]), _number(found[2] or found[1])] if found else []
            if not sides or not all(side is not None and 4 <= side <= MAX_SIDE for side in sides):
                raise UserError(
                    f"--size '{printable(cut(size))}': expected N (N x N), HxW (e.g. 218x178) or original, "
                    f"sides from 4 to {MAX_SIDE:,} (the largest JPEG) in the digits 0-9"
                )
            parsed = (sides[0], sides[1])
        side = None
        if crop is not None:
            found = _CROP.fullmatch(crop.strip())
            side = _number(found[1]) if found else None
            if side is None or not 1 <= side <= MAX_SIDE:
                raise UserError(
                    f"--crop '{printable(cut(crop))}': expected center:N (a centred N x N square, e.g. center:148), "
                    f"N from 1 to {MAX_SIDE:,} in the digits 0-9"
                )
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
    """Open (at reduced size where possible) and return the image as a viewer shows it (EXIF
    orientation, colour profile, transparency on white, 16-bit: toolkit.images) with the region to
    keep, in its pixels. Boxes and crops are in the pixels as shown (after the orientation)."""
    # closed on every way out: a multi-frame file (GIF, TIFF, animated PNG) keeps its handle after
    # decoding, and a damaged one raises with it open (ImageFile's exit closes only the file)
    with images.open_file(path) as opened:
        full_w, full_h = images.shown_size(opened)
        # Region of the original image that ends up in the output, in original pixels (even when the
        # decode below is reduced: the box is scaled to the decoded pixels at the end).
        if bbox is not None:
            box = tuple(float(v) for v in bbox_region(bbox, full_w, full_h))
        else:
            box = (0.0, 0.0, float(full_w), float(full_h))
        if spec.crop is not None:
            box = images.centre_crop(box, spec.crop)
        if opened.format == "JPEG" and spec.size is not None:
            # Ask the decoder for the smallest scale (1/2, 1/4, 1/8) that keeps the region >= the target
            # (a ratio: the same for the stored pixels, which an EXIF orientation may turn).
            out_h, out_w = spec.size
            scale = max(out_w / max(box[2] - box[0], 1), out_h / max(box[3] - box[1], 1))
            opened.draft("RGB", (math.ceil(opened.width * scale), math.ceil(opened.height * scale)))
        image = images.as_viewed(opened)  # decodes, always RGB
    # The reduced decode rounds each side up, so the two axes scale slightly differently.
    fx, fy = image.size[0] / full_w, image.size[1] / full_h
    return image, (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)


def encode_record(record: Record, spec: ImageSpec, num_attributes: int) -> EncodedSample | Skipped:
    """One record -> a sample serialized as tar members, or a reason to skip it (corrupt or unreadable image)."""
    sample = _encode_image(record, spec)
    return sample if isinstance(sample, Skipped) else serialize(sample, num_attributes)


def _encode_image(record: Record, spec: ImageSpec) -> Sample | Skipped:
    try:
        if spec.size is None and record.bbox is None:
            # The file's bytes where a plain decoder shows them as a viewer does; else (EXIF-rotated,
            # CMYK, colour profile, transparent, 16-bit) the viewed pixels re-encoded (toolkit.images).
            data, ext, size = original_bytes(record.path, spec.quality)
            return Sample(record.key, data, ext, record.attributes, size)
        image, box = _decode(record.path, spec, record.bbox)
        if spec.crop is not None and (
            min(box[:2]) < -0.5 or box[2] > image.width + 0.5 or box[3] > image.height + 0.5
        ):
            shown = _shown_size(record.path)  # (`image` may be a reduced decode)
            return Skipped(
                record.key,
                f"{record.path.name}: --crop center:{spec.crop} does not fit the image"
                + (f" ({dimensions(*shown)})" if shown else ""),
            )
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


def _fixed_bytes(values, count: int) -> np.ndarray:
    """A fixed-width bytes array of `values()` (a fresh iterator each call: one pass for the width,
    one to fill)."""
    width = max((len(value) for value in values()), default=1)
    return np.fromiter(values(), dtype=f"S{max(width, 1)}", count=count)


class _Records:
    """One split's records as a few numpy arrays. Forked workers read these instead of the table's
    Python objects: reading an object writes its reference count, which copies its memory page
    into the worker; array buffers stay shared, so a worker's memory does not grow with the data set."""

    def __init__(self, records: list[Record]):
        # Filled straight from the records, without a temporary list per field: the lists' objects
        # (a bytes object per path, a tuple of four floats per box) cost several times the arrays
        # and, freed, mostly stay in the process (measured: 10 MiB of RSS at 50,000 records, now 4).
        self.keys = _fixed_bytes(lambda: (r.key.encode() for r in records), len(records))
        self.paths = _fixed_bytes(lambda: (os.fsencode(r.path) for r in records), len(records))
        self.attributes = np.stack([r.attributes for r in records]) if records else np.zeros((0, 0), np.uint8)
        self.bboxes = np.full((len(records), 4), np.nan)
        for index, record in enumerate(records):
            if record.bbox is not None:
                self.bboxes[index] = record.bbox

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Record:
        bbox = self.bboxes[index]
        return Record(
            self.keys[index].decode(),
            Path(os.fsdecode(self.paths[index])),
            self.attributes[index],
            None if np.isnan(bbox[0]) else tuple(float(v) for v in bbox),
        )


# Worker state: the records and options arrive once per worker (inherited under fork), so a task
# is just (split, start, stop) and a result one bytes object per chunk: little pickling per image.
_WORKER: dict = {}
CHUNK = 64  # records per task; fewer for big images (`_chunk_size`)
CHUNK_BYTES = 32 << 20  # at most this many bytes of pixels in one task's results
WORKER_MEMORY = 16 << 20  # a forked worker's own memory besides its images (measured: 8-16 MiB USS)


def _chunk_size(spec: ImageSpec) -> int:
    """Records per task: 64, or as many images as CHUNK_BYTES of pixels hold (at least one)."""
    if spec.size is None:
        return CHUNK
    return max(1, min(CHUNK, CHUNK_BYTES // (3 * spec.size[0] * spec.size[1])))


def _window(workers: int) -> int:
    """Tasks in flight: enough to keep every worker busy, few enough that results never pile up."""
    return 2 * workers


def _init_worker(splits: dict[str, _Records], spec: ImageSpec, num_attributes: int) -> None:
    _WORKER.update(splits=splits, spec=spec, num_attributes=num_attributes)


def _start_worker(splits: dict[str, _Records], spec: ImageSpec, num_attributes: int, parent: int) -> None:
    """A pool worker's initializer: the state; Ctrl-C left to the main process, which stops the
    workers (instead of each printing a traceback); an exit of its own once the main process is gone."""
    _init_worker(splits, spec, num_attributes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    # A worker waits for its next task on a pipe whose write end every worker inherited, so it never
    # sees that pipe close when the main process is killed (SIGKILL): it watches its parent instead.
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


@dataclass
class Chunk:
    """One task's results as they cross from a worker to the writer: the tar members of all its
    samples in one bytes object, and per record (key, length, (H, W)) or (key, -1, reason) when it
    was skipped."""

    data: bytes
    index: list[tuple]

    def results(self) -> list[EncodedSample | Skipped]:
        results, offset = [], 0
        for key, length, info in self.index:
            if length < 0:
                results.append(Skipped(key, info))
            else:
                results.append(EncodedSample(key, self.data[offset : offset + length], info))
                offset += length
        return results


def _encode_chunk(task: tuple[str, int, int]) -> Chunk:
    """Encode records [start, stop) of a split (in a worker, or in-process with one worker)."""
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
    return Chunk(b"".join(blobs), index)


def _chunks(
    table: SourceTable, chunk: int, executor: ProcessPoolExecutor | None, workers: int
) -> Iterator[list[EncodedSample | Skipped]]:
    """Encoded chunks of every split, in input order. Tasks are index ranges (tiny); a bounded
    window of them is in flight, and results are written as they arrive, so memory stays flat; one
    stream over all splits keeps every worker busy up to the very end (no drain between splits).
    A dead worker raises BrokenProcessPool here (from `result()` or `submit`)."""
    tasks = (
        (split, i, min(i + chunk, len(records)))
        for split, records in table.splits.items()
        for i in range(0, len(records), chunk)
    )
    if executor is None:
        yield from (_encode_chunk(task).results() for task in tasks)
        return
    window = deque(executor.submit(_encode_chunk, task) for _, task in zip(range(_window(workers)), tasks))
    while window:
        done = window.popleft().result()
        task = next(tasks, None)
        if task is not None:
            window.append(executor.submit(_encode_chunk, task))
        yield done.results()


def _split_samples(
    chunks, count: int, name: str, strict: bool, skipped: list, extra: dict, bar
) -> Iterator[EncodedSample]:
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


def _shown_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as a viewer shows it (header only), or None when it does not open."""
    try:
        with images.open_file(path) as image:
            return images.shown_size(image)
    except (ValueError, OSError):
        return None


def require_train_and_test(table: SourceTable) -> None:
    """`cvae-tk shards` builds what training reads: a train and a test split. A table without one
    (`--test-fraction 0`, a one-image table, a split column without test rows) is refused before any
    work; built, its train split alone would be refused by `train` as an unfinished build."""
    for needed in ("train", "test"):
        if not table.splits.get(needed):
            counts = ", ".join(f"{len(records)} {split}" for split, records in table.splits.items() if records)
            raise UserError(
                f"{table.source}: no {needed} images ({counts or 'no images at all'}); training and evaluation need "
                "a train and a test split (shards folder: --test-fraction above 0, rows of both in --split-column, or a "
                "test/ folder beside train/)"
            )


def constant_attributes(table: SourceTable) -> str | None:
    """A warning for attributes with one value in every train image (a column of a table that is all 1,
    species of a subset of CUB that has none of their birds): the model never sees the other value,
    so it cannot learn what setting it changes. None when every attribute varies."""
    train = table.splits.get("train")
    if not train or not table.attributes:
        return None
    matrix = np.stack([record.attributes for record in train])
    low, high = matrix.min(axis=0), matrix.max(axis=0)
    constant = [f"{name} (always {low[i]})" for i, name in enumerate(table.attributes) if low[i] == high[i]]
    if not constant:
        return None
    return (
        f"{table.source}: {len(constant)} of {len(table.attributes)} attribute(s) have the same value in every "
        f"train image (first: {first_few(constant)}): the model cannot learn to change them"
    )


def check_inputs(table: SourceTable, spec: ImageSpec, workers: int) -> None:
    """What can be told before any image is encoded, refused in one line: file extensions no
    reader takes, a --crop larger than the images, a build that would not fit in memory."""
    readable = readable_extensions()
    kept = {".jpg", ".jpeg", ".png"}  # --size original keeps the bytes: JPEG or PNG only
    bad = [
        Path(*r.path.parts[-2:]).as_posix()
        for records in table.splits.values()
        for r in records
        if r.path.suffix.lower() not in (kept if spec.size is None and r.bbox is None else readable)
    ]
    if bad:
        expected = (
            ".jpg, .jpeg or .png (--size original keeps the files' bytes)"
            if spec.size is None
            else "the extension of an image format Pillow reads (.jpg, .png, .webp, .tif, .bmp, .gif, ...)"
        )
        raise UserError(
            f"{table.source}: {len(bad)} image file name(s) without a usable image extension "
            f"(first: {first_few(bad)}); expected {expected}"
        )
    if spec.crop is not None:
        for split, records in table.splits.items():
            shown = _shown_size(records[0].path) if records else None
            if shown and spec.crop > min(shown):
                raise UserError(
                    f"--crop center:{spec.crop} is larger than the images ({split}'s first, "
                    f"{records[0].path.name}, is {dimensions(*shown)}); expected a side no larger than the image's"
                )
    chunk = _chunk_size(spec)
    pixels = 3 * spec.size[0] * spec.size[1] if spec.size is not None else 0
    # each worker: the decoded image, its resized copy, the JPEG (no bigger than the pixels) and a
    # task's results; the main process: the results of the tasks in flight
    per_worker = WORKER_MEMORY + (3 + chunk) * pixels
    check_fits(
        workers * per_worker + _window(workers) * chunk * pixels,
        f"building {'x'.join(map(str, spec.size)) if spec.size else 'original-size'} shards with {workers} worker(s)",
        f"choose a smaller --size or fewer --workers (each needs about {gib(per_worker)})",
    )


def _check_unique_keys(source: str, splits: dict[str, _Records]) -> None:
    """Every sample key once in the data set (the readers make them so; a table built by hand may
    not), checked on the compact arrays, before any image is encoded."""
    keys = np.sort(np.concatenate([records.keys for records in splits.values()] or [np.zeros(0, "S1")]))
    repeated = np.unique(keys[1:][keys[1:] == keys[:-1]])
    if len(repeated):
        raise UserError(
            f"{source}: {len(repeated)} sample key(s) given to more than one image "
            f"({first_few([key.decode() for key in repeated])}); expected one key per image"
        )


def _worker_death(executor: ProcessPoolExecutor, out: Path, split: str) -> str:
    """The one line for a pool whose worker died, saying how it died where its exit code tells."""
    # private, but the only record of the exit codes
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        process.join(1)  # the pool is stopping them: wait a moment, so that every exit code is known
    codes = [p.exitcode for p in processes if p.exitcode not in (None, 0, -signal.SIGTERM)]
    code = codes[0] if codes else None
    if code == -signal.SIGKILL:
        how = "it was killed (SIGKILL), as the kernel's out-of-memory killer does"
    elif code is not None and code < 0:
        how = (
            f"it was killed by {signal.Signals(-code).name}"
            if -code in signal.valid_signals()
            else f"it was killed by signal {-code}"
        )
    elif code is not None:
        how = f"it exited with status {code}"
    else:
        how = "it ended abruptly"
    return (
        f"a shard-building worker process died while the {split} split of {out} was being written: {how}; "
        f"the shards finished so far are kept and that split has no manifest (unfinished): run the same "
        f"command again to finish the build, with fewer --workers if memory is short"
    )


def _stop(executor: ProcessPoolExecutor) -> None:
    """End the workers now, also mid-task (shutdown alone waits for the running tasks;
    Python 3.14 has executor.terminate_workers() for this)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():  # SIGTERM handled or ignored by something the worker imported
            process.kill()
            process.join()
    # A worker stopped while it was sending a result (a chunk of images is MBs) leaves half a message
    # in the result pipe, and the executor's manager thread, reading it, would wait for the rest for
    # ever (shutdown joins that thread: the build hung after a full disk or Ctrl-C). With every
    # worker gone, closing our own copy of the pipe's write end turns that wait into an end of file,
    # which the executor handles as a broken pool.
    results = getattr(executor, "_result_queue", None)
    if results is not None:
        results._writer.close()
    executor.shutdown(wait=True, cancel_futures=True)


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
    """Write every split of `table` under `out`, replacing whatever shards `out` held (see
    `prepare_output`); returns {split: manifest}. workers=0: all cores; shard_size None:
    `auto_shard_size` of each split."""
    out = Path(out)
    options = _options(table, spec, shard_size)
    workers = workers or os.cpu_count() or 1
    check_writable(out, folder=True)
    check_inputs(table, spec, workers)
    chunk = _chunk_size(spec)
    manifests = {}
    state = ({split: _Records(records) for split, records in table.splits.items()}, spec, len(table.attributes))
    _check_unique_keys(table.source, state[0])
    _init_worker(*state)  # the in-process path (workers=1) reads the same state
    # fork: workers inherit the imported modules and the records, so the pool starts in milliseconds;
    # frozen (the workers fork at the first task), the parent's objects are never visited by a
    # worker's garbage collector (which would write to, and so copy, their pages)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with output_lock(out):  # one build at a time writes `out`
        total = sum(len(records) for records in table.splits.values())
        executor, split = None, next(iter(table.splits), "")
        gc.freeze()
        try:
            prepare_output(out, table.splits, options, overwrite)
            if workers > 1:
                executor = ProcessPoolExecutor(
                    workers, mp_context=context, initializer=_start_worker, initargs=(*state, os.getpid())
                )
            with tqdm(
                total=total, desc=f"shards {table.source}", unit="img", disable=not progress, mininterval=1
            ) as bar:
                chunks = _chunks(table, chunk, executor, workers)
                for split, records in table.splits.items():
                    skipped = [{"key": s.split(":", 1)[0], "reason": s} for s in table.skipped.get(split, [])]
                    extra: dict = {"build": options}
                    samples = _split_samples(
                        chunks, -(-len(records) // chunk), f"{table.source} {split}", strict, skipped, extra, bar
                    )
                    size = spec.size or (0, 0)  # original: filled in from the images themselves
                    manifests[split] = write_split(
                        samples,
                        out,
                        split,
                        table.attributes,
                        size,
                        table.source,
                        shard_size or auto_shard_size(len(records)),
                        extra=extra,
                        keys_checked=True,  # _check_unique_keys
                    )
        except BrokenProcessPool:
            raise UserError(_worker_death(executor, out, split)) from None
        except OSError as error:  # the main process only writes: a full disk, a folder made read-only meanwhile
            where = f" ({error.filename})" if error.filename else ""
            raise UserError(
                f"could not write the shards in {out}{where}: {describe_os_error(error)}; the {split} split "
                f"has no manifest (unfinished): free some space or fix the folder, then run the same command again"
            ) from None
        finally:
            gc.unfreeze()
            _WORKER.clear()
            if executor is not None:
                _stop(executor)
        return manifests
