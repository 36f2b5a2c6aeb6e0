"""CelebA as it is distributed -> a SourceTable (its binary attributes, the official train/val/test split).

    ROOT/img_align_celeba/000001.jpg ...
    ROOT/list_attr_celeba.txt      line 1: the image count; line 2: the attribute names; then
                                   `<file> v1 ... vA` with values -1 or 1, columns separated by one or more spaces
    ROOT/list_eval_partition.txt   `<file> 0|1|2` (train, val, test)

That flat layout is torchvision's (its ROOT/celeba/) and the usual one. The copies people have are
read as they unpack, each file looked for in these places, the first found taken:
- the official Google Drive folder: Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt and
  Img/img_align_celeba/ (from Img/img_align_celeba.zip);
- its lossless copy, img_align_celeba_png/ (from Img/img_align_celeba_png.7z), taken where no JPEG
  folder is: 000001.png for the tables' 000001.jpg;
- Kaggle's (jessicali9530/celeba-dataset): the tables as CSV files, list_attr_celeba.csv (a header
  `image_id,<names>`, then `<file>,v1,...,vA`) and list_eval_partition.csv (`image_id,partition`, then
  `<file>,0|1|2`); also saved again by a spreadsheet, with ';' or tabs for the commas;
- an image folder nested in one of its name (Kaggle's zip, or `unzip img_align_celeba.zip -d
  img_align_celeba`): img_align_celeba/img_align_celeba/, taken when the outer folder holds no image.

Only the text files are parsed and the image folder is listed once; no image is decoded.
Keys are the file stems ("000001"); every split keeps the order of the attribute table.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from toolkit.data.sources import Record, SourceTable, case_hint, csv_rows, file_names, first_few, safe_key, text_rows
from toolkit.errors import UserError, cut

IMAGES = "img_align_celeba"
ATTRIBUTES = "list_attr_celeba.txt"
PARTITION = "list_eval_partition.txt"
PNG_IMAGES = "img_align_celeba_png"  # the lossless copy: the same stems, .png
# Where each is looked for, in order (see the module's docstring): flat, the Drive folder's, Kaggle's
IMAGE_FOLDERS = (IMAGES, f"Img/{IMAGES}", PNG_IMAGES, f"Img/{PNG_IMAGES}")
ATTRIBUTE_TABLES = (ATTRIBUTES, f"Anno/{ATTRIBUTES}", "list_attr_celeba.csv")
PARTITION_TABLES = (PARTITION, f"Eval/{PARTITION}", "list_eval_partition.csv")
SPLITS = {"0": "train", "1": "val", "2": "test"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_VALUE = {"-1": 0, "1": 1}
_value = _VALUE.__getitem__


def read_celeba(root: str | Path) -> SourceTable:
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise UserError(
            f"CelebA root {root} is not a folder (expected one holding {IMAGES}/, {ATTRIBUTES} and {PARTITION})"
        )
    images_dir = _first(root, IMAGE_FOLDERS, Path.is_dir)
    if images_dir is None:
        raise UserError(
            f"CelebA: expected the image folder {root / IMAGES} (or Img/{IMAGES}, or the PNG copy {PNG_IMAGES})"
            + _torchvision_hint(root)
        )
    attr_file, partition_file = (_table(root, places) for places in (ATTRIBUTE_TABLES, PARTITION_TABLES))

    names, files, lines, matrix = _read_attributes(attr_file)
    split_of = _read_partition(partition_file, set(files), attr_file.name)

    # Both directions: a row without its image would fail in the build, an image without a row
    # means the text files and the folder come from different copies.
    # One listing of the folder; "._x.jpg" macOS debris is skipped.
    table_names = files  # as both tables write them; `files` as on disk
    on_disk = file_names(images_dir, _is_image)
    if not on_disk and (images_dir / images_dir.name).is_dir():  # Kaggle's zip: img_align_celeba/img_align_celeba/
        images_dir = images_dir / images_dir.name
        on_disk = file_names(images_dir, _is_image)
    if images_dir.name == PNG_IMAGES:  # the tables name the JPEGs: 000001.jpg is 000001.png here
        others = sorted(name for name in on_disk if not name.lower().endswith(".png"))
        if others:  # else '000001.jpg has no row', which the table lists
            raise UserError(
                f"{images_dir}: {len(others)} image(s) are not PNG files (first: {first_few(others)}); the PNG copy "
                f"holds only 000001.png for the tables' 000001.jpg: move the JPEGs to {root / IMAGES}"
            )
        files = [name.rsplit(".", 1)[0] + ".png" for name in table_names]  # split_of keeps the tables' names
    absent = [(line, name) for name, line in zip(files, lines) if name not in on_disk]
    if absent:
        names_absent = [name for _, name in absent]
        raise UserError(
            f"{attr_file} line {absent[0][0]}: {len(absent)} listed image(s) not found in {images_dir} "
            f"(first: {first_few(names_absent)}){case_hint(images_dir, names_absent)}"
        )
    listed = set(files)
    unlisted = sorted(name for name in on_disk if name not in listed)
    if unlisted:
        raise UserError(
            f"{images_dir}: {len(unlisted)} image(s) have no row in {attr_file} (first: {first_few(unlisted)})"
        )
    unsplit = [name for name in table_names if name not in split_of]
    if unsplit:
        raise UserError(f"{partition_file}: {len(unsplit)} image(s) have no row (first: {first_few(unsplit)})")

    splits: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    keys: dict[str, int] = {}
    for index, name in enumerate(files):
        key = safe_key(name)
        if key in keys:  # e.g. '000001.jpg' and '000001.png': one sample key, so the shards would merge them
            raise UserError(
                f"{attr_file} line {lines[index]}: {cut(name)} gives the key {cut(key)!r}, as "
                f"{cut(files[keys[key]])} on line {lines[keys[key]]} does; rename one of the images"
            )
        keys[key] = index
        splits[split_of[table_names[index]]].append(Record(key=key, path=images_dir / name, attributes=matrix[index]))
    return SourceTable(source="celeba", attributes=names, splits=splits)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def _first(root: Path, places: tuple[str, ...], found) -> Path | None:
    return next((root / place for place in places if found(root / place)), None)


def _table(root: Path, places: tuple[str, ...]) -> Path:
    """The first of ROOT/`places` that is a file: the official name, the Drive folder's, Kaggle's CSV."""
    path = _first(root, places, Path.is_file)
    if path is None:
        raise UserError(f"CelebA: expected the file {root / places[0]} (or {' or '.join(places[1:])} in {root})")
    return path


def _torchvision_hint(root: Path) -> str:
    """torchvision's CelebA keeps the data set in ROOT/celeba/: say so when the folder given is that ROOT."""
    inner = root / "celeba"
    return f"; {inner} holds one: pass --root {inner}" if (inner / IMAGES).is_dir() else ""


def _read_attributes(path: Path) -> tuple[list[str], list[str], list[int], np.ndarray]:
    """Attribute names, image file names and their line numbers, and the (images, attributes) uint8 matrix."""
    count: int | None = None  # the .txt's line 1; Kaggle's CSV has none
    if path.suffix == ".csv":
        rows = csv_rows(path)
        number, header = next(rows, (1, []))
        names = header[1:]  # the first column names the file column (image_id)
        count_line = number
        if not names or "" in names:  # 'image_id,a,,b' or a trailing comma: a column without a name
            raise UserError(f"{path} line {number}: expected the header 'image_id,<attribute names>'")
    else:
        rows = text_rows(path)
        number, fields = next(rows, (1, []))
        if len(fields) != 1 or not (fields[0].isascii() and fields[0].isdigit()):
            # not '²', which isdigit() takes and int() refuses
            raise UserError(f"{path} line {number}: expected the image count alone, got {cut(' '.join(fields))!r}")
        count, count_line = int(fields[0]), number
        number, names = next(rows, (count_line + 1, []))
        if not names:
            raise UserError(f"{path} line {number}: expected the attribute names")
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise UserError(f"{path} line {number}: attribute name(s) repeated: {first_few(repeated)}")

    width = len(names) + 1
    files: list[str] = []
    lines: list[int] = []
    seen: dict[str, int] = {}
    values = bytearray()  # one byte per value, row after row: a single matrix at the end
    for number, fields in rows:
        if len(fields) != width:
            raise UserError(
                f"{path} line {number}: expected a file name and {len(names)} values ({width} columns), "
                f"got {len(fields)} columns"
            )
        name = fields[0]
        if name in seen:
            raise UserError(f"{path} line {number}: {cut(name)} already listed on line {seen[name]}")
        try:
            values += bytes(map(_value, fields[1:]))
        except KeyError:
            column = next(i for i, value in enumerate(fields[1:]) if value not in _VALUE)
            raise UserError(
                f"{path} line {number}: {cut(names[column])} is {cut(fields[column + 1])!r}, expected -1 or 1"
            ) from None
        seen[name] = number
        files.append(name)
        lines.append(number)
    if count is not None and count != len(files):
        raise UserError(f"{path} line {count_line}: says {count} images, but the file has {len(files)} image rows")
    if not files:
        raise UserError(f"{path}: expected at least one image row after the attribute names, found none")
    matrix = np.frombuffer(values, dtype=np.uint8).reshape(len(files), len(names))
    return names, files, lines, matrix


def _read_partition(path: Path, listed: set[str], attributes_name: str) -> dict[str, str]:
    """File name -> "train" / "val" / "test"."""
    split_of: dict[str, str] = {}
    seen: dict[str, int] = {}
    comma = path.suffix == ".csv"
    rows = csv_rows(path) if comma else text_rows(path)
    if comma:  # Kaggle's header 'image_id,partition' is skipped; a CSV without one starts with an image
        first = next(rows, None)
        # a row of an image or of a partition value is no header: one from another copy is refused below
        if first is not None and (first[1][0] in listed or first[1][-1] in SPLITS):
            rows = itertools.chain([first], rows)
    for number, fields in rows:
        if len(fields) != 2:
            shape = "<file>,0|1|2" if comma else "<file> 0|1|2"
            raise UserError(f"{path} line {number}: expected '{shape}', got {len(fields)} column(s)")
        name, value = fields
        if value not in SPLITS:
            raise UserError(f"{path} line {number}: partition {cut(value)!r}, expected 0 (train), 1 (val) or 2 (test)")
        if name in seen:
            raise UserError(f"{path} line {number}: {cut(name)} already listed on line {seen[name]}")
        if name not in listed:
            # a partition file from another copy of the data set: better to stop than guess
            raise UserError(f"{path} line {number}: {cut(name)} has no row in {attributes_name}")
        seen[name] = number
        split_of[name] = SPLITS[value]
    return split_of
