"""`cvae-tk shards verify`: every tar's size and sha256 are recorded as it is written, and a tar
that is not what its build wrote (bits flipped, cut short, longer, missing, replaced) is named,
also behind a `pipe:` URL; a manifest with nothing to compare with is one line before any tar is read."""

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from itertools import islice

import numpy as np
import pytest

from toolkit.data.digits import ATTRIBUTES, digit_samples
from toolkit.data.shards import write_split
from toolkit.data.stream import attribute_vectors, epoch_batches, eval_batches, is_url, read_manifest
from toolkit.data.verify import verify_shards
from toolkit.errors import UserError
from toolkit.run_folder import shards_fingerprint

SIZE = 8


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "digits"
    write_split(islice(digit_samples("train", SIZE), 300), out, "train", ATTRIBUTES, (SIZE, SIZE), "digits", 100)
    write_split(islice(digit_samples("test", SIZE), 50), out, "test", ATTRIBUTES, (SIZE, SIZE), "digits", 50)
    return out


@pytest.fixture
def shards(clean, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(clean, copy)
    return copy


def manifest(shards, split="train"):
    return json.loads((shards / split / "manifest.json").read_text())


def damaged(reports):
    return {damage.name: damage.problem for report in reports for damage in report.damaged}


def test_the_build_records_each_tars_size_and_sha256_and_verify_accepts_it(shards):
    for split in ("train", "test"):
        files = manifest(shards, split)["files"]
        assert set(files) == set(manifest(shards, split)["shards"])
        for name, entry in files.items():
            data = (shards / split / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    reports = verify_shards(shards)
    assert [(r.split, r.shards, r.samples, r.damaged) for r in reports] == [("test", 1, 50, ()), ("train", 3, 300, ())]
    assert reports[1].bytes == sum((shards / "train" / name).stat().st_size for name in manifest(shards)["files"])


def flip_attribute(tar):
    """Make the first sample's attribute vector say another digit (one byte: 0 -> 1, 1 -> 0 at two
    places), as bit rot might; the tar stays well-formed and the same size."""
    data = bytearray(tar.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".attr.npy"))
    payload = member.offset_data + 128  # np.save's header of a uint8 vector
    vector = np.frombuffer(bytes(data[payload : payload + len(ATTRIBUTES)]), np.uint8)
    digit = int(vector.argmax())
    data[payload + digit], data[payload + (digit + 1) % 10] = 0, 1
    tar.write_bytes(bytes(data))
    return member.name.split(".")[0], digit


def test_a_flipped_label_reads_as_valid_data_and_only_verify_tells(shards):
    _, digit = flip_attribute(shards / "train" / "train-000001.tar")
    # The readers take it: a one-hot vector of another digit is as valid as the true one.
    batches = eval_batches(shards, "train", batch_size=100)
    labels = [label for _, attributes in batches for label in attributes.argmax(1).tolist()]
    assert len(labels) == 300 and batches.skips.skipped == 0
    assert labels[100] == (digit + 1) % 10  # train-000001.tar's first sample, in shard order
    problems = damaged(verify_shards(shards))
    assert list(problems) == ["train-000001.tar"]
    assert problems["train-000001.tar"].startswith("other bytes than the build wrote")


def test_every_kind_of_damage_is_named_per_tar(shards):
    train = shards / "train"
    flip_attribute(train / "train-000000.tar")
    cut = train / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[:5000])  # a copy cut short
    longer = train / "train-000002.tar"
    longer.write_bytes(longer.read_bytes() + bytes(512))
    (shards / "test" / "test-000000.tar").unlink()
    problems = damaged(verify_shards(shards))
    assert set(problems) == {"train-000000.tar", "train-000001.tar", "train-000002.tar", "test-000000.tar"}
    assert problems["train-000000.tar"].startswith("other bytes than the build wrote (sha256 ")
    assert problems["train-000001.tar"].startswith("5,000 bytes, the manifest records ")
    assert "cut off" in problems["train-000001.tar"] and "longer" in problems["train-000002.tar"]
    assert problems["test-000000.tar"] == "missing"

    (shards / "test" / "test-000000.tar").mkdir()  # something else under the name
    assert damaged(verify_shards(shards, ["test"])) == {"test-000000.tar": "not a file"}


def test_a_pipe_url_is_read_and_compared_alike(shards):
    flip_attribute(shards / "train" / "train-000002.tar")
    cut = shards / "train" / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[:5000])
    problems = damaged(verify_shards(f"pipe:cat {shards}/{{}}"))  # train and test: a URL cannot be listed
    assert set(problems) == {"train-000001.tar", "train-000002.tar"}
    assert "cut off" in problems["train-000001.tar"] and "other bytes" in problems["train-000002.tar"]

    (shards / "train" / "train-000001.tar").unlink()  # the command fails: its status is the reason
    problems = damaged(verify_shards(f"pipe:cat {shards}/{{}}", ["train"]))
    assert problems["train-000001.tar"] == (
        f"unreadable: the command `cat {shards}/train/train-000001.tar` failed (exit status 1)"
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m.pop("files"), "records no checksums (shards built by an older cvae-tk)"),
        (lambda m: m["files"].pop("train-000001.tar"), "'files' must give"),
        (lambda m: m["files"]["train-000001.tar"].update(sha256="abc"), "'files' must give"),
        (lambda m: m["files"]["train-000001.tar"].update(bytes=True), "'files' must give"),
        (lambda m: m.update(files=[]), "'files' must give"),
    ],
)
def test_a_manifest_with_nothing_to_compare_with_is_one_line_before_any_tar_is_read(shards, edit, expected):
    found = manifest(shards)
    edit(found)
    (shards / "train" / "manifest.json").write_text(json.dumps(found))
    read = []

    class Bar:  # a tqdm stand-in: only made once every manifest has been checked
        def __init__(self, total):
            read.append(total)

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def update(self, n):
            read.append(n)

    with pytest.raises(UserError, match="train/manifest.json") as error:
        verify_shards(shards, bar=Bar)  # test comes first: train's manifest is refused before test is read
    assert expected in str(error.value) and read == []


def test_folders_that_hold_no_splits_are_one_line(tmp_path):
    with pytest.raises(UserError, match="is not a folder of shards"):
        verify_shards(tmp_path / "nothing")
    with pytest.raises(UserError, match="holds no split folders"):
        verify_shards(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="a split without a manifest was not finished"):
        verify_shards(tmp_path)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "shards", "verify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_says_each_split_and_each_damaged_tar_and_exits_1(shards):
    done = cli(shards)
    assert done.returncode == 0, done.stderr
    size = {
        split: sum(entry["bytes"] for entry in manifest(shards, split)["files"].values())
        for split in ("train", "test")
    }
    assert done.stdout.splitlines() == [
        f"test: 1 shard(s), 50 samples, {size['test']:,} bytes: every tar as built",
        f"train: 3 shard(s), 300 samples, {size['train']:,} bytes: every tar as built",
    ]
    flip_attribute(shards / "train" / "train-000001.tar")
    done = cli(shards, "--split", "train")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == f"train: 3 shard(s), 300 samples, {size['train']:,} bytes: 1 damaged"
    assert lines[1].startswith("  train-000001.tar: other bytes than the build wrote") and len(lines) == 2
    assert done.stderr.splitlines()[-1].startswith("error: 1 of 3 tars in ")
    (shards / "test" / "manifest.json").unlink()
    done = cli(shards)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: no test split in ")


@pytest.mark.parametrize("given", ["set:v2", "set:v2/sub"])
def test_a_local_folder_whose_name_holds_a_colon_is_read_as_a_folder_not_a_url(clean, tmp_path, monkeypatch, given):
    """webdataset's gopen takes `set:v2/train/x.tar` for a URL of the scheme `set` and refuses it:
    every reader opens local files itself, and only a real URL or command counts as one."""
    shutil.copytree(clean, tmp_path / given)
    monkeypatch.chdir(tmp_path)  # a relative path: the colon is in its first component
    assert not is_url(given) and not is_url("data/a:b") and not is_url(tmp_path / given)
    assert all(map(is_url, ["pipe:cat x", "http://host/x", "https://host/x", "s3://bucket/x", "gs://bucket/x"]))

    assert read_manifest(given, "train")["count"] == 300
    batches = eval_batches(given, "train", batch_size=100)
    assert sum(len(images) for images, _ in batches) == 300 and batches.skips.skipped == 0
    batches = epoch_batches(given, "train", batch_size=100, num_workers=1)
    assert [len(images) for images, _ in batches] == [100] * 3 and batches.skips.skipped == 0
    assert attribute_vectors(given, "test").shape == (50, len(ATTRIBUTES))
    assert all(shards_fingerprint(given)[split]["tars"] for split in ("train", "test"))
    reports = verify_shards(given)
    assert [(r.split, r.shards, r.damaged) for r in reports] == [("test", 1, ()), ("train", 3, ())]

    done = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "shards", "verify", given],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.count("every tar as built") == 2, done.stderr


@pytest.mark.parametrize("split", ["../other/test", "test/..", "/abs", "", "a b"])
def test_a_split_name_that_is_not_one_is_refused_and_nothing_outside_the_shards_is_read(shards, tmp_path, split):
    """`eval --split ../other/test`, `shards verify --splits ...`: every reader joins split names in
    stream.split_file, which takes only what the writer names splits with."""
    (tmp_path / "other").mkdir()
    shutil.copytree(shards / "test", tmp_path / "other" / "test")  # a real split, outside the shards
    for read in (read_manifest, attribute_vectors, lambda s, x: verify_shards(s, [x])):
        with pytest.raises(UserError, match=r"split name .*: expected a split of the shards, such as train or test"):
            read(shards, split)


def test_a_split_built_empty_is_verified_not_refused(tmp_path):
    # CelebA's reader hands over a val split, empty for a subset without val rows; the build writes its
    # manifest (no shards), and `shards verify` refused the whole folder: "lists no shards: the val split is empty"
    from PIL import Image

    from toolkit.data.build import ImageSpec, build_shards
    from toolkit.data.sources import Record, SourceTable

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    record = Record("a", tmp_path / "a.png", np.array([1], np.uint8))
    table = SourceTable(
        "celeba", ["x"], {"train": [record], "val": [], "test": [Record("b", record.path, record.attributes)]}
    )
    out = tmp_path / "shards"
    assert build_shards(table, out, ImageSpec.parse("8"), workers=1, progress=False)["val"]["count"] == 0
    reports = verify_shards(out)
    assert [(r.split, r.shards, r.samples, r.bytes, r.damaged) for r in reports][2] == ("val", 0, 0, 0, ())
    assert all(not r.damaged for r in reports)
    with pytest.raises(UserError, match="the val split is empty"):  # the readers still say so
        eval_batches(out, "val")
