"""CUB-200-2011 in its official layout -> a SourceTable (species one-hot + certain attributes, official split).

    ROOT/attributes.txt                    `<attribute_id> <name>` (beside CUB_200_2011/ in the archive)
    ROOT/CUB_200_2011/images.txt           `<image_id> <class_dir>/<file>.jpg`
                      classes.txt          `<class_id> <name>`
                      image_class_labels.txt   `<image_id> <class_id>`
                      train_test_split.txt     `<image_id> 1|0` (1 = train)
                      bounding_boxes.txt       `<image_id> x y w h` (read only for bbox_crop)
                      attributes/image_attribute_labels.txt
                          `<image_id> <attribute_id> <is_present> <certainty_id> <time>`, one row per
                          image and attribute; a few real rows carry extra columns (ignored)
                      images/<class_dir>/<file>.jpg

ROOT may also be the CUB_200_2011 folder itself. `condition` picks the vector:

- "both" (default, the paper's 512): the species one-hot (order of classes.txt) followed by the
  attributes (order of attributes.txt);
- "species": the one-hot only; attributes.txt and image_attribute_labels.txt are not read (many
  copies of CUB lack them);
- "attributes": the attributes only; classes.txt and image_class_labels.txt are not read.

An attribute is 1 only when is_present == 1 and certainty_id >= 3 (the paper's code; certainty_id
is 1 to 4). Counts come from the files, not constants. Paths in images.txt are read as the folder
reader reads its table's ('a/./b.jpg' is 'a/b.jpg', '\\' is '/'), so one image cannot be listed twice
under two spellings. An image in the folder named after a class of classes.txt (the official
layout) must carry that class in image_class_labels.txt: else the files number the images apart.
The table's source is "cub-200-2011" for "both", else "cub-200-2011:species" /
"cub-200-2011:attributes" (the manifest's `source`, so builds with different conditions are not
mixed in one --out). Only text is parsed and each class folder listed once; no image is decoded.

With bbox_crop each record carries its bounding box as annotated (x, y, w, h); the shard builder
crops the square around it that StackGAN / AttnGAN use (see `toolkit.data.build.bbox_region`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from toolkit.data.sources import (
    Record,
    SourceTable,
    case_hint,
    first_few,
    inside_path,
    missing_files,
    safe_key,
    text_rows,
)
from toolkit.errors import UserError, cut

DATA = "CUB_200_2011"
T = TypeVar("T")


CONDITIONS = ("species", "attributes", "both")


def read_cub(root: str | Path, bbox_crop: bool = False, condition: str = "both") -> SourceTable:
    if condition not in CONDITIONS:
        raise UserError(f"CUB-200-2011 condition {condition!r}: expected one of {', '.join(CONDITIONS)}")
    data = _locate(Path(os.path.abspath(root)))
    species, attributes = condition != "attributes", condition != "species"
    class_names, class_index = _read_names(data / "classes.txt", "class") if species else ([], {})
    attribute_names, attribute_index = [], {}
    if attributes:
        labels_file = data / "attributes" / "image_attribute_labels.txt"
        if not labels_file.is_file():  # the file many copies of CUB lack: say how to do without it
            raise UserError(
                f"CUB-200-2011: {labels_file} not found; it holds the attribute labels that "
                f"condition {condition!r} needs (--condition species builds species-only shards)"
            )
        attribute_names, attribute_index = _read_names(_attributes_file(data, condition), "attribute")
    repeated = sorted(name for name, count in Counter(class_names + attribute_names).items() if count > 1)
    if repeated:  # the condition vector is addressed by name (the sampler, edits): one name per position
        raise UserError(
            f"CUB-200-2011: name(s) used twice across classes.txt and attributes.txt: {first_few(repeated)}"
        )
    ids, relpaths, image_index = _read_images(data / "images.txt")

    def class_of(value: str) -> int:
        position = class_index.get(_int(value))  # type: ignore[arg-type]  # None is simply absent
        if position is None:
            raise ValueError(f"class id {value} is not in classes.txt")
        return position

    def is_train(value: str) -> bool:
        if value not in ("0", "1"):
            raise ValueError(f"split value {value!r}, expected 1 (train) or 0 (test)")
        return value == "1"

    matrix = np.zeros((len(ids), len(class_names) + len(attribute_names)), dtype=np.uint8)
    if species:
        labels = _per_image(
            data / "image_class_labels.txt", image_index, ids, relpaths, "<image_id> <class_id>", class_of
        )
        _check_class_folders(data / "image_class_labels.txt", ids, relpaths, labels, class_names)
        matrix[np.arange(len(ids)), labels] = 1
    train = _per_image(data / "train_test_split.txt", image_index, ids, relpaths, "<image_id> 1|0", is_train)
    if attributes:
        matrix[:, len(class_names) :] = _read_attribute_labels(
            labels_file, image_index, ids, relpaths, attribute_index
        )
    boxes = (
        _per_image(data / "bounding_boxes.txt", image_index, ids, relpaths, "<image_id> x y w h", _box, columns=4)
        if bbox_crop
        else None
    )

    images_dir = data / "images"
    _check_images(images_dir, data / "images.txt", relpaths)

    splits: dict[str, list[Record]] = {"train": [], "test": []}
    keys: dict[str, str] = {}
    for index, relpath in enumerate(relpaths):
        key = safe_key(relpath)
        if key in keys:  # e.g. 'a.b/c.jpg' and 'a_b/c.jpg'
            raise UserError(
                f"{data / 'images.txt'}: {cut(relpath)} and {cut(keys[key])} give the same key {cut(key)!r}"
            )
        keys[key] = relpath
        record = Record(
            key=key,
            path=images_dir / relpath,
            attributes=matrix[index],
            bbox=boxes[index] if boxes is not None else None,
        )
        splits["train" if train[index] else "test"].append(record)
    source = "cub-200-2011" if condition == "both" else f"cub-200-2011:{condition}"
    return SourceTable(source=source, attributes=class_names + attribute_names, splits=splits)


def _locate(root: Path) -> Path:
    """The CUB_200_2011 folder, from the archive root or from CUB_200_2011 itself."""
    if not root.is_dir():
        raise UserError(f"CUB-200-2011 root {root} is not a folder (expected the archive root or its {DATA}/ folder)")
    if (root / DATA / "images.txt").is_file():
        return root / DATA
    if (root / "images.txt").is_file():
        return root
    raise UserError(f"CUB-200-2011: expected {root / DATA / 'images.txt'} or {root / 'images.txt'}")


def _attributes_file(data: Path, condition: str) -> Path:
    # the official archive keeps attributes.txt one level above CUB_200_2011/
    candidates = [data.parent / "attributes.txt", data / "attributes.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"CUB-200-2011: attributes.txt not found (looked for {candidates[0]} and {candidates[1]}); "
        f"condition {condition!r} needs it (--condition species builds species-only shards)"
    )


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """text_rows(path), for a file the layout requires."""
    if not path.is_file():
        raise UserError(f"CUB-200-2011: expected the file {path}")
    yield from text_rows(path)


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _read_names(path: Path, what: str) -> tuple[list[str], dict[int, int]]:
    """`<id> <name>` rows -> names in file order, and id -> position."""
    names: list[str] = []
    index: dict[int, int] = {}
    lines: dict[int, int] = {}
    for number, fields in _rows(path):
        ident = _int(fields[0])
        if len(fields) != 2 or ident is None:
            raise UserError(f"{path} line {number}: expected '<{what}_id> <name>', got {cut(' '.join(fields))!r}")
        if ident in index:
            raise UserError(f"{path} line {number}: {what} id {ident} already used on line {lines[ident]}")
        index[ident], lines[ident] = len(names), number
        names.append(fields[1])
    if not names:
        raise UserError(f"{path}: expected at least one '<{what}_id> <name>' row, found none")
    return names, index


def _read_images(path: Path) -> tuple[list[int], list[str], dict[int, int]]:
    """images.txt -> image ids and relative paths in file order, and id -> position."""
    ids: list[int] = []
    relpaths: list[str] = []
    index: dict[int, int] = {}
    seen: dict[str, int] = {}
    for number, fields in _rows(path):
        ident = _int(fields[0])
        if len(fields) != 2 or ident is None:
            raise UserError(
                f"{path} line {number}: expected '<image_id> <class_dir>/<file>', got {cut(' '.join(fields))!r}"
            )
        relpath = inside_path(fields[1])  # one spelling per image: 'a/./b.jpg' is 'a/b.jpg', listed twice
        if relpath is None:
            raise UserError(f"{path} line {number}: {cut(fields[1])!r} is not a path inside images/")
        if ident in index:
            raise UserError(
                f"{path} line {number}: image id {ident} already used on line {seen[relpaths[index[ident]]]}"
            )
        if relpath in seen:
            raise UserError(f"{path} line {number}: {cut(relpath)} already listed on line {seen[relpath]}")
        index[ident], seen[relpath] = len(ids), number
        ids.append(ident)
        relpaths.append(relpath)
    if not ids:
        raise UserError(f"{path}: expected '<image_id> <class_dir>/<file>' rows, found none")
    return ids, relpaths, index


def _per_image(
    path: Path,
    image_index: dict[int, int],
    ids: list[int],
    relpaths: list[str],
    form: str,
    parse: Callable[..., T],
    columns: int = 1,
) -> list[T]:
    """`<image_id> <value...>` rows -> one parsed value per image (images.txt order); every image needs a row.

    `parse` gets the fields after the id and raises ValueError(reason) on a bad value.
    """
    values: list[T | None] = [None] * len(ids)
    lines: dict[int, int] = {}
    for number, fields in _rows(path):
        ident = _int(fields[0])
        if len(fields) != columns + 1 or ident is None:
            raise UserError(f"{path} line {number}: expected '{form}', got {cut(' '.join(fields))!r}")
        if ident not in image_index:
            raise UserError(f"{path} line {number}: image id {ident} is not in images.txt")
        if ident in lines:
            raise UserError(f"{path} line {number}: image id {ident} already listed on line {lines[ident]}")
        try:
            values[image_index[ident]] = parse(*fields[1:])
        except ValueError as error:
            raise UserError(f"{path} line {number}: {error}") from None
        lines[ident] = number
    missing = [f"id {ids[i]} ({cut(relpaths[i])})" for i, value in enumerate(values) if value is None]
    if missing:
        raise UserError(f"{path}: no row for {len(missing)} image(s) of images.txt (first: {first_few(missing)})")
    return values  # type: ignore[return-value]  # no None left


def _box(*fields: str) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(field) for field in fields)
    except ValueError:
        raise ValueError(f"expected four numbers x y w h, got {cut(' '.join(fields))!r}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"box {cut(' '.join(fields))!r}: expected finite numbers and a positive width and height")
    return (x, y, w, h)


_PRESENT = {"0": False, "1": True}
_CERTAIN = {"1": False, "2": False, "3": True, "4": True}  # certainty_id >= 3; other spellings go through int()


def _read_attribute_labels(
    path: Path, image_index: dict[int, int], ids: list[int], relpaths: list[str], attribute_index: dict[int, int]
) -> np.ndarray:
    """image_attribute_labels.txt -> (images, attributes) uint8, 1 where present with certainty >= 3.

    The real file has ~3.7M rows: ids are looked up as text first, and only the 1s are collected.
    """
    n_attributes = len(attribute_index)
    images = {str(ident): position for ident, position in image_index.items()}
    attributes = {str(ident): position for ident, position in attribute_index.items()}
    counts = [0] * len(ids)
    seen = bytearray(len(ids) * n_attributes)  # one flag per (image, attribute): a repeated row is an error
    ones: list[int] = []  # flat positions image * n_attributes + attribute
    form = "<image_id> <attribute_id> <is_present> <certainty_id> <time>"
    for number, fields in _rows(path):
        if len(fields) < 4:  # extra columns beyond the fourth are ignored: a few real rows have them
            raise UserError(f"{path} line {number}: expected '{form}', got {cut(' '.join(fields))!r}")
        image = images.get(fields[0])
        if image is None:
            image = image_index.get(_int(fields[0]))  # type: ignore[arg-type]  # e.g. '007'
            if image is None:
                raise UserError(f"{path} line {number}: image id {cut(fields[0])} is not in images.txt")
        attribute = attributes.get(fields[1])
        if attribute is None:
            attribute = attribute_index.get(_int(fields[1]))  # type: ignore[arg-type]
            if attribute is None:
                raise UserError(f"{path} line {number}: attribute id {cut(fields[1])} is not in attributes.txt")
        present = _PRESENT.get(fields[2])
        if present is None:
            raise UserError(f"{path} line {number}: is_present is {cut(fields[2])!r}, expected 0 or 1")
        certain = _CERTAIN.get(fields[3])
        if certain is None:
            certainty = _int(fields[3])
            if certainty not in range(1, 5):  # certainties.txt: 1 not visible ... 4 definitely
                raise UserError(
                    f"{path} line {number}: certainty_id is {cut(fields[3])!r}, expected 1, 2, 3 or 4 "
                    "(attributes/certainties.txt)"
                )
            certain = certainty >= 3
        position = image * n_attributes + attribute
        if seen[position]:
            raise UserError(
                f"{path} line {number}: image id {ids[image]} and attribute id {cut(fields[1])} already have a row"
            )
        seen[position] = 1
        counts[image] += 1
        if present and certain:
            ones.append(position)
    wrong = [f"id {ids[i]} ({count} rows)" for i, count in enumerate(counts) if count != n_attributes]
    if wrong:
        raise UserError(
            f"{path}: expected {n_attributes} rows per image (one per attribute in attributes.txt); "
            f"{len(wrong)} image(s) differ (first: {first_few(wrong)})"
        )
    flat = np.zeros(len(ids) * n_attributes, dtype=np.uint8)
    flat[np.asarray(ones, dtype=np.int64)] = 1
    return flat.reshape(len(ids), n_attributes)


def _check_images(images_dir: Path, listing: Path, relpaths: list[str]) -> None:
    """Every listed image must exist: one directory listing per class folder, no stat per image."""
    missing = [relpaths[i] for i in missing_files(images_dir, relpaths)]
    if missing:
        raise UserError(
            f"{listing}: {len(missing)} listed image(s) not found under {images_dir} (first: {first_few(missing)})"
            + case_hint(images_dir, missing)
        )


def _check_class_folders(
    path: Path, ids: list[int], relpaths: list[str], labels: list[int], class_names: list[str]
) -> None:
    """An image kept in the folder named after one class (images.txt's '001.Black_footed_Albatross/...')
    must be labelled with that class: otherwise the two files number the images differently (one
    renumbered or reordered), and every label would be silently wrong. Other folder names are not checked."""
    folders = set(class_names)
    astray = []
    for i, relpath in enumerate(relpaths):
        folder = relpath.rpartition("/")[0]
        if folder in folders and folder != class_names[labels[i]]:
            astray.append(f"id {ids[i]} ({cut(relpath)}) has class {cut(class_names[labels[i]])}")
    if astray:
        raise UserError(
            f"{path}: {len(astray)} image(s) labelled with another class than the one whose folder holds them "
            f"(first: {first_few(astray, 3)}); it does not number the images as images.txt does"
        )
