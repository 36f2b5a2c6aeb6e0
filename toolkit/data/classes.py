"""One folder per class (torchvision's ImageFolder layout), no table -> a SourceTable: each folder in
ROOT is a class, its name an attribute, and every image below it (sub-folders included) carries that
one attribute (a one-hot condition, like CUB's species):

    ROOT/cat/0001.jpg  ROOT/dog/x/0002.png ...             a seeded random test_fraction of each class is test
    ROOT/train/cat/0001.jpg  ROOT/test/cat/0101.jpg ...    when ROOT's folders are train[/val]/test

Hidden names (`.ipynb_checkpoints`, `.DS_Store`) and `__MACOSX` are passed over; other files named
as no image format Pillow opens (by extension) are left out and said. Each real folder and image is
read once, however many links (symbolic or hard) lead to it; one that two classes or splits reach is
refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from toolkit.data.sources import (
    SPLITS,
    Identities,
    Record,
    SourceTable,
    file_names,
    first_few,
    random_split,
    safe_key,
    same_file,
)
from toolkit.errors import UserError, cut
from toolkit.formats import attribute_text, is_debris  # a folder name as the text it shows (NFC)
from toolkit.images import readable_extensions
from toolkit.paths import is_utf8, shown

# Folder names that mean a split, not a class (Kaggle's copies often say valid or validation).
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_class_folders(root: str | Path, test_fraction: float | None = None, seed: int | None = None) -> SourceTable:
    """One folder per class under `root`, or under root/train and root/test (and root/val) -> a
    one-hot table. `test_fraction` (default 0.1) and `seed` (default 0) split each class at random
    when the folders give no split, and take the test split from train/ where there are split
    folders but no test/ (ImageNet's train/ + val/); where test/ is, setting either is refused (it
    would do nothing)."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise UserError(f"image folder {root} is not a folder")
    if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_fraction is {test_fraction}, expected a number in [0, 1)")
    top = _folders(root)
    split_folders = _split_folders(root, top)
    walk = _Walk(root)
    if split_folders:
        classes, by_split, homes = _read_split_folders(walk, split_folders, test_fraction, seed)
        where = root / split_folders["train"]
    else:
        classes = top
        _refuse_twins(root, classes)
        by_class = {name: walk.images_below(name) for name in classes}
        by_split = _split_each_class(by_class, 0.1 if test_fraction is None else test_fraction, seed or 0)
        homes, where = [root], root
    walk.done()
    _check_classes(where, classes, by_split)
    splits = _records(root, classes, by_split)
    warnings = []
    loose = [f"{home.name}/{name}" for home in homes for name in sorted(file_names(home)) if _is_image(name)]
    if loose:
        warnings.append(
            f"{len(loose)} image(s) lie beside the class folders, in no class, and were left out (first: {first_few(loose)})"
        )
    if walk.left_out:
        warnings.append(
            f"{len(walk.left_out)} file(s) in the class folders have no extension of an image format Pillow opens and "
            f"were left out (first: {first_few(walk.left_out)})"
        )
    return SourceTable(source=f"classes:{shown(root.name)}", attributes=classes, splits=splits, warnings=warnings)


def _split_folders(root: Path, top: list[str]) -> dict[str, str]:
    """split -> its folder where root's folders (`top`) are split folders (train/, test/, ...), else {}
    (class folders); a mix of the two is refused."""
    split_of_folder = {name: SPLIT_FOLDERS.get(name.lower()) for name in top}
    splits_named = sorted(name for name in top if split_of_folder[name])
    others = [name for name in top if not split_of_folder[name]]
    if len(splits_named) >= 2 and others:  # ImageFolder would make train and test classes ('train' alone may be one)
        raise UserError(
            f"{root}: holds the split folders {', '.join(splits_named)} and the folder(s) {first_few(others)}; "
            "expected split folders only (train/cat/, test/cat/) or class folders only (cat/, dog/)"
        )
    if len(splits_named) >= 2 and "train" not in split_of_folder.values():  # val/ + test/ are not two classes
        raise UserError(
            f"{root}: holds the split folders {', '.join(splits_named)} but no train/; expected train/cat/ "
            "beside them (the training images), or class folders only (cat/, dog/)"
        )
    if not (top and all(split_of_folder.values()) and "train" in split_of_folder.values()):
        return {}
    named: dict[str, str] = {}
    for folder, split in split_of_folder.items():
        if split in named:
            raise UserError(f"{root}: both {named[split]}/ and {folder}/ hold the {split} split; expected one")
        named[split] = folder
    return named


def _read_split_folders(
    walk: _Walk, named: dict[str, str], test_fraction: float | None, seed: int | None
) -> tuple[list[str], dict[str, dict[str, list[str]]], list[Path]]:
    """The classes (train/'s folders), split -> class -> images, and the split folders."""
    root = walk.root
    given = [option for option, value in (("--test-fraction", test_fraction), ("--seed", seed)) if value is not None]
    if given and "test" in named:  # without a test/ folder (ImageNet's train/ + val/) they carve one from train
        raise UserError(
            f"{given[0]} does nothing here: the folders {', '.join(sorted(named.values()))} in {root} give each "
            "image's split"
        )
    classes = _folders(root / named["train"])
    _refuse_twins(root / named["train"], classes)
    # a class is its name as a text: test/'s 'Café' is train/'s 'Café' also where one of them spells 'é' as 'e' + a
    # combining accent (macOS writes names so, and its zips keep them; another system's copy of the same folder may not)
    class_of = {attribute_text(name): name for name in classes}
    found = {split: _folders(root / folder) for split, folder in named.items()}
    by_split: dict[str, dict[str, list[str]]] = {}
    for split, names in found.items():
        strangers = [name for name in names if attribute_text(name) not in class_of]
        if strangers:
            raise UserError(
                f"{root / named[split]}: class folder(s) {first_few(strangers)} have no folder in "
                f"{root / named['train']}; expected the training classes only (a class never trained on cannot be drawn)"
            )
        by_class = by_split[split] = {}
        for name in names:  # both spellings of one class in one split folder: its images are that class's
            by_class.setdefault(class_of[attribute_text(name)], []).extend(walk.images_below(f"{named[split]}/{name}"))
    if "test" not in named:  # as without split folders: a random share of each training class is test
        by_split.update(
            _split_each_class(by_split["train"], 0.1 if test_fraction is None else test_fraction, seed or 0)
        )
    return classes, by_split, [root / folder for folder in named.values()]


def _check_classes(where: Path, classes: list[str], by_split: dict[str, dict[str, list[str]]]) -> None:
    """Classes that can be attributes: some, named in UTF-8, not a zip's wrapper folder, each with training images."""
    if not classes:
        raise UserError(
            f"{where}: expected one folder per class (cat/, dog/, ...), found none; "
            "for images with 0/1 attributes, give their CSV table with --attributes"
        )
    untyped = [shown(name) for name in classes if not is_utf8(name)]
    if untyped:  # a class name is an attribute name: in every manifest, export and command line
        raise UserError(
            f"{where}: class folder name(s) {first_few(untyped)} are not UTF-8 text; rename them "
            "(each class name becomes an attribute name)"
        )
    if len(classes) == 1:  # a zip's folder around the classes (flowers/flowers/cat/): one class of them all
        only = where / classes[0]
        inner = _folders(only)
        if len(inner) >= 2 and not file_names(only, _is_image):
            raise UserError(
                f"{where}: the only class folder, {cut(classes[0])}/, holds no image but the folders {first_few(inner)}: "
                f"if they are the classes, pass --root {only}"
            )
    empty = [name for name in classes if not by_split["train"].get(name)]
    if empty:
        raise UserError(
            f"{where}: class folder(s) {first_few(empty)} hold no image (no file named .jpg, .png, .webp or another "
            "extension Pillow opens); add images or remove them"
        )


def _refuse_twins(where: Path, classes: list[str]) -> None:
    """Two class folders whose names differ only in Unicode normalization look the same everywhere (a
    listing, --attr, a figure's labels): two classes no one could tell apart or name."""
    seen: dict[str, str] = {}
    for name in classes:
        other = seen.setdefault(attribute_text(name), name)
        if other != name:
            raise UserError(
                f"{where}: the class folders {cut(other)!r} and {cut(name)!r} have one name, written in two Unicode "
                "normalizations (an accent as one character or as a combining one); expected one folder per class: "
                "move the images of one into the other"
            )


def _records(root: Path, classes: list[str], by_split: dict[str, dict[str, list[str]]]) -> dict[str, list[Record]]:
    """split -> records, one-hot over `classes`, in class then path order; only the splits that have images."""
    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    keys: dict[str, str] = {}
    for split, by_class in by_split.items():
        for index, name in enumerate(classes):
            attributes = np.zeros(len(classes), dtype=np.uint8)
            attributes[index] = 1
            for relative in by_class.get(name, []):
                key = safe_key(relative)
                if key in keys:  # 'cat/x.jpg' and 'cat/x.png', 'a.b/x.jpg' and 'a_b/x.jpg'
                    raise UserError(
                        f"{root}: {cut(relative)} gives the sample key {cut(key)!r}, as {cut(keys[key])} does; "
                        "rename one of them"
                    )
                keys[key] = relative
                splits[split].append(Record(key=key, path=root / relative, attributes=attributes))
    return {split: records for split, records in splits.items() if records}


def _hidden(name: str) -> bool:
    """Hidden names, and what a file manager, a notebook or a zip leaves behind (.DS_Store, Thumbs.db, __MACOSX)."""
    return name.startswith(".") or is_debris(name)


def _is_image(name: str) -> bool:
    return not _hidden(name) and os.path.splitext(name)[1].lower() in readable_extensions()


def _folders(folder: Path) -> list[str]:
    """The visible folders (or links to folders) directly in `folder`, sorted (as ImageFolder sorts its classes)."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if not _hidden(entry.name) and _is_folder(entry))


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that loops
        return False


class _Walk:
    """The images of the class folders under `root`, each real folder and image read once across them
    all: `left_out` gathers the files named as no image, `owners` the path that reached each folder and
    file first, by its identity (`Identities`: a symbolic link and a hard link lead to one; no stat per
    image); the class folder that path starts with owns it."""

    def __init__(self, root: Path):
        self.root = root
        self.left_out: list[str] = []  # relative to root
        self.classes: list[str] = []  # the class folders walked, relative to root
        self.owners: dict[int, str] = {}  # identity -> the path (the one in the images found) that reached it first
        self.home: int | None = None  # Identities' home device

    def images_below(self, relative: str) -> list[str]:
        """The images anywhere below root/relative, as sorted '/'-separated paths relative to root; other
        visible files go to `left_out`. Links are followed, each real folder and file once: one reached
        again from this class is passed over (a link back up the tree, a second name), one that another
        class or split reached is refused, as its images would be two classes' or in two splits."""
        root, found = self.root, []
        self.classes.append(relative)
        top = os.path.realpath(root / relative)
        stack = [(os.fspath(root / relative), relative)]  # a stack, not recursion: any depth of folders
        while stack:
            folder, inside = stack.pop()
            real = os.path.realpath(folder)
            if inside != relative and (top + os.sep).startswith(real.rstrip(os.sep) + os.sep):
                continue  # a link to this class folder or above it: the other classes would be read as this one
            try:
                identities = Identities(folder, self.home)
                self.home = identities.home
                if not self._claim(identities.folder, relative, inside, "folder"):
                    continue
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as error:  # os.walk would pass over it: its images missing without a word
                raise UserError(
                    f"cannot list the folder {error.filename or folder}: {error.strerror or error}"
                ) from None
            subfolders = []
            for entry in entries:
                if _hidden(entry.name):
                    continue
                path = f"{inside}/{entry.name}"
                if _is_folder(entry):
                    subfolders.append((entry.path, path))
                elif not _is_image(entry.name):
                    self.left_out.append(path)
                elif self._claim(identities.of(entry), relative, path, "file"):
                    found.append(path)
            stack += reversed(subfolders)  # depth first, in name order, as os.walk went
        return found

    def _claim(self, identity: int | None, relative: str, inside: str, what: str) -> bool:
        """True the first time a folder or file is reached (or where it cannot be told); False when this
        class reached it already under another name. Two identities alike are confirmed by a stat of both."""
        if identity is None:
            return True
        first = self.owners.setdefault(identity, inside)
        if first is inside or not same_file(self.root / first, self.root / inside):
            return True
        if first == relative or first.startswith(relative + "/"):
            return False
        owner = next(name for name in self.classes if first == name or first.startswith(name + "/"))
        raise UserError(
            f"{self.root}: {cut(first)} and {cut(inside)} are the same {what} (a link), so the same images would "
            f"be in {cut(owner)}/ and {cut(relative)}/ at once; remove one of them"
        )

    def done(self) -> None:
        """Let go of `owners` (an entry per image) once every class is walked, before the records are made."""
        self.owners = {}


def _split_each_class(
    by_class: dict[str, list[str]], test_fraction: float, seed: int
) -> dict[str, dict[str, list[str]]]:
    """split -> class -> images: each class split at random on its own, so every class is in train and,
    with two images or more, in test."""
    rng = np.random.default_rng(seed)
    by_split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name, images in by_class.items():
        for image, split in zip(images, random_split(len(images), test_fraction, rng)):
            by_split[split].setdefault(name, []).append(image)
    return by_split
