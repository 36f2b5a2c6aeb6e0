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
from typing import Callable, Iterator, Sequence

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


def file_names(folder: Path, keep: Callable[[str], bool] | None = None, links: set[str] | None = None) -> set[str]:
    """Names of the regular files directly inside `folder` (one os.scandir), those `keep` accepts if given;
    `links` (if given) gathers those of them that are symbolic links (the listing tells, no stat)."""
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries if (keep is None or keep(entry.name)) and _is_file(entry, links)}


def _is_file(entry: os.DirEntry, links: set[str] | None = None) -> bool:
    """A regular file, or a link to one; a link that loops (ELOOP) or cannot be followed is not one
    (listed in a table, it is then reported as that one missing file; unlisted, it is ignored)."""
    try:
        if not entry.is_file():
            return False
        if links is not None and entry.is_symlink():
            links.add(entry.name)
        return True
    except OSError:
        return False


def missing_files(root: Path, relative_paths: Sequence[str], links: dict[str, set[str]] | None = None) -> list[int]:
    """Indices of the '/'-separated `relative_paths` with no file under `root`: one listing per folder, no
    stat per file. `links`, if given, gets folder -> the names in it that are symbolic links (for `same_files`)."""
    folders: dict[str, set[str]] = {}
    missing: list[int] = []
    for index, relpath in enumerate(relative_paths):
        folder, _, name = relpath.rpartition("/")
        if folder not in folders:
            found = links.setdefault(folder, set()) if links is not None else None
            try:
                folders[folder] = file_names(root / folder, links=found)
            except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL byte in the name
                folders[folder] = set()
            except OSError as error:  # a name no file system takes is missing; an unreadable folder is not
                if error.errno != errno.ENAMETOOLONG:
                    raise UserError(f"cannot list the folder {root / folder}: {error.strerror or error}") from None
                folders[folder] = set()
        if name not in folders[folder]:
            missing.append(index)
    return missing


def same_files(root: Path, relative_paths: Sequence[str], links: dict[str, set[str]]) -> tuple[int, int] | None:
    """The indices (first, second) of two of the distinct '/'-separated `relative_paths` (each a file under
    `root`, `links` as `missing_files` gave them) that are one file reached through symbolic links, else
    None. One realpath per folder, and one per name that is itself a link: an image in a folder reached
    through a link (img_align_celeba -> a folder on another disk) is that folder's real path + its name,
    no realpath (a stat per part of the path) per image."""
    real_root = os.path.realpath(root)
    folders: dict[str, tuple[str, bool, str | None]] = {}  # folder -> (real path, through a link, inside ROOT as)
    reals: dict[str, int] = {}  # real path -> index, of the paths through a link
    index_of: dict[str, int] | None = None
    for index, relpath in enumerate(relative_paths):
        folder, _, name = relpath.rpartition("/")
        known = folders.get(folder)
        if known is None:
            real_folder = os.path.realpath(root / folder)
            known = folders[folder] = (
                real_folder,
                real_folder != os.path.join(real_root, folder).rstrip(os.sep),
                _inside(real_folder, real_root),
            )
        real_folder, linked_folder, folder_inside = known
        linked_name = name in links.get(folder, ())
        if not linked_name and not linked_folder:
            continue  # no link on its way: no other path (distinct, normalized) is this file but through one
        if linked_name:
            real = os.path.realpath(os.path.join(real_folder, name))
            inside = _inside(real, real_root)
        else:  # the folder's real path, and a name that is no link: the file's real path
            real = os.path.join(real_folder, name)
            inside = None if folder_inside is None else posixpath.join(folder_inside, name)
        if real in reals:
            return reals[real], index
        reals[real] = index
        if inside is not None:
            if index_of is None:
                index_of = {other: at for at, other in enumerate(relative_paths)}
            twin = index_of.get(inside)
            if twin is not None and twin != index:
                return min(twin, index), max(twin, index)
    return None


def _inside(real: str, real_root: str) -> str | None:
    """A real path as '/'-separated and relative to the real ROOT ('' for ROOT itself), or None outside it."""
    inside = os.path.relpath(real, real_root).replace(os.sep, "/")
    if inside == ".." or inside.startswith("../"):
        return None
    return "" if inside == "." else inside


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
