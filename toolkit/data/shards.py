"""Write samples into WebDataset tar shards plus one `manifest.json` per split.

Layout (one folder per data set):

    OUT/train/train-000000.tar ... OUT/train/manifest.json
    OUT/test/test-000000.tar   ... OUT/test/manifest.json

Each sample in a tar: `<key>.png` (or `.jpg`): the encoded image bytes as given; `<key>.attr.npy`:
the 0/1 attribute vector (uint8, length A). Keys are dot-free, as WebDataset requires.

Tar members are laid out exactly as webdataset's `TarWriter` writes them (same header fields, sorted
fields per sample; a test compares the bytes), but each sample is serialized on its own by
`serialize`, so worker processes can do it and the writing process only appends bytes.

Nothing half-written looks valid: the split's old manifest is removed first, every tar is written
under a `.tmp` name and renamed when complete, and the manifest is written last. A split without a
manifest is incomplete, and the reader refuses it. Tars have fixed mtime/owner, so the same
input gives byte-identical shards.

A build owns its whole output folder (`prepare_output`): it refuses a folder holding anything but
shards, or shards another build finished (unless overwrite), and leaves no split or shard of an
older build beside the new ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

from toolkit.atomic import write_text
from toolkit.errors import UserError
from toolkit.formats import LOCK, MANIFEST, is_debris  # noqa: F401 (MANIFEST: re-exported)
from toolkit.ownership import FolderLock

# Fixed member time (2000-01-01) so rebuilds are byte-identical. An int: a float mtime makes
# tarfile add a PAX header to every member, doubling the header work.
FIXED_MTIME = 946_684_800
IMAGE_EXTS = ("png", "jpg")
# A sample key becomes the member names `<key>.attr.npy` and `<key>.<ext>`: one flat name, no
# '.' (webdataset splits the field off at the first one), no '/' or '\\' (no folders, so nothing
# can point outside the archive's root when extracted: `../x`, `/tmp/x`), no control characters.
_KEY = re.compile(r"[^./\\\x00-\x1f\x7f]+")
# A split name becomes the folder OUT/<split>/ and the shard names <split>-000000.tar (readers
# check it too: `eval --split ../other/test` must not read outside the shards).
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Sample:
    key: str  # unique, dot-free
    image: bytes  # encoded PNG or JPEG
    ext: str  # "png" or "jpg"
    attributes: np.ndarray  # uint8 0/1, one per attribute name
    size: tuple[int, int] | None = None  # (H, W) of the image, where the producer knows it


@lru_cache(maxsize=16)
def npy_header(length: int) -> bytes:
    """The bytes np.save writes before a uint8 vector of `length` values (128 of them)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(length, dtype=np.uint8), allow_pickle=False)
    return buffer.getvalue()[: -length or None]


def encode_attributes(attributes: np.ndarray) -> bytes:
    """The .npy bytes of a uint8 vector (what np.save writes; the header is cached: this runs per sample)."""
    vector = np.ascontiguousarray(attributes, dtype=np.uint8)
    return npy_header(len(vector)) + vector.tobytes()


def _check(sample: Sample, num_attributes: int) -> None:
    if not isinstance(sample.key, str) or not _KEY.fullmatch(sample.key):
        raise ValueError(
            f"sample key {sample.key!r}: expected a non-empty name without '.', '/', '\\' or control characters"
        )
    if sample.ext not in IMAGE_EXTS:
        raise ValueError(f"sample {sample.key}: image extension {sample.ext!r}, expected one of {IMAGE_EXTS}")
    attributes = np.asarray(sample.attributes)
    if attributes.shape != (num_attributes,):
        raise ValueError(
            f"sample {sample.key}: {attributes.shape[0] if attributes.ndim else 0} attribute values, expected {num_attributes}"
        )
    if attributes.size and (
        attributes.min() < 0 or attributes.max() > 1 or not np.array_equal(attributes, attributes.astype(np.uint8))
    ):
        raise ValueError(f"sample {sample.key}: attribute values must be 0 or 1")


@dataclass
class EncodedSample:
    """A sample already laid out as tar members (what `serialize` returns)."""

    key: str
    data: bytes
    size: tuple[int, int] | None = None  # (H, W), carried over from the Sample


def _member(name: str, data: bytes) -> bytes:
    # The header webdataset's TarWriter gives each member (tarfile's default PAX format).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), FIXED_MTIME, 0o444, "bigdata", "bigdata"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def serialize(sample: Sample, num_attributes: int) -> EncodedSample:
    """Check a sample and lay it out as tar members: `<key>.attr.npy`, then `<key>.<ext>` (sorted, as TarWriter)."""
    _check(sample, num_attributes)
    fields = {"attr.npy": encode_attributes(sample.attributes), sample.ext: sample.image}
    data = b"".join(_member(f"{sample.key}.{field}", fields[field]) for field in sorted(fields))
    return EncodedSample(sample.key, data, sample.size)


class _ShardFile:
    """One tar written under `<name>.tmp`, renamed to `<name>` by `commit()`, which returns its
    manifest entry {"bytes", "sha256"} (hashed as written: the file is never read back)."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.stream = open(self.tmp, "wb", buffering=1 << 20)
        self.count = self.size = 0
        self.digest = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self.stream.write(data)
        self.digest.update(data)
        self.size += len(data)

    def append(self, sample: EncodedSample) -> None:
        self._write(sample.data)
        self.count += 1

    def commit(self) -> dict:
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole record.
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.size + end) % tarfile.RECORDSIZE
        self._write(bytes(end))
        self.stream.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self.size, "sha256": self.digest.hexdigest()}

    def abort(self) -> None:
        try:
            self.stream.close()  # flushes the buffer, which fails again on a full disk
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


def write_split(
    samples: Iterable[Sample | EncodedSample],
    out: str | Path,
    split: str,
    attributes: list[str],
    image_size: tuple[int, int],
    source: str,
    shard_size: int = 10_000,
    extra: dict | None = None,
    keys_checked: bool = False,
) -> dict:
    """Write one split to `out/split/` and return its manifest.

    `extra` is merged into the manifest after the samples are exhausted, so a caller may fill it
    while the samples stream (e.g. the list of skipped images). Sample keys must be unique: checked
    here with a set of them, unless `keys_checked` says the caller did (the builder checks its
    compact key arrays before encoding: the set of 50,000 keys was 6 MiB of its memory).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not SPLIT_NAME.fullmatch(split):  # it names a folder and files under `out`: nothing may point elsewhere
        raise ValueError(f"split name {split!r}: expected letters, digits, '_' or '-'")
    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # the split is incomplete until the new one lands
    for partial in folder.glob(f"{split}-*.tar.tmp"):  # left by a build that was killed
        partial.unlink()
    counts: dict[str, int] = {}
    files: dict[str, dict] = {}  # name -> {"bytes", "sha256"}: what `cvae-tk shards verify` checks
    shard: _ShardFile | None = None
    seen: set[str] = set()
    try:
        for sample in samples:
            if isinstance(sample, Sample):
                sample = serialize(sample, len(attributes))
            if not keys_checked:
                if sample.key in seen:
                    raise ValueError(f"duplicate sample key {sample.key!r}")
                seen.add(sample.key)
            if shard is None:
                shard = _ShardFile(folder / f"{split}-{len(counts):06d}.tar")
            shard.append(sample)
            if shard.count == shard_size:
                files[shard.path.name] = shard.commit()
                counts[shard.path.name], shard = shard.count, None
        if shard is not None:
            files[shard.path.name] = shard.commit()
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
        "files": files,
        **(extra or {}),
    }
    write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


# What a build leaves in a split folder <split>/: its tars, its manifest, and the temporary names
# of both (a killed build's `.tar.tmp`, atomic_path's hidden `.manifest.json.<pid>.tmp`).
def _is_shard_file(split: str, name: str) -> bool:
    return (
        name == MANIFEST
        or re.fullmatch(rf"\.{re.escape(MANIFEST)}\.\d+\.tmp", name) is not None
        or re.fullmatch(rf"{re.escape(split)}-\d{{6,}}\.tar(\.tmp)?", name) is not None
    )


def _split_folders(out: Path) -> dict[str, list[str]]:
    """{split: its file names} of a build's output folder; anything else in it (a file, a link, a
    folder with other files) is a UserError: a build never deletes or mixes with what it did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, expected a folder for the shards")
    if not out.exists():
        return {}
    splits: dict[str, list[str]] = {}
    foreign: list[str] = []
    with os.scandir(out) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name == LOCK and entry.is_file(follow_symlinks=False):
                continue  # the build's own lock (`output_lock`)
            if is_debris(entry.name):
                continue  # a file manager's (.DS_Store): kept, and no reason to refuse the folder
            if not (entry.is_dir(follow_symlinks=False) and SPLIT_NAME.fullmatch(entry.name)):
                foreign.append(entry.name)
                continue
            with os.scandir(entry.path) as inner:
                files = {e.name: e.is_file(follow_symlinks=False) for e in inner if not is_debris(e.name)}
            strays = [name for name, is_file in files.items() if not (is_file and _is_shard_file(entry.name, name))]
            if strays:
                foreign += [f"{entry.name}/{name}" for name in sorted(strays)]
            else:
                splits[entry.name] = sorted(files)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"--out {out} holds files that are not shards ({shown}); choose an empty or new folder "
            f"(--overwrite replaces only shards, never other files)"
        )
    return splits


def output_lock(out: str | Path) -> FolderLock:
    """`with output_lock(out):` around a whole build: OUT/.lock keeps a second build out of the
    folder while this one writes it (both would write the same `.tar.tmp` names and mix their tars)."""
    return FolderLock(Path(out), "shard build", "--out", "shards")


def prepare_output(out: str | Path, splits: Iterable[str], build: dict, overwrite: bool = False) -> None:
    """Make `out` ready for a build of `splits` whose options are `build` (each manifest's "build").

    Refused, before anything is touched: `out` is a file, or holds anything that is not shards
    (even with overwrite: only shards are ever deleted, and a file manager's debris with a split
    folder deleted), or holds a split that another build finished (a manifest with other options,
    or one that does not parse), unless overwrite.
    Then every old manifest is removed (no split looks finished until this build rewrites it) and
    the split folders this build does not write are deleted, so no older split is left beside
    the new ones; stale tars inside the kept splits go when `write_split` finishes each."""
    out = Path(out)
    found = _split_folders(out)
    if not overwrite:
        for split, names in found.items():
            if MANIFEST not in names:
                continue  # an unfinished build: its shards are replaced
            manifest = out / split / MANIFEST
            try:
                previous = json.loads(manifest.read_text())
            except (ValueError, OSError):
                previous = None
            if not isinstance(previous, dict) or previous.get("build") != build:
                raise UserError(
                    f"{out} already holds shards from another build ({manifest}); "
                    f"choose another --out or pass --overwrite to replace them"
                )
    wanted = set(splits)
    for split, names in found.items():
        folder = out / split
        for name in names:
            if name == MANIFEST or split not in wanted:
                (folder / name).unlink(missing_ok=True)
        if split not in wanted:  # with the .DS_Store a file manager left beside those shards
            for debris in filter(is_debris, os.listdir(folder)):
                if (folder / debris).is_dir() and not (folder / debris).is_symlink():
                    shutil.rmtree(folder / debris)
                else:
                    (folder / debris).unlink()
            folder.rmdir()
