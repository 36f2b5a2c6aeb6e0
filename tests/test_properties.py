"""Property-based tests (hypothesis) of everything that parses user input: the raw data sets'
attribute files (CelebA, CUB-200-2011, a folder's CSV), the `key=value` config overrides and the
Sampler's `attributes` argument.

Valid inputs, written in every way the formats allow, must read back exactly. Mangled inputs (lines
deleted, duplicated, swapped or replaced, fields replaced by odd text, bytes flipped, files cut
short) must give either the result an independent reading of the format's rules gives (an `oracle_*`
below) or one `UserError`, never another exception.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
import os
import posixpath
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ATTRIBUTES
from fixtures import make_celeba, make_cub, make_folder, replace_line
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from toolkit.config import MIN_WORKER_LIMIT, WORKERS_PER_CPU, TrainConfig, load_config, usable_cpus
from toolkit.data.celeba import read_celeba
from toolkit.data.cub import read_cub
from toolkit.data.folder import FILE_COLUMNS, read_folder
from toolkit.data.sources import safe_key
from toolkit.errors import UserError


def budget(examples: int):
    """Hypothesis settings: `examples` per test (about 15 s for the whole file on 2 cores), or
    PROPERTY_EXAMPLES=4000 in the environment for a deeper search."""
    return settings(
        max_examples=int(os.environ.get("PROPERTY_EXAMPLES", examples)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


SETTINGS = budget(60)

# --- building blocks ---------------------------------------------------------------------------

# One whitespace-free field of a whitespace-separated file (anything str.split() keeps whole).
FIELD_CHAR = st.characters(codec="utf-8", categories=("L", "N", "P", "S", "M", "Cf", "Co")).filter(
    lambda c: not c.isspace()
)
# A file or folder name: no '/', no NUL, no whitespace (so it stays one field), no leading '.'.
NAME_CHAR = st.characters(codec="utf-8", categories=("L", "N", "P", "S"), exclude_characters="/\\")
NASTY = [
    "",
    "-1",
    "1",
    "0",
    "2",
    "3",
    "4",
    "+1",
    "-0",
    "01",
    "007",
    "\u00b2",
    "\u0661",
    "1_0",
    "0x1",
    "1e3",
    "nan",
    "inf",
    "-inf",
    "1.5",
    "\x00",
    "..",
    "../x",
    "/abs",
    "a\\b",
    "a/b.jpg",
    ".jpg",
    "\ufeff",
    "\u00e9",
    "\u2028",
    "\x85",
    "\x0b",
    "\t",
    "\r",
    "\n",
    ",",
    '"',
    "'",
    "train",
    "val",
    "test",
    "file",
    "true",
    "x" * 300,
    "d" * 300 + "/x.jpg",
]


def field(max_size: int = 10) -> st.SearchStrategy[str]:
    return st.text(FIELD_CHAR, min_size=1, max_size=max_size)


def file_stem(max_size: int = 8) -> st.SearchStrategy[str]:
    return st.text(NAME_CHAR, min_size=1, max_size=max_size).filter(lambda s: not s.startswith("."))


def lines_of(text: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line; lines end at \\n, \\r or \\r\\n (as a file is read)."""
    return [(n, line.split()) for n, line in enumerate(io.StringIO(text, newline=None), 1) if line.split()]


def decoded(blob: bytes) -> str | None:
    """The text a file opened with encoding='utf-8-sig' reads as. Decoded incrementally, as a file is:
    then a file that is only the start of a BOM (b'\\xef') reads as empty, where bytes.decode raises."""
    try:
        return codecs.getincrementaldecoder("utf-8-sig")().decode(blob, final=True)
    except UnicodeDecodeError:
        return None


def is_file(path: Path) -> bool:
    return os.path.isfile(path)  # False, not an error, for NUL bytes or too long names


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # readers never decode images


def summary(table) -> tuple:
    """Everything a reader returns, as plain comparable values."""
    return (
        list(table.attributes),
        {
            split: [(r.key, Path(r.path), [int(v) for v in r.attributes], r.bbox) for r in records]
            for split, records in table.splits.items()
        },
    )


def check_matrix_types(table) -> None:
    for records in table.splits.values():
        for record in records:
            assert record.attributes.dtype == np.uint8 and record.attributes.shape == (len(table.attributes),)


def mangle(data, blob: bytes, separator: bytes = b" ") -> bytes:
    """1 to 3 random edits of a text file: lines, fields or bytes."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        lines = blob.splitlines(keepends=True) or [b""]
        where = data.draw(st.integers(0, len(lines) - 1), label="line")
        edit = data.draw(
            st.sampled_from(
                [
                    "delete",
                    "duplicate",
                    "swap",
                    "replace_line",
                    "replace_field",
                    "insert",
                    "flip_byte",
                    "truncate",
                    "append",
                ]
            ),
            label="edit",
        )
        odd = data.draw(st.one_of(st.sampled_from(NASTY), st.text(max_size=6)), label="odd").encode(
            "utf-8", "surrogatepass"
        )
        if edit == "delete":
            del lines[where]
        elif edit == "duplicate":
            lines.insert(data.draw(st.integers(0, len(lines)), label="to"), lines[where])
        elif edit == "swap":
            other = data.draw(st.integers(0, len(lines) - 1), label="other")
            lines[where], lines[other] = lines[other], lines[where]
        elif edit == "replace_line":
            lines[where] = odd + b"\n"
        elif edit == "replace_field":
            ending = lines[where][len(lines[where].rstrip(b"\r\n")) :]
            fields = lines[where].rstrip(b"\r\n").split(separator)
            fields[data.draw(st.integers(0, len(fields) - 1), label="field")] = odd
            lines[where] = separator.join(fields) + ending
        blob = b"".join(lines)
        if edit == "insert":
            at = data.draw(st.integers(0, len(blob)), label="at")
            blob = blob[:at] + odd + blob[at:]
        elif edit == "flip_byte" and blob:
            at = data.draw(st.integers(0, len(blob) - 1), label="at")
            blob = blob[:at] + bytes([data.draw(st.integers(0, 255), label="byte")]) + blob[at + 1 :]
        elif edit == "truncate":
            blob = blob[: data.draw(st.integers(0, len(blob)), label="at")]
        elif edit == "append":
            blob += odd
    return blob


def read_or_error(read, *args, **kwargs):
    """The reader's summary, or None for a UserError; any other exception fails the test."""
    try:
        table = read(*args, **kwargs)
    except UserError as error:
        assert str(error).strip(), "an empty error message"
        return None
    check_matrix_types(table)
    return summary(table)


class Invalid(Exception):
    """Raised by the oracles: the format's rules reject the input."""


def require(condition: bool) -> None:
    if not condition:
        raise Invalid


def unique(items) -> bool:
    items = list(items)
    return len(set(items)) == len(items)


def to_int(text: str) -> int:
    try:
        return int(text)  # ids as Python reads them ('007' is 7), as the readers document
    except ValueError:
        raise Invalid from None


# --- CelebA ------------------------------------------------------------------------------------

CELEBA_IMAGE = st.builds(lambda stem, ext: stem + ext, file_stem(), st.sampled_from([".jpg", ".JPG", ".jpeg", ".png"]))


@st.composite
def celeba_data_sets(draw):
    names = draw(st.lists(field(), min_size=1, max_size=5, unique=True))
    files = draw(st.lists(CELEBA_IMAGE, min_size=1, max_size=6, unique_by=(lambda f: f, safe_key)))
    assume(all(len(f.encode()) < 200 for f in files))
    values = [[draw(st.integers(0, 1)) for _ in names] for _ in files]
    partition = [draw(st.sampled_from("012")) for _ in files]
    style = draw(
        st.fixed_dictionaries(
            {
                "newline": st.sampled_from(["\n", "\r\n"]),
                "bom": st.booleans(),
                "trailing": st.sampled_from(["", " ", "  "]),
                "gaps": st.lists(st.sampled_from([" ", "  ", "   ", "\t"]), min_size=1, max_size=3),
                "blank_end": st.booleans(),
                "order": st.permutations(range(len(files))),
            }
        )
    )
    return names, files, values, partition, style


def celeba_texts(names, files, values, partition, style) -> tuple[bytes, bytes]:
    gaps = style["gaps"]
    gap = lambda i: gaps[i % len(gaps)]  # noqa: E731
    nl, trailing = style["newline"], style["trailing"]
    lines = [str(len(files)) + trailing, "".join(gap(i) + name for i, name in enumerate(names)).lstrip() + trailing]
    for name, row in zip(files, values):
        # as in the real file: each value right-aligned in 2 characters after the separator
        lines.append(name + "".join(gap(i) + ("1" if v else "-1").rjust(2) for i, v in enumerate(row)) + trailing)
    attr = nl.join(lines) + nl + (nl if style["blank_end"] else "")
    part = "".join(f"{files[i]}{gap(i)}{partition[i]}{trailing}{nl}" for i in style["order"])
    bom = "\ufeff" if style["bom"] else ""
    return (bom + attr).encode(), (bom + part).encode()


def write_celeba(root: Path, files, attr: bytes, part: bytes) -> None:
    (root / "img_align_celeba").mkdir(parents=True)
    for name in files:
        touch(root / "img_align_celeba" / name)
    (root / "list_attr_celeba.txt").write_bytes(attr)
    (root / "list_eval_partition.txt").write_bytes(part)


def oracle_celeba(root: Path, attr: bytes, part: bytes):
    """CelebA's rules, read independently: the summary read_celeba must return, or Invalid."""
    attr_text, part_text = decoded(attr), decoded(part)
    require(attr_text is not None and part_text is not None)
    rows = [fields for _, fields in lines_of(attr_text)]
    require(len(rows) >= 2 and len(rows[0]) == 1 and re.fullmatch("[0-9]+", rows[0][0]) is not None)
    count, names, rows = int(rows[0][0]), rows[1], rows[2:]
    require(unique(names))
    require(all(len(row) == len(names) + 1 and all(v in ("-1", "1") for v in row[1:]) for row in rows))
    files = [row[0] for row in rows]
    require(unique(files) and count == len(rows) and rows)
    split_of = {}
    for fields in (fields for _, fields in lines_of(part_text)):
        require(len(fields) == 2 and fields[1] in ("0", "1", "2") and fields[0] not in split_of and fields[0] in files)
        split_of[fields[0]] = {"0": "train", "1": "val", "2": "test"}[fields[1]]
    images = root / "img_align_celeba"
    on_disk = {
        p.name
        for p in images.iterdir()
        if p.is_file() and p.name.lower().endswith((".jpg", ".jpeg", ".png")) and not p.name.startswith(".")
    }
    require(set(files) == on_disk and set(files) <= set(split_of) and unique(safe_key(f) for f in files))
    splits = {"train": [], "val": [], "test": []}
    for row in rows:
        splits[split_of[row[0]]].append(
            (safe_key(row[0]), images / row[0], [1 if v == "1" else 0 for v in row[1:]], None)
        )
    return names, splits


@SETTINGS
@given(celeba_data_sets())
def test_celeba_valid_files_read_back_exactly(data_set):
    names, files, values, partition, style = data_set
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_celeba(root, files, *celeba_texts(*data_set))
        attributes, splits = summary(read_celeba(root))
    assert attributes == names
    expected = {"train": [], "val": [], "test": []}
    for name, row, part in zip(files, values, partition):  # each split in the file's order
        expected[{"0": "train", "1": "val", "2": "test"}[part]].append(
            (safe_key(name), root / "img_align_celeba" / name, row, None)
        )
    assert splits == expected
    assert unique(r[0] for records in splits.values() for r in records)


@SETTINGS
@given(celeba_data_sets(), st.data())
def test_celeba_mangled_files_give_the_rules_result_or_one_user_error(data_set, data):
    attr, part = celeba_texts(*data_set)
    if data.draw(st.booleans(), label="mangle the attribute file"):
        attr = mangle(data, attr)
    else:
        part = mangle(data, part)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_celeba(root, data_set[1], attr, part)
        got = read_or_error(read_celeba, root)
        try:
            expected = oracle_celeba(root, attr, part)
        except Invalid:
            expected = None
    assert got == expected


# --- CUB-200-2011 ------------------------------------------------------------------------------


@st.composite
def cub_data_sets(draw):
    def named(count_max, prefix):
        ids = draw(st.lists(st.integers(0, 999), min_size=1, max_size=count_max, unique=True))
        names = draw(
            st.lists(field(8).map(lambda s, p=prefix: p + s), min_size=len(ids), max_size=len(ids), unique=True)
        )
        return ids, names

    class_ids, class_names = named(4, "c.")
    attribute_ids, attribute_names = named(4, "has::")
    image_ids = draw(st.lists(st.integers(0, 9999), min_size=1, max_size=5, unique=True))
    folders = draw(st.lists(file_stem(), min_size=1, max_size=2, unique=True))
    relpaths = draw(
        st.lists(
            st.builds(lambda d, f: f"{d}/{f}.jpg", st.sampled_from(folders), file_stem()),
            min_size=len(image_ids),
            max_size=len(image_ids),
            unique_by=(lambda r: r, safe_key),
        )
    )
    labels = [draw(st.sampled_from(class_ids)) for _ in image_ids]
    train = [draw(st.booleans()) for _ in image_ids]
    marks = [[(draw(st.integers(0, 1)), draw(st.integers(1, 4))) for _ in attribute_ids] for _ in image_ids]
    boxes = [
        (draw(st.integers(0, 50)), draw(st.integers(0, 50)), draw(st.integers(1, 50)), draw(st.integers(1, 50)))
        for _ in image_ids
    ]
    style = draw(
        st.fixed_dictionaries(
            {
                "newline": st.sampled_from(["\n", "\r\n"]),
                "pad": st.sampled_from(["", "0", "00"]),  # ids as '007'
                "inside": st.booleans(),
                "extra_columns": st.booleans(),
                "bbox": st.booleans(),
                "condition": st.sampled_from(["both", "species", "attributes"]),
                "order": st.permutations(range(len(image_ids) * len(attribute_ids))),
            }
        )
    )
    return dict(
        class_ids=class_ids,
        class_names=class_names,
        attribute_ids=attribute_ids,
        attribute_names=attribute_names,
        image_ids=image_ids,
        relpaths=relpaths,
        labels=labels,
        train=train,
        marks=marks,
        boxes=boxes,
        style=style,
    )


CUB_FILES = [
    "classes.txt",
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "attributes/image_attribute_labels.txt",
    "bounding_boxes.txt",
    "attributes.txt",
]


def cub_texts(d) -> dict[str, bytes]:
    s, nl = d["style"], d["style"]["newline"]
    pad = lambda i: s["pad"] + str(i)  # noqa: E731
    text = lambda rows: "".join(" ".join(map(str, row)) + nl for row in rows).encode()  # noqa: E731
    labels = []
    for flat in s["order"]:
        image, attribute = divmod(flat, len(d["attribute_ids"]))
        present, certainty = d["marks"][image][attribute]
        extra = ["0", "x"] if s["extra_columns"] and flat % 3 == 0 else []
        labels.append([pad(d["image_ids"][image]), d["attribute_ids"][attribute], present, certainty, "12.5", *extra])
    return {
        "classes.txt": text(zip(d["class_ids"], d["class_names"])),
        "attributes.txt": text(zip(map(pad, d["attribute_ids"]), d["attribute_names"])),
        "images.txt": text(zip(d["image_ids"], d["relpaths"])),
        "image_class_labels.txt": text(zip(d["image_ids"], map(pad, d["labels"]))),
        "train_test_split.txt": text((i, int(t)) for i, t in zip(d["image_ids"], d["train"])),
        "attributes/image_attribute_labels.txt": text(labels),
        "bounding_boxes.txt": text((i, *box) for i, box in zip(d["image_ids"], d["boxes"])),
    }


def write_cub(root: Path, d, texts: dict[str, bytes]) -> Path:
    """The archive layout; attributes.txt beside CUB_200_2011/ or inside it. Returns the data folder."""
    data = root / "CUB_200_2011"
    for name, blob in texts.items():
        if blob is None:
            continue
        path = (data if name != "attributes.txt" or d["style"]["inside"] else root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    for relpath in d["relpaths"]:
        touch(data / "images" / relpath)
    return data


SPECIES_FILES = {"classes.txt", "image_class_labels.txt"}
ATTRIBUTE_FILES = {"attributes.txt", "attributes/image_attribute_labels.txt"}


def oracle_cub(data: Path, texts: dict[str, bytes], bbox: bool, condition: str = "both"):
    """CUB-200-2011's rules, read independently (see the docstring of toolkit/data/cub.py)."""
    species, attributes = condition != "attributes", condition != "species"
    rows = {name: [] for name in SPECIES_FILES | ATTRIBUTE_FILES}  # a condition's unused files stay empty
    for name in CUB_FILES:
        if (
            (name == "bounding_boxes.txt" and not bbox)
            or (name in SPECIES_FILES and not species)
            or (name in ATTRIBUTE_FILES and not attributes)
        ):
            continue
        blob = texts.get(name)
        require(blob is not None and decoded(blob) is not None)
        rows[name] = [fields for _, fields in lines_of(decoded(blob))]

    def named(name):
        require(rows[name] and all(len(r) == 2 for r in rows[name]))
        ids = [to_int(r[0]) for r in rows[name]]
        require(unique(ids))
        return ids, [r[1] for r in rows[name]]

    class_ids, class_names = named("classes.txt") if species else ([], [])
    attribute_ids, attribute_names = named("attributes.txt") if attributes else ([], [])
    require(unique(class_names + attribute_names))  # one name per position of the condition vector
    images = rows["images.txt"]
    require(images and all(len(r) == 2 for r in images))
    # one spelling per image ('a/./b.jpg' is 'a/b.jpg', '\\' is '/'), inside images/
    image_ids, relpaths = [to_int(r[0]) for r in images], [posixpath.normpath(r[1].replace("\\", "/")) for r in images]
    require(all(not p.startswith("/") and p != ".." and not p.startswith("../") for p in relpaths))
    require(unique(image_ids) and unique(relpaths))

    def per_image(name, columns, parse):
        values = {}
        for r in rows[name]:
            require(len(r) == columns + 1)
            ident = to_int(r[0])
            require(ident in image_ids and ident not in values)
            values[ident] = parse(*r[1:])
        require(set(values) == set(image_ids))
        return [values[i] for i in image_ids]

    def class_of(value):
        require(to_int(value) in class_ids)
        return class_ids.index(to_int(value))

    def split(value):
        require(value in ("0", "1"))
        return value == "1"

    def box(*fields):
        try:
            x, y, w, h = map(float, fields)
        except ValueError:
            raise Invalid from None
        require(all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0)
        return (x, y, w, h)

    labels = per_image("image_class_labels.txt", 1, class_of) if species else [None] * len(image_ids)
    if species:  # an image in a class's folder has that class
        folders = [p.rpartition("/")[0] for p in relpaths]
        require(all(f not in class_names or f == class_names[c] for f, c in zip(folders, labels)))
    train = per_image("train_test_split.txt", 1, split)
    boxes = per_image("bounding_boxes.txt", 4, box) if bbox else [None] * len(image_ids)
    present = np.zeros((len(image_ids), len(attribute_ids)), np.uint8)
    seen = set()
    for r in rows["attributes/image_attribute_labels.txt"]:
        require(len(r) >= 4)
        image, attribute = to_int(r[0]), to_int(r[1])
        require(image in image_ids and attribute in attribute_ids and (image, attribute) not in seen)
        require(r[2] in ("0", "1"))
        certainty = to_int(r[3])
        require(1 <= certainty <= 4)  # attributes/certainties.txt
        seen.add((image, attribute))
        present[image_ids.index(image), attribute_ids.index(attribute)] = r[2] == "1" and certainty >= 3
    require(len(seen) == len(image_ids) * len(attribute_ids))  # 0 == 0 when the attributes are not read
    require(all(is_file(data / "images" / p) for p in relpaths) and unique(safe_key(p) for p in relpaths))
    splits = {"train": [], "test": []}
    for index, relpath in enumerate(relpaths):
        row = [0] * len(class_ids) + present[index].tolist()
        if species:
            row[labels[index]] = 1
        splits["train" if train[index] else "test"].append(
            (safe_key(relpath), data / "images" / relpath, row, boxes[index])
        )
    return class_names + attribute_names, splits


@SETTINGS
@given(cub_data_sets())
def test_cub_valid_files_read_back_exactly(d):
    bbox, condition = d["style"]["bbox"], d["style"]["condition"]
    species, with_attributes = condition != "attributes", condition != "species"
    texts = cub_texts(d)
    if not with_attributes:  # species alone must not need the attribute files
        texts["attributes.txt"] = texts["attributes/image_attribute_labels.txt"] = None
    with tempfile.TemporaryDirectory() as folder:
        data = write_cub(Path(folder), d, texts)
        attributes, splits = summary(read_cub(Path(folder), bbox_crop=bbox, condition=condition))
    assert attributes == (d["class_names"] if species else []) + (d["attribute_names"] if with_attributes else [])
    expected = {"train": [], "test": []}
    for index, relpath in enumerate(d["relpaths"]):
        marks = [int(p == 1 and c >= 3) for p, c in d["marks"][index]]
        row = ([0] * len(d["class_ids"]) if species else []) + (marks if with_attributes else [])
        if species:
            row[d["class_ids"].index(d["labels"][index])] = 1
        box = tuple(map(float, d["boxes"][index])) if bbox else None
        expected["train" if d["train"][index] else "test"].append(
            (safe_key(relpath), data / "images" / relpath, row, box)
        )
    assert splits == expected


@SETTINGS
@given(cub_data_sets(), st.data())
def test_cub_mangled_files_give_the_rules_result_or_one_user_error(d, data):
    bbox, condition = d["style"]["bbox"], d["style"]["condition"]
    texts = cub_texts(d)
    for name in data.draw(
        st.lists(st.sampled_from(sorted(texts)), min_size=1, max_size=2, unique=True), label="files"
    ):
        texts[name] = None if data.draw(st.integers(0, 9), label="drop") == 0 else mangle(data, texts[name])
    with tempfile.TemporaryDirectory() as folder:
        data_folder = write_cub(Path(folder), d, texts)
        got = read_or_error(read_cub, Path(folder), bbox_crop=bbox, condition=condition)
        try:
            expected = oracle_cub(data_folder, texts, bbox, condition)
        except Invalid:
            expected = None
    assert got == expected


# --- a folder with a CSV -----------------------------------------------------------------------

CSV_TEXT = st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"))


@st.composite
def folder_data_sets(draw):
    file_column = draw(st.sampled_from(FILE_COLUMNS).flatmap(lambda c: st.sampled_from([c, c.upper(), c.title()])))
    names = draw(
        st.lists(
            st.text(CSV_TEXT, min_size=1, max_size=8).map(str.strip).filter(bool),
            min_size=1,
            max_size=4,
            unique_by=str.lower,
        ).filter(lambda ns: not {n.lower() for n in ns} & {*FILE_COLUMNS, "split"})
    )
    split_column = draw(st.sampled_from([None, "split", "Split"]))
    folders = draw(
        st.lists(
            st.text(NAME_CHAR, min_size=1, max_size=6).filter(lambda s: s not in (".", "..")),
            min_size=1,
            max_size=2,
            unique=True,
        )
    )
    relpaths = draw(
        st.lists(
            st.builds(
                lambda d, f, ext, flat: f + ext if flat else f"{d}/{f}{ext}",
                st.sampled_from(folders),
                file_stem(),
                st.sampled_from([".jpg", ".png", ""]),
                st.booleans(),
            ),
            min_size=1,
            max_size=6,
            unique_by=(lambda r: r, safe_key),
        )
    )
    # folder names must not also be flat file names
    assume(not set(folders) & set(relpaths) and all(len(r.encode()) < 200 for r in relpaths))
    values = [[draw(st.integers(0, 1)) for _ in names] for _ in relpaths]
    splits = [draw(st.sampled_from(["train", "val", "test"])) for _ in relpaths]
    style = draw(
        st.fixed_dictionaries(
            {
                "newline": st.sampled_from(["\n", "\r\n"]),
                "bom": st.booleans(),
                "pad": st.sampled_from(["", " ", "  "]),
                "dot_slash": st.booleans(),
                "backslash": st.booleans(),
                "minus_one": st.booleans(),  # CelebA's -1/1 for 0/1
                "blank_rows": st.booleans(),
                "columns": st.permutations(range(len(names) + 1 + (split_column is not None))),
                "quoting": st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
                "test_fraction": st.sampled_from([0.0, 0.1, 0.5]),
                "seed": st.integers(0, 3),
            }
        )
    )
    return dict(
        file_column=file_column,
        names=names,
        split_column=split_column,
        relpaths=relpaths,
        values=values,
        splits=splits,
        style=style,
    )


def folder_text(d) -> bytes:
    s = d["style"]
    header = [d["file_column"], *d["names"]] + ([d["split_column"]] if d["split_column"] else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=s["newline"], quoting=s["quoting"])
    writer.writerow([header[i] for i in s["columns"]])
    for index, relpath in enumerate(d["relpaths"]):
        cell = ("./" if s["dot_slash"] else "") + (relpath.replace("/", "\\") if s["backslash"] else relpath)
        absent = "-1" if s["minus_one"] else "0"
        row = [s["pad"] + cell + s["pad"], *(s["pad"] + ("1" if v else absent) for v in d["values"][index])]
        if d["split_column"]:
            row.append(d["splits"][index] + s["pad"])
        writer.writerow([row[i] for i in s["columns"]])
        if s["blank_rows"] and index == 0:
            buffer.write(s["newline"])
    return (("\ufeff" if s["bom"] else "") + buffer.getvalue()).encode()


def write_folder(root: Path, d, table: bytes) -> None:
    for relpath in d["relpaths"]:
        touch(root / "images" / relpath)
    (root / "labels.csv").write_bytes(table)


def expected_random_split(n: int, fraction: float) -> int:
    """How many rows a random split puts in test (folder.py's docstring)."""
    test = round(fraction * n)
    if n >= 2 and fraction > 0:
        test = max(test, 1)
    return min(test, max(n - 1, 0))


def oracle_folder(root: Path, blob: bytes, split_column: str | None):
    """The CSV rules (toolkit/data/folder.py's docstring), read independently; split-less tables get
    the split read_folder drew, checked separately."""
    text = decoded(blob)
    require(text is not None)
    # the docstring's separator rule: a first line 'sep=X' names it (and is no row); else ',' unless the
    # header holds no comma outside its quoted names and holds ';' or a tab; and where that separator
    # gives the first row another column count than the header, the other that gives both one count (>= 2)
    lines = [line for line in io.StringIO(text, newline="") if line.strip()][:2]
    declared = re.fullmatch(r"sep=([,;\t|])", lines[0].strip(" \r\n"), re.IGNORECASE) if lines else None
    if declared:
        separator = declared[1]
    else:
        outside = re.sub(r'"[^"]*(?:"|$)', "", lines[0] if lines else "")
        separator = next((other for other in ";\t" if "," not in outside and other in outside), ",")

        def fits(other: str) -> bool:
            try:
                counts = [len(next(csv.reader([line.rstrip("\r\n")], delimiter=other), [])) for line in lines]
            except csv.Error:  # a field beyond csv's size limit: the reader says so
                raise Invalid from None
            return counts[0] >= 2 and counts[0] == counts[1]

        if len(lines) == 2 and not fits(separator):
            separator = next((o for o in ",;\t" if o != separator and o in lines[0] and fits(o)), separator)
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=separator))
    except csv.Error:
        raise Invalid from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]  # blank rows, before the header too
    if declared:
        rows = rows[1:]
    header = [cell.strip() for cell in (rows[0] if rows else [])]
    require(any(header) and "" not in header and unique(header))
    lowered = [cell.lower() for cell in header]
    file_names = [name for name in FILE_COLUMNS if name in lowered]
    require(bool(file_names))
    file_column = lowered.index(file_names[0])
    split_index = None
    if split_column is not None:
        require(split_column in header and header.index(split_column) != file_column)
        split_index = header.index(split_column)
    attribute_columns = [i for i in range(len(header)) if i not in (file_column, split_index)]
    require(bool(attribute_columns))
    records, seen, absent = [], set(), set()
    for row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        require(len(row) == len(header))
        name = row[file_column].strip()
        require(name != "")
        if os.path.isabs(name):  # an absolute path inside the image folder: relative to it
            name = os.path.relpath(name, root / "images")
        name = posixpath.normpath(name.replace("\\", "/"))
        require(not name.startswith("/") and name != ".." and not name.startswith("../") and name not in seen)
        seen.add(name)
        values = [row[i].strip() for i in attribute_columns]
        require(all(v in ("0", "1", "-1") for v in values))
        absent.update(v for v in values if v != "1")
        require(len(absent) < 2)  # 0/1 or -1/1, not both in one table
        split = row[split_index].strip() if split_index is not None else None
        require(split_index is None or split in ("train", "val", "test"))
        records.append((name, [int(v == "1") for v in values], split))
    require(bool(records) and all(is_file(root / "images" / name) for name, _, _ in records))
    require(unique(safe_key(name) for name, _, _ in records))
    return [header[i] for i in attribute_columns], records


def check_folder_result(root: Path, got, expected, split_column, fraction) -> None:
    names, records = expected
    attributes, splits = got
    assert attributes == names
    entries = [(safe_key(name), root / "images" / name, values, None) for name, values, _ in records]
    if split_column is not None:
        wanted = {}
        for entry, (_, _, split) in zip(entries, records):
            wanted.setdefault(split, []).append(entry)
        assert splits == {s: wanted[s] for s in ("train", "val", "test") if s in wanted}
    else:  # a random split: train and test, each in table order, of the documented sizes
        assert set(splits) <= {"train", "test"}
        order = {entry[0]: index for index, entry in enumerate(entries)}
        for split_records in splits.values():
            assert [order[r[0]] for r in split_records] == sorted(order[r[0]] for r in split_records)
        assert sorted(r for s in splits.values() for r in s) == sorted(entries)
        assert len(splits.get("test", [])) == expected_random_split(len(entries), fraction)


@SETTINGS
@given(folder_data_sets())
def test_folder_valid_tables_read_back_exactly(d):
    s = d["style"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_folder(root, d, folder_text(d))
        got = summary(
            read_folder(
                root / "images",
                root / "labels.csv",
                split_column=d["split_column"],
                test_fraction=s["test_fraction"],
                seed=s["seed"],
            )
        )
    # attributes in the table's column order, which the style shuffles
    order = [i - 1 for i in s["columns"] if 1 <= i <= len(d["names"])]
    records = [
        (relpath, [values[i] for i in order], split)
        for relpath, values, split in zip(d["relpaths"], d["values"], d["splits"])
    ]
    check_folder_result(root, got, ([d["names"][i] for i in order], records), d["split_column"], s["test_fraction"])


@SETTINGS
@given(folder_data_sets(), st.data())
def test_folder_mangled_tables_give_the_rules_result_or_one_user_error(d, data):
    s = d["style"]
    blob = mangle(data, folder_text(d), separator=b",")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_folder(root, d, blob)
        got = read_or_error(
            read_folder,
            root / "images",
            root / "labels.csv",
            split_column=d["split_column"],
            test_fraction=s["test_fraction"],
            seed=s["seed"],
        )
        try:
            expected = oracle_folder(root, blob, d["split_column"])
        except Invalid:
            expected = None
        if expected is None or got is None:
            assert got == expected
        else:
            check_folder_result(root, got, expected, d["split_column"], s["test_fraction"])


# --- what the searches above found, pinned ------------------------------------------------------


def test_celeba_count_line_takes_ascii_digits_only(tmp_path):
    # '²'.isdigit() is true but int('²') raises ValueError: it crashed the reader
    make_celeba(tmp_path, n=4)
    for count in ("\u00b2", "\u0664", "+4", "4.0"):
        replace_line(tmp_path / "list_attr_celeba.txt", 1, count)
        with pytest.raises(UserError, match="image count"):
            read_celeba(tmp_path)


def test_celeba_two_images_with_one_key_are_refused(tmp_path):
    # '000001.jpg' and '000001.png' both gave the key '000001': the shards would have merged the two samples
    make_celeba(tmp_path, n=4)
    (tmp_path / "img_align_celeba" / "000002.jpg").rename(tmp_path / "img_align_celeba" / "000001.png")
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        path = tmp_path / name
        path.write_text(path.read_text().replace("000002.jpg", "000001.png"))
    with pytest.raises(UserError, match="000001.png gives the key '000001', as 000001.jpg"):
        read_celeba(tmp_path)


def test_cub_a_repeated_attribute_row_is_refused_even_when_the_count_is_right(tmp_path):
    # one row repeated in place of another kept every image's row count right: it was read as 'absent'
    cub = make_cub(tmp_path)
    labels = cub["files"]["attribute_labels"]
    lines = labels.read_text().splitlines()
    lines[1] = lines[0]
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 2: image id 1 and attribute id 1 already have a row"):
        read_cub(tmp_path)


def test_cub_a_name_used_twice_is_refused(tmp_path):
    # a class named like an attribute (or two classes alike) gave a condition vector with two equal names
    cub = make_cub(tmp_path)
    replace_line(cub["files"]["classes"], 2, f"2 {cub['attribute_names'][0]}")
    with pytest.raises(UserError, match="used twice"):
        read_cub(tmp_path)


@pytest.mark.parametrize("folder", ["a\x00b", "d" * 300])
def test_image_paths_no_file_system_takes_are_missing_images(tmp_path, folder):
    # a NUL byte (ValueError) or a 300-byte folder name (OSError ENAMETOOLONG) escaped os.scandir
    cub = make_cub(tmp_path / "cub")
    replace_line(cub["files"]["images"], 1, f"1 {folder}/x.jpg")
    with pytest.raises(UserError, match="not found"):
        read_cub(tmp_path / "cub")
    made = make_folder(tmp_path / "folder")
    replace_line(made["table"], 2, f"{folder}/x.jpg,1,0")
    with pytest.raises(UserError, match="not found"):
        read_folder(made["root"], made["table"])


@pytest.mark.parametrize(
    "override, words",
    [
        ("run_dir=${nope}", "config key 'run_dir'"),  # interpolations failed in to_object, outside any try
        ("seed=${oc.env:NO_SUCH_VARIABLE_HERE}", "config key 'seed'"),
        ("seed=${seed}", "config key 'seed'"),
        ("recipe=" + "r" * 300, "unknown recipe"),  # Path.is_file raised OSError(ENAMETOOLONG)
        ("data=5", "'data' in the command line is a group"),  # was: unknown config key '?'
        (".seed=1", "unknown config key '.seed'"),
        ("seed=-1", "seed"),
        ("seed=4294967296", "seed"),  # numpy's seeding takes [0, 2**32): it failed at train time
        ("lr=inf", "lr"),
        ("weight_decay=inf", "weight_decay"),
        ("dist_timeout_s=0", "dist_timeout_s"),
    ],
)
def test_overrides_that_used_to_crash_or_pass_give_one_clear_user_error(override, words):
    with pytest.raises(UserError) as caught:
        load_config(["recipe=digits", override])
    assert words in str(caught.value)


# --- key=value overrides -----------------------------------------------------------------------

INT_KEYS = {
    "seed": (0, 2**32 - 1),
    "max_steps": (1, None),
    "batch_size": (1, None),
    "log_every": (1, None),
    "sample_every": (1, None),
    "eval_every": (0, None),
    "warmup_steps": (0, None),
    "grad_accum": (1, None),
    "max_bad_steps": (1, None),
    "checkpoint_every": (1, None),
    "checkpoints_total_limit": (1, None),
    "data.num_workers": (0, max(WORKERS_PER_CPU * usable_cpus(), MIN_WORKER_LIMIT)),  # as many as the CPUs feed
    "data.shuffle_buffer": (1, None),
    "model.latent_dim": (1, None),
    "model.width": (1, None),
    "model.levels": (1, None),
    "model.embed_dim": (1, None),
}
FLOAT_KEYS = {
    "lr": (0.0, None, True),
    "beta": (0.0, 1.0, False),
    "weight_decay": (0.0, None, False),
    "grad_clip": (0.0, None, False),
    "dist_timeout_s": (0.0, 1e7, True),
    "data.max_skipped_fraction": (0.0, 1.0, False),
}
TEXT_KEYS = ["run_dir", "data.shards", "resume"]
CHOICE_KEYS = {
    "mixed_precision": ["auto", "no", "fp16", "bf16"],
    "optimizer": ["adam", "adamw"],
    "lr_schedule": ["constant", "cosine"],
    "data.sampling": ["epochs", "resampled"],
    "model.arch": ["paper", "resnet"],
    "model.prior": ["standard", "learned"],
}
ALL_KEYS = [*INT_KEYS, *FLOAT_KEYS, *TEXT_KEYS, *CHOICE_KEYS, "data.record_keys", "data", "model", "recipe"]
YAMLISH = [
    "",
    "null",
    "~",
    "true",
    "no",
    "yes",
    "on",
    ".inf",
    "-.inf",
    ".nan",
    "1:2",
    "0x10",
    "0o7",
    "1_000",
    "1e3",
    "-1",
    "[1]",
    "{a: 1}",
    "!!binary aGk=",
    "!!python/object:os.system",
    "&a x",
    "*a",
    "'q'",
    '"',
    "%",
    "@",
    "`",
    "|",
    ">",
    "- x",
    "? x",
    "#",
    "${x}",
    "${oc.env:HOME}",
    "${oc.env:NO_SUCH_VARIABLE_HERE}",
    "${seed}",
    "${oc.decode:'1'}",
    "${oc.create:{}}",
    "${",
    "}",
    "\\${x}",
    "\x00",
    "\u00b2",
    "\u0661",
    "9" * 30,
    "1e400",
    "nan",
]


def check_config(config) -> None:
    assert isinstance(config, TrainConfig)
    for key in INT_KEYS:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        assert isinstance(value, int) and not isinstance(value, bool), key
    assert 0 < config.lr < math.inf and 0 <= config.beta <= 1 and 0 < config.dist_timeout_s
    for key, choices in CHOICE_KEYS.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        assert value in choices, key
    assert config.run_dir and config.recipe


OVERRIDE = st.one_of(
    st.text(max_size=20),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=12)),
        st.one_of(st.sampled_from(YAMLISH), st.text(max_size=12), st.integers().map(str), st.floats().map(repr)),
    ),
)


@budget(150)
@given(st.lists(OVERRIDE, max_size=4))
def test_any_overrides_give_a_valid_config_or_one_user_error(overrides):
    try:
        config = load_config(["recipe=digits", *overrides])
    except UserError as error:
        assert str(error).strip()
        return
    check_config(config)


@st.composite
def typed_overrides(draw):
    """key=value items of valid values, with the value each must give."""
    items = {}
    for key in draw(
        st.lists(
            st.sampled_from([*INT_KEYS, *FLOAT_KEYS, *TEXT_KEYS, *CHOICE_KEYS, "data.record_keys"]),
            max_size=6,
            unique=True,
        )
    ):
        if key in INT_KEYS:
            low, high = INT_KEYS[key]
            value = draw(st.integers(low, high if high is not None else 10**12))
            text = str(value)
        elif key in FLOAT_KEYS:
            low, high, open_low = FLOAT_KEYS[key]
            value = draw(
                st.floats(
                    low,
                    high,
                    exclude_min=open_low,
                    exclude_max=high is not None and open_low,
                    allow_nan=False,
                    allow_infinity=False,
                )
            )
            text = repr(value)
        elif key in CHOICE_KEYS:
            value = text = draw(st.sampled_from(CHOICE_KEYS[key]))
        elif key == "data.record_keys":
            value = draw(st.booleans())
            text = draw(st.sampled_from([str(value), str(value).lower()]))
        else:  # text is taken as typed, '=' and YAML syntax included; only ${...} is OmegaConf's interpolation
            # (and an empty or blank value is refused: an unset shell variable, see test_config.py)
            value = text = draw(
                st.text(min_size=1, max_size=20).filter(lambda t: "${" not in t and "\\" not in t and t.strip())
            )
        items[key] = (text, value)
    if {"model.width", "model.levels", "model.embed_dim"} & set(items):
        # options only resnet reads (paper refuses them)
        items["model.arch"] = ("resnet", "resnet")
    return items


@budget(150)
@given(typed_overrides())
def test_valid_overrides_round_trip(items):
    config = load_config(["recipe=digits", *(f"{key}={text}" for key, (text, _) in items.items())])
    check_config(config)
    for key, (_, value) in items.items():
        got = config
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value and type(got) is type(value), (key, got, value)


# --- the Sampler's attributes ------------------------------------------------------------------

NAMES = list(TINY_ATTRIBUTES)
ONE_OR_ZERO = st.sampled_from(
    [0, 1, True, False, 0.0, 1.0, -0.0, np.int64(1), np.int8(0), np.float32(1), np.float64(0), np.uint8(1)]
)
NOT_ONE_OR_ZERO = st.sampled_from(
    [
        2,
        -1,
        0.5,
        float("nan"),
        float("inf"),
        "1",
        "0",
        None,
        [1],
        (0,),
        b"1",
        1j,
        np.float32(0.5),
        np.array([1]),
        object(),
    ]
)


@pytest.fixture(scope="module")
def sampler(tiny_onnx):
    from toolkit.sampler import Sampler

    return Sampler(tiny_onnx, device="cpu")


def mappings(valid: bool):
    good = st.dictionaries(st.sampled_from(NAMES), ONE_OR_ZERO, max_size=len(NAMES))
    if valid:
        return good
    unknown = st.dictionaries(
        st.one_of(st.text(max_size=6), st.integers(), st.sampled_from(["A", "smiling", "x_y", "e"])),
        ONE_OR_ZERO,
        min_size=1,
        max_size=3,
    ).filter(lambda m: not set(m) <= set(NAMES))
    bad_value = st.builds(lambda m, k, v: {**m, k: v}, good, st.sampled_from(NAMES), NOT_ONE_OR_ZERO)
    return st.one_of(unknown, bad_value)


def arrays(valid: bool):
    good = st.builds(
        lambda rows, dtype: np.array(rows, dtype=dtype),
        st.lists(st.lists(st.integers(0, 1), min_size=len(NAMES), max_size=len(NAMES)), min_size=1, max_size=4),
        st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.float16]),
    )
    if valid:
        return st.one_of(
            good,
            good.map(lambda a: a.tolist()),
            good.map(lambda a: a[0]),
            good.map(lambda a: [tuple(r) for r in a.tolist()]),
        )
    numbers = st.sampled_from([0, 1, 2, -1, 0.5, float("nan"), float("inf"), 1e300, -0.0])
    return st.one_of(
        # a value outside 0/1
        st.lists(st.lists(numbers, min_size=len(NAMES), max_size=len(NAMES)), min_size=1, max_size=3).filter(
            lambda rows: any(v not in (0, 1) for row in rows for v in row)
        ),
        st.integers(0, 9).filter(lambda a: a != len(NAMES)).map(lambda a: np.zeros((2, a), np.float32)),  # wrong width
        st.sampled_from(
            [
                np.zeros((0, len(NAMES))),
                np.zeros((1, 1, len(NAMES))),
                np.float32(1),
                1,
                [],
                (),
                "digit_1",
                b"\x00" * 5,
                None,
                {1, 0},
                [[0, 1], [0]],
                [{"a": 1}, [0] * len(NAMES)],
                [["a"] * len(NAMES)],
                [[None] * len(NAMES)],
                np.array([{"a": 1}]),
                [[1j] * len(NAMES)],
            ]
        ),
    )


def attribute_forms(valid: bool):
    single = mappings(valid)
    listed = st.lists(mappings(True), min_size=1, max_size=3)
    if not valid:
        listed = st.builds(lambda good, bad, at: good[:at] + [bad] + good[at:], listed, single, st.integers(0, 3))
    return st.one_of(single, listed, listed.map(tuple), arrays(valid))


def expected_conditions(attributes, base) -> np.ndarray:
    """What `attributes` means (the Sampler's docstring), for valid input: float32 [M, A]."""
    if base is None:
        start = np.zeros(len(NAMES), np.float32)
    elif isinstance(base, dict):
        start = expected_conditions(base, None)[0]
    else:
        start = np.asarray(base, np.float32).reshape(-1)

    def row(mapping):
        vector = start.copy()
        for name, value in mapping.items():
            vector[NAMES.index(name)] = float(value)
        return vector

    if isinstance(attributes, dict):
        return row(attributes)[None]
    if isinstance(attributes, (list, tuple)) and attributes and all(isinstance(m, dict) for m in attributes):
        return np.stack([row(m) for m in attributes])
    return np.asarray(attributes, np.float32).reshape(-1, len(NAMES))


BASES = st.one_of(
    st.none(),
    mappings(True),
    arrays(True).filter(lambda a: len(np.asarray(a, np.float32).reshape(-1, len(NAMES))) == 1),
)


@budget(100)
@given(attribute_forms(valid=True), BASES, st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_sampler_reads_every_attribute_form_as_documented(sampler, attributes, base, n, seed):
    wanted = expected_conditions(attributes, base)
    np.testing.assert_array_equal(sampler.conditions(attributes, base=base), wanted)
    images = sampler.sample(attributes, n=n, seed=seed, base=base)
    assert images.shape == (len(wanted) * n, 8, 8, 3) and images.dtype == np.uint8
    # the same images as the explicit float32 matrix: a form changes nothing but the conditions
    assert np.array_equal(images, sampler.sample(wanted, n=n, seed=seed))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e300 as float32
@budget(100)
@given(attribute_forms(valid=False), st.one_of(st.none(), mappings(True)))
def test_sampler_refuses_bad_attributes_with_one_user_error(sampler, attributes, base):
    with pytest.raises(UserError) as caught:
        sampler.sample(attributes, n=1, seed=0, base=base)
    assert str(caught.value).strip()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@budget(40)
@given(attribute_forms(valid=True), st.one_of(mappings(False), arrays(False).filter(lambda base: base is not None)))
def test_sampler_refuses_a_bad_base_with_one_user_error(sampler, attributes, base):
    with pytest.raises(UserError):
        sampler.sample(attributes, n=1, seed=0, base=base)


# Inputs that once escaped as other exceptions from toolkit/sampler.py.
def test_sampler_huge_integers_in_an_array_give_a_user_error(sampler):
    with pytest.raises(UserError):
        sampler.sample([[10**400, 0, 0, 0, 0]], n=1, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, "7"])
def test_sampler_bad_seed_gives_a_user_error(sampler, seed):
    with pytest.raises(UserError):
        sampler.sample({"a": 1}, n=1, seed=seed)


def test_sampler_numpy_bools_in_a_mapping_are_accepted(sampler):
    assert np.array_equal(sampler.sample({"a": np.True_}, n=1, seed=0), sampler.sample({"a": True}, n=1, seed=0))


def test_sampler_text_in_an_array_and_absurd_n_give_a_user_error(sampler):
    with pytest.raises(UserError, match="0/1"):
        sampler.sample([["1", "0", "0", "0", "0"]], n=1, seed=0)
    for n in (2**40, np.int64(2**62)):  # numpy's would wrap around in the size check
        with pytest.raises(UserError, match="GiB"):
            sampler.sample({"a": 1}, n=n, seed=0)


# --- the shard builder's --size and --crop ------------------------------------------------------

SIDE_MAX = 65_500  # the largest JPEG side: what `--size` documents (README.md, the error message)
DIGITS_LIKE = [
    "\u0661\u0662",
    "\u00b2",
    "\u2460",
    "\uff11\uff16",
    "\u0967",
    "\U0001d7dc",
    "\u00bd",
]  # int() takes some
SPEC_PIECES = [
    "original",
    "ORIGINAL",
    "Original",
    "orig",
    "x",
    "X",
    "\u00d7",  # the multiplication sign
    "\u0445",  # Cyrillic x
    "*",
    ",",
    "center",
    "CENTER",
    "centre",
    ":",
    " ",
    "\t",
    "\n",
    "\u00a0",
    "\u3000",
    "+",
    "-",
    "_",
    ".",
    "e",
    "0",
    "00",
    "4",
    "3",
    "16",
    "64",
    "148",
    "218",
    "65500",
    "65501",
    "99999999999",
    "9" * 5000,
    *DIGITS_LIKE,
]
SPEC_TEXT = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(SPEC_PIECES), max_size=6).map("".join),
    st.builds(
        lambda a, sep, b, pad: f"{pad}{a}{sep}{b}{pad}",
        st.integers(0, 70_000).map(str),
        st.sampled_from(["x", "X", " x ", "\tx", "\u00d7", "*", "xx", ""]),
        st.integers(0, 70_000).map(str),
        st.sampled_from(["", " ", "\t", "\n", "\u00a0"]),
    ),
)
CROP_TEXT = st.one_of(
    st.none(),
    st.builds(
        lambda kind, colon, n: f"{kind}{colon}{n}",
        st.sampled_from(["center", "CENTER", "Center", " center", "centre", "middle", ""]),
        st.sampled_from([":", " : ", "", "::", "="]),
        st.one_of(st.integers(-5, 70_000).map(str), st.sampled_from(DIGITS_LIKE + ["", "+8", "1_0", "9" * 5000])),
    ),
    SPEC_TEXT,
)


def value_of(digits: str) -> int:
    """The number a run of digits 0-9 writes; any beyond 10 digits as 10**10 (int() refuses 4,300)."""
    return int(digits) if len(digits.lstrip("0")) <= 10 else 10**10


def oracle_size(text: str):
    """The documented grammar of --size ('N (N x N), HxW (e.g. 218x178) or original', sides from 4 to
    65,500): (H, W), None for original, or Invalid. Written from the documentation: numbers in the
    digits 0-9 only (no sign, '_' or other scripts' digits); 'x' and 'original' in either case;
    blanks around the whole and around the 'x' ignored."""
    ascii_blank = " \t"
    text = text.strip()
    if text.lower() == "original" and text.isascii():
        return None
    head, x, tail = text.lower().partition("x") if text.isascii() else (text, "", "")
    parts = [head.strip(ascii_blank), tail.strip(ascii_blank)] if x else [head, head]
    require(all(part and part.isascii() and part.isdigit() for part in parts))
    sides = [value_of(part) for part in parts]
    require(all(4 <= side <= SIDE_MAX for side in sides))
    return (sides[0], sides[1])


def oracle_crop(text: str | None):
    """--crop 'center:N - a centred N x N square': N from 1 (a crop no image is larger than is
    refused at once: beyond the largest side), None for no --crop, or Invalid."""
    if text is None:
        return None
    kind, colon, value = text.strip().partition(":")
    require(colon == ":" and kind.strip(" \t").lower() == "center" and kind.isascii())
    value = value.strip(" \t")
    require(value.isascii() and value.isdigit())
    require(1 <= value_of(value) <= SIDE_MAX)
    return value_of(value)


@budget(400)
@given(SPEC_TEXT, CROP_TEXT)
def test_size_and_crop_give_the_documented_spec_or_one_user_error_quoting_them(size, crop):
    from toolkit.data.build import ImageSpec
    from toolkit.errors import cut, printable

    try:
        expected = (oracle_size(size), oracle_crop(crop))
        require(not (expected[0] is None and expected[1] is not None))  # a crop re-encodes: not with original
    except Invalid:
        expected = None
    try:
        spec = ImageSpec.parse(size, crop)
    except UserError as error:
        assert expected is None, f"refused {size!r} {crop!r}: {error}"
        message = str(error)
        assert "\n" not in message
        try:
            oracle_size(size)
        except Invalid:
            assert f"--size '{printable(cut(size))}'" in message  # the text at fault, as typed
        else:
            try:
                oracle_crop(crop)
            except Invalid:
                assert f"--crop '{printable(cut(crop))}'" in message
            else:
                assert "--crop needs a --size other than original" in message
        return
    assert expected is not None, f"accepted {size!r} {crop!r} as {spec}"
    assert (spec.size, spec.crop) == expected
    assert spec.size is None or all(type(side) is int for side in spec.size)


@pytest.mark.parametrize(
    "size, crop, words",
    [
        ("+64", None, "--size '+64'"),  # int() took signs, '_' and other scripts' digits as 64
        ("6_4", None, "--size '6_4'"),
        ("\u0666\u0664", None, "--size '\u0666\u0664'"),
        ("64", "center:\u00b2", "--crop 'center:\u00b2'"),  # str.isdigit() passed it, int() raised ValueError
        ("64", "center:" + "9" * 5000, "--crop 'center:999"),  # int() refuses 4,300 digits: ValueError
        ("64", "", "--crop ''"),  # an empty --crop (an unset shell variable) was no crop at all
        ("64", "center:99999", "N from 1 to 65,500"),
    ],
)
def test_size_and_crop_texts_that_used_to_pass_or_crash_give_one_user_error(size, crop, words):
    from toolkit.data.build import ImageSpec

    with pytest.raises(UserError) as caught:
        ImageSpec.parse(size, crop)
    assert words in str(caught.value)


def test_size_and_crop_accept_the_documented_spellings():
    from toolkit.data.build import ImageSpec

    assert ImageSpec.parse(" 218X178 ").size == (218, 178) and ImageSpec.parse("64 x 32").size == (64, 32)
    assert ImageSpec.parse("Original").size is None and ImageSpec.parse("0064").size == (64, 64)
    assert ImageSpec.parse("64", " CENTER:148 ").crop == 148 and ImageSpec.parse("64", None).crop is None


# --- shards: what the writer writes, the readers read back ------------------------------------

# A relative image path as a reader sees it (any character a file name holds: blanks, controls,
# dots, non-UTF-8 bytes as os.fsdecode escapes them); its key is the readers' safe_key of it.
PATH_PART = st.one_of(
    st.text(
        st.characters(codec="utf-8", exclude_characters="/\x00")
        | st.sampled_from([".", " ", "\\", "\n", "\x7f", "\x85", "\u2028", "\udcff"]),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["__key__", "__url__", "attr", "png", "_", "-", "A", "a"]),
)
RELATIVE_PATH = st.builds(
    lambda parts, ext: "/".join(parts) + ext,
    st.lists(PATH_PART, min_size=1, max_size=3),
    st.sampled_from([".jpg", ".png", ".JPG", "", ".tar", ".attr.npy"]),
)
SPLIT = st.one_of(st.sampled_from(["train", "test", "val"]), st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True))
MODES = {"png": ["RGB", "L", "P", "1", "RGBA", "LA"], "jpg": ["RGB", "L"], "bmp": ["RGB", "L"]}


def smooth_pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """RGBA uint8 [H, W, 4]: a blend of four random corner colours plus a little noise (JPEG keeps
    such images within a few levels, as it does photos), with a random alpha."""
    corners = rng.integers(0, 256, (2, 2, 4)).astype(np.float64)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    blend = (corners[0, 0] * (1 - y) + corners[1, 0] * y) * (1 - x) + (corners[0, 1] * (1 - y) + corners[1, 1] * y) * x
    return np.clip(blend + rng.normal(0, 3, blend.shape), 0, 255).astype(np.uint8)


@st.composite
def shard_builds(draw):
    """A source table of small images on disk (as a reader would hand over; a split may be empty)
    and the build's options."""
    stored = draw(st.sampled_from(["original", "resized", "cropped"]))
    attributes = draw(st.lists(field(6), min_size=1, max_size=5, unique=True))
    splits = draw(st.lists(SPLIT, min_size=1, max_size=3, unique=True))
    paths = draw(st.lists(RELATIVE_PATH, min_size=1, max_size=8, unique_by=safe_key))
    samples = {split: [] for split in splits}
    for relative in paths:
        kind = draw(st.sampled_from(["png", "jpg"] if stored == "original" else ["png", "jpg", "bmp"]))
        samples[draw(st.sampled_from(splits))].append(
            dict(
                key=safe_key(relative),
                kind=kind,
                mode=draw(st.sampled_from(MODES[kind])),
                size=(draw(st.integers(1, 16)), draw(st.integers(1, 16))),  # (H, W)
                seed=draw(st.integers(0, 2**32 - 1)),
                attributes=draw(st.lists(st.integers(0, 1), min_size=len(attributes), max_size=len(attributes))),
            )
        )
    size = None if stored == "original" else (draw(st.integers(4, 16)), draw(st.integers(4, 16)))
    smallest = min((min(s["size"]) for items in samples.values() for s in items), default=16)
    crop = draw(st.integers(1, smallest)) if stored == "cropped" else None
    shard_size = draw(st.integers(1, 4))
    return attributes, samples, size, crop, shard_size


def write_image(path: Path, sample: dict) -> np.ndarray:
    """Write a sample's image file; returns the RGB pixels a viewer shows for it (on white)."""
    height, width = sample["size"]
    rgba = smooth_pixels(np.random.default_rng(sample["seed"]), height, width)
    mode = sample["mode"]
    if mode in ("RGBA", "LA"):
        image = Image.fromarray(rgba, "RGBA").convert(mode)
    elif mode == "P":
        image = Image.fromarray(rgba[..., :3], "RGB").quantize(8)
    else:
        image = Image.fromarray(rgba[..., :3], "RGB").convert(mode)
    image.save(path, format={"jpg": "JPEG", "png": "PNG", "bmp": "BMP"}[sample["kind"]], quality=90)
    with Image.open(path) as written:  # the file's own pixels (a JPEG's, after its loss)
        shown = np.asarray(written.convert("RGBA" if "A" in mode else "RGB"), np.float64)
    if "A" in mode:  # transparency shown on white, as a browser does
        alpha = shown[..., 3:] / 255
        shown = shown[..., :3] * alpha + 255 * (1 - alpha)
    return shown


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def as_bytes(images) -> np.ndarray:
    """The readers' float [B, 3, H, W] in [0, 1] as the uint8 [B, H, W, 3] they were (x / 255 exactly)."""
    return np.round(images.numpy() * 255).astype(np.uint8).transpose(0, 2, 3, 1)


@budget(150)
@given(shard_builds(), st.integers(1, 3), st.integers(1, 8))
def test_shards_read_back_every_sample_once_with_its_key_attributes_and_pixels(build, batch_size, shuffle_buffer):
    from toolkit.data.build import ImageSpec, build_shards
    from toolkit.data.sources import Record, SourceTable
    from toolkit.data.stream import EpochStream, attribute_vectors, eval_batches, read_manifest
    from toolkit.data.verify import verify_shards

    attributes, samples, size, crop, shard_size = build
    spec = ImageSpec(size, crop)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shown, records = {}, {}
        for split, items in samples.items():
            records[split] = []
            for index, sample in enumerate(items):
                path = root / "images" / f"{split}-{index}.{sample['kind']}"
                path.parent.mkdir(exist_ok=True)
                shown[sample["key"]] = write_image(path, sample)
                records[split].append(Record(sample["key"], path, np.array(sample["attributes"], np.uint8)))
        table = SourceTable("folder:property", attributes, records)
        out = root / "shards"
        manifests = build_shards(table, out, spec, workers=1, shard_size=shard_size, progress=False)
        assert set(manifests) == set(samples)

        for split, items in samples.items():
            keys = [s["key"] for s in items]
            manifest = manifests[split]
            assert manifest == read_manifest(out, split, empty_ok=True)
            assert manifest["attributes"] == attributes and manifest["count"] == len(items)
            assert manifest["skipped"] == {"count": 0, "samples": []}
            names = [f"{split}-{i:06d}.tar" for i in range(-(-len(items) // shard_size))]
            assert list(manifest["shards"]) == names == sorted(p.name for p in (out / split).glob("*.tar"))
            assert list(manifest["shards"].values()) == [
                len(keys[i : i + shard_size]) for i in range(0, len(keys), shard_size)
            ]

            # the tars, read with tarfile alone: the recorded bytes and sha256, two members per sample in order
            stored = {}
            for name in names:
                blob = (out / split / name).read_bytes()
                assert manifest["files"][name] == {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
                members = tar_members(out / split / name)
                for (attr_name, attr), (image_name, image) in zip(members[::2], members[1::2]):
                    key, _, field = image_name.rpartition(".")
                    assert attr_name == f"{key}.attr.npy" and field in ("png", "jpg")
                    stored[key] = (field, np.load(io.BytesIO(attr), allow_pickle=False), image)
                assert len(members) == 2 * manifest["shards"][name]
            assert list(stored) == keys  # every sample once, in the table's order
            sizes = set()
            for sample in items:
                field, vector, image = stored[sample["key"]]
                assert vector.dtype == np.uint8 and vector.tolist() == sample["attributes"]
                pixels = pil_rgb(image)
                sizes.add(pixels.shape[:2])
                if size is None:  # --size original: PNG stays PNG (its pixels exactly), JPEG its own bytes
                    assert field == sample["kind"]
                    if field == "jpg":
                        assert image == records[split][items.index(sample)].path.read_bytes()
                    assert pixels.shape[:2] == sample["size"]
                    assert np.abs(pixels - shown[sample["key"]]).max() <= (1 if "A" in sample["mode"] else 0)
                else:  # re-encoded: a JPEG of the spec's size, close to the source's resized (crop) pixels
                    assert field == "jpg" and pixels.shape[:2] == size
                    height, width = sample["size"]
                    box = (0, 0, width, height)
                    if crop is not None:
                        box = ((width - crop) / 2, (height - crop) / 2, (width + crop) / 2, (height + crop) / 2)
                    source = Image.fromarray(np.round(shown[sample["key"]]).astype(np.uint8))
                    want = np.asarray(source.resize((size[1], size[0]), Image.BILINEAR, box=box), np.float64)
                    # brightness: JPEG's 4:2:0 colour planes blur a 2-pixel source's edge, not its luma
                    luma = np.array([0.299, 0.587, 0.114])
                    assert np.abs((pixels - want) @ luma).mean() <= 4, "not the source's pixels"
            assert manifest["image_size"] == (list(size) if size else (list(sizes.pop()) if len(sizes) == 1 else None))

            if not items:  # a table's empty split (CelebA's val of a subset without val rows): built, refused as empty
                with pytest.raises(UserError, match=f"the {split} split is empty"):
                    eval_batches(out, split)
                continue
            expected = np.stack([pil_rgb(stored[k][2]) for k in keys]) if len(sizes) <= 1 or size else None
            wanted_attributes = np.array([s["attributes"] for s in items], np.float32)
            # eval_batches: every sample once, in order (one at a time where sizes vary)
            batches = list(eval_batches(out, split, batch_size=batch_size if expected is not None else 1))
            got_attributes = np.concatenate([a.numpy() for _, a in batches])
            np.testing.assert_array_equal(got_attributes, wanted_attributes)
            for i, key in enumerate(keys):
                images = batches[i // batch_size][0] if expected is not None else batches[i][0]
                np.testing.assert_array_equal(
                    as_bytes(images)[i % batch_size if expected is not None else 0], pil_rgb(stored[key][2])
                )
            np.testing.assert_array_equal(attribute_vectors(out, split), wanted_attributes.astype(np.uint8))
            # one epoch of the trainer's reader, one sample per batch: every key once, shuffled
            stream = EpochStream(
                out, split, batch_size=1, with_keys=True, shuffle_buffer=shuffle_buffer, persistent=False
            )
            seen = {}
            for images, vectors, batch_keys in stream.epoch(0):
                assert batch_keys[0] not in seen
                seen[batch_keys[0]] = (as_bytes(images)[0], vectors[0].numpy())
            assert sorted(seen) == sorted(keys)
            for sample in items:
                pixels, vector = seen[sample["key"]]
                np.testing.assert_array_equal(pixels, pil_rgb(stored[sample["key"]][2]))
                assert vector.tolist() == sample["attributes"]

        # `cvae-tk shards verify`: every split, every tar as built
        reports = verify_shards(out)
        assert {r.split: (r.shards, r.samples, r.damaged) for r in reports} == {
            split: (len(manifests[split]["shards"]), len(items), ()) for split, items in samples.items()
        }
