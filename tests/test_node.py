"""examples/node/sample.mjs: the Node.js embedding example of export/README.md, run with node and
onnxruntime-node on a trained digits export, gives the Python Sampler's images for the same noise."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolkit.sampler import Sampler, image_grid, to_uint8

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "node" / "sample.mjs"
NODE = shutil.which("node")
ORT_NODE = ROOT / "node_modules" / "onnxruntime-node"
DIGITS = [f"digit_{i}" for i in range(10)]
LATENT_DIM = 16  # the digits recipe

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (bash scripts/setup-js.sh needs npm and node)"),
    pytest.mark.skipif(
        not (ORT_NODE / "package.json").exists(),
        reason="node_modules/onnxruntime-node is missing: run bash scripts/setup-js.sh",
    ),
]


def run_node(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NODE, str(SCRIPT), *map(str, args)], check=False, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def write_noise(path: Path, noise: np.ndarray) -> Path:
    # float(x) of a float32 prints the double that is exactly x, so JSON carries it unchanged
    path.write_text(json.dumps([[float(x) for x in row] for row in noise]))
    return path


def condition(name: str, rows: int) -> np.ndarray:
    attributes = np.zeros((rows, len(DIGITS)), np.float32)
    attributes[:, DIGITS.index(name)] = 1
    return attributes


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG file, each CRC checked here (not left to the decoder)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


@pytest.fixture(scope="module")
def variant(trained_run, tmp_path_factory) -> Path:
    """The same run exported with --uint8 --temperature-input: the other output layout and input list."""
    from toolkit.export import export_onnx

    path, _ = export_onnx(
        trained_run,
        tmp_path_factory.mktemp("node") / "digits-uint8-temperature.onnx",
        uint8=True,
        temperature_input=True,
    )
    return path


def test_node_png_equals_the_python_sampler(exported, tmp_path):
    noise = np.random.default_rng(0).standard_normal((6, LATENT_DIM), dtype=np.float32)
    result = run_node(
        exported,
        "digit_3=1",
        "--noise",
        write_noise(tmp_path / "noise.json", noise),
        "--columns",
        4,
        "--raw",
        tmp_path / "out.f32",
        "--out",
        tmp_path / "threes.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrote" in result.stdout and "threes.png" in result.stdout

    expected = Sampler(exported, device="cpu").run(condition("digit_3", 6), noise)  # float32 [6, 3, 32, 32]
    floats = np.fromfile(tmp_path / "out.f32", np.float32).reshape(expected.shape)
    assert np.abs(floats - expected).max() <= 1e-5  # onnxruntime-node vs Python onnxruntime, CPU

    kinds = [kind for kind, _ in png_chunks(tmp_path / "threes.png")]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    with Image.open(tmp_path / "threes.png") as image:
        assert image.mode == "RGB" and image.size == (4 * 34 + 2, 2 * 34 + 2)  # 2 rows x 4, 2-pixel gaps
        pixels = np.asarray(image)
    grid = image_grid(to_uint8(expected), columns=4)
    assert pixels.shape == grid.shape
    assert np.abs(pixels.astype(int) - grid.astype(int)).max() <= 1


def test_node_toggling_an_attribute_changes_the_images(exported, tmp_path):
    noise = write_noise(
        tmp_path / "noise.json", np.random.default_rng(1).standard_normal((2, LATENT_DIM), dtype=np.float32)
    )
    images = {}
    for digit in ("digit_1", "digit_8"):
        result = run_node(exported, f"{digit}=1", "--noise", noise, "--out", tmp_path / f"{digit}.png", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        images[digit] = np.asarray(Image.open(tmp_path / f"{digit}.png")).astype(int)
    assert np.abs(images["digit_1"] - images["digit_8"]).mean() > 1


def test_node_uint8_export_with_temperature_input(variant, tmp_path):
    noise = np.random.default_rng(2).standard_normal((3, LATENT_DIM), dtype=np.float32)
    result = run_node(
        variant,
        "digit_5=1",
        "--noise",
        write_noise(tmp_path / "noise.json", noise),
        "--temperature",
        0.7,
        "--raw",
        tmp_path / "out.u8",
        "--out",
        tmp_path / "fives.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # uint8 [3, 32, 32, 3]
    expected = Sampler(variant, device="cpu").run(condition("digit_5", 3), noise, temperature=0.7)
    raw = np.fromfile(tmp_path / "out.u8", np.uint8).reshape(expected.shape)
    assert np.abs(raw.astype(int) - expected.astype(int)).max() <= 1
    pixels = np.asarray(Image.open(tmp_path / "fives.png"))
    assert np.abs(pixels.astype(int) - image_grid(expected, columns=3).astype(int)).max() <= 1


def test_node_temperature_scales_the_noise_of_a_plain_export(exported, tmp_path):
    # Without a temperature input the script multiplies the noise itself, as the Sampler does.
    noise = np.random.default_rng(3).standard_normal((2, LATENT_DIM), dtype=np.float32)
    result = run_node(
        exported,
        "digit_0=1",
        "--noise",
        write_noise(tmp_path / "noise.json", noise),
        "--temperature",
        0.5,
        "--raw",
        tmp_path / "out.f32",
        "--out",
        tmp_path / "zeros.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    expected = Sampler(exported, device="cpu").run(condition("digit_0", 2), noise, temperature=0.5)
    at_one = Sampler(exported, device="cpu").run(condition("digit_0", 2), noise)
    floats = np.fromfile(tmp_path / "out.f32", np.float32).reshape(expected.shape)
    assert np.abs(floats - expected).max() <= 1e-5
    assert np.abs(floats - at_one).max() > 1e-3  # the temperature did something


def test_node_same_seed_same_png_other_seed_other_png(exported, tmp_path):
    outputs = []
    for seed, name in ((7, "a.png"), (7, "b.png"), (8, "c.png")):
        result = run_node(exported, "digit_2=1", "-n", 3, "--seed", seed, "--out", tmp_path / name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"seed {seed}" in result.stdout
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (3 * 34 + 2, 34 + 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["digit_33=1"], "unknown attribute 'digit_33'"),
        (["digit_3=2"], "expected an attribute as NAME=0 or NAME=1, got digit_3=2"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--noise", "rows.json"], "--noise rows.json: expected a JSON array of rows of 16 finite numbers"),
        (["--out", "x.jpg"], "--out must name a .png file"),
        # which one was meant cannot be told (the last one won, exit 0); cvae-tk sample --attr refuses it too
        (["digit_3=1", "digit_3=0"], "digit_3 is set twice, to 1 and to 0: give it once"),
    ],
)
def test_node_user_mistakes_are_one_line(exported, tmp_path, args, message):
    (tmp_path / "rows.json").write_text(json.dumps([[0.0] * 15]))  # one number short
    result = run_node(exported, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_node_more_images_than_memory_holds_are_refused_before_any_work(exported, tmp_path):
    """-n beyond what memory holds: the whole batch went to ONNX Runtime at once (at -n 2000000 it
    failed to allocate a 131 GB buffer, exit 1; at -n 200000000 the kernel's OOM killer ended node).
    Refused in one line before the noise is drawn (4 GiB is the most a Node.js buffer holds here)."""
    result = run_node(exported, "digit_3=1", "-n", 2_000_000, "--seed", 0, "--out", "big.png", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip().startswith("sample.mjs: -n 2000000: ") and "ask for fewer images (-n)" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_node_runs_more_images_than_one_batch_in_batches_as_the_sampler(exported, tmp_path):
    """ONNX Runtime runs 256 images at a time (toolkit.sampler's default batch_size), so its buffers
    stay bounded; the images of 300 rows of noise are still the Sampler's."""
    noise = np.random.default_rng(4).standard_normal((300, LATENT_DIM), dtype=np.float32)
    result = run_node(
        exported,
        "digit_6=1",
        "--noise",
        write_noise(tmp_path / "noise.json", noise),
        "--raw",
        "out.f32",
        "--out",
        "sixes.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "float32 [300,3,32,32]" in result.stdout
    expected = Sampler(exported, device="cpu").run(condition("digit_6", 300), noise)
    floats = np.fromfile(tmp_path / "out.f32", np.float32).reshape(expected.shape)
    assert np.abs(floats - expected).max() <= 1e-5
    pixels = np.asarray(Image.open(tmp_path / "sixes.png")).astype(int)
    assert np.abs(pixels - image_grid(to_uint8(expected), columns=8).astype(int)).max() <= 1


def test_node_outputs_that_are_inputs_or_links_or_in_no_folder(exported, tmp_path):
    """--raw onto the export replaced the model with the output tensor; --out and --raw of one file
    left only the PNG; an output name that is a link was replaced by a plain file (cvae-tk writes
    through links, toolkit/atomic.py); a missing folder or a file as the folder failed after the
    sampling, the latter with exit 1 and Node's `ENOTDIR: ... lstat` of the temporary file. Each is one
    line before any work, nothing written; a link to a file is written through and kept."""
    model = tmp_path / "digits.onnx"
    shutil.copy(exported, model)
    (tmp_path / "alias.onnx").symlink_to(model)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    original = model.read_bytes()
    mistakes = [
        (["--raw", "digits.onnx"], "cannot write --raw digits.onnx: it is digits.onnx, the export this command reads"),
        (["--raw", "alias.onnx"], "cannot write --raw alias.onnx: it is digits.onnx, the export this command reads"),
        (["--raw", "./x.png", "--out", "x.png"], "--out x.png and --raw ./x.png are one file"),
        (["--out", "nowhere/x.png"], "cannot write --out nowhere/x.png: the folder nowhere does not exist"),
        (["--out", "afile/x.png"], "cannot write --out afile/x.png: afile is a file, not a folder"),
        (["--out", "dangling.png"], "cannot write --out dangling.png: it is a link to"),
    ]
    for args, message in mistakes:
        before = sorted(path.name for path in tmp_path.iterdir())
        result = run_node("digits.onnx", "digit_3=1", "--seed", 0, *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert sorted(path.name for path in tmp_path.iterdir()) == before, args
        assert model.read_bytes() == original and (tmp_path / "afile").read_text() == "mine"

    (tmp_path / "target.png").write_bytes(b"old")
    (tmp_path / "link.png").symlink_to(tmp_path / "target.png")
    result = run_node("digits.onnx", "digit_3=1", "--seed", 0, "--out", "link.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "link.png").is_symlink() and (tmp_path / "target.png").read_bytes()[:4] == b"\x89PNG"


def test_node_refuses_a_file_that_is_not_a_sampler(trained_run, tmp_path):
    result = run_node(trained_run / "config.json", cwd=tmp_path)
    assert result.returncode == 2
    assert "config.json is not an ONNX file" in result.stderr, result.stderr


def test_node_without_onnxruntime_node_says_what_to_install(exported, tmp_path):
    """The script copied where no node_modules is above it (an application's folder before npm install):
    a static import failed before any line ran, with Node's stack trace."""
    script = tmp_path / "app" / "sample.mjs"
    script.parent.mkdir()
    shutil.copy(SCRIPT, script)
    result = subprocess.run(
        [NODE, str(script), str(exported), "digit_3=1"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2 and not list(tmp_path.glob("**/*.png"))
    assert result.stderr.strip() == (
        "sample.mjs: onnxruntime-node is not installed where this script can import it: "
        "npm install onnxruntime-node (in cvae-tk: bash scripts/setup-js.sh)"
    )


def test_node_nan_pixels_and_noise_beyond_float32_are_refused_as_the_sampler_refuses_them(tiny_onnx, tmp_path):
    """A graph returning NaN gave pixel 0 (black) without a word, where toolkit.sampler refuses it; noise
    finite as a double but infinite as the float32 the model takes (1e300) was fed to it. One line each,
    nothing written."""
    too_big = write_noise(tmp_path / "big.json", np.full((2, 4), 3e38, np.float32))  # finite: the graph makes NaN
    result = run_node(tiny_onnx, "--noise", too_big, "--out", "x.png", "--raw", "x.raw", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        f"sample.mjs: {tiny_onnx}: the graph returned NaN or infinite pixels "
        "(broken weights, or inputs far outside the prior's range?)"
    )
    with (
        Sampler(tiny_onnx, device="cpu") as sampler,
        pytest.raises(Exception, match="returned NaN or infinite pixels"),
    ):
        sampler.run(np.zeros((2, 5), np.float32), np.full((2, 4), 3e38, np.float32))
    (tmp_path / "inf.json").write_text("[[1e300, 0, 0, 0]]")
    result = run_node(tiny_onnx, "--noise", "inf.json", "--out", "x.png", cwd=tmp_path)
    assert result.returncode == 2 and "as float32, which ends at 3.4e38" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x.*"))


def test_node_attribute_names_match_in_either_unicode_normalization(tiny_onnx, tmp_path):
    """'é=1' typed as 'e' + a combining accent against an export's 'é' of one code point was 'unknown attribute'."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "é") for form in ("NFC", "NFD"))
    for name in (nfc, nfd):
        result = run_node(tiny_onnx, f"{name}=1", "-n", 2, "--seed", 0, "--raw", f"{len(name)}.raw", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "1.raw").read_bytes() == (tmp_path / "2.raw").read_bytes()
    result = run_node(tiny_onnx, f"{nfc}=1", f"{nfd}=0", cwd=tmp_path)
    assert result.returncode == 2 and "is set twice, to 1 and to 0" in result.stderr, result.stderr


def test_node_writes_both_outputs_or_neither(tiny_onnx, tmp_path):
    """--raw was written before --out: where writing --out then failed, the raw tensor stayed without its
    PNG. Both are written beside their names first, then renamed; a failure leaves neither. And a --out
    name of 250 bytes (legal) failed: its temporary name passed the 255 a name may have."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not available here (a folder no write can enter, even as root)")
    try:
        result = run_node(tiny_onnx, "-n", 2, "--seed", 0, "--out", "locked/x.png", "--raw", "x.raw", cwd=tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "sample.mjs: cannot write locked/x.png: EPERM; x.raw not written either"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["locked"] and not list(locked.iterdir())
    long = "x" * 246 + ".png"
    result = run_node(tiny_onnx, "-n", 2, "--seed", 0, "--out", long, "--raw", "x.raw", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["locked", long, "x.raw"])
