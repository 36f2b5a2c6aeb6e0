"""Every output is written atomically and every unwritable place is refused in one line.

The faults are real: a folder on a read-only file system (a tmpfs mounted read-only in a private
mount namespace, `unshare -m`; chmod 0o555 is ignored by root, which these tests may run as), a
disk that fills while the image is written (a 16 KiB tmpfs: the kernel's own ENOSPC) or is full
before (0 bytes left). In-process, ENOSPC is injected into the file PIL writes, after its first bytes.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import ROOT, assert_user_error, snapshot
from toolkit.atomic import IMAGE_FORMATS, check_output, check_writable_size, save_image, write_text
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


def _refused_extensions() -> list[str]:
    """Every extension Pillow registers that is not in the toolkit's table (.ico, .icns, .pgm, .pbm,
    .pfm, .gif, .psd, .xbm, .apng...), and a few it does not know."""
    Image.init()
    return sorted(set(Image.registered_extensions()) - set(IMAGE_FORMATS)) + [".xyz", "", ".png.tmp"]


@pytest.mark.parametrize("suffix", _refused_extensions())
def test_an_extension_the_toolkit_does_not_write_faithfully_is_refused_before_anything_is_written(tmp_path, suffix):
    """.ico used to write a 32x16 icon for a 70x36 grid, .icns a stretched 1024x1024, .pgm/.pbm/.pfm
    colour PPM data: only the table's formats are written, the rest refused in one line listing them."""
    with pytest.raises(UserError, match="image extension") as refused:
        save_image(Image.new("RGB", (70, 36)), tmp_path / f"a{suffix}")
    message = str(refused.value)
    assert "\n" not in message and f"a{suffix}" in message
    assert "(use .png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff or .ppm)" in message
    assert list(tmp_path.iterdir()) == []


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("suffix", sorted(IMAGE_FORMATS))
def test_each_accepted_format_writes_an_rgb_file_of_the_exact_size(tmp_path, suffix):
    spec = IMAGE_FORMATS[suffix]
    image = _noise(37, 23)  # odd sizes: BMP pads rows, JPEG and WebP subsample chroma
    save_image(image, tmp_path / f"a{suffix.upper()}")  # the extension's case does not matter
    with Image.open(tmp_path / f"a{suffix.upper()}") as written:
        assert (written.format, written.mode, written.size) == (spec.name, "RGB", (37, 23))
        if spec.lossless:
            assert np.array_equal(np.asarray(written), np.asarray(image))
    assert [p.name for p in tmp_path.iterdir()] == [f"a{suffix.upper()}"]


# The limits, tried with Pillow 13: libwebp 16,383 and libjpeg 65,500 pixels per side (one more is a
# ValueError / "broken data stream"); Pillow's encoders a row of at most 2**31 bits (RGB: 89,478,478
# pixels; one more is a MemoryError); BMP's 32-bit file size and TIFF's 32-bit strip length: a
# 100000 x 14316 RGB image writes and reopens in both (4,294,800,054 bytes), 100000 x 14400 fails.
@pytest.mark.parametrize("suffix, limit", [(".webp", 16_383), (".jpg", 65_500)])
def test_an_image_over_the_formats_limit_is_refused_before_anything_is_written(tmp_path, suffix, limit):
    spec = IMAGE_FORMATS[suffix]
    for size in ((limit, 1), (1, limit)):  # the largest it holds, either way round, is written
        save_image(Image.new("RGB", size, (10, 200, 30)), tmp_path / f"ok{suffix}")
        with Image.open(tmp_path / f"ok{suffix}") as written:
            assert written.size == size and written.mode == "RGB"
    for size in ((limit + 1, 1), (1, limit + 1)):
        with pytest.raises((ValueError, OSError)):  # the limit is the library's own, not a guess
            Image.new("RGB", size).save(tmp_path / "raw.bin", format=spec.name)
        (tmp_path / "raw.bin").unlink(missing_ok=True)
        with pytest.raises(UserError) as refused:
            save_image(Image.new("RGB", size), tmp_path / f"big{suffix}")
        assert f"holds at most {limit:,} pixels per side: use .png or a smaller image" in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == [f"ok{suffix}"]  # no file, no temporary


def test_the_limits_of_pillow_bmp_and_tiff_are_checked_without_writing():
    widest = 89_478_478
    check_writable_size("a.png", widest, 1, "x", "y")
    with pytest.raises(MemoryError):  # Pillow's own limit, before writing a byte
        Image.new("RGB", (widest + 1, 1)).save(io.BytesIO(), format="PNG")
    with pytest.raises(UserError, match="Pillow writes images at most 89,478,478 pixels wide: use fewer"):
        check_writable_size("a.png", widest + 1, 1, "the grid", "fewer images (-n)", option="--grid")
    for suffix in (".bmp", ".tif"):
        check_writable_size(f"a{suffix}", 100_000, 14_316, "x", "y")
        with pytest.raises(
            UserError, match=r"holds at most 4,294,967,295 bytes \(4 GiB\), this one needs 4,32.*: use .png"
        ):
            check_writable_size(f"a{suffix}", 100_000, 14_400, "the grid", "fewer images (-n)")


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


@pytest.mark.parametrize(
    "command, suffix",
    [("sample", suffix) for suffix in (".xyz", ".ico", ".icns", ".pgm", ".pbm", ".pfm", ".gif")]
    + [(command, suffix) for command in ("interpolate", "edit") for suffix in (".ico", ".pgm")],
)
def test_an_unknown_extension_is_refused_before_the_model_is_even_opened(tmp_path, command, suffix):
    """Neither the model, the run nor the photo exists: the extension is refused first, in one line."""
    out = f"out{suffix}"
    args = {
        "sample": ["sample", "missing.onnx", "--attr", "a=1", "-n", 2, "--grid", out],
        "interpolate": ["interpolate", "RUN", "--from-attr", "a=1", "--to-attr", "b=1", "--out", out],
        "edit": ["edit", "RUN", "photo.png", "--attr", "a=1", "--set", "b=1", "--out", out],
    }[command]
    result = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path
    )
    words = "unknown image extension '.xyz'" if suffix == ".xyz" else f"does not write the image extension '{suffix}'"
    assert_user_error(result, out, words, ".png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff or .ppm")
    assert snapshot(tmp_path) == []


# `cvae-tk` with the work made impossible: a refusal must come before it (the tiny model's images are 8x8)
NO_WORK = """
import sys

def no_work(*args, **kwargs):
    raise AssertionError("the work started before the output was checked")

if sys.argv[1] == "sample":
    import toolkit.sampler
    toolkit.sampler.Sampler.sample = toolkit.sampler.Sampler.run = no_work
else:  # torch is imported only here: the sample cases stay fast
    import toolkit.edit
    toolkit.edit._decode_frames = toolkit.edit.encode = no_work
    if sys.argv[1] == "edit":
        toolkit.edit.load_run_model = no_work
from toolkit.cli import main
main()
"""


@pytest.mark.parametrize(
    "case",
    ["grid-webp", "grid-jpeg", "rows-webp", "strip-webp", "strip-jpeg", "pair-webp"],
)
def test_an_output_over_its_formats_limit_is_refused_before_sampling(tiny_onnx, tmp_path, case):
    """`-n 500 --grid big.webp` used to sample, then fail with a WebP traceback; `.jpg` with libjpeg's
    'broken data stream': now one line before the work, naming the size and the format's limit."""
    run_dir = tiny_onnx.parent / "run"
    Image.new("RGB", (8192, 3), (200, 10, 10)).save(tmp_path / "wide.png")  # its pair is 16,384 wide
    interpolate = ["interpolate", run_dir, "--from-attr", "a=1", "--to-attr", "b=1", "--steps"]
    args, words = {
        "grid-webp": (["sample", tiny_onnx, "-n", 1639, "--grid", "big.webp"], ["--grid big.webp", "16,392 x 12"]),
        "grid-jpeg": (["sample", tiny_onnx, "-n", 6550, "--grid", "big.jpg"], ["--grid big.jpg", "65,502 x 12"]),
        "rows-webp": (
            ["sample", tiny_onnx, "--each-attribute", "-n", 1639, "--grid", "big.webp"],
            ["5 row(s) x 1639 images", "16,392 x 52"],
        ),
        "strip-webp": ([*interpolate, 2048, "--out", "big.webp"], ["--out big.webp", "2048 frames", "16,384 x 8"]),
        "strip-jpeg": ([*interpolate, 8188, "--out", "big.jpg"], ["--out big.jpg", "65,504 x 8"]),
        "pair-webp": (
            ["edit", run_dir, "wide.png", "--attr", "a=1", "--set", "b=1", "--out", "big.webp"],
            ["--out big.webp", "16,384 x 3"],
        ),
    }[case]
    limit = "WebP holds at most 16,383 pixels per side" if case.endswith("webp") else "JPEG holds at most 65,500"
    result = subprocess.run(
        [sys.executable, "-c", NO_WORK, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=tmp_path,
    )
    assert_user_error(
        result, *words, limit, ": use .png or fewer" if "pair" not in case else ": use .png or a smaller"
    )
    assert snapshot(tmp_path) == ["wide.png"]  # no file, no temporary


@pytest.mark.parametrize("suffix", [".webp", ".ppm"])
def test_the_grid_checked_is_the_grid_written(tiny_onnx, tmp_path, suffix):
    """The check's geometry is image_grid's: the largest WebP grid is written, at the size computed."""
    n = 1638 if suffix == ".webp" else 3  # 1638 x 10 + 2 = 16,382 pixels: WebP holds it
    result = subprocess.run(
        [*CLI, "sample", str(tiny_onnx), "--each-attribute", "-n", str(n), "--grid", f"g{suffix}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / f"g{suffix}") as written:
        assert (written.mode, written.size) == ("RGB", (n * 10 + 2, 5 * 10 + 2))
        if suffix == ".ppm":  # the padding: white around every 8x8 image
            pixels = np.asarray(written)
            assert (pixels[:2] == 255).all() and (pixels[:, -2:] == 255).all() and (pixels[10:12] == 255).all()
    assert snapshot(tmp_path) == [f"g{suffix}"]
