"""What every raw-format reader returns: a table of records (file path + attribute vector) per split.

Readers only parse text files and list paths (cheap, no image decoding); `toolkit.data.build`
decodes, resizes and encodes the images in worker processes and writes the shards.
"""

from __future__ import annotations

import csv
import errno
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from toolkit.errors import UserError, cut
from toolkit.formats import attribute_text  # NFC: the one normalization names are matched in

SPLITS = ("train", "val", "test")  # the splits a reader may give (train and test are required)


@dataclass
class Record:
    key: str  # unique within the data set, dot-free (WebDataset's rule)
    path: Path  # the image file
    attributes: np.ndarray  # uint8 0/1, one per attribute name
    # (x, y, width, height) object box, if asked for: the builder keeps the square around it that
    # StackGAN / AttnGAN keep (toolkit.data.build.bbox_region)
    bbox: tuple[float, float, float, float] | None = None


@dataclass
class SourceTable:
    source: str  # e.g. "celeba", "cub-200-2011", "folder:<root>", "classes:<root>"
    attributes: list[str]
    splits: dict[str, list[Record]]  # "train", "val", "test" -> records in a fixed order
    skipped: dict[str, list[str]] = field(default_factory=dict)  # split -> "name: reason" found while reading
    warnings: list[str] = field(default_factory=list)  # what the reader passed over, said after the build


def safe_key(relative_path: str) -> str:
    """A dot-free, slash-free WebDataset key from a relative file path: '001.Black_footed/x.jpg' -> '001_Black_footed__x'.

    Also backslash- and control-character-free, UTF-8 text (a file name's bytes that are not UTF-8
    become '_xNN') and never empty ('.jpg' -> '_'), as the shard writer requires."""
    stem = relative_path.rsplit(".", 1)[0] if "." in relative_path.rsplit("/", 1)[-1] else relative_path
    key = stem.replace("/", "__").replace(".", "_")
    if key.isprintable() and "\\" not in key:  # nearly every key: nothing to replace
        return key or "_"
    return "".join(_key_char(char) for char in key) or "_"


def _key_char(char: str) -> str:
    if char == "\\" or char < " " or char == "\x7f":
        return "_"
    if "\udc80" <= char <= "\udcff":  # a byte of a file name that is not UTF-8 (os.fsdecode's escape): '_xff'
        return f"_x{ord(char) - 0xDC00:02x}"
    return char


def inside_path(text: str) -> str | None:
    """A file name from a table as a '/'-separated path relative to its folder ('./a//b.jpg' and
    'a\\b.jpg' -> 'a/b.jpg', so one image has one spelling), or None for one that leaves the folder
    (absolute, or '..' beyond its top)."""
    name = posixpath.normpath(text.replace("\\", "/"))
    if name.startswith("/") or name == ".." or name.startswith("../"):
        return None
    return name


def text_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every non-blank line; CRLF, a BOM and trailing spaces are fine."""
    try:
        with open(path, encoding="utf-8-sig") as lines:
            for number, line in enumerate(lines, 1):
                fields = line.split()
                if fields:
                    yield number, fields
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: expected a text file ({error.reason})") from None


_SEPARATORS = (",", ";", "\t")
_DECLARED = re.compile(r"sep=([,;\t|])", re.IGNORECASE)  # 'sep=;': Excel reads it as the separator, not a row
_QUOTED = re.compile(r'"[^"]*(?:"|$)')  # a quoted cell ('""' inside one reads as two of them: the same)


def _delimiter(stream) -> tuple[str, bool]:
    """(the column separator, whether the file begins with Excel's 'sep=X' line naming it, to be skipped).
    The separator is read from the header and the first row after it: ',' unless the header holds no
    comma outside its quoted cells and holds ';' or a tab (what spreadsheets in many locales save as
    "CSV": 'file;"a,b"' is two columns); and where that separator gives the first row another number of
    columns than the header, the other one that gives both the same number, two or more (a ';' table
    whose header names hold commas, which ';' writers leave unquoted: 'file;Smiling, mouth open')."""
    lines = []
    for line in stream:
        if line.strip():  # blank lines before the header, and between it and the first row
            lines.append(line)
            if len(lines) == 2:
                break
    stream.seek(0)
    if not lines:
        return ",", False
    declared = _DECLARED.fullmatch(lines[0].strip(" \r\n"))
    if declared:  # Excel's own line naming the separator, before the header
        return declared[1], True
    outside = _QUOTED.sub("", lines[0])
    chosen = next((other for other in _SEPARATORS[1:] if "," not in outside and other in outside), ",")
    if len(lines) == 1:
        return chosen, False

    def columns(line: str, separator: str) -> int:
        return len(next(csv.reader([line.rstrip("\r\n")], delimiter=separator), []))

    def fits(separator: str) -> bool:
        return columns(lines[0], separator) >= 2 and columns(lines[0], separator) == columns(lines[1], separator)

    if not fits(chosen):
        chosen = next(
            (other for other in _SEPARATORS if other != chosen and other in lines[0] and fits(other)), chosen
        )
    return chosen, False


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row of a CSV file (commas, or `_delimiter`'s semicolons
    or tabs, or what a first line 'sep=;' names, as Excel reads it), each field stripped of surrounding
    spaces; a BOM and CRLF are fine."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            delimiter, skip = _delimiter(stream)  # skip: the 'sep=' line, if the file begins with one
            reader = csv.reader(stream, delimiter=delimiter)
            for fields in reader:
                fields = [field.strip() for field in fields]
                if any(fields):
                    if skip:
                        skip = False
                        continue
                    yield reader.line_num, fields
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: expected a UTF-8 CSV file ({error.reason})") from None
    except csv.Error as error:  # a NUL byte, a field beyond csv's size limit, ...
        raise UserError(f"{path}: not a readable CSV file ({error})") from None


def file_names(folder: Path, keep: Callable[[str], bool] | None = None) -> set[str]:
    """Names of the regular files directly inside `folder` (one os.scandir), those `keep` accepts if given."""
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries if (keep is None or keep(entry.name)) and _is_file(entry)}


def _is_file(entry: os.DirEntry) -> bool:
    """A regular file, or a link to one; a link that loops (ELOOP) or cannot be followed is not one
    (listed in a table, it is then reported as that one missing file; unlisted, it is ignored)."""
    try:
        return entry.is_file()
    except OSError:
        return False


class Identities:
    """Who the files of one listed folder are: an int from (st_dev, st_ino), the same for every name of
    one file (a symbolic link to it, a hard link, the folder reached twice), or None where it cannot be
    told. No stat per file: the inode number is the listing's (DirEntry.inode(), free), the device the
    folder's (the files in a folder are on its file system). One file's stat per folder checks that the
    listing numbers files as stat does; where it does not (a FUSE file system that numbers every entry
    alike), each file costs a stat. A link's identity is its target's, whose stat telling it a file or a
    folder took already (DirEntry keeps it). `folder` is the folder's own identity.

    On the `home` device (the first folder's, if not given) the identity is the inode number itself (no
    new int per file: the walk's memory), elsewhere (device + 1) << 128 | inode."""

    def __init__(self, folder: str | Path, home: int | None = None):
        status = os.stat(folder)
        self.home = status.st_dev if home is None else home
        self.device = status.st_dev
        self.folder = self.key(status.st_dev, status.st_ino)
        self.listing_is_stat: bool | None = None  # found out at its first file that is no link

    def key(self, device: int, inode: int) -> int | None:
        """(st_dev, st_ino) as one int (a third the size of the tuple); None for inode 0, which some file
        systems give every file (nothing to compare)."""
        if not inode:
            return None
        return inode if device == self.home else ((device + 1) << 128) | inode

    def of(self, entry: os.DirEntry) -> int | None:
        try:
            if entry.is_symlink():
                status = _stat(entry)
                return self.key(status.st_dev, status.st_ino)
            if self.listing_is_stat:
                return self.key(self.device, entry.inode())
            status = _stat(entry)
            if self.listing_is_stat is None:
                self.listing_is_stat = (status.st_dev, status.st_ino) == (self.device, entry.inode())
            return self.key(status.st_dev, status.st_ino)
        except OSError:  # gone since the listing, a link that cannot be followed: not told apart
            return None

    def files(self, entries: Iterable[os.DirEntry]) -> dict[str, int | None]:
        """File name -> identity, of the files (`_is_file`) among a listing's `entries`: `of` each, with
        the common case (a file that is no link, on the home device, in a folder whose listing numbers
        files as stat does) worked out here, without a call (a third of the time for 200,000 names)."""
        found: dict[str, int | None] = {}
        home = self.device == self.home
        for entry in entries:
            try:
                if not entry.is_file():
                    continue
                if home and self.listing_is_stat and not entry.is_symlink():
                    found[entry.name] = entry.inode() or None
                    continue
            except OSError:  # a link that loops: no file
                continue
            found[entry.name] = self.of(entry)
        return found


def _stat(entry: os.DirEntry) -> os.stat_result:
    """The stat of the file an entry names (a link's target). DirEntry keeps it where it took one (to tell
    a link's target a file); Windows' DirEntry.stat gives no st_dev / st_ino, os.stat does."""
    return entry.stat() if os.name != "nt" else os.stat(entry.path)


class Listing:
    """The folders under `root`, each listed once (one os.scandir) when a path in it is first asked
    for: the names of the files in it and, with `identify`, their `Identities` (no stat per file)."""

    def __init__(self, root: Path, identify: bool = False):
        self.root, self.identify = root, identify
        self.home: int | None = None  # the device of the first folder listed (`Identities`)
        self.folders: dict[str, dict[str, int | None]] = {}  # '/'-separated folder -> file name -> identity

    def files(self, folder: str) -> dict[str, int | None]:
        found = self.folders.get(folder)
        if found is None:
            try:
                found = self._list(self.root / folder)
            except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL byte in the name
                found = {}
            except OSError as error:  # a name no file system takes is missing; an unreadable folder is not
                if error.errno != errno.ENAMETOOLONG:
                    raise UserError(
                        f"cannot list the folder {self.root / folder}: {error.strerror or error}"
                    ) from None
                found = {}
            self.folders[folder] = found
        return found

    def _list(self, folder: Path) -> dict[str, int | None]:
        with os.scandir(folder) as entries:
            if not self.identify:
                return dict.fromkeys(entry.name for entry in entries if _is_file(entry))
            identities = Identities(folder, self.home)
            self.home = identities.home
            return identities.files(entries)

    def missing(self, relative_paths: Sequence[str], among: Sequence[int] | None = None) -> list[int]:
        """Indices of the '/'-separated `relative_paths` (only those in `among`, if given) with no file under
        ROOT; a folder listed before is not listed again."""
        missing, folders = [], self.folders
        for index in range(len(relative_paths)) if among is None else among:
            folder, _, name = relative_paths[index].rpartition("/")
            if name not in (folders.get(folder) or self.files(folder)):
                missing.append(index)
        return missing

    def same_files(self, relative_paths: Sequence[str]) -> tuple[int, int] | None:
        """The indices (first, second) of two of the distinct '/'-separated `relative_paths` (files found
        under ROOT, by a Listing made with `identify`) that name one file, through a symbolic link or a hard
        link, else None. Two identities alike are confirmed by a stat of both names (a file system could
        number files in its listings wrongly: no image is refused for that)."""
        seen: dict[int, int] = {}
        folders = self.folders
        for index, relpath in enumerate(relative_paths):
            folder, _, name = relpath.rpartition("/")
            identity = (folders.get(folder) or self.files(folder)).get(name)
            if identity is None:
                continue
            first = seen.setdefault(identity, index)
            if first != index and same_file(self.root / relative_paths[first], self.root / relpath):
                return first, index
        return None


def missing_files(root: Path, relative_paths: Sequence[str]) -> list[int]:
    """Indices of the '/'-separated `relative_paths` with no file under `root`: one listing per folder, no
    stat per file."""
    return Listing(root).missing(relative_paths)


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether two names are one file (os.path.samefile; False where either cannot be read)."""
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):
        return False


def link_kind(root: Path, first: str, second: str) -> str:
    """What makes two '/'-separated names under `root` of one file one, for a message: 'a symbolic link'
    where both lead to one real path, 'a hard link' where neither goes through a symbolic link below ROOT,
    else 'links, symbolic and hard'. Only on the way to an error: a realpath of each."""
    real_root = os.path.realpath(root)
    reals = [os.path.realpath(root / name) for name in (first, second)]
    if reals[0] == reals[1]:
        return "a symbolic link"
    if all(real == os.path.join(real_root, *name.split("/")) for real, name in zip(reals, (first, second))):
        return "a hard link"
    return "links, symbolic and hard"


def unicode_twins(root: Path, relative_paths: Sequence[str]) -> list[str | None]:
    """For listed files not found under `root`: each one's spelling on disk where that differs only in
    Unicode normalization (a name typed as 'é' and kept on disk as 'e' + a combining accent, as macOS
    writes names and its zips keep them: the same text, which no one can see), else None. Folder by
    folder down the path, one listing each; only for the names not found."""
    listings: dict[str, dict[str, list[str]]] = {}

    def twin(folder: str, name: str) -> str | None:
        if folder not in listings:
            listings[folder] = {}
            try:
                with os.scandir(root / folder) as entries:
                    for entry in entries:
                        listings[folder].setdefault(attribute_text(entry.name), []).append(entry.name)
            except (OSError, ValueError):
                pass
        found = listings[folder].get(attribute_text(name), [])
        return name if name in found else (found[0] if len(found) == 1 else None)

    spelled: list[str | None] = []
    for relpath in relative_paths:
        folder = ""
        for part in relpath.split("/"):
            on_disk = twin(folder, part)
            if on_disk is None:
                folder = None
                break
            folder = posixpath.join(folder, on_disk)
        spelled.append(folder if folder is not None and folder != relpath else None)
    return spelled


def case_hint(root: Path, missing: Sequence[str]) -> str:
    """For listed files not found under `root`: a note naming those that are there with other upper/lower
    case letters ('000001.JPG' for '000001.jpg', which a case-insensitive disk would have found), else ''.
    Only on the way to an error: one more listing per folder."""
    folders: dict[str, dict[str, str]] = {}
    twins: list[tuple[str, str]] = []  # (on disk, listed)
    for relpath in missing:
        folder, _, name = relpath.rpartition("/")
        if folder not in folders:
            try:
                folders[folder] = {other.lower(): other for other in file_names(root / folder)}
            except (OSError, ValueError):
                folders[folder] = {}
        twin = folders[folder].get(name.lower())
        if twin is not None:
            twins.append((posixpath.join(folder, twin), relpath))
    if not twins:
        return ""
    return (
        f"; {len(twins)} of them found with other upper/lower case letters (first: {cut(twins[0][0])} for "
        f"{cut(twins[0][1])}); names are case-sensitive here: correct the table or rename the files"
    )


def first_few(names: Sequence[str], shown: int = 5) -> str:
    """The first `shown` names, comma-separated, then 'and N more' for the rest: for error messages."""
    more = len(names) - shown
    return ", ".join(cut(name) for name in names[:shown]) + (f" and {more} more" if more > 0 else "")


def random_split(n: int, test_fraction: float, rng: np.random.Generator) -> list[str]:
    """round(test_fraction * n) rows test (at least 1 when n >= 2 and the fraction > 0; never all), the rest train."""
    n_test = round(test_fraction * n)
    if n >= 2 and test_fraction > 0:
        n_test = max(n_test, 1)
    n_test = min(n_test, max(n - 1, 0))  # keep at least one training row
    test = set(rng.permutation(n)[:n_test].tolist())
    return ["test" if index in test else "train" for index in range(n)]
