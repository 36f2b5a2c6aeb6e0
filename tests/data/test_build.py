"""The parallel shard builder: determinism, image handling, skipped files, refusals, interruptions."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageFilter

from toolkit.data import shards as shards_module
from toolkit.data.build import ImageSpec, bbox_region, build_shards
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
    # 178 x 218 images: the 224-pixel square (r = 112) around the box centre (60, 95), clipped: 172 x 207
    assert manifests["train"]["image_size"] == [207, 172]
    images, _ = next(iter(eval_batches(tmp_path / "out", "train", batch_size=2)))
    assert images.shape == (2, 3, 207, 172)


def test_bbox_region_is_stackgans_square():
    # r = int(0.75 * max(w, h)) around the centre, clipped to the image (StackGAN / AttnGAN get_img(s))
    assert bbox_region((70, 50, 40, 60), 200, 160) == (45, 35, 135, 125)  # 90 x 90, inside
    assert bbox_region((0, 50, 40, 60), 200, 160) == (0, 35, 65, 125)  # clipped on the left
    assert bbox_region((150, 10, 60, 20), 200, 160) == (135, 0, 200, 65)  # clipped right and top
    # whole pixels, truncated as there: x, y, w, h = 10, 20, 33, 21; r = 24; centre (26, 30)
    assert bbox_region((10.7, 20.2, 33.9, 21.0), 200, 160) == (2, 6, 50, 54)
    with pytest.raises(ValueError, match="outside"):
        bbox_region((300, 10, 20, 20), 200, 160)


def gradient(width, height):
    """R = x and G = y scaled to 0..255, B = 0: every pixel says where it came from."""
    xs = np.linspace(0, 255, width, dtype=np.float32)
    ys = np.linspace(0, 255, height, dtype=np.float32)
    rgb = np.zeros((height, width, 3), np.float32)
    rgb[..., 0], rgb[..., 1] = xs[None, :], ys[:, None]
    return rgb


def stored(out, split):
    """key -> the stored image (H, W, 3) float, read from the tars themselves."""
    images = {}
    for shard in sorted((out / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".jpg", ".png")):
                    data = tar.extractfile(member).read()
                    images[member.name.rsplit(".", 1)[0]] = np.asarray(
                        Image.open(io.BytesIO(data)).convert("RGB"), np.float32
                    )
    return images


def one_record_table(path, bbox):
    record = Record("bird", path, np.array([1], np.uint8), bbox)
    return SourceTable("synthetic", ["bird"], {"train": [record]})


def test_bbox_crop_keeps_the_box_aspect_in_a_square_output(tmp_path):
    # a 40 x 60 blue box at (70, 50) on a 200 x 160 gradient (lossless PNG source)
    rgb = gradient(200, 160)
    rgb[50:110, 70:110] = (0, 0, 255)
    path = tmp_path / "bird.png"
    Image.fromarray(rgb.round().astype(np.uint8)).save(path)
    table = one_record_table(path, (70.0, 50.0, 40.0, 60.0))
    for side in (90, 45):  # the 90 x 90 region (45, 35)-(135, 125) at 1:1, then halved
        build_shards(table, tmp_path / f"out{side}", ImageSpec.parse(str(side)), workers=1, progress=False)
        got = stored(tmp_path / f"out{side}", "train")["bird"]
        assert got.shape == (side, side, 3)
        scale = side / 90
        rows, cols = np.nonzero(got[..., 2] > 128)  # the blue box, in output pixels
        # the box keeps its 40 x 60 shape (scaled), where the square puts it: not stretched to the output
        assert abs(cols.min() - 25 * scale) <= 1 and abs(cols.max() + 1 - 65 * scale) <= 1
        assert abs(rows.min() - 15 * scale) <= 1 and abs(rows.max() + 1 - 75 * scale) <= 1
        # the context around it is the region's: the gradient says where each corner came from
        want = rgb[35:125, 45:135]
        if side != 90:
            want = np.asarray(
                Image.fromarray(want.round().astype(np.uint8)).resize((side, side), Image.BILINEAR), np.float32
            )
        for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert np.abs(got[corner][:2] - want[corner][:2]).max() < 6, corner

    # at the border the square is clipped, as StackGAN does: (0, 35)-(65, 125) kept as it is
    table = one_record_table(path, (0.0, 50.0, 40.0, 60.0))
    manifests = build_shards(table, tmp_path / "edge", ImageSpec.parse("original"), workers=1, progress=False)
    assert manifests["train"]["image_size"] == [90, 65]
    got = stored(tmp_path / "edge", "train")["bird"]
    assert np.abs(got[:, :, :2] - rgb[35:125, 0:65, :2]).mean() < 3


def test_bbox_crop_with_a_reduced_decode_is_taken_at_original_size(tmp_path):
    # an 800 x 640 JPEG, 30 x 30 output of the 240 x 240 region (230, 160)-(470, 400): a 1/8-scale decode
    rgb = gradient(800, 640)
    path = tmp_path / "big.jpg"
    Image.fromarray(rgb.round().astype(np.uint8)).save(path, quality=95)
    table = one_record_table(path, (300.0, 200.0, 100.0, 160.0))
    build_shards(table, tmp_path / "out", ImageSpec.parse("30"), workers=1, progress=False)
    got = stored(tmp_path / "out", "train")["bird"]
    # output pixel (i, j) covers original x = 230 + 8 (j + 0.5), y = 160 + 8 (i + 0.5)
    x = 230 + 8 * (np.arange(30) + 0.5)
    y = 160 + 8 * (np.arange(30) + 0.5)
    assert np.abs(got[0, :, 0] - x * 255 / 799).max() < 4
    assert np.abs(got[:, 0, 1] - y * 255 / 639).max() < 4


def test_absurd_sizes_are_refused_before_any_work(table, tmp_path, monkeypatch):
    for bad in ("100000", "65536x65536", "70000x8", "-3", "0"):
        with pytest.raises(UserError, match="--size.*65,500"):
            ImageSpec.parse(bad)
    assert ImageSpec.parse("65500x4").size == (65500, 4)  # the largest JPEG libjpeg writes
    # a size that fits JPEG but not the memory: said before anything is written, with what it needs
    import toolkit.memory

    monkeypatch.setattr(toolkit.memory, "available_bytes", lambda: 2**30)
    with pytest.raises(
        UserError, match=r"8000x8000 shards with 2 worker\(s\) needs .* GiB .* 1.0 GiB is available.*--workers"
    ):
        build_shards(table, tmp_path / "out", ImageSpec.parse("8000"), workers=2, progress=False)
    with pytest.raises(UserError, match=r"5000 worker\(s\)"):
        build_shards(table, tmp_path / "out", ImageSpec.parse("16"), workers=5000, progress=False)
    assert not (tmp_path / "out").exists()
    build_shards(table, tmp_path / "out", ImageSpec.parse("16"), workers=2, progress=False)  # what fits goes on


def test_a_crop_larger_than_the_images_is_refused_before_any_work_or_skipped_per_image(table, tmp_path, monkeypatch):

    with pytest.raises(
        UserError, match=r"--crop center:200 is larger than the images .*000.jpg, is 178 wide x 218 high"
    ):
        build_shards(table, tmp_path / "out", ImageSpec.parse("32", "center:200"), workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    # images of mixed sizes: the ones the crop does not fit are skipped, saying so
    photo(table.splits["train"][3].path, width=100, height=90, seed=3)
    manifests = build_shards(table, tmp_path / "out", ImageSpec.parse("32", "center:148"), workers=1, progress=False)
    skipped = manifests["train"]["skipped"]["samples"]
    assert [s["key"] for s in skipped] == ["003"]
    assert "--crop center:148 does not fit the image (100 wide x 90 high)" in skipped[0]["reason"]


def test_a_key_given_twice_is_refused_before_anything_is_written(table, tmp_path):
    # the readers make keys unique; a table built by hand may not, and the writer no longer keeps a
    # set of every key (the builder checks its key arrays instead): a key in train and test, and one
    # twice in train, are both named
    first = table.splits["train"][0]
    table.splits["test"].append(Record(first.key, first.path, first.attributes))
    table.splits["train"].append(Record("001", first.path, first.attributes))
    with pytest.raises(UserError, match=r"synthetic: 2 sample key\(s\) given to more than one image \(000, 001\)"):
        build_shards(table, tmp_path / "out", ImageSpec.parse("32"), workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_writer_still_refuses_a_repeated_key_when_it_checks_them(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    sample = shards_module.Sample("k", png.getvalue(), "png", np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        shards_module.write_split([sample, sample], tmp_path, "train", ["a"], (8, 8), "test")
