"""`cvae-tk shards verify`: are the shards on disk the bytes their build wrote?

Every manifest records, per tar, its size and sha256 (`files`, written as the tar is written). A
copy cut short, a file replaced, or bits flipped on a disk all give other bytes; the readers
cannot always tell (a flipped bit inside a JPEG still decodes, to other pixels), so this reads
every tar whole and compares. Local folders and URLs (`pipe:...`, `http://...`) alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from toolkit.data.stream import describe_pipe_failure, is_url, open_shard, read_manifest, split_file
from toolkit.errors import UserError, one_line
from toolkit.formats import MANIFEST

CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_SPLITS = ("train", "test")  # what every `cvae-tk shards` source writes (where a URL cannot be listed)


@dataclass(frozen=True)
class Damage:
    """One tar that is not what its manifest says: `problem` says how (missing, size, content)."""

    split: str
    name: str
    problem: str


@dataclass(frozen=True)
class SplitReport:
    split: str
    shards: int
    samples: int
    bytes: int  # the sizes the manifest records
    damaged: tuple[Damage, ...]


def splits_in(shards: str | Path) -> list[str]:
    """The split folders of a local shards folder (each one holding anything), in name order; a URL
    cannot be listed, so there the splits every build writes."""
    if is_url(shards):
        return list(DEFAULT_SPLITS)
    folder = Path(shards)
    if not folder.is_dir():
        raise UserError(f"{shards} is not a folder of shards (expected {folder}/<split>/{MANIFEST})")
    splits = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not splits:
        raise UserError(f"{shards} holds no split folders (expected {folder}/<split>/{MANIFEST})")
    return splits


def recorded_files(manifest: dict, location: str) -> dict[str, dict]:
    """The manifest's {tar name: {"bytes", "sha256"}}, one entry per shard it lists; a UserError
    when a manifest has none (written by cvae-tk before 2026-12) or a malformed one."""
    files = manifest.get("files")
    if files is None:
        raise UserError(
            f"{location} records no checksums (shards built by an older cvae-tk): nothing to compare "
            "the tars with; rebuild them with `cvae-tk shards` to verify them from now on"
        )

    def entry_ok(entry) -> bool:
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        return (
            isinstance(size, int)
            and not isinstance(size, bool)
            and size >= 0
            and isinstance(digest, str)
            and _SHA256.fullmatch(digest) is not None
        )

    if not isinstance(files, dict) or set(files) != set(manifest["shards"]) or not all(map(entry_ok, files.values())):
        raise UserError(
            f"{location} is not a valid shard manifest: 'files' must give {{'bytes', 'sha256'}} (64 hex digits) "
            "for exactly the shards it lists; rebuild the shards with `cvae-tk shards`"
        )
    return files


def _hash(location: str, progress: Callable[[int], None]) -> tuple[int, str]:
    """(bytes read, sha256) of a local file or a URL, read in 1 MiB pieces."""
    digest, size = hashlib.sha256(), 0
    with open_shard(location) as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            progress(len(chunk))
    return size, digest.hexdigest()


def _size_problem(size: int, recorded: int) -> str | None:
    if size == recorded:
        return None
    how = "cut off" if size < recorded else "longer"
    return f"{size:,} bytes, the manifest records {recorded:,} ({how}: an unfinished or damaged copy?)"


def _check_tar(shards: str | Path, split: str, name: str, recorded: dict, progress) -> str | None:
    """What is wrong with one tar, or None when it has the recorded size and sha256."""
    location = split_file(shards, split, name)
    if not is_url(shards):  # a local file's size is told without reading it
        path = Path(location)
        if not path.is_file():
            return "missing" if not path.exists() else "not a file"
        if problem := _size_problem(path.stat().st_size, recorded["bytes"]):
            return problem
    try:
        size, digest = _hash(location, progress)
    except Exception as error:  # OSError for a file; a pipe's command failing; an HTTP error
        return f"unreadable: {describe_pipe_failure(error) or one_line(error)}"
    if problem := _size_problem(size, recorded["bytes"]):
        return problem
    if digest != recorded["sha256"]:
        return (
            f"other bytes than the build wrote (sha256 {digest[:12]}..., the manifest records "
            f"{recorded['sha256'][:12]}...): damaged on disk or in a copy, or replaced"
        )
    return None


def _recorded(shards: str | Path, split: str) -> tuple[dict, dict[str, dict]]:
    """(manifest, its `files`) of a split: a UserError when the manifest is missing, malformed or
    records no checksums (nothing to compare with). A split without samples is one without tars:
    nothing in it can be damaged (readers refuse to read it, as empty, not verify)."""
    manifest = read_manifest(shards, split, empty_ok=True)
    return manifest, recorded_files(manifest, split_file(shards, split, MANIFEST))


def _verify(shards, split: str, manifest: dict, files: dict[str, dict], progress) -> SplitReport:
    damaged = []
    for name in manifest["shards"]:
        problem = _check_tar(shards, split, name, files[name], progress)
        if problem:
            damaged.append(Damage(split, name, problem))
    total = sum(entry["bytes"] for entry in files.values())
    return SplitReport(split, shards=len(files), samples=manifest["count"], bytes=total, damaged=tuple(damaged))


def verify_shards(shards: str | Path, splits: Iterable[str] | None = None, bar=None) -> list[SplitReport]:
    """Read every tar of each of `splits` (None: every split folder of a local `shards`, or train and
    test for a URL) whole and compare it with its manifest's record. Every manifest is read and
    checked before the first tar is (a UserError for one that is missing, malformed or records no
    checksums). `bar(total)`: a progress bar for the bytes to read (a tqdm), told of every piece read."""
    recorded = {split: _recorded(shards, split) for split in (list(splits) if splits else splits_in(shards))}
    total = sum(entry["bytes"] for _, files in recorded.values() for entry in files.values())
    with bar(total) if bar else contextlib.nullcontext() as progress:
        update = progress.update if progress else (lambda n: None)
        return [_verify(shards, split, *recorded[split], update) for split in recorded]
