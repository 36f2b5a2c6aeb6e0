"""Tiny copies of the raw data sets in their official layouts, quirks included, for the reader tests.

Each builder writes real (random-pixel) JPEGs and the text files exactly as the official archives
spell them, and returns what a reader should find plus the paths of the text files, so a test can
corrupt one line and check the error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
CUB_SPECIES = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani", "Crested_Auklet"]
CUB_ATTRIBUTES = [
    "has_bill_shape::curved_(up_or_down)",
    "has_bill_shape::dagger",
    "has_bill_shape::hooked",
    "has_bill_shape::needle",
    "has_bill_shape::hooked_seabird",
    "has_bill_shape::spatulate",
]


def write_jpeg(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=75)


def replace_line(path: Path, number: int, text: str) -> None:
    """Replace line `number` (1-based) of a text file, keeping the other lines byte for byte."""
    lines = Path(path).read_bytes().splitlines(keepends=True)
    ending = b"\r\n" if lines[number - 1].endswith(b"\r\n") else b"\n"
    lines[number - 1] = text.encode() + ending
    Path(path).write_bytes(b"".join(lines))


def delete_line(path: Path, number: int) -> None:
    lines = Path(path).read_bytes().splitlines(keepends=True)
    del lines[number - 1]
    Path(path).write_bytes(b"".join(lines))


def make_celeba(root: Path, n: int = 12, crlf: bool = False, seed: int = 0, kaggle: bool = False) -> dict:
    """ROOT/img_align_celeba/*.jpg (178 x 218), list_attr_celeba.txt, list_eval_partition.txt.

    As in the real files: line 1 the count, line 2 the names with a trailing space, each value
    right-aligned in 2 characters after a space (so two spaces before a 1); first 2/3 train, then
    val, then test, in file order. Returns the files, the expected vectors by stem and the splits.
    `kaggle`: Kaggle's copy instead (jessicali9530/celeba-dataset): the images one folder deeper
    (img_align_celeba/img_align_celeba/), list_attr_celeba.csv with the header
    'image_id,<names>' and list_eval_partition.csv with 'image_id,partition'.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    images = root / "img_align_celeba" / "img_align_celeba" if kaggle else root / "img_align_celeba"
    names = [f"{index:06d}.jpg" for index in range(1, n + 1)]
    for name in names:
        write_jpeg(images / name, 178, 218, rng)
    values = rng.integers(0, 2, (n, len(CELEBA_ATTRIBUTES))).astype(np.uint8)
    n_train, n_val = (2 * n) // 3, (n - (2 * n) // 3) // 2
    partition = [0] * n_train + [1] * n_val + [2] * (n - n_train - n_val)

    newline = "\r\n" if crlf else "\n"
    if kaggle:
        attr_lines = [",".join(["image_id", *CELEBA_ATTRIBUTES])]
        attr_lines += [",".join([name, *("1" if v else "-1" for v in row)]) for name, row in zip(names, values)]
        partition_lines = ["image_id,partition", *(f"{name},{p}" for name, p in zip(names, partition))]
        attr_file, partition_file = root / "list_attr_celeba.csv", root / "list_eval_partition.csv"
    else:
        attr_lines = [str(n), " ".join(CELEBA_ATTRIBUTES) + " "]
        attr_lines += [name + "".join(" 1".rjust(3) if v else " -1" for v in row) for name, row in zip(names, values)]
        partition_lines = [f"{name} {p}" for name, p in zip(names, partition)]
        attr_file, partition_file = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    attr_file.write_bytes((newline.join(attr_lines) + newline).encode())
    partition_file.write_bytes((newline.join(partition_lines) + newline).encode())

    stems = [name[:-4] for name in names]
    split_names = ("train", "val", "test")
    return {
        "root": root,
        "images": images,
        "attr_file": attr_file,
        "partition_file": partition_file,
        "names": list(CELEBA_ATTRIBUTES),
        "files": names,
        "attributes": dict(zip(stems, values)),
        "splits": {
            split: [stem for stem, p in zip(stems, partition) if p == i] for i, split in enumerate(split_names)
        },
    }


def make_cub(root: Path, n_classes: int = 3, n_attributes: int = 4, images_per_class: int = 3, seed: int = 0) -> dict:
    """The official archive: ROOT/attributes.txt beside ROOT/CUB_200_2011/ (images.txt, classes.txt, ...).

    Image 1 carries the crafted certainty cases on attributes 1-3: present & certainty 3 -> 1,
    present & certainty 2 -> 0, absent & certainty 4 -> 0. Every fifth row of
    image_attribute_labels.txt carries extra columns, as a few real rows do. Images have varied sizes.
    Returns the text files (`files`), names, relative paths, expected vectors, splits and boxes.
    """
    assert n_attributes >= 3, "the crafted certainty cases need three attributes"
    rng = np.random.default_rng(seed)
    root = Path(root)
    data = root / "CUB_200_2011"
    species = [CUB_SPECIES[c] if c < len(CUB_SPECIES) else f"Species_{c + 1}" for c in range(n_classes)]
    class_dirs = [f"{c + 1:03d}.{name}" for c, name in enumerate(species)]
    attribute_names = [
        CUB_ATTRIBUTES[a] if a < len(CUB_ATTRIBUTES) else f"has_part::value_{a + 1}" for a in range(n_attributes)
    ]

    relpaths, labels, boxes = [], [], []
    for c, class_dir in enumerate(class_dirs):
        for j in range(images_per_class):
            image_id = len(relpaths) + 1
            relpath = f"{class_dir}/{species[c].title()}_{j + 1:04d}_{700 + image_id}.jpg"
            width, height = int(rng.integers(40, 120)), int(rng.integers(30, 100))
            write_jpeg(data / "images" / relpath, width, height, rng)
            relpaths.append(relpath)
            labels.append(c)
            x, y = float(rng.integers(0, width // 3)), float(rng.integers(0, height // 3))
            boxes.append((x, y, float(width // 2), float(height // 2)))
    n = len(relpaths)
    is_train = [(i % 2 == 0) for i in range(n)]

    # (is_present, certainty_id) per image and attribute; row 1 holds the crafted cases
    present = rng.integers(0, 2, (n, n_attributes))
    certainty = rng.integers(1, 5, (n, n_attributes))
    present[0, :3], certainty[0, :3] = (1, 1, 0), (3, 2, 4)
    expected_attributes = ((present == 1) & (certainty >= 3)).astype(np.uint8)

    files = {
        "attributes": root / "attributes.txt",
        "images": data / "images.txt",
        "classes": data / "classes.txt",
        "labels": data / "image_class_labels.txt",
        "split": data / "train_test_split.txt",
        "boxes": data / "bounding_boxes.txt",
        "attribute_labels": data / "attributes" / "image_attribute_labels.txt",
    }
    files["attribute_labels"].parent.mkdir(parents=True, exist_ok=True)
    files["attributes"].write_text("".join(f"{a + 1} {name}\n" for a, name in enumerate(attribute_names)))
    files["images"].write_text("".join(f"{i + 1} {relpath}\n" for i, relpath in enumerate(relpaths)))
    files["classes"].write_text("".join(f"{c + 1} {class_dir}\n" for c, class_dir in enumerate(class_dirs)))
    files["labels"].write_text("".join(f"{i + 1} {c + 1}\n" for i, c in enumerate(labels)))
    files["split"].write_text("".join(f"{i + 1} {int(t)}\n" for i, t in enumerate(is_train)))
    files["boxes"].write_text(
        "".join(f"{i + 1} {x:.1f} {y:.1f} {w:.1f} {h:.1f}\n" for i, (x, y, w, h) in enumerate(boxes))
    )
    rows = []
    for i in range(n):
        for a in range(n_attributes):
            row = f"{i + 1} {a + 1} {present[i, a]} {certainty[i, a]} {rng.uniform(1, 30):.4f}"
            if len(rows) % 5 == 4:
                row += " 0 0"  # the real file's quirk: a few rows carry extra columns
            rows.append(row + "\n")
    files["attribute_labels"].write_text("".join(rows))
    (data / "attributes" / "certainties.txt").write_text("1 not visible\n2 guessing\n3 probably\n4 definitely\n")

    vectors = {}
    for i, relpath in enumerate(relpaths):
        one_hot = np.zeros(n_classes, dtype=np.uint8)
        one_hot[labels[i]] = 1
        vectors[relpath] = np.concatenate([one_hot, expected_attributes[i]])
    return {
        "root": root,
        "data": data,
        "files": files,
        "class_names": class_dirs,
        "attribute_names": attribute_names,
        "relpaths": relpaths,
        "labels": dict(zip(relpaths, labels)),
        "attributes": vectors,
        "splits": {
            "train": [r for r, t in zip(relpaths, is_train) if t],
            "test": [r for r, t in zip(relpaths, is_train) if not t],
        },
        "boxes": dict(zip(relpaths, boxes)),
        "crafted": relpaths[0],
    }


def make_class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> dict:
    """ROOT/<class>/img_k.jpg (torchvision's ImageFolder layout), `counts[class]` images each; a
    class of 5 or more keeps its fifth image and later in a sub-folder, ROOT/<class>/extra/."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    files = []
    for name, count in counts.items():
        for k in range(count):
            file = f"{name}/{'extra/' if k >= 4 else ''}img_{k:03d}.jpg"
            write_jpeg(root / file, int(rng.integers(8, 24)), int(rng.integers(8, 24)), rng)
            files.append(file)
    return {"root": root, "files": files}


def make_folder(root: Path, n: int = 10, split_column: bool = False, seed: int = 0) -> dict:
    """ROOT/photos/{a,b}/img_k.jpg plus ROOT/labels.csv (`file,Smiling,Eyeglasses[,split]`).

    Returns the image root (`root`, i.e. ROOT/photos), the table, the names, the file names in table
    order, the expected vectors by file name and (with a split column) the splits.
    """
    rng = np.random.default_rng(seed)
    images = Path(root) / "photos"
    names = ["Smiling", "Eyeglasses"]
    files = [f"{'ab'[k % 2]}/img_{k:03d}.jpg" for k in range(n)]
    for file in files:
        write_jpeg(images / file, int(rng.integers(16, 48)), int(rng.integers(16, 48)), rng)
    values = rng.integers(0, 2, (n, len(names))).astype(np.uint8)
    splits = [("train", "val", "test")[k % 3] for k in range(n)]
    header = ["file", *names] + (["split"] if split_column else [])
    lines = [",".join(header)]
    for k, file in enumerate(files):
        lines.append(",".join([file, *map(str, values[k])] + ([splits[k]] if split_column else [])))
    table = Path(root) / "labels.csv"
    table.write_text("\n".join(lines) + "\n")
    result = {"root": images, "table": table, "names": names, "files": files, "attributes": dict(zip(files, values))}
    if split_column:
        result["splits"] = {s: [f for f, t in zip(files, splits) if t == s] for s in ("train", "val", "test")}
    return result
