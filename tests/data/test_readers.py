"""The raw-format readers (CelebA, CUB-200-2011, folder + CSV) on tiny fixtures in the official layouts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import delete_line, make_celeba, make_class_folders, make_cub, make_folder, replace_line, write_jpeg
from PIL import Image

from toolkit.data.build import require_train_and_test
from toolkit.data.celeba import read_celeba
from toolkit.data.classes import read_class_folders
from toolkit.data.cub import read_cub
from toolkit.data.folder import read_folder
from toolkit.data.sources import safe_key
from toolkit.errors import UserError


def by_key(table):
    return {record.key: record for records in table.splits.values() for record in records}


def raises(match_all, call, *args, **kwargs):
    """`call` raises a UserError whose one message contains every string of `match_all`."""
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    for part in match_all:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------- CelebA


@pytest.fixture
def celeba(tmp_path):
    return make_celeba(tmp_path / "celeba")


@pytest.mark.parametrize("crlf", [False, True])
def test_celeba_attributes_splits_and_keys(tmp_path, crlf):
    fixture = make_celeba(tmp_path / "celeba", crlf=crlf)
    table = read_celeba(fixture["root"])
    assert table.source == "celeba"
    assert table.attributes == fixture["names"] and len(table.attributes) == 40
    assert {split: [r.key for r in records] for split, records in table.splits.items()} == fixture["splits"]
    assert [len(table.splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    records = by_key(table)
    for stem, expected in fixture["attributes"].items():
        assert records[stem].attributes.dtype == np.uint8
        np.testing.assert_array_equal(records[stem].attributes, expected)
        assert records[stem].path == fixture["images"] / f"{stem}.jpg" and records[stem].path.is_file()
        assert records[stem].bbox is None


def test_celeba_double_spaces_are_read_as_written(celeba):
    # the fixture writes the real quirk: two spaces before every 1
    line = celeba["attr_file"].read_text().splitlines()[2]
    assert "  1" in line and line.startswith("000001.jpg ")
    values = [0 if v == "-1" else 1 for v in line.split()[1:]]
    np.testing.assert_array_equal(by_key(read_celeba(celeba["root"]))["000001"].attributes, values)


def test_celeba_missing_root_and_files(tmp_path, celeba):
    raises(["nowhere"], read_celeba, tmp_path / "nowhere")
    celeba["partition_file"].unlink()
    raises([str(celeba["partition_file"])], read_celeba, celeba["root"])
    celeba["attr_file"].unlink()
    raises([str(celeba["attr_file"])], read_celeba, celeba["root"])
    shutil.rmtree(celeba["images"])
    raises([str(celeba["images"])], read_celeba, celeba["root"])


def test_celeba_bad_value_names_line_and_attribute(celeba):
    line = celeba["attr_file"].read_text().splitlines()[4].replace(" -1", "  0", 1).replace("  1", "  0", 1)
    replace_line(celeba["attr_file"], 5, line)
    raises(["list_attr_celeba.txt line 5", "expected -1 or 1"], read_celeba, celeba["root"])


def test_celeba_wrong_column_count(celeba):
    line = celeba["attr_file"].read_text().splitlines()[6]
    replace_line(celeba["attr_file"], 7, line.rsplit(" ", 1)[0])
    raises(["list_attr_celeba.txt line 7", "40 values"], read_celeba, celeba["root"])


def test_celeba_count_disagrees(celeba):
    replace_line(celeba["attr_file"], 1, "13")
    raises(["list_attr_celeba.txt line 1", "13", "12"], read_celeba, celeba["root"])


def test_celeba_row_without_image(celeba):
    (celeba["images"] / "000004.jpg").unlink()
    (celeba["images"] / "000009.jpg").unlink()
    raises(["list_attr_celeba.txt line 6", "2 listed image(s)", "000004.jpg, 000009.jpg"], read_celeba, celeba["root"])


def test_celeba_image_without_row(celeba):
    write_jpeg(celeba["images"] / "999999.jpg", 178, 218, np.random.default_rng(1))
    raises(["1 image(s)", "999999.jpg", "list_attr_celeba.txt"], read_celeba, celeba["root"])


def test_celeba_image_without_partition_row_and_bad_partition(celeba):
    delete_line(celeba["partition_file"], 3)
    raises(["list_eval_partition.txt", "1 image(s)", "000003.jpg"], read_celeba, celeba["root"])
    replace_line(celeba["partition_file"], 3, "000004.jpg 7")
    raises(["list_eval_partition.txt line 3", "'7'"], read_celeba, celeba["root"])


def test_celeba_duplicate_row(celeba):
    lines = celeba["attr_file"].read_text().splitlines()
    replace_line(celeba["attr_file"], 4, lines[2])  # 000001 again, 000002 gone
    raises(["list_attr_celeba.txt line 4", "000001.jpg", "line 3"], read_celeba, celeba["root"])


def table_contents(table):
    """Everything a reader hands the builder, paths relative to the image folder."""
    return table.attributes, {
        split: [(r.key, r.path.name, r.attributes.tolist(), r.bbox) for r in records]
        for split, records in table.splits.items()
    }


@pytest.mark.parametrize("crlf", [False, True])
def test_celeba_kaggle_copy_reads_as_the_official_one(tmp_path, crlf):
    official = read_celeba(make_celeba(tmp_path / "official", crlf=crlf)["root"])
    kaggle = make_celeba(tmp_path / "kaggle", crlf=crlf, kaggle=True)
    table = read_celeba(kaggle["root"])
    assert table_contents(table) == table_contents(official)
    assert all(r.path.parent == kaggle["images"] and r.path.is_file() for rs in table.splits.values() for r in rs)
    assert kaggle["images"] == kaggle["root"] / "img_align_celeba" / "img_align_celeba"


@pytest.mark.parametrize("separator", [";", "\t"])
def test_celeba_kaggle_tables_saved_by_a_spreadsheet_read_as_the_official_ones(tmp_path, separator):
    """Kaggle's CSVs saved again by a spreadsheet in a locale whose "CSV" separates with ';' (or as
    tab-separated text), with its BOM, CRLF and quotes: 'expected the header image_id,<attribute names>'
    (the folder reader's tables already took them)."""
    official = read_celeba(make_celeba(tmp_path / "official")["root"])
    kaggle = make_celeba(tmp_path / "kaggle", kaggle=True)
    for table in (kaggle["attr_file"], kaggle["partition_file"]):
        rows = [line.split(",") for line in table.read_text().splitlines()]
        text = "\r\n".join(separator.join(f'"{cell}"' for cell in row) for row in rows) + "\r\n"
        table.write_bytes(("\ufeff" + text).encode())
    assert table_contents(read_celeba(kaggle["root"])) == table_contents(official)


def test_celeba_official_tables_with_nested_image_folder(tmp_path, celeba):
    # `unzip img_align_celeba.zip -d img_align_celeba`: the images one folder deeper, as in Kaggle's zip
    nested = celeba["images"] / "img_align_celeba"
    nested.mkdir()
    for name in celeba["files"]:
        (celeba["images"] / name).rename(nested / name)
    table = read_celeba(celeba["root"])
    assert {r.path.parent for rs in table.splits.values() for r in rs} == {nested}
    # an image in the outer folder as well: the outer folder is the image folder, the others unlisted
    write_jpeg(celeba["images"] / "000001.jpg", 178, 218, np.random.default_rng(1))
    raises(["line 4", "11 listed image(s) not found", str(celeba["images"])], read_celeba, celeba["root"])


def test_celeba_google_drive_folder_reads_as_the_flat_layout(tmp_path):
    # the official Drive folder: Anno/, Eval/, Img/ (img_align_celeba.zip unzipped in Img/)
    flat = read_celeba(make_celeba(tmp_path / "flat")["root"])
    drive = make_celeba(tmp_path / "drive")
    root = drive["root"]
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    (root / "Img").mkdir()
    drive["attr_file"].rename(root / "Anno" / "list_attr_celeba.txt")
    drive["partition_file"].rename(root / "Eval" / "list_eval_partition.txt")
    drive["images"].rename(root / "Img" / "img_align_celeba")
    table = read_celeba(root)
    assert table_contents(table) == table_contents(flat)
    assert {r.path.parent for rs in table.splits.values() for r in rs} == {root / "Img" / "img_align_celeba"}


def test_celeba_png_copy_holding_jpegs_too_is_one_line_saying_so(tmp_path):
    """JPEGs in the PNG copy's folder were 'image(s) have no row in list_attr_celeba.txt (first:
    000001.jpg)', naming a file the table lists."""
    png = make_celeba(tmp_path / "png", n=4)
    folder = png["root"] / "img_align_celeba_png"
    png["images"].rename(folder)
    for name in png["files"]:
        Image.open(folder / name).save(folder / name.replace(".jpg", ".png"))
    raises(
        [f"{folder}: 4 image(s) are not PNG files (first: 000001.jpg", f"move the JPEGs to {png['images']}"],
        read_celeba,
        png["root"],
    )


def test_celeba_png_copy_is_read_where_no_jpeg_folder_is(tmp_path):
    # Img/img_align_celeba_png.7z: the same faces as 000001.png, while the tables name 000001.jpg
    flat = read_celeba(make_celeba(tmp_path / "flat")["root"])
    png = make_celeba(tmp_path / "png")
    folder = png["root"] / "img_align_celeba_png"
    folder.mkdir()
    for name in png["files"]:
        Image.open(png["images"] / name).save(folder / name.replace(".jpg", ".png"))
        (png["images"] / name).unlink()
    png["images"].rmdir()
    table = read_celeba(png["root"])
    assert [(k, a, v) for k, _, a, v in table_contents(table)[1]["train"]] == [
        (k, a, v) for k, _, a, v in table_contents(flat)[1]["train"]
    ]
    paths = [r.path for rs in table.splits.values() for r in rs]
    assert all(p.parent == folder and p.suffix == ".png" and p.is_file() for p in paths) and len(paths) == 12
    # a row missing from the partition file is named as that file (and the tables) name it
    delete_line(png["root"] / "list_eval_partition.txt", 3)
    raises(["list_eval_partition.txt: 1 image(s) have no row (first: 000003.jpg)"], read_celeba, png["root"])
    (folder / "000003.png").unlink()
    raises(["line 5", "1 listed image(s) not found", "000003.png"], read_celeba, png["root"])


def test_celeba_official_tables_are_read_before_kaggles(tmp_path, celeba):
    (celeba["root"] / "list_attr_celeba.csv").write_text("not,a,table\n")
    (celeba["root"] / "list_eval_partition.csv").write_text("x\n")
    assert len(by_key(read_celeba(celeba["root"]))) == 12


def test_celeba_kaggle_tables_one_by_one(tmp_path, celeba):
    # each table is found as .txt or as Kaggle's .csv on its own
    kaggle = make_celeba(tmp_path / "kaggle", kaggle=True)
    shutil.copy(kaggle["partition_file"], celeba["root"])
    celeba["partition_file"].unlink()
    assert table_contents(read_celeba(celeba["root"]))[1]["test"][-1][0] == "000012"


def test_celeba_missing_tables_name_both_spellings(celeba):
    celeba["attr_file"].unlink()
    raises([str(celeba["attr_file"]), "list_attr_celeba.csv"], read_celeba, celeba["root"])


def test_celeba_torchvision_root_is_pointed_to_its_celeba_folder(tmp_path):
    # torchvision.datasets.CelebA(root) keeps the data set in ROOT/celeba/
    make_celeba(tmp_path / "celeba")
    raises([str(tmp_path / "img_align_celeba"), f"--root {tmp_path / 'celeba'}"], read_celeba, tmp_path)


@pytest.fixture
def kaggle(tmp_path):
    return make_celeba(tmp_path / "kaggle", kaggle=True)


def test_celeba_kaggle_bad_rows_name_line_and_column(kaggle):
    attr = kaggle["attr_file"]
    row = attr.read_text().splitlines()[3].split(",")
    replace_line(attr, 4, ",".join([row[0], "0", *row[2:]]))
    raises(["list_attr_celeba.csv line 4", "5_o_Clock_Shadow", "'0'", "expected -1 or 1"], read_celeba, kaggle["root"])
    replace_line(attr, 4, ",".join(row[:-1]))
    raises(["list_attr_celeba.csv line 4", "40 values", "got 40 columns"], read_celeba, kaggle["root"])
    replace_line(attr, 4, ",".join([row[0], *(f" {value} " for value in row[1:])]))  # spaces around values are fine
    assert len(by_key(read_celeba(kaggle["root"]))) == 12
    header = attr.read_text().splitlines()[0]
    replace_line(attr, 1, header + ",")
    raises(["list_attr_celeba.csv line 1", "expected the header"], read_celeba, kaggle["root"])
    replace_line(attr, 1, "image_id")
    raises(["list_attr_celeba.csv line 1", "expected the header"], read_celeba, kaggle["root"])
    attr.write_bytes(b"image_id,Smiling\n000001.jpg,\xff1\n")
    raises(["list_attr_celeba.csv", "expected a UTF-8 CSV file"], read_celeba, kaggle["root"])


def test_celeba_kaggle_partition_header_is_optional(kaggle):
    part = kaggle["partition_file"]
    delete_line(part, 1)  # no header: the first row is an image's
    assert table_contents(read_celeba(kaggle["root"]))[1]["train"][0][0] == "000001"
    part.write_text("999999.jpg,0\n" + part.read_text())  # another copy's first row was taken for a header
    raises(
        ["list_eval_partition.csv line 1", "999999.jpg", "no row in list_attr_celeba.csv"], read_celeba, kaggle["root"]
    )
    delete_line(part, 1)
    replace_line(part, 1, "000001.jpg,7")
    raises(["list_eval_partition.csv line 1", "'7'"], read_celeba, kaggle["root"])
    replace_line(part, 1, "000001.jpg,0")
    replace_line(part, 3, "000003.jpg 0")
    raises(["list_eval_partition.csv line 3", "'<file>,0|1|2'", "1 column"], read_celeba, kaggle["root"])
    replace_line(part, 3, "999999.jpg,0")
    raises(
        ["list_eval_partition.csv line 3", "999999.jpg", "no row in list_attr_celeba.csv"], read_celeba, kaggle["root"]
    )


# ----------------------------------------------------------------------------------------------- CUB


@pytest.fixture
def cub(tmp_path):
    return make_cub(tmp_path / "CUB")


def test_cub_vectors_names_splits_and_keys(cub):
    table = read_cub(cub["root"])
    assert table.source == "cub-200-2011"
    assert table.attributes == cub["class_names"] + cub["attribute_names"]
    assert table.attributes[:2] == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert table.attributes[3] == "has_bill_shape::curved_(up_or_down)"
    assert [len(table.splits["train"]), len(table.splits["test"])] == [5, 4]
    assert {split: [r.key for r in records] for split, records in table.splits.items()} == {
        split: [safe_key(r) for r in relpaths] for split, relpaths in cub["splits"].items()
    }
    records = by_key(table)
    for relpath, expected in cub["attributes"].items():
        record = records[safe_key(relpath)]
        assert record.attributes.shape == (3 + 4,) and record.attributes.dtype == np.uint8
        np.testing.assert_array_equal(record.attributes, expected)
        # the species one-hot sits at the class's position in classes.txt
        assert record.attributes[:3].tolist() == [int(c == cub["labels"][relpath]) for c in range(3)]
        assert record.path == cub["data"] / "images" / relpath and record.path.is_file()
        assert record.bbox is None
    key = safe_key(cub["relpaths"][4])
    assert key == "002_Laysan_Albatross__Laysan_Albatross_0002_705" and records[key].attributes[1] == 1


def test_cub_certainty_rule(cub):
    # image 1: attr 1 present/certainty 3 -> 1, attr 2 present/certainty 2 -> 0, attr 3 absent/certainty 4 -> 0
    rows = cub["files"]["attribute_labels"].read_text().splitlines()[:3]
    assert [row.split()[:4] for row in rows] == [["1", "1", "1", "3"], ["1", "2", "1", "2"], ["1", "3", "0", "4"]]
    record = by_key(read_cub(cub["root"]))[safe_key(cub["crafted"])]
    assert record.attributes[3:6].tolist() == [1, 0, 0]


def test_cub_extra_columns_are_ignored(cub):
    rows = cub["files"]["attribute_labels"].read_text().splitlines()
    assert any(len(row.split()) > 5 for row in rows)  # the quirk is in the fixture
    assert len(read_cub(cub["root"]).splits["train"]) == 5


def test_cub_both_roots_and_attributes_beside_data(cub):
    expected = {k: (r.path, r.attributes.tolist()) for k, r in by_key(read_cub(cub["root"])).items()}
    inner = read_cub(cub["data"])  # CUB_200_2011 itself: attributes.txt one level up
    assert {k: (r.path, r.attributes.tolist()) for k, r in by_key(inner).items()} == expected
    cub["files"]["attributes"].rename(cub["data"] / "attributes.txt")
    for root in (cub["root"], cub["data"]):
        assert {k: (r.path, r.attributes.tolist()) for k, r in by_key(read_cub(root)).items()} == expected


def test_cub_bbox_crop(cub):
    records = by_key(read_cub(cub["root"], bbox_crop=True))
    for relpath, box in cub["boxes"].items():
        assert records[safe_key(relpath)].bbox == box
    delete_line(cub["files"]["boxes"], 2)
    raises(["bounding_boxes.txt", "1 image(s)", cub["relpaths"][1]], read_cub, cub["root"], bbox_crop=True)
    read_cub(cub["root"])  # not read without bbox_crop
    replace_line(cub["files"]["boxes"], 2, "3 1.0 2.0 -5.0 4.0")
    raises(["bounding_boxes.txt line 2", "positive width"], read_cub, cub["root"], bbox_crop=True)


def test_cub_missing_files(tmp_path, cub):
    raises(["nowhere"], read_cub, tmp_path / "nowhere")
    raises([str(tmp_path / "CUB_200_2011" / "images.txt")], read_cub, tmp_path)
    cub["files"]["attributes"].unlink()
    raises([str(cub["root"] / "attributes.txt"), str(cub["data"] / "attributes.txt")], read_cub, cub["data"])
    for name in ("classes", "labels", "split", "attribute_labels"):
        moved = cub["files"][name].rename(cub["files"][name].with_suffix(".bak"))
        (cub["root"] / "attributes.txt").write_text("1 a\n2 b\n3 c\n4 d\n")
        raises([str(cub["files"][name])], read_cub, cub["root"])
        moved.rename(cub["files"][name])
    read_cub(cub["root"])


@pytest.mark.parametrize(
    "file, line, text, expected",
    [
        ("images", 2, "2", "images.txt line 2"),
        ("images", 3, "x 001.Black_footed_Albatross/a.jpg", "images.txt line 3"),
        ("images", 3, "1 001.Black_footed_Albatross/a.jpg", "image id 1 already used on line 1"),
        ("classes", 2, "1 002.Laysan_Albatross", "classes.txt line 2"),
        ("labels", 4, "4 9", "image_class_labels.txt line 4: class id 9 is not in classes.txt"),
        ("labels", 4, "99 1", "image_class_labels.txt line 4: image id 99 is not in images.txt"),
        ("split", 5, "5 2", "train_test_split.txt line 5"),
        (
            "attribute_labels",
            6,
            "2 9 1 3 1.0",
            "image_attribute_labels.txt line 6: attribute id 9 is not in attributes.txt",
        ),
        ("attribute_labels", 6, "42 2 1 3 1.0", "image_attribute_labels.txt line 6: image id 42 is not in images.txt"),
        ("attribute_labels", 6, "2 2 5 3 1.0", "image_attribute_labels.txt line 6: is_present"),
        ("attribute_labels", 6, "2 2 1 x 1.0", "image_attribute_labels.txt line 6: certainty_id"),
        # certainties.txt has 1 to 4: a 5 or a 0 was read as certain (>= 3) or not
        ("attribute_labels", 6, "2 2 1 5 1.0", "line 6: certainty_id is '5', expected 1, 2, 3 or 4"),
        ("attribute_labels", 6, "2 2 1 0 1.0", "line 6: certainty_id is '0', expected 1, 2, 3 or 4"),
        ("attribute_labels", 6, "2 2 1", "image_attribute_labels.txt line 6"),
        ("attributes", 2, "two has_bill_shape::dagger", "attributes.txt line 2"),
    ],
)
def test_cub_malformed_rows(cub, file, line, text, expected):
    replace_line(cub["files"][file], line, text)
    raises([expected], read_cub, cub["root"])


def test_cub_missing_rows_and_images(cub):
    original = cub["files"]["attribute_labels"].read_bytes()
    delete_line(cub["files"]["attribute_labels"], 6)
    raises(["image_attribute_labels.txt", "expected 4 rows per image", "id 2 (3 rows)"], read_cub, cub["root"])
    cub["files"]["attribute_labels"].write_bytes(original)
    delete_line(cub["files"]["split"], 9)
    raises(["train_test_split.txt", "1 image(s)", "id 9"], read_cub, cub["root"])


def test_cub_missing_image_files(cub):
    for relpath in cub["relpaths"][2:4]:
        (cub["data"] / "images" / relpath).unlink()
    raises(["images.txt", "2 listed image(s)", cub["relpaths"][2], cub["relpaths"][3]], read_cub, cub["root"])


def test_cub_species_only_needs_no_attribute_files(cub):
    cub["files"]["attribute_labels"].unlink()  # what many copies of CUB lack
    cub["files"]["attributes"].unlink()
    table = read_cub(cub["root"], condition="species")
    assert table.source == "cub-200-2011:species" and table.attributes == cub["class_names"]
    records = by_key(table)
    assert len(records) == len(cub["relpaths"])
    for relpath in cub["relpaths"]:
        assert records[safe_key(relpath)].attributes.tolist() == [int(c == cub["labels"][relpath]) for c in range(3)]
    assert {s: [r.key for r in rs] for s, rs in table.splits.items()} == {
        s: [safe_key(r) for r in rs] for s, rs in cub["splits"].items()
    }
    replace_line(cub["files"]["labels"], 4, "4 9")  # the species files are still checked
    raises(["image_class_labels.txt line 4: class id 9"], read_cub, cub["root"], condition="species")


def test_cub_attributes_only(cub):
    cub["files"]["classes"].unlink()  # not read for attributes only
    cub["files"]["labels"].unlink()
    table = read_cub(cub["root"], condition="attributes")
    assert table.source == "cub-200-2011:attributes" and table.attributes == cub["attribute_names"]
    for relpath, expected in cub["attributes"].items():
        assert by_key(table)[safe_key(relpath)].attributes.tolist() == expected[3:].tolist()
    assert by_key(table)[safe_key(cub["crafted"])].attributes[:3].tolist() == [1, 0, 0]  # certainty rule kept


@pytest.mark.parametrize("condition", ["both", "attributes"])
@pytest.mark.parametrize("missing", ["attribute_labels", "attributes"])
def test_cub_missing_attribute_files_say_how_to_do_without(cub, condition, missing):
    cub["files"][missing].unlink()
    message = raises([cub["files"][missing].name, "--condition species"], read_cub, cub["root"], condition=condition)
    assert "\n" not in message
    if missing == "attribute_labels":
        assert str(cub["files"][missing]) in message


def test_cub_unknown_condition(cub):
    raises(
        ["'species+attributes'", "species, attributes, both"], read_cub, cub["root"], condition="species+attributes"
    )


# ----------------------------------------------------------------------------------------------- folder


def test_folder_random_split_is_seeded_and_keeps_table_order(tmp_path):
    fixture = make_folder(tmp_path, n=10)
    table = read_folder(fixture["root"], fixture["table"], test_fraction=0.2, seed=3)
    assert table.source == "folder:photos" and table.attributes == ["Smiling", "Eyeglasses"]
    assert sorted(table.splits) == ["test", "train"]
    assert [len(table.splits["train"]), len(table.splits["test"])] == [8, 2]
    order = {safe_key(f): i for i, f in enumerate(fixture["files"])}
    for records in table.splits.values():
        positions = [order[r.key] for r in records]
        assert positions == sorted(positions)
    again = read_folder(fixture["root"], fixture["table"], test_fraction=0.2, seed=3)
    assert [r.key for r in again.splits["test"]] == [r.key for r in table.splits["test"]]
    records = by_key(table)
    for file, expected in fixture["attributes"].items():
        assert records[safe_key(file)].path == fixture["root"] / file
        np.testing.assert_array_equal(records[safe_key(file)].attributes, expected)
    assert "a__img_000" in records  # subfolder in the key
    # at least one test row for a small table, never all of them
    assert len(read_folder(fixture["root"], fixture["table"], test_fraction=0.01).splits["test"]) == 1


def test_a_folder_table_that_leaves_no_train_or_test_images_is_refused_before_the_build(tmp_path):
    """It used to build a train split alone, which `train` then refused as an unfinished build."""
    fixture = make_folder(tmp_path / "random", n=4)
    with pytest.raises(UserError, match="folder:photos: no test images \\(4 train\\); training and evaluation need"):
        require_train_and_test(read_folder(fixture["root"], fixture["table"], test_fraction=0.0))
    one = make_folder(tmp_path / "one", n=1)
    with pytest.raises(UserError, match="no test images \\(1 train\\)"):
        require_train_and_test(read_folder(one["root"], one["table"]))
    marked = make_folder(tmp_path / "marked", n=6, split_column=True)
    lines = marked["table"].read_text().splitlines()
    marked["table"].write_text("\n".join([lines[0]] + [line.rsplit(",", 1)[0] + ",test" for line in lines[1:]]) + "\n")
    with pytest.raises(UserError, match="no train images \\(6 test\\)"):
        require_train_and_test(read_folder(marked["root"], marked["table"], split_column="split"))
    done = subprocess.run(  # the command refuses it before anything is written
        [sys.executable, "-m", "toolkit.cli", "shards", "folder", "--root", fixture["root"], "--attributes",
         fixture["table"], "--out", tmp_path / "out", "--test-fraction", "0", "--size", "8"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: folder:photos: no test images (4 train); training and evaluation need a train and a test split "
        "(shards folder: --test-fraction above 0, rows of both in --split-column, or a test/ folder beside train/)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_link_loop_in_the_image_folder_is_ignored_unless_listed_and_then_named(tmp_path):
    """One looping link used to refuse the whole folder ('cannot list the folder: Too many levels of symbolic links')."""
    fixture = make_folder(tmp_path, n=6)
    images = fixture["root"] / "a"
    (images / "loop1.jpg").symlink_to("loop2.jpg")
    (images / "loop2.jpg").symlink_to("loop1.jpg")
    (images / "nowhere.jpg").symlink_to("gone.jpg")
    table = read_folder(fixture["root"], fixture["table"], test_fraction=0.2)
    assert sum(map(len, table.splits.values())) == 6
    with fixture["table"].open("a") as stream:
        stream.write("a/loop1.jpg,1,0\n")
    with pytest.raises(UserError, match="a/loop1.jpg"):
        read_folder(fixture["root"], fixture["table"], test_fraction=0.2)


@pytest.mark.parametrize(
    "make, rows",
    [
        # a second name for a listed file, beside it or in another folder
        (lambda r: (r / "a/alias.jpg").symlink_to("img_000.jpg"), ["a/img_000.jpg", "a/alias.jpg"]),
        (lambda r: (r / "b/alias.jpg").symlink_to("../a/img_000.jpg"), ["b/alias.jpg", "a/img_000.jpg"]),
        # a folder link: every image in it is listed twice
        (lambda r: (r / "c").symlink_to("a"), ["a/img_000.jpg", "c/img_000.jpg"]),
        (lambda r: (r / "a/up").symlink_to(".."), ["a/img_000.jpg", "a/up/a/img_000.jpg"]),
        # two links to one file outside the image folder
        (
            lambda r: [(r / name).symlink_to(r.parent / "labels.csv") for name in ("x.jpg", "y.jpg")],
            ["x.jpg", "y.jpg"],
        ),
    ],
)
def test_one_image_listed_on_two_rows_through_a_symbolic_link_is_refused(tmp_path, make, rows):
    """Two rows naming one file through a link were two samples of one image (maybe with two attribute
    vectors, maybe one in train and one in test) without a word, as two spellings of one name are not."""
    fixture = make_folder(tmp_path, n=4)
    make(fixture["root"])
    fixture["table"].write_text("file,Smiling\n" + "".join(f"{row},1\n" for row in ["b/img_001.jpg", *rows]))
    raises(
        ["labels.csv line 4:", f"{rows[1]} is the file {rows[0]} of line 3", "(a symbolic link)"],
        read_folder,
        fixture["root"],
        fixture["table"],
    )
    # each name alone is read: a link is a file like any other
    for row in rows:
        fixture["table"].write_text(f"file,Smiling\nb/img_001.jpg,1\n{row},0\n")
        assert len(by_key(read_folder(fixture["root"], fixture["table"], test_fraction=0.5))) == 2


@pytest.mark.parametrize(
    "make, rows, kind",
    [
        # a second name beside it, in another folder, in a folder reached through a link
        (lambda r: os.link(r / "a/img_000.jpg", r / "a/alias.jpg"), ["a/img_000.jpg", "a/alias.jpg"], "a hard link"),
        (lambda r: os.link(r / "a/img_000.jpg", r / "b/alias.jpg"), ["b/alias.jpg", "a/img_000.jpg"], "a hard link"),
        (
            lambda r: [os.link(r / "a/img_000.jpg", r / "b/alias.jpg"), (r / "c").symlink_to("b")],
            ["a/img_000.jpg", "c/alias.jpg"],
            "links, symbolic and hard",
        ),
        # a symbolic link to a hard link's second name
        (
            lambda r: [os.link(r / "a/img_000.jpg", r / "b/alias.jpg"), (r / "x.jpg").symlink_to("b/alias.jpg")],
            ["x.jpg", "a/img_000.jpg"],
            "links, symbolic and hard",
        ),
    ],
)
def test_one_image_listed_on_two_rows_through_a_hard_link_is_refused(tmp_path, make, rows, kind):
    """Two names of one file made with `ln` (no -s) were two samples of one image, as symbolic links were
    before: one inode, told by the listing's inode numbers (no stat per image)."""
    fixture = make_folder(tmp_path, n=4)
    make(fixture["root"])
    fixture["table"].write_text("file,Smiling\n" + "".join(f"{row},1\n" for row in ["b/img_001.jpg", *rows]))
    raises(
        ["labels.csv line 4:", f"{rows[1]} is the file {rows[0]} of line 3 under another name ({kind})"],
        read_folder,
        fixture["root"],
        fixture["table"],
    )
    for row in rows:  # each name alone is read
        fixture["table"].write_text(f"file,Smiling\nb/img_001.jpg,1\n{row},0\n")
        assert len(by_key(read_folder(fixture["root"], fixture["table"], test_fraction=0.5))) == 2


def test_a_listing_that_numbers_files_otherwise_than_stat_costs_a_stat_each_and_refuses_nothing(tmp_path, monkeypatch):
    """Some FUSE file systems give every entry of a listing one inode number (libfuse without use_ino):
    taken as is, every image would be 'the same file'. One stat per folder compares the listing's number
    with stat's; where they differ, each file is stat'd, and two names alike are confirmed by a stat."""
    import toolkit.data.sources as sources

    fixture = make_folder(tmp_path, n=6)
    real_scandir = os.scandir

    class Lying:
        def __init__(self, entry):
            self.entry = entry

        def __getattr__(self, name):
            return getattr(self.entry, name)

        def inode(self):
            return 0xFFFFFFFF

    class Listing:
        def __init__(self, path):
            self.listing = real_scandir(path)

        def __enter__(self):
            return (Lying(entry) for entry in self.listing)

        def __exit__(self, *exc):
            self.listing.close()

    monkeypatch.setattr(sources.os, "scandir", Listing)
    assert len(by_key(read_folder(fixture["root"], fixture["table"], test_fraction=0.5))) == 6
    os.link(fixture["root"] / "a/img_000.jpg", fixture["root"] / "b/alias.jpg")
    with fixture["table"].open("a") as stream:
        stream.write("b/alias.jpg,1,0\n")
    raises(
        ["line 8: b/alias.jpg is the file a/img_000.jpg of line 2", "(a hard link)"],
        read_folder,
        fixture["root"],
        fixture["table"],
    )


def test_images_in_a_linked_folder_cost_no_realpath_each(tmp_path, monkeypatch):
    """img_align_celeba kept on another disk and linked into --root: every image went through a
    realpath of its own (a stat per part of its path: 1.2 million for CelebA, minutes on NFS) to
    look for a second name of it. The folder's real path is taken once; only names that are links
    themselves are resolved."""
    import toolkit.data.sources as sources

    (tmp_path / "disk/img").mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "root/img").symlink_to(tmp_path / "disk/img")
    names = [f"img/{i:04d}.jpg" for i in range(300)]
    for name in names:
        (tmp_path / "root" / name).touch()
    (tmp_path / "root/img/alias.jpg").symlink_to("0007.jpg")
    table = tmp_path / "labels.csv"
    table.write_text("file,Smiling\n" + "".join(f"{name},1\n" for name in names))
    calls, stats = [], []
    realpath, stat = os.path.realpath, os.stat
    monkeypatch.setattr(sources.os.path, "realpath", lambda *a, **k: calls.append(a) or realpath(*a, **k))
    monkeypatch.setattr(sources.os, "stat", lambda *a, **k: stats.append(a) or stat(*a, **k))
    assert len(by_key(read_folder(tmp_path / "root", table, test_fraction=0.5))) == 300
    assert len(calls) <= 5, len(calls)
    assert len(stats) <= 10, len(stats)  # nor a stat each, to tell hard links (the listing's inode numbers)
    table.write_text(table.read_text() + "img/alias.jpg,0\n")  # still told
    raises(
        ["labels.csv line 302: img/alias.jpg is the file img/0007.jpg of line 9"],
        read_folder,
        tmp_path / "root",
        table,
    )


def test_a_listed_name_kept_on_disk_in_another_unicode_normalization_is_read_as_on_disk(tmp_path):
    """'é' typed in a table (one code point) and 'e' + a combining accent on disk (as macOS writes names and
    its zips keep them) are the same text: the image was 'not found' under a name that looked the same."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "Café/élan.jpg") for form in ("NFC", "NFD"))
    fixture = make_folder(tmp_path, n=2)
    root = fixture["root"]
    (root / nfd.split("/")[0]).mkdir()
    shutil.copy(root / "a/img_000.jpg", root / nfd)
    shutil.copy(root / "a/img_000.jpg", root / unicodedata.normalize("NFD", "naïve.jpg"))
    rows = ["b/img_001.jpg,0", f"{nfc},1", f"{unicodedata.normalize('NFC', 'naïve.jpg')},1"]
    fixture["table"].write_text("file,Smiling\n" + "\n".join(rows) + "\n")
    records = by_key(read_folder(root, fixture["table"], test_fraction=0.5))
    assert sorted(str(r.path.relative_to(root)) for r in records.values()) == sorted(
        ["b/img_001.jpg", nfd, unicodedata.normalize("NFD", "naïve.jpg")]
    )
    # both spellings on two rows: one image twice
    fixture["table"].write_text(f"file,Smiling\n{nfd},0\n{nfc},1\n")
    raises(["labels.csv line 3:", "of line 2", "another Unicode normalization"], read_folder, root, fixture["table"])
    # two files whose names differ only so: each row reads its own
    (root / nfc.split("/")[0]).mkdir()
    shutil.copy(root / "a/img_000.jpg", root / nfc)
    assert len(by_key(read_folder(root, fixture["table"], test_fraction=0.5))) == 2


def test_folder_split_column(tmp_path):
    fixture = make_folder(tmp_path, n=7, split_column=True)
    table = read_folder(fixture["root"], fixture["table"], split_column="split")
    assert table.attributes == ["Smiling", "Eyeglasses"]  # the split column is not an attribute
    assert {s: [r.key for r in rs] for s, rs in table.splits.items()} == {
        s: [safe_key(f) for f in files] for s, files in fixture["splits"].items()
    }


@pytest.mark.parametrize(
    "line, text, expected",
    [
        (3, "b/img_001.jpg,1,2,val", "labels.csv line 3: column Eyeglasses is '2', expected 0 or 1 (or -1 or 1)"),
        (3, "b/img_001.jpg,-1,0,val", "expected 0/1 or -1/1 in every column, not both"),  # -1 and 0 in one row
        (4, "a/img_002.jpg,1,0,dev", "labels.csv line 4: column split is 'dev'"),
        (4, "a/img_002.jpg,1,0", "labels.csv line 4: 3 column(s)"),
        (5, "a/img_002.jpg,1,0,val", "labels.csv line 5: a/img_002.jpg already listed on line 4"),
        (5, "../img_002.jpg,1,0,val", "labels.csv line 5"),
        (
            1,
            "name,Smiling,Eyeglasses,split",
            "labels.csv line 1: expected a file column named one of file, filename, file_name, image, path, image_id; the header is name, Smiling, Eyeglasses, split",
        ),
    ],
)
def test_folder_bad_rows(tmp_path, line, text, expected):
    fixture = make_folder(tmp_path, n=7, split_column=True)
    replace_line(fixture["table"], line, text)
    raises([expected], read_folder, fixture["root"], fixture["table"], split_column="split")


def test_folder_split_column_naming_an_attribute_column_says_so(tmp_path):
    """--split-column Smiling (a 0/1 column) was answered about the real split column ('column split is
    'train', expected 0 or 1'): the split column is checked first, and said to hold an attribute's 0/1."""
    fixture = make_folder(tmp_path, n=7, split_column=True)
    raises(
        [
            "labels.csv line 2: column Smiling is '",
            "expected one of train, val, test in the split column (it holds 0/1 values: an attribute column?)",
            "; column split holds '",
            "pass --split-column split",
        ],
        read_folder,
        fixture["root"],
        fixture["table"],
        split_column="Smiling",
    )
    # without a column of splits: no hint naming one
    plain = make_folder(tmp_path / "plain", n=7)
    with pytest.raises(UserError) as caught:
        read_folder(plain["root"], plain["table"], split_column="Eyeglasses")
    assert "attribute column?)" in str(caught.value) and "pass --split-column" not in str(caught.value)


def test_folder_missing_things(tmp_path):
    fixture = make_folder(tmp_path, n=7)
    raises(
        ["labels.csv line 1", "no split column 'fold'"],
        read_folder,
        fixture["root"],
        fixture["table"],
        split_column="fold",
    )
    raises(["missing.csv"], read_folder, fixture["root"], tmp_path / "missing.csv")
    for file in fixture["files"][1:3]:
        (fixture["root"] / file).unlink()
    raises(
        ["labels.csv", "2 listed image(s)", "b/img_001.jpg (line 3)", "a/img_002.jpg (line 4)"],
        read_folder,
        fixture["root"],
        fixture["table"],
    )


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_folder_tables_separated_by_semicolons_or_tabs_read_as_the_comma_one(tmp_path, delimiter):
    fixture = make_folder(tmp_path, n=6, split_column=True)
    text = fixture["table"].read_text()
    fixture["table"].write_bytes(b"\xef\xbb\xbf" + text.replace(",", delimiter).encode())  # and Excel's BOM
    table = read_folder(fixture["root"], fixture["table"], split_column="split")
    assert table.attributes == ["Smiling", "Eyeglasses"]
    records = by_key(table)
    for file, expected in fixture["attributes"].items():
        np.testing.assert_array_equal(records[safe_key(file)].attributes, expected)


@pytest.mark.parametrize(
    "header, row",
    [
        ('file;"Smiling, open";Hat', "{};1;0"),  # a spreadsheet's ';' CSV quotes a name holding a comma
        ("file;Smiling, open;Hat", "{};1;0"),  # ... or, as Python's and LibreOffice's ';' writers, does not
        ('file\t"Smiling, open"\tHat', "{}\t1\t0"),
        ('"file";"Smiling, open";"Hat"', '"{}";"1";"0"'),  # every cell quoted
    ],
)
def test_folder_table_separated_by_semicolons_with_a_comma_in_a_header_name(tmp_path, header, row):
    """The header's comma decided ',' although it was inside a name: the header was one column too
    many or few and the table refused ('expected a file column named ...')."""
    fixture = make_folder(tmp_path, n=2)
    rows = [row.format(file) for file in fixture["files"]]
    fixture["table"].write_text("\n".join([header, *rows]) + "\n")
    table = read_folder(fixture["root"], fixture["table"], test_fraction=0.5)
    assert table.attributes == ["Smiling, open", "Hat"]
    assert [r.attributes.tolist() for r in by_key(table).values()] == [[1, 0], [1, 0]]


@pytest.mark.parametrize("separator", [";", ",", "\t", "|"])
def test_folder_table_beginning_with_excels_sep_line_reads_it_as_the_separator(tmp_path, separator):
    """'sep=;' on the first line (written for Excel, which reads it as the separator) was read as the
    header: refused as 'column 2 has no name' or as having no file column."""
    fixture = make_folder(tmp_path, n=2)
    rows = [separator.join([file, "1", "0"]) for file in fixture["files"]]
    header = separator.join(["file", '"Smiling, open"', "Hat"])
    fixture["table"].write_text("\n".join([f"sep={separator}", header, *rows]) + "\n")
    table = read_folder(fixture["root"], fixture["table"], test_fraction=0.5)
    assert table.attributes == ["Smiling, open", "Hat"]
    assert [r.attributes.tolist() for r in by_key(table).values()] == [[1, 0], [1, 0]]
    fixture["table"].write_text(f"sep={separator}\n" + "\n".join(rows) + "\n")  # line numbers stay the file's
    raises(["labels.csv line 2: expected a file column"], read_folder, fixture["root"], fixture["table"])


def test_folder_table_with_a_comma_and_semicolons_in_its_header_names_stays_comma_separated(tmp_path):
    # names holding ';' in a comma table: the comma is the separator, as the rows agree
    fixture = make_folder(tmp_path, n=2)
    rows = [f"{file},1,0" for file in fixture["files"]]
    fixture["table"].write_text("\n".join(["file,a;b;c,d;e", *rows]) + "\n")
    assert read_folder(fixture["root"], fixture["table"], test_fraction=0.5).attributes == ["a;b;c", "d;e"]


def test_folder_table_is_read_as_the_celeba_csvs_are_blank_lines_before_the_header_included(tmp_path):
    # one CSV reader (sources.csv_rows) for every table: the header is the first row that is not blank
    fixture = make_folder(tmp_path, n=2)
    fixture["table"].write_text("\n  \nfile ; Smiling\n a/img_000.jpg ; 1 \nb/img_001.jpg;x\n")
    raises(["labels.csv line 5: column Smiling is 'x'"], read_folder, fixture["root"], fixture["table"])
    replace_line(fixture["table"], 5, "b/img_001.jpg;0")
    records = by_key(read_folder(fixture["root"], fixture["table"], test_fraction=0.5))
    assert {key: r.attributes.tolist() for key, r in records.items()} == {"a__img_000": [1], "b__img_001": [0]}


def test_folder_table_of_minus_one_and_one_reads_as_zero_and_one(tmp_path):
    fixture = make_folder(tmp_path, n=4)
    fixture["table"].write_text(
        "file,Smiling,Eyeglasses\na/img_000.jpg,-1,1\nb/img_001.jpg,1,-1\na/img_002.jpg,-1,-1\nb/img_003.jpg,1,1\n"
    )
    records = by_key(read_folder(fixture["root"], fixture["table"], test_fraction=0.25))
    got = {key: records[key].attributes.tolist() for key in records}
    assert got == {"a__img_000": [0, 1], "b__img_001": [1, 0], "a__img_002": [0, 0], "b__img_003": [1, 1]}


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "line 1: expected a header row"),
        ("\n\n", "line 1: expected a header row"),
        ("file,Smiling\n", "expected at least one image row after the header"),
        ("file\na/img_000.jpg\n", "expected at least one 0/1 attribute column"),
        (
            "name,Smiling\na/img_000.jpg,1\n",
            "expected a file column named one of file, filename, file_name, image, path, image_id",
        ),
        ("file;Smiling\na/img_000.jpg,1\n", "line 2: 1 column(s), the header has 2"),  # separators mixed
        ("file,Smiling\na/img_000.jpg,yes\n", "column Smiling is 'yes', expected 0 or 1 (or -1 or 1)"),
        ("file,Smiling\na/img_000.jpg,0.5\n", "column Smiling is '0.5', expected 0 or 1 (or -1 or 1)"),
        ("file,Smiling\na/img_000.jpg,\n", "column Smiling is '', expected 0 or 1 (or -1 or 1)"),
        ("file,Smiling\n,1\n", "line 2: empty file name"),
        # CelebA's -1/1 is read as 0/1, but one table holding both 0 and -1 is not guessed at
        (
            "file,Smiling,Hat\na/img_000.jpg,-1,1\nb/img_001.jpg,1,0\n",
            "line 3: column Hat is 0, but line 2 has -1: expected 0/1 or -1/1 in every column, not both",
        ),
        # a split column not named with --split-column: said so
        (
            "file,fold\na/img_000.jpg,train\n",
            "column fold is 'train', expected 0 or 1 (or -1 or 1) (a column of splits? pass --split-column fold)",
        ),
    ],
)
def test_folder_malformed_tables_are_one_user_error(tmp_path, content, expected):
    fixture = make_folder(tmp_path, n=2)
    fixture["table"].write_text(content)
    raises(["labels.csv", expected], read_folder, fixture["root"], fixture["table"])
    fixture["table"].write_bytes(b"\xff\xfe" + content.encode("utf-16-le"))  # UTF-16, as some editors save
    if content:
        raises(["labels.csv", "expected a UTF-8 CSV file"], read_folder, fixture["root"], fixture["table"])


# ----------------------------------------------------------------------------------------------- every reader


def test_cub_one_image_under_two_spellings_is_refused(cub):
    """'a/./b.jpg', 'a//b.jpg', './a/b.jpg' and 'a\\b.jpg' name the image a/b.jpg: listed beside it, the
    same image was two samples under two keys (maybe one in train, one in test); alone, it is read as it."""
    first = cub["relpaths"][0]
    folder, name = first.split("/")
    second = (cub["data"] / "images.txt").read_text().splitlines()[1]
    for spelling in (f"{folder}/./{name}", f"{folder}//{name}", f"./{folder}/{name}", f"{folder}\\{name}"):
        replace_line(cub["files"]["images"], 2, f"2 {spelling}")
        raises([f"images.txt line 2: {first} already listed on line 1"], read_cub, cub["root"])
    replace_line(cub["files"]["images"], 2, second)
    replace_line(cub["files"]["images"], 1, f"1 ./{folder}//{name}")
    record = by_key(read_cub(cub["root"]))[safe_key(first)]
    assert record.path == cub["data"] / "images" / first


def test_cub_class_labels_numbered_otherwise_than_images_txt_are_refused(cub):
    """Images 1-3 are in 001.Black_footed_Albatross/: a label of class 2 for image 3 means
    image_class_labels.txt numbers the images otherwise (every label silently wrong)."""
    replace_line(cub["files"]["labels"], 3, "3 2")
    raises(
        ["image_class_labels.txt: 1 image(s) labelled with another class", f"id 3 ({cub['relpaths'][2]})"],
        read_cub,
        cub["root"],
    )
    read_cub(cub["root"], condition="attributes")  # the labels are not read
    # class names that are not the folders' names: nothing to compare, the labels are taken as written
    classes = cub["files"]["classes"]
    classes.write_text("".join(f"{c} Species_{c}\n" for c in (1, 2, 3)))
    assert by_key(read_cub(cub["root"]))[safe_key(cub["relpaths"][2])].attributes[:3].tolist() == [0, 1, 0]


def test_a_listed_file_found_only_in_another_case_is_named_as_such(tmp_path):
    """'000001.jpg' listed, '000001.JPG' on disk: 'not found' alone sent the user to a file that `ls` shows."""
    celeba = make_celeba(tmp_path / "celeba", n=6)
    (celeba["images"] / "000001.jpg").rename(celeba["images"] / "000001.JPG")
    raises(["1 listed image(s) not found", "000001.JPG for 000001.jpg", "case-sensitive"], read_celeba, celeba["root"])

    cub = make_cub(tmp_path / "cub")
    folder, name = cub["relpaths"][4].split("/")
    (cub["data"] / "images" / folder / name).rename(cub["data"] / "images" / folder / name.lower())
    raises([f"{folder}/{name.lower()} for {folder}/{name}", "case-sensitive"], read_cub, cub["root"])

    mine = make_folder(tmp_path / "mine", n=4)
    (mine["root"] / "b/img_001.jpg").rename(mine["root"] / "b/IMG_001.jpg")
    (mine["root"] / "a/img_002.jpg").unlink()  # missing in any case: no note for it
    message = raises(
        [
            "2 listed image(s) not found",
            "1 of them found with other upper/lower case",
            "b/IMG_001.jpg for b/img_001.jpg",
        ],
        read_folder,
        mine["root"],
        mine["table"],
    )
    assert "img_002" not in message.split("; ", 1)[1]


def test_text_quoted_from_a_table_is_cut_in_the_message(tmp_path):
    """A line or a field megabytes long (a wrong file given as the table) was quoted whole: a 5 MB 'line'."""
    long = "x" * 100_000  # under the csv module's field limit
    celeba = make_celeba(tmp_path / "celeba", n=4)
    cub = make_cub(tmp_path / "cub")
    mine = make_folder(tmp_path / "mine", n=4)
    row = celeba["attr_file"].read_text().splitlines()[2]
    cases = [
        (celeba["attr_file"], 1, long, read_celeba, celeba["root"]),  # the count line
        (celeba["attr_file"], 3, row.replace("-1", long, 1), read_celeba, celeba["root"]),  # a value
        (celeba["partition_file"], 1, f"000001.jpg {long}", read_celeba, celeba["root"]),
        (cub["files"]["images"], 1, f"1 {long}", read_cub, cub["root"]),  # a missing image
        (cub["files"]["labels"], 1, f"1 {long} 3", read_cub, cub["root"]),  # a malformed row
        (cub["files"]["attribute_labels"], 1, f"1 1 1 {long} 1.0", read_cub, cub["root"]),
        (mine["table"], 1, f"file,{long},{long}", read_folder, mine["root"], mine["table"]),  # names repeated
        (mine["table"], 2, f"a/img_000.jpg,{long},1", read_folder, mine["root"], mine["table"]),
        (mine["table"], 2, f"a/{long}.jpg,1,1", read_folder, mine["root"], mine["table"]),
    ]
    for path, line, text, read, *args in cases:
        original = path.read_bytes()
        replace_line(path, line, text)
        message = raises([path.name], read, *args)
        assert len(message) < 1000 and "xxx..." in message, (path.name, line, len(message))
        path.write_bytes(original)


def test_folder_absolute_paths_inside_the_root_read_as_relative_ones(tmp_path):
    """A table made with `find "$PWD"/photos` names every file by its absolute path: refused as 'not a
    path inside the image folder' although each was; outside the root it still is refused."""
    fixture = make_folder(tmp_path, n=4)
    root = fixture["root"]
    rows = fixture["table"].read_text().splitlines()
    rows[1] = f"{root}/{rows[1]}"
    rows[2] = f"{root}/./x/../{rows[2]}"
    fixture["table"].write_text("\n".join(rows) + "\n")
    records = by_key(read_folder(root, fixture["table"], test_fraction=0.25))
    assert sorted(records) == sorted(safe_key(file) for file in fixture["files"])
    assert records[safe_key(fixture["files"][0])].path == root / fixture["files"][0]
    for outside in (f"{tmp_path}/labels.csv", f"{root}/../photos2/a.jpg", "/"):
        replace_line(fixture["table"], 4, f"{outside},1,0")
        raises(["labels.csv line 4", "is not a path inside the image folder"], read_folder, root, fixture["table"])
    replace_line(fixture["table"], 4, f"{root}/{fixture['files'][0]},1,0")  # one image, two spellings
    raises([f"line 4: {fixture['files'][0]} already listed on line 2"], read_folder, root, fixture["table"])


@pytest.mark.parametrize("linked", ["root", "table"])
def test_folder_absolute_paths_inside_the_root_through_a_link_read_as_relative_ones(tmp_path, linked):
    """--root given through a link (/home/me/photos -> /gpfs/me/photos) and the table written with real
    paths (Path.resolve()), or the reverse: each path was refused as 'not a path inside the image
    folder' although it named a file inside it."""
    fixture = make_folder(tmp_path, n=4)
    real = fixture["root"]
    (tmp_path / "home").mkdir()
    (tmp_path / "home/photos").symlink_to(real)
    given, written = (tmp_path / "home/photos", real) if linked == "root" else (real, tmp_path / "home/photos")
    rows = fixture["table"].read_text().splitlines()
    rows[1:] = [f"{written}/{row}" for row in rows[1:]]
    fixture["table"].write_text("\n".join(rows) + "\n")
    records = by_key(read_folder(given, fixture["table"], test_fraction=0.25))
    assert sorted(records) == sorted(safe_key(file) for file in fixture["files"])
    # a path outside the root stays refused, a link to it or not; and one written both ways is one image
    (tmp_path / "home/elsewhere").symlink_to(tmp_path)
    for outside in (f"{tmp_path}/labels.csv", f"{tmp_path}/home/elsewhere/labels.csv", "/nul\x00.jpg"):
        replace_line(fixture["table"], 4, f"{outside},1,0")
        raises(["labels.csv line 4", "is not a path inside the image folder"], read_folder, given, fixture["table"])
    replace_line(fixture["table"], 4, f"{given}/{fixture['files'][0]},1,0")
    raises([f"line 4: {fixture['files'][0]} already listed on line 2"], read_folder, given, fixture["table"])


# ----------------------------------------------------------------------------------------------- class folders


def one_hot_classes(table):
    """split -> [(sample key, the class its one-hot vector names)]."""
    result = {}
    for split, records in table.splits.items():
        for record in records:
            assert record.attributes.dtype == np.uint8 and record.attributes.sum() == 1
            name = table.attributes[int(record.attributes.argmax())]
            result.setdefault(split, []).append((record.key, name))
    return result


def test_class_folders_are_one_hot_classes_split_within_each_class(tmp_path):
    made = make_class_folders(tmp_path / "pets", {"dog": 5, "cat": 4, "bird": 1})
    table = read_class_folders(made["root"], test_fraction=0.25, seed=3)
    assert table.source == "classes:pets" and table.attributes == ["bird", "cat", "dog"]  # sorted, as ImageFolder
    classes = one_hot_classes(table)
    for split, pairs in classes.items():
        for key, name in pairs:
            assert key.startswith(name + "__")  # the image is in its class's folder
    # each class split on its own: at least one train image each, one test image of every class of 2+
    assert sorted({name for _, name in classes["train"]}) == ["bird", "cat", "dog"]
    assert sorted(name for _, name in classes["test"]) == ["cat", "dog"]
    assert sum(len(pairs) for pairs in classes.values()) == 10
    assert table.warnings == []
    # sub-folders of a class are the class; the split is seeded
    assert "dog__extra__img_004" in {key for key, _ in classes["train"] + classes["test"]}
    assert one_hot_classes(read_class_folders(made["root"], test_fraction=0.25, seed=3)) == classes
    assert one_hot_classes(read_class_folders(made["root"], test_fraction=0.25, seed=4)) != classes
    assert sum(len(r) for r in read_class_folders(made["root"]).splits.values()) == 10  # default fraction 0.1


@pytest.mark.parametrize("names", [("train", "test"), ("Train", "valid", "Test"), ("train", "validation", "test")])
def test_split_folders_give_each_images_split(tmp_path, names):
    root = tmp_path / "data"
    made = {name: make_class_folders(root / name, {"cat": 2, "dog": 3}, seed=k) for k, name in enumerate(names)}
    table = read_class_folders(root)
    expected = {"train": "train", "test": "test", "valid": "val", "validation": "val"}
    assert set(table.splits) == {expected[name.lower()] for name in names}
    assert table.attributes == ["cat", "dog"]
    for name in names:
        split = table.splits[expected[name.lower()]]
        assert len(split) == 5 and all(r.path.is_relative_to(made[name]["root"]) for r in split)
    raises(
        ["--test-fraction does nothing here", "give each image's split"], read_class_folders, root, test_fraction=0.2
    )
    raises(["--seed does nothing here"], read_class_folders, root, seed=1)


@pytest.mark.parametrize("held_out", ["val", "valid"])
def test_split_folders_without_test_take_a_share_of_each_training_class(tmp_path, held_out):
    # ImageNet's train/ + val/ (Kaggle's train/ + valid/): no test/, so test is carved from train, per class
    root = tmp_path / "data"
    make_class_folders(root / "train", {"cat": 4, "dog": 6})
    make_class_folders(root / held_out, {"cat": 1, "dog": 1})
    table = read_class_folders(root)
    assert {split: len(records) for split, records in table.splits.items()} == {"train": 8, "val": 2, "test": 2}
    assert all(r.key.startswith("train__") for r in table.splits["test"])  # from train/, one of each class
    assert sorted(table.attributes[int(r.attributes.argmax())] for r in table.splits["test"]) == ["cat", "dog"]
    again = read_class_folders(root, test_fraction=0.5, seed=1)
    assert {split: len(records) for split, records in again.splits.items()} == {"train": 5, "val": 2, "test": 5}
    assert read_class_folders(root, test_fraction=0.0).splits.keys() == {"train", "val"}  # refused by the build


def test_split_folders_must_hold_the_training_classes(tmp_path):
    root = tmp_path / "data"
    make_class_folders(root / "train", {"cat": 2})
    make_class_folders(root / "test", {"cat": 1, "dog": 1})
    raises([str(root / "test"), "dog", f"no folder in {root / 'train'}"], read_class_folders, root)
    make_class_folders(root / "val", {"cat": 1})
    make_class_folders(root / "valid", {"cat": 1})
    raises(["both val/ and valid/ hold the val split"], read_class_folders, root)


def test_class_folders_named_in_two_unicode_normalizations_are_one_class(tmp_path):
    """train/Café (é one code point) and test/Café (e + a combining accent, as macOS writes names) were
    'class folder(s) Café have no folder in train/': a class is its name as a text (NFC)."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "Café") for form in ("NFC", "NFD"))
    root = tmp_path / "data"
    make_class_folders(root / "train", {nfc: 2, "dog": 2})
    make_class_folders(root / "test", {nfd: 1, "dog": 1})
    table = read_class_folders(root)
    assert table.attributes == [nfc, "dog"]  # train/'s spelling
    assert sorted(table.attributes[int(r.attributes.argmax())] for r in table.splits["test"]) == [nfc, "dog"]
    assert any(r.path.parent.name == nfd for r in table.splits["test"])  # read where it is on disk
    # both spellings in test/: one class, the images of both
    make_class_folders(root / "test", {nfc: 1}, seed=5)
    assert (
        sum(table.attributes[int(r.attributes.argmax())] == nfc for r in read_class_folders(root).splits["test"]) == 2
    )
    # two classes of one name, in train/ or without split folders: refused, not two classes no one can tell apart
    make_class_folders(root / "train", {nfd: 1})
    raises([str(root / "train"), "two Unicode normalizations", "one folder per class"], read_class_folders, root)
    # a table's columns likewise: two attributes of one name
    photos = make_folder(tmp_path / "table", n=4)
    photos["table"].write_text(f"file,{nfc},{nfd}\na/img_000.jpg,1,0\nb/img_001.jpg,0,1\n")
    raises(
        ["labels.csv line 1: column name(s) repeated (one name in two Unicode normalizations)"],
        read_folder,
        photos["root"],
        photos["table"],
    )
    flat = tmp_path / "flat"
    make_class_folders(flat, {nfc: 1, nfd: 1, "dog": 1})
    raises([str(flat), f"{nfc!r}", "two Unicode normalizations"], read_class_folders, flat)


def test_class_folder_debris_is_passed_over_and_what_is_left_out_is_said(tmp_path):
    made = make_class_folders(tmp_path / "pets", {"cat": 2, "dog": 2})
    root = made["root"]
    for debris in (".ipynb_checkpoints", "__MACOSX", ".git"):  # not classes
        write_jpeg(root / debris / "x.jpg", 8, 8, np.random.default_rng(0))
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / "._img_000.jpg").write_bytes(b"\0")  # macOS resource fork
    (root / "cat" / "notes.txt").write_text("x")
    (root / "dog" / "img.heic").write_bytes(b"\0")
    write_jpeg(root / "stray.jpg", 8, 8, np.random.default_rng(0))
    (root / "labels.csv").write_text("file,a\n")  # not an image: no warning of its own
    table = read_class_folders(root)
    assert table.attributes == ["cat", "dog"] and sum(len(r) for r in table.splits.values()) == 4
    assert len(table.warnings) == 2
    assert "1 image(s) lie beside the class folders" in table.warnings[0] and "pets/stray.jpg" in table.warnings[0]
    assert (
        "2 file(s)" in table.warnings[1]
        and "cat/notes.txt" in table.warnings[1]
        and "dog/img.heic" in table.warnings[1]
    )


def test_class_folder_mistakes_are_one_line(tmp_path):
    raises(["nowhere", "is not a folder"], read_class_folders, tmp_path / "nowhere")
    flat = tmp_path / "flat"
    write_jpeg(flat / "a.jpg", 8, 8, np.random.default_rng(0))
    raises(["expected one folder per class", "--attributes"], read_class_folders, flat)
    made = make_class_folders(tmp_path / "pets", {"cat": 2})
    (made["root"] / "dog").mkdir()
    (made["root"] / "dog" / "readme.txt").write_text("x")
    raises(["class folder(s) dog hold no image"], read_class_folders, made["root"])
    (made["root"] / "dog" / "readme.txt").unlink()
    write_jpeg(made["root"] / "dog" / "img_000.jpg", 8, 8, np.random.default_rng(0))
    write_jpeg(made["root"] / "dog" / "img_000.png", 8, 8, np.random.default_rng(0))
    raises(["dog/img_00", "gives the sample key 'dog__img_000'"], read_class_folders, made["root"])
    raises(["test_fraction is 1.5"], read_class_folders, made["root"], test_fraction=1.5)


def test_class_folders_follow_links_once(tmp_path):
    elsewhere = make_class_folders(tmp_path / "elsewhere", {"cat": 2})
    made = make_class_folders(tmp_path / "pets", {"dog": 2})
    (made["root"] / "cat").symlink_to(elsewhere["root"] / "cat")  # data sets are put together with links
    (made["root"] / "dog" / "loop").symlink_to(made["root"] / "dog")  # a link back up: read once, no hang
    table = read_class_folders(made["root"], test_fraction=0.5)
    assert table.attributes == ["cat", "dog"] and sum(len(r) for r in table.splits.values()) == 4


def test_a_layout_that_is_neither_classes_nor_splits_is_refused_not_read_as_classes(tmp_path):
    """train/ and test/ beside a class folder were read as three classes (cat, test, train), and a zip's
    folder around the classes (flowers/flowers/cat/) as one class of every image, without a word."""
    mixed = tmp_path / "mixed"
    make_class_folders(mixed, {"cat": 2})
    make_class_folders(mixed / "train", {"cat": 2})
    make_class_folders(mixed / "TEST", {"cat": 1})
    raises(
        ["holds the split folders TEST, train and the folder(s) cat", "expected split folders only"],
        read_class_folders,
        mixed,
    )
    held_out = tmp_path / "held_out"  # val/ and test/ without train/ were read as the classes test and val
    make_class_folders(held_out / "val", {"cat": 2})
    make_class_folders(held_out / "test", {"cat": 2})
    raises(["holds the split folders test, val but no train/"], read_class_folders, held_out)
    vehicles = make_class_folders(tmp_path / "vehicles", {"bus": 2, "train": 2})["root"]  # a class may be named train
    assert read_class_folders(vehicles).attributes == ["bus", "train"]
    wrapped = tmp_path / "download"
    make_class_folders(wrapped / "flowers", {"daisy": 2, "rose": 2})
    raises(
        [
            "the only class folder, flowers/, holds no image but the folders daisy, rose",
            f"pass --root {wrapped / 'flowers'}",
        ],
        read_class_folders,
        wrapped,
    )
    assert read_class_folders(wrapped / "flowers").attributes == ["daisy", "rose"]
    make_class_folders(tmp_path / "one", {"cat": 6})  # one class, images in a sub-folder too: read
    assert read_class_folders(tmp_path / "one").attributes == ["cat"]


def test_an_image_reached_by_links_is_read_once_and_never_in_two_classes_or_splits(tmp_path):
    """A link back above its class folder (cat/up -> ..) made every other class's images cat's too; the
    same folder or file under two class folders (or in train/ and test/) was two samples of two
    classes (or one in both splits) without a word."""
    made = make_class_folders(tmp_path / "pets", {"cat": 2, "dog": 3})
    root = made["root"]
    (root / "cat" / "up").symlink_to("..")
    (root / "dog" / "again.jpg").symlink_to("img_000.jpg")  # a second name in its own class: read once
    table = read_class_folders(root, test_fraction=0.0)
    read = sorted(r.path.relative_to(root).as_posix() for r in table.splits["train"])
    assert read == sorted(["dog/again.jpg", *(f for f in made["files"] if f != "dog/img_000.jpg")])
    (root / "dog" / "same.jpg").symlink_to(root / "cat" / "img_000.jpg")
    raises(
        ["cat/img_000.jpg and dog/same.jpg are the same file (a link)", "in cat/ and dog/ at once"],
        read_class_folders,
        root,
    )
    (root / "dog" / "same.jpg").unlink()
    (root / "kitty").symlink_to("cat")
    raises(["cat and kitty are the same folder (a link)"], read_class_folders, root)
    split = tmp_path / "split"
    make_class_folders(split / "train", {"cat": 2, "dog": 2})
    (split / "test").mkdir()
    (split / "test" / "cat").symlink_to(split / "train" / "cat")
    raises(
        ["test/cat and train/cat are the same folder", "in test/cat/ and train/cat/ at once"],
        read_class_folders,
        split,
    )


def test_an_image_with_two_hard_links_is_read_once_and_never_in_two_classes_or_splits(tmp_path):
    """Two names of one file made with `ln` (no -s) were two samples, in two classes or in train and test,
    as symbolic links were before: one inode, told by the listing's inode numbers (no stat per image)."""
    made = make_class_folders(tmp_path / "pets", {"cat": 2, "dog": 3})
    root = made["root"]
    os.link(root / "dog" / "img_000.jpg", root / "dog" / "again.jpg")  # a second name in its own class: read once
    table = read_class_folders(root, test_fraction=0.0)
    read = sorted(r.path.relative_to(root).as_posix() for r in table.splits["train"])
    assert read == sorted(["dog/again.jpg", *(f for f in made["files"] if f != "dog/img_000.jpg")])
    os.link(root / "cat" / "img_000.jpg", root / "dog" / "same.jpg")
    raises(
        ["cat/img_000.jpg and dog/same.jpg are the same file (a link)", "in cat/ and dog/ at once"],
        read_class_folders,
        root,
    )
    split = tmp_path / "split"
    make_class_folders(split / "train", {"cat": 2, "dog": 2})
    (split / "test" / "cat").mkdir(parents=True)
    os.link(split / "train" / "cat" / "img_000.jpg", split / "test" / "cat" / "x.jpg")
    raises(
        ["test/cat/x.jpg and train/cat/img_000.jpg are the same file", "in test/cat/ and train/cat/ at once"],
        read_class_folders,
        split,
    )


def test_file_and_folder_names_that_are_not_utf8_build_or_are_refused_in_one_line(tmp_path):
    """Linux allows any bytes in a name; Python hands them over as surrogate escapes, which no manifest,
    tar member name or export can hold (a UnicodeEncodeError traceback in the build)."""
    from toolkit.data.build import ImageSpec, build_shards

    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/set\xff"))  # the data set's own folder
    made = make_class_folders(root, {"cat": 3, "dog": 2})
    write_jpeg(Path(os.fsdecode(os.fsencode(root) + b"/dog/\xfe.jpg")), 8, 8, np.random.default_rng(0))
    (root / "labels.csv").write_text("file,a\n" + "".join(f"{f},{k % 2}\n" for k, f in enumerate(made["files"])))
    for table in (
        read_class_folders(root, test_fraction=0.4),
        read_folder(root, root / "labels.csv", test_fraction=0.4),
    ):
        out = tmp_path / table.source.split(":")[0]
        built = build_shards(table, out, ImageSpec.parse("8"), workers=1, progress=False)
        assert built["train"]["source"] in ("classes:set\\xff", "folder:set\\xff")  # shown as ls shows it
    keys = {r.key for rs in read_class_folders(root).splits.values() for r in rs}
    assert "dog___xfe" in keys  # the byte as text in the key
    Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9")).mkdir()
    raises(["class folder name(s) caf\\xe9 are not UTF-8 text"], read_class_folders, root)


def test_a_class_folder_that_cannot_be_listed_is_one_line_not_missing_images(tmp_path, monkeypatch):
    """os.walk passes over a folder it cannot list (no permission, a disk error): its images were left
    out without a word. Tests run as root, whom permissions do not stop, so the listing fails here."""
    made = make_class_folders(tmp_path / "pets", {"cat": 2, "dog": 5})
    scandir, locked = os.scandir, str(made["root"] / "dog" / "extra")

    def failing_scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    raises([f"cannot list the folder {locked}: Permission denied"], read_class_folders, made["root"])
