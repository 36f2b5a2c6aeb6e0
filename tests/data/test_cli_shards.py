"""`cvae-tk shards celeba|cub|folder` end to end on fixture folders in the official layouts."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from fixtures import make_celeba, make_class_folders, make_cub, make_folder

from toolkit.data.sources import safe_key


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "shards", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def manifests(out):
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/manifest.json")}


def test_celeba_cub_and_folder(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=12)
    done = cli(
        "celeba", "--root", celeba["root"], "--out", "out/celeba", "--size", "32", "--crop", "center:148", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    found = manifests(tmp_path / "out" / "celeba")
    assert {split: m["count"] for split, m in found.items()} == {k: len(v) for k, v in celeba["splits"].items()}
    assert found["train"]["attributes"] == celeba["names"] and found["train"]["image_size"] == [32, 32]

    cub = make_cub(tmp_path / "cub")
    done = cli(
        "cub", "--root", cub["root"], "--out", "out/cub", "--size", "24", "--bbox-crop", "--workers", "1", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    found = manifests(tmp_path / "out" / "cub")
    assert set(found) == {"train", "test"} and len(found["test"]["attributes"]) == 3 + 4
    assert found["test"]["build"]["bbox_crop"]  # the crop is part of the build: without it, another build
    again = cli("cub", "--root", cub["root"], "--out", "out/cub", "--size", "24", "--workers", "1", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr

    folder = make_folder(tmp_path / "mine", n=10)
    done = cli(
        "folder",
        "--root",
        folder["root"],
        "--attributes",
        folder["table"],
        "--out",
        "out/mine",
        "--size",
        "16x12",
        "--test-fraction",
        "0.2",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    found = manifests(tmp_path / "out" / "mine")
    assert (found["train"]["count"], found["test"]["count"], found["test"]["image_size"]) == (8, 2, [16, 12])


def test_original_celeba_keeps_218x178(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=6)
    done = cli("celeba", "--root", celeba["root"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert manifests(tmp_path / "shards" / "celeba")["train"]["image_size"] == [218, 178]


@pytest.mark.parametrize(
    "args, words",
    [
        (["celeba", "--root", "nowhere"], ["nowhere"]),
        (["celeba", "--root", "{root}", "--size", "huge"], ["--size"]),
        (["celeba", "--root", "{root}", "--out", "taken", "--size", "16"], ["--overwrite"]),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(tmp_path, args, words):
    celeba = make_celeba(tmp_path / "celeba", n=6)
    first = cli("celeba", "--root", celeba["root"], "--out", "taken", "--size", "8", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = cli(*[a.format(root=celeba["root"]) for a in args], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    for word in words:
        assert word in lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def stored_vectors(out, split):
    """key -> the attribute vector stored in the split's tars."""
    vectors = {}
    for shard in sorted((out / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".attr.npy"):
                    vectors[member.name[: -len(".attr.npy")]] = np.load(
                        io.BytesIO(tar.extractfile(member).read())
                    ).tolist()
    return vectors


def test_cub_species_only_without_the_attribute_labels(tmp_path):
    cub = make_cub(tmp_path / "cub")
    both = cli("cub", "--root", cub["root"], "--out", "out/both", "--size", "16", "--workers", "1", cwd=tmp_path)
    assert both.returncode == 0, both.stderr
    cub["files"]["attribute_labels"].unlink()  # the real sample lacks it
    species = ["--size", "16", "--condition", "species", "--workers", "1"]
    mixed = cli("cub", "--root", cub["root"], "--out", "out/both", *species, cwd=tmp_path)
    assert mixed.returncode == 2 and "--overwrite" in mixed.stderr  # another condition is another build
    done = cli("cub", "--root", cub["root"], "--out", "out/species", *species, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = manifests(tmp_path / "out" / "species")
    assert found["train"]["attributes"] == found["test"]["attributes"] == cub["class_names"]
    assert found["train"]["source"] == "cub-200-2011:species"
    # the one-hot vectors say what image_class_labels.txt says, read here on its own
    ids = dict(line.split() for line in cub["files"]["images"].read_text().splitlines())
    labels = dict(line.split() for line in cub["files"]["labels"].read_text().splitlines())
    expected = {safe_key(ids[i]): [int(c == int(labels[i])) for c in range(1, 4)] for i in ids}
    got = {
        **stored_vectors(tmp_path / "out" / "species", "train"),
        **stored_vectors(tmp_path / "out" / "species", "test"),
    }
    assert got == expected


@pytest.mark.parametrize("condition", [None, "both", "attributes"])
def test_cub_attributes_without_the_labels_file_is_one_line_and_writes_nothing(tmp_path, condition):
    cub = make_cub(tmp_path / "cub")
    cub["files"]["attribute_labels"].unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = cli(
        "cub",
        "--root",
        cub["root"],
        "--out",
        "out/cub",
        *(["--condition", condition] if condition else []),
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert str(cub["files"]["attribute_labels"]) in lines[0] and "--condition species" in lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cub_unknown_condition_is_one_line(tmp_path):
    cub = make_cub(tmp_path / "cub")
    done = cli("cub", "--root", cub["root"], "--condition", "birds", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "species, attributes, both" in lines[0]
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("command", ["celeba", "cub", "folder"])
def test_option_mistakes_are_refused_before_the_tables_are_read(tmp_path, command):
    """--size and --crop were parsed after the reader (2.3 s of CUB-sized tables before `--size abc` was
    refused): here the tables are broken, and the option is what the one line names."""
    if command == "celeba":
        celeba = make_celeba(tmp_path / "data", n=4)
        celeba["attr_file"].write_text("not a count\n")
        args = ["celeba", "--root", celeba["root"]]
    elif command == "cub":
        cub = make_cub(tmp_path / "data")
        cub["files"]["images"].write_text("not an id\n")
        args = ["cub", "--root", cub["root"]]
    else:
        mine = make_folder(tmp_path / "data", n=4)
        mine["table"].write_text("no file column\n")
        args = ["folder", "--root", mine["root"], "--attributes", mine["table"]]
    for options, word in (
        (["--size", "abc"], "--size 'abc'"),
        (["--size", "8", "--crop", "middle"], "--crop 'middle'"),
    ):
        done = cli(*args, "--out", "out", *options, cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and word in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_random_split_options_with_a_split_column_are_refused(tmp_path):
    """--test-fraction and --seed choose a random split; with --split-column they did nothing, silently."""
    mine = make_folder(tmp_path / "mine", n=9, split_column=True)
    args = ["folder", "--root", mine["root"], "--attributes", mine["table"], "--size", "8", "--split-column", "split"]
    for extra in (["--test-fraction", "0.2"], ["--test-fraction", "0.1"], ["--seed", "3"], ["--seed", "0"]):
        done = cli(*args, "--out", "out", *extra, cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert f"{extra[0]} does nothing with --split-column" in lines[0]
    assert not (tmp_path / "out").exists()
    done = cli(*args, "--out", "out", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {split: m["count"] for split, m in manifests(tmp_path / "out").items()} == {"train": 3, "val": 3, "test": 3}


def test_an_attribute_with_one_value_in_every_train_image_is_warned_after_the_build(tmp_path):
    """A column of 1s (or a CUB subset's absent species) builds a condition the model cannot learn to change."""
    mine = make_folder(tmp_path / "mine", n=8)
    mine["table"].write_text(
        "file,Smiling,Eyeglasses\n" + "".join(f"{file},1,{k % 2}\n" for k, file in enumerate(mine["files"]))
    )
    args = ["folder", "--root", mine["root"], "--attributes", mine["table"], "--size", "8", "--workers", "1"]
    done = cli(*args, "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 of 2 attribute(s)" in warnings[0] and "Smiling (always 1)" in warnings[0]
    assert "Eyeglasses" not in warnings[0] and set(manifests(tmp_path / "out")) == {"train", "test"}


def test_folder_without_a_table_builds_one_hot_classes_and_says_what_it_left_out(tmp_path):
    made = make_class_folders(tmp_path / "pets", {"cat": 3, "dog": 4})
    (made["root"] / "cat" / "notes.txt").write_text("x")
    done = cli("folder", "--root", made["root"], "--out", "out", "--size", "8", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    built = manifests(tmp_path / "out")
    assert {split: m["count"] for split, m in built.items()} == {"train": 5, "test": 2}
    assert built["train"]["attributes"] == ["cat", "dog"] and built["train"]["source"] == "classes:pets"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "cat/notes.txt" in warnings[0]
    # --split-column names a column of a table: without one it is refused, nothing written
    done = cli("folder", "--root", made["root"], "--out", "o2", "--split-column", "split", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: --split-column names a column of the --attributes table: give the table too"
    )
    assert not (tmp_path / "o2").exists()
