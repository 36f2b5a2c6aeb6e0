"""`cvae-tk shards celeba|cub|folder` end to end on fixture folders in the official layouts."""

import json
import subprocess
import sys

import pytest

from fixtures import make_celeba, make_cub, make_folder


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "toolkit.cli", "shards", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def manifests(out):
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/manifest.json")}


def test_celeba_cub_and_folder(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=12)
    done = cli("celeba", "--root", celeba["root"], "--out", "out/celeba", "--size", "32", "--crop", "center:148", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = manifests(tmp_path / "out" / "celeba")
    assert {split: m["count"] for split, m in found.items()} == {k: len(v) for k, v in celeba["splits"].items()}
    assert found["train"]["attributes"] == celeba["names"] and found["train"]["image_size"] == [32, 32]

    cub = make_cub(tmp_path / "cub")
    done = cli("cub", "--root", cub["root"], "--out", "out/cub", "--size", "24", "--bbox-crop", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = manifests(tmp_path / "out" / "cub")
    assert set(found) == {"train", "test"} and len(found["test"]["attributes"]) == 3 + 4

    folder = make_folder(tmp_path / "mine", n=10)
    done = cli("folder", "--root", folder["root"], "--attributes", folder["table"], "--out", "out/mine", "--size", "16x12",
               "--test-fraction", "0.2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = manifests(tmp_path / "out" / "mine")
    assert (found["train"]["count"], found["test"]["count"], found["test"]["image_size"]) == (8, 2, [16, 12])


def test_original_celeba_keeps_218x178(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=6)
    done = cli("celeba", "--root", celeba["root"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert manifests(tmp_path / "shards" / "celeba")["train"]["image_size"] == [218, 178]


@pytest.mark.parametrize("args, words", [
    (["celeba", "--root", "nowhere"], ["nowhere"]),
    (["celeba", "--root", "{root}", "--size", "huge"], ["--size"]),
    (["celeba", "--root", "{root}", "--out", "taken", "--size", "16"], ["--overwrite"]),
])
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
