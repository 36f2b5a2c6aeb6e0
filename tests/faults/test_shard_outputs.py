"""A shard build owns its whole --out: nothing of an older build is left beside the new one, a
folder holding other things or another build is refused before any work, and an output that cannot
be written (a file, a read-only folder, a full disk) is one line, with nothing half-written."""

import errno
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_celeba
from PIL import Image

from toolkit.data import shards as shards_module
from toolkit.data.build import ImageSpec, build_shards
from toolkit.data.digits import write_digits
from toolkit.data.folder import read_folder
from toolkit.data.sources import Record, SourceTable
from toolkit.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SPEC = ImageSpec.parse("8")


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def table(tmp_path, splits=("train", "test"), n=6):
    """A small SourceTable of real JPEGs, `n` per split."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    result = {}
    for split in splits:
        records = []
        for index in range(n):
            path = folder / f"{split}{index}.jpg"
            if not path.exists():
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
            records.append(Record(f"{split}{index}", path, np.array([index % 2], np.uint8)))
        result[split] = records
    return SourceTable("synthetic", ["odd"], result)


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "shards", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(done):
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_a_rebuild_leaves_no_split_or_shard_of_the_older_build(tmp_path):
    out = tmp_path / "out"
    build_shards(table(tmp_path, ("train", "val", "test"), n=8), out, SPEC, workers=1, shard_size=2, progress=False)
    assert (out / "val" / "manifest.json").exists() and (out / "train" / "train-000003.tar").exists()
    # the same source and options, but the data changed: no val split any more, fewer train images
    smaller = table(tmp_path, ("train", "test"), n=8)
    smaller.splits["train"] = smaller.splits["train"][:3]
    build_shards(smaller, out, SPEC, workers=1, shard_size=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "manifest.json",
        "train-000000.tar",
        "train-000001.tar",
    ]
    clean = tmp_path / "clean"
    build_shards(smaller, clean, SPEC, workers=1, shard_size=2, progress=False)
    assert files(out) == files(clean)


def test_overwrite_replaces_the_whole_output_of_another_build(tmp_path):
    out = tmp_path / "out"
    build_shards(table(tmp_path, ("train", "val", "test")), out, SPEC, workers=1, shard_size=2, progress=False)
    before = files(out)
    other = table(tmp_path, ("train", "test"))
    with pytest.raises(UserError, match="another build.*--overwrite"):
        build_shards(other, out, ImageSpec.parse("12"), workers=1, progress=False)
    assert files(out) == before  # refused before anything is touched
    build_shards(other, out, ImageSpec.parse("12"), workers=1, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]  # the old val split went too
    assert sorted(p.name for p in (out / "train").iterdir()) == ["manifest.json", "train-000000.tar"]
    assert json.loads((out / "train" / "manifest.json").read_text())["image_size"] == [12, 12]


@pytest.mark.parametrize(
    "stray", ["notes.txt", "photos/a.jpg", "train/notes.txt", "train/train-000000.tar.bak", "test/sub/x"]
)
def test_a_folder_holding_other_files_is_refused_even_with_overwrite(tmp_path, stray):
    out = tmp_path / "out"
    build_shards(table(tmp_path), out, SPEC, workers=1, progress=False)
    (out / stray).parent.mkdir(parents=True, exist_ok=True)
    (out / stray).write_text("the user's")
    before = files(out)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=f"not shards.*{stray.split('/')[0]}"):
            build_shards(table(tmp_path), out, ImageSpec.parse("12"), workers=1, overwrite=overwrite, progress=False)
        assert files(out) == before


def test_a_file_managers_debris_neither_refuses_the_folder_nor_is_deleted(tmp_path):
    """Finder writes .DS_Store (and ._ files) into every folder it shows, at once again if deleted: a
    shard folder a Mac user had looked at was refused as 'holds files that are not shards'."""
    out = tmp_path / "out"
    build_shards(table(tmp_path, ("train", "val", "test")), out, SPEC, workers=1, shard_size=2, progress=False)
    debris = [".DS_Store", "train/.DS_Store", "train/._train-000000.tar", "Thumbs.db", ".ipynb_checkpoints/x"]
    for name in [*debris, "val/.DS_Store"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"\0")
    build_shards(
        table(tmp_path, ("train", "test")), out, ImageSpec.parse("12"), workers=1, overwrite=True, progress=False
    )
    for name in debris:
        assert (out / name).is_file(), name  # never deleted
    assert not (out / "val").exists()  # the old split went, with the .DS_Store beside its shards
    assert json.loads((out / "train" / "manifest.json").read_text())["image_size"] == [12, 12]
    build_shards(
        table(tmp_path, ("train", "test")), out, ImageSpec.parse("12"), workers=1, progress=False
    )  # same build


def test_a_damaged_or_foreign_manifest_counts_as_another_build(tmp_path):
    out = tmp_path / "out"
    build_shards(table(tmp_path), out, SPEC, workers=1, progress=False)
    for text in ("{not json", "[]", json.dumps({"build": {"source": "elsewhere"}})):
        (out / "test" / "manifest.json").write_text(text)
        with pytest.raises(UserError, match="another build"):
            build_shards(table(tmp_path), out, SPEC, workers=1, progress=False)
    build_shards(table(tmp_path), out, SPEC, workers=1, overwrite=True, progress=False)


def test_the_digits_build_owns_its_output_alike(tmp_path):
    out = tmp_path / "digits"
    (out / "val").mkdir(parents=True)
    (out / "val" / "val-000000.tar").write_bytes(b"an older build's shard")
    manifests = write_digits(out, size=8, shard_size=1000)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert manifests["train"]["count"] == 1618 and manifests["train"]["build"]["size"] == 8
    with pytest.raises(UserError, match="another build"):
        write_digits(out, size=16, shard_size=1000)
    write_digits(out, size=16, shard_size=1000, overwrite=True)
    assert json.loads((out / "test" / "manifest.json").read_text())["image_size"] == [16, 16]


@contextmanager
def read_only_folder(path: Path):
    """A real read-only folder: chmod 0o555, or, for root (which ignores permissions), a read-only tmpfs."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("root ignores file permissions and cannot mount a read-only folder here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_outputs_that_cannot_be_written_are_one_line_before_any_work(tmp_path):
    celeba = make_celeba(tmp_path / "celeba", n=6)
    (tmp_path / "afile").write_text("not a folder")
    with read_only_folder(tmp_path / "ro"):
        for out, words in (
            ("afile", ["afile", "is a file"]),
            ("afile/sub", ["afile", "is a file"]),
            ("ro", ["ro", "not writable"]),
            ("ro/sub", ["ro", "not writable"]),
        ):
            line = one_error_line(
                cli("celeba", "--root", celeba["root"], "--out", out, "--size", "8", "--workers", "1", cwd=tmp_path)
            )
            for word in words:
                assert word in line, line
        assert not list((tmp_path / "ro").iterdir())
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_full_disk_is_one_line_leaves_no_partial_shard_and_a_rerun_finishes(tmp_path, monkeypatch):
    source = table(tmp_path, n=8)
    clean = tmp_path / "clean"
    build_shards(source, clean, SPEC, workers=2, shard_size=2, progress=False)
    real_append = shards_module._ShardFile.append

    def disk_full_in_the_third_shard(self, sample):
        if self.path.name == "train-000002.tar":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, sample)

    monkeypatch.setattr(shards_module._ShardFile, "append", disk_full_in_the_third_shard)
    out = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        build_shards(source, out, SPEC, workers=2, shard_size=2, progress=False)
    for words in ("No space left on device", "ENOSPC", "train", "run the same command again"):
        assert words in str(refused.value), str(refused.value)
    # no .tmp, no manifest
    assert sorted(p.name for p in out.rglob("*")) == [
        "train",
        "train-000000.tar",
        "train-000001.tar",
    ]
    monkeypatch.setattr(shards_module._ShardFile, "append", real_append)  # space freed
    build_shards(source, out, SPEC, workers=2, shard_size=2, progress=False)
    assert files(out) == files(clean)


def test_the_folder_reader_refuses_unknown_image_extensions_before_any_image_is_encoded(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png", "c.txt", "d", "e.heic"):  # .txt and no extension hold real JPEG bytes
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            root / name, format="PNG" if name == "b.png" else "JPEG"
        )
    csv = tmp_path / "labels.csv"
    import toolkit.data.build as build_module

    def never(*args):
        raise AssertionError("an image was encoded before the extensions were checked")

    monkeypatch.setattr(build_module, "encode_record", never)
    for rows, words in (
        (["c.txt"], ["c.txt"]),
        (["d"], ["d"]),
        (["e.heic", "c.txt"], ["e.heic", "c.txt", "2 image file"]),
    ):
        csv.write_text("file,x\na.jpg,1\nb.png,0\n" + "".join(f"{row},1\n" for row in rows))
        with pytest.raises(UserError, match="image extension") as refused:
            build_shards(read_folder(root, csv), tmp_path / "out", SPEC, workers=1, progress=False)
        for word in words:
            assert word in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_second_build_into_the_same_out_is_refused_while_the_first_writes(tmp_path):
    """Two builds at once used to write the same `.tar.tmp` names: the loser failed, the winner
    finished with a manifest of one build over tars of both."""
    args = [sys.executable, "-m", "toolkit.cli", "shards", "digits", "--out", "out", "--shard-size", "10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([*args, "--size", "128"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "out" / ".lock"
        while first.poll() is None and not (lock.exists() and lock.read_text().endswith("\n")):
            pass  # created, then written: wait for the whole holder
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = cli("digits", "--out", "out", "--shard-size", "10", "--size", "16", cwd=tmp_path)
        assert one_error_line(second) == (
            f"error: another shard build (pid {first.pid} on this machine) is writing --out out: wait for it to end, "
            "or choose another --out (two at once in one folder would mix their shards)"
        )
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        first.kill()
        first.communicate()
    assert not lock.exists()  # released
    done = cli("verify", "out", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.count("every tar as built") == 2
    assert json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())["image_size"] == [128, 128]


def test_a_lock_left_by_a_killed_build_is_taken_over_and_a_refused_build_releases_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "started": 0}))
    done = cli("digits", "--out", "out", "--size", "8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: taking over the stale lock {Path('out') / '.lock'} (pid {int(dead.stdout)} is gone" in done.stderr
    )
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]

    (tmp_path / "held").mkdir()  # a holder on another host cannot be checked from here: reported
    (tmp_path / "held" / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    done = cli("digits", "--out", "held", "--size", "8", cwd=tmp_path)
    assert one_error_line(done).startswith("error: --out held is locked by a shard build on elsewhere (pid 1)")
    assert [p.name for p in (tmp_path / "held").iterdir()] == [".lock"]

    mine = tmp_path / "mine"  # refused for the user's files: the lock is released, the files untouched
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds files that are not shards"):
        write_digits(mine, size=8)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
