"""A folder of images plus a CSV table -> a SourceTable (your own data set; one folder per class
without a table: toolkit.data.classes).

    ROOT/any/sub/folders/image.jpg ...
    TABLE (CSV with a header row):
        file,Smiling,Eyeglasses[,split]
        a/0001.jpg,1,0[,train]

The file column is the first of `file`, `filename`, `file_name`, `image`, `path`, `image_id` in the
header (file names are relative to ROOT, or absolute paths inside ROOT); the optional split column
holds train / val / test; every other column is a 0/1 (or -1/1) attribute. Without a split column,
a seeded random `test_fraction` of the rows is test and the rest train, each split in table order.
Only the table is parsed and each folder listed once. Two rows naming one file (through a symbolic
link or a hard link) are refused, as one name listed twice is.
A name not found as written but found in the other Unicode normalization ('é' as one code point,
or as 'e' + a combining accent, as macOS writes names) is read as it is on disk.
Columns are separated by commas, or by semicolons or tabs where the header holds no comma outside
its quoted names (what spreadsheets in many locales save as "CSV"), or where only they give the first
row as many columns as the header ('file;Smiling, open' with the row 'a.jpg;1').
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from toolkit.data.sources import (
    SPLITS,
    Listing,
    Record,
    SourceTable,
    case_hint,
    csv_rows,
    first_few,
    inside_path,
    link_kind,
    random_split,
    safe_key,
    unicode_twins,
)
from toolkit.errors import UserError, cut
from toolkit.formats import attribute_text
from toolkit.paths import shown

# file_name: Hugging Face datasets' imagefolder metadata.csv; image_id: Kaggle's tables (CelebA's CSVs)
FILE_COLUMNS = ("file", "filename", "file_name", "image", "path", "image_id")
_VALUE = {"0": 0, "1": 1, "-1": 0}  # 0/1, or -1/1 as CelebA's tables write them; never both in one table


def read_folder(
    root: str | Path, table: str | Path, split_column: str | None = None, test_fraction: float = 0.1, seed: int = 0
) -> SourceTable:
    root, table = Path(os.path.abspath(root)), Path(os.path.abspath(table))
    if not root.is_dir():
        raise UserError(f"image folder {root} is not a folder")
    if not table.is_file():
        raise UserError(f"expected the table file {table} (a CSV with a header row)")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_fraction is {test_fraction}, expected a number in [0, 1)")

    names, files, lines, matrix, split_of = _read_table(table, split_column, root)
    if not files:
        raise UserError(f"{table}: expected at least one image row after the header, found none")
    _check_images(root, table, files, lines)
    if split_of is None:
        split_of = random_split(len(files), test_fraction, np.random.default_rng(seed))

    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    keys: dict[str, int] = {}
    for index, (name, line) in enumerate(zip(files, lines)):
        key = safe_key(name)
        if key in keys:  # e.g. 'a.b/c.jpg' and 'a_b/c.jpg'
            raise UserError(f"{table} line {line}: {cut(name)} gives the key {cut(key)!r}, as line {keys[key]} does")
        keys[key] = line
        splits[split_of[index]].append(Record(key=key, path=root / name, attributes=matrix[index]))
    # only the splits that have rows: a data set need not have a val split
    splits = {split: records for split, records in splits.items() if records}
    return SourceTable(source=f"folder:{shown(root.name)}", attributes=names, splits=splits)


def _read_table(
    table: Path, split_column: str | None, root: Path
) -> tuple[list[str], list[str], list[int], np.ndarray, list[str] | None]:
    """Attribute names, normalized file names, their line numbers, the uint8 matrix, and the splits if given."""
    rows = csv_rows(table)  # the first non-blank row is the header
    number, header = next(rows, (1, []))
    if not header:
        raise UserError(f"{table} line {number}: expected a header row (a file column and attribute columns)")
    if "" in header:
        raise UserError(f"{table} line {number}: column {header.index('') + 1} has no name")
    texts = [attribute_text(cell) for cell in header]  # 'é' as one code point or two: one name
    if len(set(texts)) != len(texts):
        repeated = sorted({cell for cell, text in zip(header, texts) if texts.count(text) > 1})
        twins = " (one name in two Unicode normalizations)" if len(set(header)) == len(header) else ""
        raise UserError(f"{table} line {number}: column name(s) repeated{twins}: {first_few(repeated)}")
    lowered = [cell.lower() for cell in header]
    file_column = next((lowered.index(name) for name in FILE_COLUMNS if name in lowered), None)
    if file_column is None:
        raise UserError(
            f"{table} line {number}: expected a file column named one of {', '.join(FILE_COLUMNS)}; "
            f"the header is {cut(', '.join(header))}"
        )
    split_index = None
    if split_column is not None:
        if split_column not in header or header.index(split_column) == file_column:
            raise UserError(
                f"{table} line {number}: no split column {split_column!r}; the header is {cut(', '.join(header))}"
            )
        split_index = header.index(split_column)
    attribute_columns = [i for i in range(len(header)) if i not in (file_column, split_index)]
    if not attribute_columns:
        raise UserError(f"{table} line {number}: expected at least one 0/1 attribute column besides the file column")
    names = [header[i] for i in attribute_columns]

    files: list[str] = []
    lines: list[int] = []
    splits: list[str] = []
    seen: dict[str, int] = {}
    inside = _Inside(root)
    values = bytearray()  # one byte per value, row after row: a single matrix at the end
    absent: dict[str, int] = {}  # "0" or "-1" -> the first line using it for an absent attribute
    for number, row in rows:
        if len(row) != len(header):
            raise UserError(f"{table} line {number}: {len(row)} column(s), the header has {len(header)}")
        name = _normalize(row[file_column], table, number, inside)
        if name in seen:
            raise UserError(f"{table} line {number}: {cut(name)} already listed on line {seen[name]}")
        seen[name] = number
        if split_index is not None:  # before the attributes: a wrong split column is said as that
            split = row[split_index]
            if split not in SPLITS:
                raise UserError(_not_a_split(table, number, header, row, split_index, file_column))
            splits.append(split)
        for column in attribute_columns:
            text = row[column]
            value = _VALUE.get(text)
            if value is None:
                hint = ""
                if split_index is None and text in SPLITS:
                    hint = f" (a column of splits? pass --split-column {header[column]})"
                raise UserError(
                    f"{table} line {number}: column {cut(header[column])} is {cut(text)!r}, "
                    f"expected 0 or 1 (or -1 or 1){hint}"
                )
            if text != "1":
                absent.setdefault(text, number)
            if len(absent) == 2:
                other = "0" if text == "-1" else "-1"
                raise UserError(
                    f"{table} line {number}: column {cut(header[column])} is {text}, but line {absent[other]} "
                    f"has {other}: expected 0/1 or -1/1 in every column, not both"
                )
            values.append(value)
        files.append(name)
        lines.append(number)
    matrix = np.frombuffer(values, dtype=np.uint8).reshape(len(files), len(names))
    return names, files, lines, matrix, (splits if split_index is not None else None)


def _not_a_split(
    table: Path, number: int, header: list[str], row: list[str], split_index: int, file_column: int
) -> str:
    """The line for a row whose split column holds no split name: that it is the split column, that its
    0/1 is an attribute's (--split-column naming an attribute column), and which column holds split names."""
    split = row[split_index]
    what = "it holds 0/1 values: an attribute column?" if split in _VALUE else "the --split-column"
    other = next((i for i, text in enumerate(row) if text in SPLITS and i not in (split_index, file_column)), None)
    hint = (
        ""
        if other is None
        else f"; column {cut(header[other])} holds {row[other]!r}: pass --split-column {cut(header[other])}"
    )
    return (
        f"{table} line {number}: column {cut(header[split_index])} is {cut(split)!r}, expected one of "
        f"{', '.join(SPLITS)} in the split column ({what}){hint}"
    )


def _normalize(cell: str, table: Path, number: int, inside: _Inside) -> str:
    """A file name relative to ROOT, with '/' separators (a table written on Windows may use '\\'); an
    absolute path inside ROOT (a table made with `find "$PWD"/...`) is made relative to it."""
    text = cell.strip()
    if not text:
        raise UserError(f"{table} line {number}: empty file name")
    name = inside.relative(text) if os.path.isabs(text) else inside_path(text)
    if name is None:
        raise UserError(f"{table} line {number}: {cut(cell.strip())!r} is not a path inside the image folder")
    return name


class _Inside:
    """Absolute paths of a table made relative to ROOT: by the names alone, or, where a symbolic link
    hides that one is inside (ROOT given as /home/me/photos, a link to /gpfs/me/photos, and the table
    written with Path.resolve(); or the reverse), by the real paths: ROOT's, and each folder's of such
    a path (one realpath per folder, only for paths the names alone put outside)."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root: str | None = None
        self.real_folders: dict[str, str] = {}

    def relative(self, text: str) -> str | None:
        name = inside_path(os.path.relpath(text, self.root))  # by the names alone: '../..' for one outside ROOT
        if name is not None:
            return name
        if self.real_root is None:
            self.real_root = os.path.realpath(self.root)
        folder, base = os.path.split(os.path.normpath(text))
        real_folder = self.real_folders.get(folder)
        if real_folder is None:
            try:
                real_folder = os.path.realpath(folder)
            except (OSError, ValueError):  # ValueError: a NUL byte in the name
                real_folder = folder
            self.real_folders[folder] = real_folder
        return inside_path(os.path.relpath(os.path.join(real_folder, base), self.real_root))


def _check_images(root: Path, table: Path, files: list[str], lines: list[int]) -> None:
    """Every row's image must exist, and be another file than every other row's (not a second name of it,
    a symbolic or a hard link): one directory listing per folder, no stat per image (`Listing`)."""
    listing = Listing(root, identify=True)
    indices = listing.missing(files)
    spelled = unicode_twins(root, [files[i] for i in indices]) if indices else []
    if any(spelled):  # a name typed in one Unicode normalization, kept on disk in the other: read as on disk
        listed = dict(zip(files, lines))
        for index, on_disk in zip(indices, spelled):
            if on_disk is not None:
                if on_disk in listed:
                    raise UserError(
                        f"{table} line {lines[index]}: {cut(files[index])} is the file {cut(on_disk)} of line "
                        f"{listed[on_disk]} (its name in another Unicode normalization); expected each image on one row"
                    )
                listed[on_disk] = lines[index]
                files[index] = on_disk
        indices = listing.missing(files, indices)  # only the renamed are looked up again, in the listings made
    if indices:
        missing = [f"{cut(files[i])} (line {lines[i]})" for i in indices]
        raise UserError(
            f"{table}: {len(missing)} listed image(s) not found under {root} (first: {first_few(missing)})"
            + case_hint(root, [files[i] for i in indices])
        )
    twins = listing.same_files(files)
    if twins is not None:  # two samples of one image, maybe one in train and one in test
        first, second = twins
        raise UserError(
            f"{table} line {lines[second]}: {cut(files[second])} is the file {cut(files[first])} of line "
            f"{lines[first]} under another name ({link_kind(root, files[first], files[second])}); expected each "
            "image on one row"
        )
