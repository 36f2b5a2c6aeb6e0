"""Every output is written atomically and every unwritable place is refused in one line.

The faults are real: a folder on a read-only file system (a tmpfs mounted read-only in a private
mount namespace, `unshare -m`; chmod 0o555 is ignored by root, which these tests may run as), a
disk that fills while the image is written (a 16 KiB tmpfs: the kernel's own ENOSPC) or is full
before (0 bytes left). In-process, ENOSPC is injected into the file PIL writes, after its first bytes.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import ROOT, assert_user_error, snapshot
from toolkit.atomic import check_output, save_image, write_text
from toolkit.errors import UserError

ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
CLI = [sys.executable, "-m", "toolkit.cli"]


def _namespace_prefix() -> list[str] | None:
    """`unshare -m` (root) or `unshare -r -m` (a user namespace), if this machine lets us mount a tmpfs in it."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    try:
        probe = subprocess.run(
            [*prefix, "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


NAMESPACE = _namespace_prefix()
needs_mount = pytest.mark.skipif(NAMESPACE is None, reason="cannot mount a tmpfs in a private mount namespace here")


def run_on_tmpfs(
    folder: Path, options: str, args: list, fill: bool = False, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`cvae-tk ARGS` with a fresh tmpfs (mount options `options`, e.g. ro or size=16k) on `folder`,
    seen by this command only; `fill` fills it up first. Returns the result and what the folder
    held at the end (in result.listing: the mount vanishes with the namespace)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; '
    if fill:
        script += 'cat /dev/zero > "$MNT/fill" 2>/dev/null; '
    script += '"$@"; code=$?; find "$MNT" -mindepth 1 -printf "%P %s\\n" > "$LISTING"; exit $code'
    listing = folder.parent / f"{folder.name}.listing"
    env = dict(ENV, MNT=str(folder), LISTING=str(listing))
    result = subprocess.run(
        [*NAMESPACE, "sh", "-c", script, "sh", options, str(folder), *CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd or folder.parent,
    )
    assert result.returncode != 99, result.stderr
    result.listing = {
        line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in listing.read_text().splitlines() if line
    }
    return result


# --- the mechanism, in-process ---------------------------------------------------------------------------


def test_a_disk_that_fills_while_an_image_is_written_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    write_text(target, "the previous grid")
    real_open = builtins.open

    class FillsUp:
        """A file that takes its first write, then reports ENOSPC, as a filling disk does."""

        def __init__(self, stream):
            self.stream, self.writes = stream, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def open_filling(file, mode="r", *args, **kwargs):
        stream = real_open(file, mode, *args, **kwargs)
        return FillsUp(stream) if "w" in mode and str(file).endswith(".tmp") else stream

    monkeypatch.setattr(builtins, "open", open_filling)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # incompressible: many writes
    with pytest.raises(OSError) as raised:
        save_image(Image.fromarray(noise), target)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(target)  # the user's file is named, not the hidden temporary
    assert target.read_text() == "the previous grid"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.parametrize(
    "name, kind",
    [("a.png", "PNG"), ("a.JPG", "JPEG"), ("a.jpeg", "JPEG"), ("a.webp", "WEBP"), ("a.bmp", "BMP"), ("a.tif", "TIFF")],
)
def test_the_format_comes_from_the_final_name_not_the_temporary_one(tmp_path, name, kind):
    save_image(Image.new("RGBA", (5, 4), (10, 20, 30, 255)), tmp_path / name)
    with Image.open(tmp_path / name) as written:
        assert written.format == kind and written.size == (5, 4)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name", ["a.xyz", "a", "a.psd", "a.xbm", "a.png.tmp"])
def test_an_extension_pil_cannot_write_rgb_in_is_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(UserError, match="image extension"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_check_output_refuses_folders_files_in_the_way_and_creates_nothing(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="it is a folder"):
        check_output(tmp_path / "folder")
    with pytest.raises(UserError, match="it is a file, expected a folder"):
        check_output(tmp_path / "file", folder=True)
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "deeper" / "x.png")
    assert check_output(tmp_path / "new" / "deeper" / "x.png") == tmp_path / "new" / "deeper" / "x.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # the check made nothing, left no probe


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder; the mount tests cover it")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(UserError, match="not writable"):
            check_output(locked / "grid.png")
    finally:
        locked.chmod(0o755)


# --- the real faults, through the real command line --------------------------------------------------


@needs_mount
@pytest.mark.parametrize("command", ["grid", "out-dir", "export", "interpolate", "edit", "shards", "classifier"])
def test_a_read_only_folder_is_refused_in_one_line_before_any_work(tiny_onnx, digits_shards, tmp_path, command):
    run_dir = tiny_onnx.parent / "run"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(photo)
    ro = tmp_path / "ro"
    args = {
        "grid": ["sample", tiny_onnx, "--each-attribute", "-n", 2, "--grid", ro / "grid.png"],
        "out-dir": ["sample", tiny_onnx, "--attr", "a=1", "-n", 2, "--out-dir", ro / "images"],
        "export": ["export", run_dir, "--out", ro / "x.onnx"],
        "interpolate": [
            "interpolate",
            run_dir,
            "--from-attr",
            "a=1",
            "--to-attr",
            "b=1",
            "--steps",
            3,
            "--out",
            ro / "strip.png",
        ],
        "edit": ["edit", run_dir, photo, "--attr", "a=1", "--set", "b=1", "--out", ro / "edit.png"],
        "shards": ["shards", "digits", "--out", ro / "digits"],
        "classifier": [
            "classifier",
            "train",
            "recipe=digits",
            f"data.shards={digits_shards}",
            "--steps",
            1,
            "--out",
            ro / "classifier",
        ],
    }[command]
    result = run_on_tmpfs(ro, "ro", args)
    assert_user_error(result, str(ro), "not writable", "EROFS")
    assert result.listing == {}


@needs_mount
def test_a_disk_that_fills_during_the_grid_is_one_line_and_leaves_nothing(tiny_onnx, tmp_path):
    small = tmp_path / "small"
    # 10 rows x 64 noisy 8x8 images: far more than 16 KiB of PNG
    result = run_on_tmpfs(
        small,
        "size=16k",
        ["sample", tiny_onnx, "--each-attribute", "-n", 64, "--temperature", 3, "--grid", small / "grid.png"],
    )
    assert_user_error(result, str(small / "grid.png"), "No space left on device", "ENOSPC")
    assert result.listing == {}  # neither the grid nor its temporary file


@needs_mount
def test_a_disk_that_fills_during_out_dir_keeps_only_complete_images(tiny_onnx, tmp_path):
    small = tmp_path / "small"
    result = run_on_tmpfs(
        small, "size=16k", ["sample", tiny_onnx, "--each-attribute", "-n", 64, "--out-dir", small / "images"]
    )
    assert_user_error(result, str(small / "images"), "ENOSPC")
    names = [name for name in result.listing if name.startswith("images/")]
    assert names and all(name.endswith(".png") and not name.split("/")[-1].startswith(".") for name in names)
    assert all(result.listing[name] > 0 for name in names)  # no 0-byte file: each image is whole or absent
    assert len(names) < 640  # the disk really filled


@needs_mount
def test_a_full_disk_is_refused_before_sampling(tiny_onnx, tmp_path):
    full = tmp_path / "full"
    result = run_on_tmpfs(
        full, "size=16k", ["sample", tiny_onnx, "--attr", "a=1", "-n", 1, "--grid", full / "grid.png"], fill=True
    )
    assert_user_error(result, str(full / "grid.png"), "is full")
    assert set(result.listing) == {"fill"}


def test_an_unknown_extension_is_refused_before_the_model_is_even_opened(tmp_path):
    result = subprocess.run(
        [*CLI, "sample", "missing.onnx", "--attr", "a=1", "--grid", "out.xyz"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=tmp_path,
    )
    assert_user_error(result, "out.xyz", "unknown image extension '.xyz'")
    assert snapshot(tmp_path) == []
