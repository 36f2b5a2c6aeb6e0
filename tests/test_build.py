"""The parallel shard builder: determinism, image handling, skipped files, refusals, interruptions."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageFilter

from toolkit.data import shards as shards_module
from toolkit.data.build import ImageSpec, build_shards
from toolkit.data.sources import Record, SourceTable
from toolkit.data.stream import eval_batches
from toolkit.errors import UserError


def photo(path, width=178, height=218, seed=0):
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    small.resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2)).save(path, quality=92)


@pytest.fixture()
def table(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for index in range(9):
        path = folder / f"{index:03d}.jpg"
        photo(path, seed=index)
        records.append(Record(f"{index:03d}", path, np.array([index % 2, 1 - index % 2], np.uint8)))
    return SourceTable("synthetic", ["even", "odd"], {"train": records[:6], "test": records[6:]})


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_shards_whatever_the_number_of_workers(table, tmp_path):
    spec = ImageSpec.parse("32")
    one = build_shards(table, tmp_path / "one", spec, workers=1, shard_size=4, progress=False)
    two = build_shards(table, tmp_path / "two", spec, workers=2, shard_size=4, progress=False)
    assert one == two
    assert one["train"]["shards"] == {"train-000000.tar": 4, "train-000001.tar": 2}
    assert files(tmp_path / "one") == files(tmp_path / "two")
    images, attributes = next(iter(eval_batches(tmp_path / "one", "train", batch_size=6)))
    assert images.shape == (6, 3, 32, 32)
    assert attributes.tolist() == [[i % 2, 1 - i % 2] for i in range(6)]


def test_original_size_keeps_the_bytes(table, tmp_path):
    manifests = build_shards(table, tmp_path / "out", ImageSpec.parse("original"), workers=1, progress=False)
    assert manifests["test"]["image_size"] == [218, 178]
    with tarfile.open(tmp_path / "out" / "test" / "test-000000.tar") as tar:
        assert tar.extractfile("006.jpg").read() == table.splits["test"][0].path.read_bytes()


def test_center_crop_and_reduced_decode_match_a_full_decode(table, tmp_path):
    build_shards(table, tmp_path / "out", ImageSpec.parse("64", "center:148"), workers=1, progress=False)
    images, _ = next(iter(eval_batches(tmp_path / "out", "train", batch_size=1)))
    got = images[0].permute(1, 2, 0).numpy() * 255
    # reference: full-size decode, centre crop 148, resize
    full = Image.open(table.splits["train"][0].path).convert("RGB")
    left, top = (178 - 148) // 2, (218 - 148) // 2
    want = np.asarray(full.crop((left, top, left + 148, top + 148)).resize((64, 64), Image.BICUBIC), np.float32)
    assert got.shape == (64, 64, 3)
    assert np.abs(got - want).mean() < 4.0  # JPEG re-encoding and the 1/2-scale decode, nothing more


def test_size_and_crop_options_are_checked():
    assert ImageSpec.parse("218x178").size == (218, 178) and ImageSpec.parse("64").size == (64, 64)
    for bad in ("0", "64x", "big", "3x3"):
        with pytest.raises(UserError, match="--size"):
            ImageSpec.parse(bad)
    with pytest.raises(UserError, match="center:N"):
        ImageSpec.parse("64", "middle:100")
    with pytest.raises(UserError, match="--crop"):
        ImageSpec.parse("original", "center:100")


def test_corrupt_images_are_skipped_and_listed_or_fail_in_strict_mode(table, tmp_path):
    broken = table.splits["train"][2].path
    broken.write_bytes(broken.read_bytes()[:600])  # truncated JPEG
    table.splits["train"][4].path.write_bytes(b"not an image at all")
    manifests = build_shards(table, tmp_path / "out", ImageSpec.parse("32"), workers=2, progress=False)
    train = manifests["train"]
    assert train["count"] == 4 and train["skipped"]["count"] == 2
    assert [s["key"] for s in train["skipped"]["samples"]] == ["002", "004"]
    assert all(s["reason"] for s in train["skipped"]["samples"])
    assert json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())["skipped"] == train["skipped"]
    with pytest.raises(UserError, match="002"):
        build_shards(table, tmp_path / "strict", ImageSpec.parse("32"), workers=1, strict=True, progress=False)
    assert not list((tmp_path / "strict").rglob("manifest.json"))
    assert not list((tmp_path / "strict").rglob("*.tmp"))


def test_other_shards_in_the_output_are_refused_unless_overwrite(table, tmp_path):
    out = tmp_path / "out"
    build_shards(table, out, ImageSpec.parse("32"), workers=1, progress=False)
    before = files(out)
    build_shards(table, out, ImageSpec.parse("32"), workers=1, progress=False)  # same build: verified rebuild
    assert files(out) == before
    with pytest.raises(UserError, match="--overwrite"):
        build_shards(table, out, ImageSpec.parse("48"), workers=1, progress=False)
    assert files(out) == before  # refused before touching anything
    build_shards(table, out, ImageSpec.parse("48"), workers=1, overwrite=True, progress=False)
    assert json.loads((out / "train" / "manifest.json").read_text())["image_size"] == [48, 48]


def test_an_interrupted_build_is_never_taken_for_finished_and_a_rerun_completes(table, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    build_shards(table, clean, ImageSpec.parse("32"), workers=1, shard_size=2, progress=False)
    out = tmp_path / "out"
    real_commit, calls = shards_module._ShardFile.commit, []

    def dying_commit(self):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second shard is being finished
        real_commit(self)

    monkeypatch.setattr(shards_module._ShardFile, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        build_shards(table, out, ImageSpec.parse("32"), workers=1, shard_size=2, progress=False)
    monkeypatch.setattr(shards_module._ShardFile, "commit", real_commit)
    assert not (out / "train" / "manifest.json").exists()  # a split without a manifest is unfinished
    with pytest.raises(UserError, match="manifest.json"):
        list(eval_batches(out, "train"))
    (out / "train" / "train-000007.tar.tmp").write_bytes(b"partial")  # what a SIGKILL would leave
    build_shards(table, out, ImageSpec.parse("32"), workers=1, shard_size=2, progress=False)
    assert files(out) == files(clean)


def test_bounding_box_crop_at_original_size(table, tmp_path):
    for record in table.splits["train"] + table.splits["test"]:
        record.bbox = (10.0, 20.0, 100.0, 150.0)
    manifests = build_shards(table, tmp_path / "out", ImageSpec.parse("original"), workers=1, progress=False)
    assert manifests["train"]["image_size"] == [150, 100]
    images, _ = next(iter(eval_batches(tmp_path / "out", "train", batch_size=2)))
    assert images.shape == (2, 3, 150, 100)
