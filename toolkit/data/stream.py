"""The WebDataset pipeline that feeds training and evaluation.

Batches are (images float32 [B, 3, H, W] in [0, 1], attributes float32 [B, A]), on the device the
caller names (`device=`; the CPU by default). Bound for a GPU, the images cross from the DataLoader
workers as uint8, pinned, and become float only there: a quarter of the bytes to move between
processes, pin and copy, and a copy that does not wait for the GPU (see `_stages`).

- `train_batches`: an endless stream. Shards are *resampled* (drawn with replacement, seeded by
  seed, rank and worker), so every rank always has a next batch and step-based training never
  hangs on uneven shards; samples are shuffled in a buffer before they are decoded. An "epoch" is
  therefore a number of samples, not a pass that sees each sample exactly once.
- `epoch_batches`: one epoch for one rank of N. Shards are shuffled per epoch with the seed and dealt
  to ranks, then to workers; each sample is seen at most once per epoch across all ranks (disjoint),
  and every rank gets exactly the same number of batches (the smallest any rank can fill), because
  an unequal count hangs DDP. The samples that do not fill those batches wait for another epoch.
  `EpochStream` gives the same epochs one after another from one DataLoader whose workers are
  started once (the trainer's and the classifier's way), not once per epoch.
- `eval_batches`: one ordered pass over a split, every sample exactly once (for metrics, grids).

The loaders are already rank- and worker-aware: do not hand them to `accelerator.prepare`.

Unreadable data is skipped and counted, never a crash and never silent. A shard that cannot be
opened, breaks off (a truncated tar) or ends before the count its manifest gives loses the samples it
did not deliver; a sample whose image or attributes do not decode (or do not match the split's size
and attribute count) loses itself. Each loss travels down the pipeline as a skip report (also out of
DataLoader workers, in order, so the counts are deterministic) and is counted in the main process
by the `Skips` of the returned `Batches`, which warns once per shard and reason and stops with a
`UserError` once the skipped fraction passes its bound (`data.max_skipped_fraction`, default 1 %):
see `Skips` for how the fraction is taken.
"""

from __future__ import annotations

import ast
import io
import json
import multiprocessing
import random
import re
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import default_collate
from torchcodec.decoders import decode_jpeg

from toolkit.data.batches import (  # noqa: F401 (Skips: re-exported)
    DEFAULT_MAX_SKIPPED_FRACTION,
    Batches,
    Skip,
    Skips,
    to_unit_float,
)
from toolkit.data.shards import SPLIT_NAME, npy_header
from toolkit.errors import UserError, one_line
from toolkit.formats import FIELDS, MANIFEST

NPY_HEADER_BYTES = 128  # np.save's header of a 1-D uint8 vector (format 1.0, padded to 64-byte alignment)
# A shard name from a manifest: a plain file name, so it cannot point outside the split's folder
# (`../x.tar`, `/etc/x`) nor into the command of a `pipe:` URL (`x.tar; rm ...`).
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar")
# The tar members a sample is made of (`<key>.<field>`). Members are read into memory, never
# extracted; a member name is only split into key and field. Other members (links, folders,
# webdataset's `__key__` / `__url__` names, stray files) are skipped unread, so they cannot clash
# with the sample's own fields.


# --- seeds: every random choice of a pass follows from the run's seed ---------------------------------

SEED_RADIX = 1_000_003  # a prime above any epoch, segment, or rank and worker's `worker_part`


def derive_seed(seed: int, part: int, radix: int = SEED_RADIX) -> int:
    """The seed of one part of a run (an epoch, a segment, a rank's worker) from the run's seed:
    distinct (seed, part) give distinct seeds while 0 <= part < radix. These are the formulas runs
    have always used, so a checkpoint resumed by a newer cvae-tk reads the same batches."""
    return seed * radix + part


def worker_part(rank: int, worker: int) -> int:
    """One number per (rank, DataLoader worker), distinct for workers < 1,009 (and ranks < 991)."""
    return rank * 1_009 + worker


# What webdataset's gopen is for: a `pipe:` command or a URL whose scheme starts it (http://, gs://...).
_URL = re.compile(r"pipe:|[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(shards: str | Path) -> bool:
    """Whether `shards` is read through webdataset's gopen (a command or a remote URL), not a local
    path. A local path may hold ':' (a folder `set:v2`): it is still one, though gopen would take
    `set` for a URL scheme."""
    return _URL.match(str(shards)) is not None


def open_shard(url: str):
    """A tar or manifest opened for reading: a URL or command through gopen, a local file with open()
    (gopen parses `set:v2/train/x.tar` as the scheme `set` and refuses a good file)."""
    return wds.gopen(url, "rb") if is_url(url) else open(url, "rb")


def read_manifest(shards: str | Path, split: str, empty_ok: bool = False) -> dict:
    """The split's manifest.json, from a folder or from beside shards at a URL (`pipe:...`, `http://...`),
    checked for the shape `cvae-tk shards` writes (a UserError naming the manifest otherwise).
    `empty_ok`: a split without samples (a build writes one for a table's empty split, e.g. CelebA's
    val of a subset without val rows) is a manifest too, not a UserError (for `shards verify`)."""
    location = split_file(shards, split, MANIFEST)
    if is_url(shards):
        try:
            with open_shard(location) as stream:
                text = stream.read()
        except Exception as error:
            raise UserError(f"could not read {location}: {describe_pipe_failure(error) or one_line(error)}") from None
    else:
        path = Path(location)
        if not path.is_file():
            raise UserError(
                f"no {split} split in {shards}: expected {path} (run `cvae-tk shards ... --out {shards}`; "
                "a split without a manifest was not finished)"
            )
        try:
            text = path.read_bytes()
        except OSError as error:
            raise UserError(f"could not read {location}: {error.strerror or error}") from None
    try:
        manifest = json.loads(text)
    except ValueError as error:  # also bytes that are not UTF-8
        raise UserError(
            f"{location} is not a JSON manifest ({one_line(error)}); rebuild the shards with `cvae-tk shards`"
        ) from None
    check_manifest(manifest, location, split, empty_ok)
    return manifest


def check_manifest(manifest, location: str, split: str, empty_ok: bool = False) -> None:
    """What the readers rely on: a UserError naming the manifest and the field otherwise (a damaged or
    hand-edited manifest would else fail later as a KeyError or TypeError, or read wrong counts)."""

    def bad(what: str) -> UserError:
        return UserError(f"{location} is not a valid shard manifest: {what}; rebuild the shards with `cvae-tk shards`")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(manifest, dict):
        raise bad(f"expected a JSON object, got {type(manifest).__name__}")
    for key in ("attributes", "count", "shards"):
        if key not in manifest:
            raise bad(f"it has no '{key}'")
    attributes = manifest["attributes"]
    if not isinstance(attributes, list) or not attributes or not all(isinstance(a, str) and a for a in attributes):
        raise bad("'attributes' must be a non-empty list of names")
    if len(set(attributes)) != len(attributes):
        raise bad("'attributes' names an attribute twice")
    if not isinstance(manifest["shards"], dict):
        raise bad("'shards' must map shard file names to sample counts")
    if not manifest["shards"] and not empty_ok:
        raise UserError(f"{location} lists no shards: the {split} split is empty")
    for name, value in manifest["shards"].items():
        if not _SHARD_NAME.fullmatch(name):
            raise UserError(
                f"{location} lists the shard {name!r}: expected a plain file name such as {split}-000000.tar "
                "(letters, digits, '_', '-', '.'; no '/', no leading '.')"
            )
        if not count(value):
            raise bad(f"shard {name} has the count {value!r}, expected an integer >= 0")
    if not count(manifest["count"]) or manifest["count"] != sum(manifest["shards"].values()):
        raise bad(
            f"'count' is {manifest['count']!r}, expected the sum of the shard counts ({sum(manifest['shards'].values())})"
        )
    size = manifest.get("image_size")  # null: images of varied sizes (--size original)
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(count(side) for side in size)):
        raise bad(f"'image_size' is {size!r}, expected [height, width] or null")


def worker_died(error: BaseException) -> bool:
    """Whether `error` is PyTorch's report of a DataLoader worker process that died (killed by a
    signal, e.g. the kernel's OOM killer, or exited). It is raised wherever the main process is
    when the SIGCHLD arrives (in the middle of a forward pass too), not only in the loader."""
    return isinstance(error, RuntimeError) and "DataLoader worker (pid" in str(error)


def shard_urls(shards: str | Path, split: str) -> list[str]:
    manifest = read_manifest(shards, split)
    return [split_file(shards, split, name) for name in manifest["shards"]]


def split_file(shards: str | Path, split: str, name: str) -> str:
    """Where the file `name` (a tar, the manifest) of `split` lies: a URL (pipe:..., http://...) is
    joined as text, a local folder as a path. A split name that is not one (`../other/test`,
    `test/x`) is a UserError: every file read lies inside the shards."""
    if not SPLIT_NAME.fullmatch(split):
        raise UserError(
            f"split name {split!r}: expected a split of the shards, such as train or test (letters, digits, '_' or '-')"
        )
    text = str(shards)
    # a command with the path in the middle: pipe:aws s3 cp s3://bucket/celeba64/{} - (not a folder `a{}`)
    if "{}" in text and is_url(shards):
        return text.replace("{}", f"{split}/{name}")
    return f"{text.rstrip('/')}/{split}/{name}" if is_url(shards) else str(Path(shards) / split / name)


def _is_field(name: str) -> bool:
    """Whether a tar member is one of FIELDS (webdataset's split: the field is all after the first
    '.' of the last path component)."""
    return name.rpartition("/")[2].partition(".")[2].lower() in FIELDS


class WrongSize(ValueError):
    """An image whose size is not the split's (found from its header, before decoding)."""


def decode(sample: dict, with_keys: bool = False, expected_size=None) -> tuple:
    """(image float [3, H, W] in [0, 1], attributes float [A]) and, with_keys, the sample's key.
    expected_size (H, W): refuse an image of another size before decoding its pixels."""
    pixels, *rest = _decode_sample(sample, with_keys, expected_size)
    return (to_unit_float(pixels), *rest)


def _decode_sample(sample: dict, with_keys: bool = False, expected_size=None) -> tuple:
    """`decode` with the pixels left uint8 [3, H, W]: what crosses from the loader workers (a quarter
    of float32's bytes to move, pin and copy to the GPU; `Batches` converts them where they land)."""
    ext = "png" if "png" in sample else "jpg"
    if ext not in sample or "attr.npy" not in sample:
        raise UserError(
            f"sample {sample.get('__key__')!r} has no "
            f"{'.attr.npy' if ext in sample else 'image (.png or .jpg)'} member; the shard was not written by "
            "`cvae-tk shards`, or it is damaged"
        )
    pixels = _decode_image(sample[ext], expected_size)
    attributes = attribute_vector(sample["attr.npy"])
    decoded = (pixels, torch.from_numpy(attributes.astype(np.float32)))
    return (*decoded, sample["__key__"]) if with_keys else decoded


def _check_size(height: int, width: int, expected_size) -> None:
    # checked before decoding: a hostile header may declare a huge image
    if expected_size and 0 not in expected_size and (height, width) != tuple(expected_size):
        raise WrongSize(f"is {height}x{width}, not the split's {expected_size[0]}x{expected_size[1]}")


def _decode_image(data: bytes, expected_size) -> torch.Tensor:
    """An image member's pixels, uint8 [3, H, W] RGB. A whole baseline or progressive JPEG (what
    `cvae-tk shards` writes) is decoded by torchcodec's libjpeg-turbo call (torchvision's, which it
    replaces, is deprecated since 0.29), 3x faster than through PIL for a 64x64 image (most of PIL's
    time is its Python header parsing) and the same pixels
    (tests/data/test_stream.py); anything else (PNG, other JPEG kinds, a JPEG without its end
    marker, which libjpeg would pad where PIL refuses it as truncated) goes through PIL."""
    frame = _jpeg_frame(data)
    if frame is not None and data.endswith(b"\xff\xd9"):
        height, width = frame
        _check_size(height, width, expected_size)
        limit = Image.MAX_IMAGE_PIXELS  # beyond it (a split of varied sizes): PIL's decompression-bomb check
        if limit is None or height * width <= limit:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    image = Image.open(io.BytesIO(data))
    _check_size(image.height, image.width, expected_size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


# Frame markers of the JPEGs torchcodec takes here: baseline, extended and progressive Huffman.
_JPEG_FRAMES = (0xC0, 0xC1, 0xC2)


def _jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, read without decoding, when the frame is one of
    _JPEG_FRAMES with 1 (grey) or 3 (colour) components; None otherwise (not a JPEG, another kind)."""
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position += 2
            continue
        if marker in _JPEG_FRAMES:
            if position + 10 > len(data):
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            components = data[position + 9]
            return (height, width) if height and width and components in (1, 3) else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker in (0xD9, 0xDA):
            return None  # another kind of frame, or the scan or the end before any frame
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def attribute_vector(data: bytes) -> np.ndarray:
    """The uint8 vector of an `.attr.npy` member. What `cvae-tk shards` writes is the 128-byte header
    np.save gives a uint8 vector, then the values: compared and read in place (45x faster than
    np.load, which parses the header with Python's parser: a tenth of the feed's time per image).
    Any other .npy goes through np.load."""
    length = len(data) - NPY_HEADER_BYTES
    if length > 0 and data[:NPY_HEADER_BYTES] == npy_header(length):
        return np.frombuffer(data, np.uint8, length, NPY_HEADER_BYTES)
    return np.load(io.BytesIO(data), allow_pickle=False)


# --- unreadable data: skipped, reported down the pipeline, counted in the main process -------------


# webdataset's words for a `pipe:` command that failed: "(('<command>',), {'shell': True, ...}): exit 1 (read) {}"
_PIPE_FAILED = re.compile(r"^(?P<call>\(\(.*\)): exit (?P<status>-?\d+) \((?:read|write)\)")


def describe_pipe_failure(error: BaseException) -> str | None:
    """'the command `cat /x/train-000000.tar` failed (exit status 1)' for webdataset's error of a
    failing `pipe:` command (its text is the Popen arguments' repr), else None."""
    found = _PIPE_FAILED.match(str(error))
    if found is None:
        return None
    try:
        (command, *_), _ = ast.literal_eval(found["call"])
    except (ValueError, SyntaxError, TypeError):
        return None
    status = int(found["status"])
    how = f"was killed by signal {-status}" if status < 0 else f"failed (exit status {status})"
    return f"the command `{command}` {how}"


def describe_read_error(error: BaseException) -> str:
    """One line for why a shard or manifest could not be read (file, URL or command)."""
    if (pipe := describe_pipe_failure(error)) is not None:
        return pipe
    text = re.sub(r" object at 0x[0-9a-fA-F]+", "", one_line(error))  # PIL names the BytesIO: same text every time
    text = re.sub(r" @ <[^>]*>$", "", text)  # webdataset appends the stream it read
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _tar_samples(stream, url: str):
    """The samples of one tar stream, as webdataset reads them: only FIELDS members, grouped by key
    (a member cut off by the end of the data raises tarfile's "unexpected end of data")."""
    members = wds.tariterators.tar_file_iterator(stream, select_files=_is_field)
    yield from wds.tariterators.group_by_keys({**member, "__url__": url} for member in members)


class ReadCount:
    """The samples the shard reader (the pipeline's first stage) has yielded in this pass, which the
    last stage reports batch by batch: the shuffle buffer between them reads ahead of the batches,
    and the skip bound weighs losses against what was read."""

    def __init__(self):
        self.total = 0


def _read_shards(source, counts: dict[str, int], count: ReadCount):
    """Samples of each shard ({"url": ...} items) in order. A shard that cannot be opened, breaks
    off, or ends before its manifest count is followed by a `Skip` of the samples it did not
    deliver (tarfile takes a cut-off header for the end of the archive: only the count tells)."""
    count.total = 0
    for item in source:
        url = item["url"]
        expected, read, error, stream = counts.get(url, 0), 0, None, None
        try:
            stream = open_shard(url)
            for sample in _tar_samples(stream, url):
                read += 1
                count.total += 1
                yield sample
        except Exception as caught:
            error = caught
        finally:
            if stream is not None:
                try:
                    stream.close()  # a pipe: reports its command's failure here
                except Exception as caught:
                    # a failed command also leaves tarfile with "empty file": the command's status says why
                    error = caught if error is None or isinstance(error, tarfile.ReadError) else error
        lost = max(expected - read, 0)
        if error is None and not lost:
            continue
        if error is None:
            reason = f"it ended after {read} of {expected} samples (a cut-off tar?)"
        else:
            reason = (
                f"broke off after {read} of {expected} samples: {describe_read_error(error)}"
                if read
                else f"unreadable: {describe_read_error(error)}"
            )
        yield Skip(url, reason, lost)


def _check_sample(decoded: tuple, image_size, num_attributes: int | None) -> str | None:
    pixels, attributes = decoded[0], decoded[1]
    if image_size and 0 not in image_size and tuple(pixels.shape[1:]) != tuple(image_size):
        return f"is {pixels.shape[1]}x{pixels.shape[2]}, not the split's {image_size[0]}x{image_size[1]}"
    if num_attributes is not None and attributes.shape != (num_attributes,):
        return f"has {attributes.numel()} attribute values, not {num_attributes}"
    return None


def _decode_batches(
    source,
    batch_size: int,
    partial: bool,
    with_keys: bool,
    count: ReadCount,
    image_size=None,
    num_attributes=None,
    unit_float: bool = True,
):
    """Decode and batch (what wds.map(decode) + wds.batched did). Yields (batch, None, read) and, at
    once for every skip report or undecodable sample, (None, Skip, read); read: the samples the
    reader has yielded since the previous item (the shuffle buffer reads ahead of the batches, so
    both losses and reads are counted when read). Images float in [0, 1], or uint8 unless `unit_float`."""
    batch, counted = [], 0

    def read() -> int:
        nonlocal counted
        counted, new = count.total, count.total - counted
        return new

    for sample in source:
        if isinstance(sample, Skip):
            yield None, sample, read()
            continue
        try:
            decoded = _decode_sample(sample, with_keys, image_size)
            problem = _check_sample(decoded, image_size, num_attributes)
            if unit_float:
                decoded = (to_unit_float(decoded[0]), *decoded[1:])
        except UserError as error:  # decode's own message (a missing member) names the sample
            problem = one_line(error)
        except WrongSize as error:
            problem = str(error)
        except Exception as error:
            problem = f"could not be decoded: {describe_read_error(error)}"
        if problem:
            reason = problem if problem.startswith("sample ") else f"sample {sample.get('__key__')} {problem}"
            yield None, Skip(sample.get("__url__", "?"), reason, 1, undecodable=True), read()
            continue
        batch.append(decoded)
        if len(batch) == batch_size:
            yield default_collate(batch), None, read()
            batch = []
    if batch and partial:
        yield default_collate(batch), None, read()


def _for_cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def _loader(pipeline, num_workers: int, seed: int, device=None, persistent: bool = False):
    # Its own generator: creating a loader iterator must not draw from the global RNG (exact resume).
    # Batches bound for a GPU are pinned (a thread of the loader's), so that their copy to the device
    # is asynchronous: from pageable memory CUDA waits for the stream first, and the next step's
    # kernels could not be queued while this one runs. `persistent`: the workers outlive a pass.
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=device is not None and torch.device(device).type == "cuda",
        persistent_workers=persistent and num_workers > 0,
    )


def _stages(
    counts: dict[str, int],
    manifest: dict,
    batch_size: int,
    partial_batches: bool,
    with_keys: bool,
    shuffle=None,
    device=None,
) -> list:
    """The pipeline after the shard list. At this point items are {"url": ...}; `_read_shards`
    turns them into samples (dicts of tar members) with a `Skip` where a shard fails; the shuffle
    (training only) mixes samples, passing Skips straight on; `_decode_batches` yields (batch,
    None, read) or (None, Skip, read). The first and last stage share the count of samples read.

    Where the images become float follows `device`: for the CPU, in the workers, image by image
    (each worker is one thread; in the main process the conversion's threads would compete with
    the workers for the cores: 10x its CPU time with 2 workers on 2 cores, bench/feed.py); for
    another device, after the copy there (`Batches`), so uint8 crosses from the workers."""
    count = ReadCount()
    return [
        partial(_read_shards, counts=counts, count=count),
        *([shuffle] if shuffle else []),
        partial(
            _decode_batches,
            batch_size=batch_size,
            partial=partial_batches,
            with_keys=with_keys,
            count=count,
            image_size=manifest.get("image_size"),
            num_attributes=len(manifest.get("attributes", [])) or None,
            unit_float=_for_cpu(device),
        ),
    ]


def _shuffle(source, bufsize: int, initial: int, rng: random.Random):
    """webdataset's buffer shuffle (the same order from the same samples and rng), except that skip
    reports pass straight through: never held in the buffer, drawing nothing from `rng`."""
    source = iter(source)
    initial, buffer = min(initial, bufsize), []
    for sample in source:
        if isinstance(sample, Skip):
            yield sample
            continue
        buffer.append(sample)
        if len(buffer) < bufsize:
            for extra in source:
                if isinstance(extra, Skip):
                    yield extra
                    continue
                buffer.append(extra)
                break
        if len(buffer) >= initial:
            yield wds.filters.pick(buffer, rng)
    while buffer:
        yield wds.filters.pick(buffer, rng)


def _worker_shuffle(source, bufsize: int, seed: int):
    """Buffer shuffle whose seed differs per rank and worker (copies of one RNG would repeat each other)."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(derive_seed(seed, worker_part(rank, worker)))
    yield from _shuffle(source, bufsize, min(bufsize, 100), rng)


def _skips(skips: Skips | None, split: str, shards, manifest: dict, max_skipped_fraction: float) -> Skips:
    return skips if skips is not None else Skips(split, shards, manifest["count"], max_skipped_fraction)


class SharedNumber:
    """A number a pass reads when it starts (an epoch, a stream's seed), set in the main process and
    read by the loader workers: a shared-memory integer, as open_clip's SharedEpoch (workers that
    outlive a pass keep their copy of the dataset, so a plain attribute set later never reaches them)."""

    def __init__(self, value: int = 0):
        self.shared = multiprocessing.Value("q", value, lock=False)

    @property
    def value(self) -> int:
        return int(self.shared.value)

    @value.setter
    def value(self, value: int) -> None:
        self.shared.value = value


class _Reader:
    """What both multi-pass readers share: the pipeline after the shard source (`_stages`), one
    DataLoader for every pass (its workers persistent unless `persistent=False`), the run's skip
    counter, and `close()`."""

    def __init__(
        self, source, counts, manifest, batch_size, with_keys, shuffle, num_workers, seed, device, persistent, skips
    ):
        pipeline = wds.DataPipeline(source, *_stages(counts, manifest, batch_size, False, with_keys, shuffle, device))
        self.loader = _loader(pipeline, num_workers, seed, device, persistent)
        self.skips, self.device = skips, device

    def close(self) -> None:
        """Stop the workers (and any `pipe:` readers) now, not when the loader is collected; a later
        pass starts new ones. What torch's iterator does when deleted (Lightning calls it too)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None


class ResampledStream(_Reader):
    """Endless shuffled batches from the train split (see the module docstring), one stream per seed,
    all from one DataLoader whose workers are started once: `.batches(seed)` gives the same batches
    as `train_batches(seed=seed)` (the trainer reads a new seed every 1,000 batches). One stream at
    a time: after a new `.batches()`, do not read an older one's. `skips`: a counter to add to (one per run),
    else a new one checking `max_skipped_fraction`. `manifest`: the split's, if the caller has read
    it already (`read_manifest`). `device`: where the batches are wanted (they cross from the
    workers as uint8 and become float there); None: the CPU. `persistent=False`: workers for one
    stream only."""

    def __init__(
        self,
        shards: str | Path,
        batch_size: int,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        with_keys: bool = False,
        max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
        skips: Skips | None = None,
        manifest: dict | None = None,
        device: torch.device | str | None = None,
        persistent: bool = True,
        seed: int = 0,
    ):
        manifest = manifest or read_manifest(shards, "train")
        counts = {split_file(shards, "train", name): count for name, count in manifest["shards"].items()}
        self.seed = SharedNumber(seed)
        super().__init__(
            _ResampledShards(list(counts), self.seed),
            counts,
            manifest,
            batch_size,
            with_keys,
            partial(_shared_shuffle, bufsize=shuffle_buffer, seed=self.seed),
            num_workers,
            seed,
            device,
            persistent,
            _skips(skips, "train", shards, manifest, max_skipped_fraction),
        )

    def batches(self, seed: int) -> Batches:
        self.seed.value = seed  # read by the workers when the stream starts: after this, in `iter(loader)`
        return Batches(self.loader, self.skips, device=self.device)


def train_batches(shards: str | Path, batch_size: int, seed: int = 0, num_workers: int = 1, **options) -> Batches:
    """Endless shuffled batches from the train split, for one seed (see the module docstring).
    `options`: `ResampledStream`'s (shuffle_buffer, with_keys, max_skipped_fraction, skips,
    manifest, device). Its loader and workers serve this stream only: for one stream after
    another, keep one `ResampledStream`."""
    return ResampledStream(shards, batch_size, num_workers, persistent=False, seed=seed, **options).batches(seed)


class _ResampledShards(wds.ResampledShards):
    """webdataset's resampled shard list (the same draws from the same seed), its seed read from
    `seed` when a pass starts, and every pass its first (the draws a new loader's workers make)."""

    def __init__(self, urls: list[str], seed: SharedNumber):
        super().__init__(urls, deterministic=True)
        self.shared_seed = seed

    def __iter__(self):
        self.seed, self.epoch = self.shared_seed.value, -1
        yield from super().__iter__()


def _shared_shuffle(source, bufsize: int, seed: SharedNumber):
    yield from _worker_shuffle(source, bufsize, seed.value)


def deal_shards(
    names: list[str], epoch: int, seed: int, rank: int, world: int, worker: int, workers: int
) -> list[str]:
    """The shards one worker of one rank reads in `epoch`: a seeded shuffle, dealt round-robin."""
    order = list(names)
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    return order[rank::world][worker::workers]


class _EpochShards(torch.utils.data.IterableDataset):
    def __init__(self, urls: list[str], epoch: SharedNumber, seed: int, rank: int, world: int):
        super().__init__()
        self.urls, self.epoch, self.seed, self.rank, self.world = urls, epoch, seed, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in deal_shards(self.urls, self.epoch.value, self.seed, self.rank, self.world, worker, workers):
            yield {"url": url}


def _epoch_shuffle(source, bufsize: int, seed: int, epoch: SharedNumber):
    # a radix of its own since the first release (distinct for epochs < 7,919): the same batches on resume
    yield from _worker_shuffle(source, bufsize, derive_seed(seed, epoch.value, radix=7919))


def batches_per_rank(counts: dict[str, int], batch_size: int, epoch: int, seed: int, world: int, workers: int) -> int:
    """How many full batches every rank can fill in `epoch` (each worker batches its own shards)."""
    names, per_rank = list(counts), []
    for rank in range(world):
        per_rank.append(
            sum(
                sum(counts[name] for name in deal_shards(names, epoch, seed, rank, world, worker, workers))
                // batch_size
                for worker in range(workers)
            )
        )
    return min(per_rank)


class EpochStream(_Reader):
    """The epochs of one rank of N, one after another, from one DataLoader whose workers live from
    the first epoch to the last: `.epoch(k)` gives the same `Batches` as `epoch_batches(epoch=k)`.
    Starting every epoch's workers afresh (fork, open shards, fill the shuffle buffers) stalls the
    consumer for a few batches' time per worker, which a short epoch (CUB's 93 batches; a small
    benchmark's) feels in its rate. One epoch at a time: after a new `.epoch()`, do not read an older one's `Batches`.
    `skips`: a counter to add to (one per run), else a new one checking `max_skipped_fraction`.
    `manifest`: the split's, if the caller has read it already (`read_manifest`). `device`: where
    the batches are wanted (see `train_batches`). `persistent=False`: workers for one pass only."""

    def __init__(
        self,
        shards: str | Path,
        split: str = "train",
        batch_size: int = 64,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        with_keys: bool = False,
        max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
        skips: Skips | None = None,
        manifest: dict | None = None,
        device: torch.device | str | None = None,
        persistent: bool = True,
    ):
        manifest = manifest or read_manifest(shards, split)
        urls = [split_file(shards, split, name) for name in manifest["shards"]]
        self.shards, self.split, self.batch_size, self.seed = shards, split, batch_size, seed
        self.world, self.workers = world, max(num_workers, 1)
        self.counts, self.count = dict(zip(urls, manifest["shards"].values())), manifest["count"]
        self.current = SharedNumber()
        super().__init__(
            _EpochShards(urls, self.current, seed, rank, world),
            self.counts,
            manifest,
            batch_size,
            with_keys,
            partial(_epoch_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=self.current),
            num_workers,
            seed,
            device,
            persistent,
            _skips(skips, split, shards, manifest, max_skipped_fraction),
        )

    def length(self, epoch: int) -> int:
        """The batches every rank gets in `epoch`."""
        return batches_per_rank(self.counts, self.batch_size, epoch, self.seed, self.world, self.workers)

    def epoch(self, epoch: int) -> Batches:
        count = self.length(epoch)
        if count == 0:
            raise UserError(
                f"{self.split} split of {self.shards} cannot give {self.world} rank(s) x {self.workers} worker(s) a batch "
                f"of {self.batch_size} each: {len(self.counts)} shard(s), {self.count} samples; use a smaller batch_size "
                "or rebuild with a smaller --shard-size"
            )
        self.current.value = epoch  # read by the workers when the pass starts: after this, in `iter(loader)`
        return Batches(self.loader, self.skips, length=count, device=self.device)


def epoch_batches(
    shards: str | Path, split: str = "train", batch_size: int = 64, epoch: int = 0, **options
) -> Batches:
    """One epoch of shuffled batches for one rank (see the module docstring); has len(). `options`:
    `EpochStream`'s (seed, rank, world, num_workers, shuffle_buffer, with_keys, max_skipped_fraction,
    skips, manifest, device). Its loader and workers serve this epoch only: for epoch after epoch,
    keep one `EpochStream`."""
    return EpochStream(shards, split, batch_size, persistent=False, **options).epoch(epoch)


def attribute_vectors(shards: str | Path, split: str) -> np.ndarray:
    """Every attribute vector of `split`, in shard order, uint8 [N, A], read without decoding an
    image (only the `.attr.npy` members are read: seconds for all of CelebA). A shard that cannot be
    read is passed over (its samples are missing); a malformed vector is a UserError."""
    manifest = read_manifest(shards, split)
    width, vectors = len(manifest["attributes"]), []
    for url in shard_urls(shards, split):
        try:
            stream = open_shard(url)
        except Exception:
            continue
        try:
            for member in wds.tariterators.tar_file_iterator(
                stream, select_files=lambda name: name.endswith(".attr.npy")
            ):
                vector = attribute_vector(member["data"])
                if vector.shape != (width,):
                    raise UserError(
                        f"{url}: {member['fname']} holds a vector of shape {list(vector.shape)}, expected [{width}] (the manifest's attributes)"
                    )
                vectors.append(vector.astype(np.uint8))
        except UserError:
            raise
        except Exception:
            pass  # a shard that breaks off: what it held so far is kept (eval_batches counts such losses)
        finally:
            try:
                stream.close()
            except Exception:
                pass
    if not vectors:
        raise UserError(f"the {split} split of {shards} holds no readable attribute vectors")
    return np.stack(vectors)


def eval_batches(
    shards: str | Path,
    split: str = "test",
    batch_size: int = 256,
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
    manifest: dict | None = None,
    device: torch.device | str | None = None,
) -> Batches:
    """One ordered pass over `split`: every readable sample exactly once, in shard order. Unreadable
    ones are skipped and counted in `.skips` (a UserError past `max_skipped_fraction` of the split).
    `manifest`: the split's, if the caller has read it already (`read_manifest`). `device`: where
    the batches are wanted (see `train_batches`)."""
    manifest = manifest or read_manifest(shards, split)
    counts = {split_file(shards, split, name): count for name, count in manifest["shards"].items()}
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(counts)),
        *_stages(counts, manifest, batch_size, True, False, device=device),
    )
    return Batches(
        _loader(pipeline, 0, 0, device), Skips(split, shards, manifest["count"], max_skipped_fraction), device=device
    )
