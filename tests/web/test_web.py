"""`cvae-tk web`: the static page it writes, served on 127.0.0.1 and driven in headless Chromium
(node + playwright-core, tests/web/drive.mjs): its images against the Python Sampler's, its noise
generator, the attribute toggles, the download, photo editing with the encoder, the many-attribute
(CUB-sized) layout, and that it loads nothing from outside 127.0.0.1.

The browser tests need node, the npm packages (`bash scripts/setup-js.sh`) and Chromium; without
them they are skipped, saying which is missing."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import selectors
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from toolkit.errors import UserError
from toolkit.sampler import Sampler, to_uint8
from toolkit.web import build as web_build
from toolkit.web import build_page, serve, url

DRIVER = ROOT / "tests" / "web" / "drive.mjs"
CHROMIUM = os.environ.get("CHROMIUM") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium") or "/usr/bin/chromium"
)
COMMAND_TIMEOUT_S = 90  # one driver command (opening a page compiles ORT's wasm: a few seconds)


def _browser_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (bash scripts/setup-js.sh needs npm and node)"
    if not (ROOT / "node_modules" / "playwright-core").is_dir():
        return "node_modules/playwright-core is missing: run bash scripts/setup-js.sh"
    if not all((ROOT / web_build.ORT_PACKAGE / name).is_file() for name in web_build.ORT_FILES):
        return "node_modules/onnxruntime-web is missing: run bash scripts/setup-js.sh"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    return None


MISSING = _browser_missing()
needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"browser test: {MISSING}")
needs_ort_web = pytest.mark.skipif(
    not all((ROOT / web_build.ORT_PACKAGE / name).is_file() for name in web_build.ORT_FILES),
    reason="node_modules/onnxruntime-web is missing: run bash scripts/setup-js.sh",
)


class Driver:
    """tests/web/drive.mjs: one Chromium for the module, a JSON command a line."""

    def __init__(self, chromium_args: tuple[str, ...] = ()):
        self.process = subprocess.Popen(
            ["node", str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, CHROMIUM=CHROMIUM, CHROMIUM_ARGS=" ".join(chromium_args)),
        )
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.process.stdout, selectors.EVENT_READ)

    def __call__(self, op: str, **fields):
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        if not self.selector.select(COMMAND_TIMEOUT_S):
            self.process.kill()
            raise TimeoutError(f"the browser driver gave no answer to {op} in {COMMAND_TIMEOUT_S} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the browser driver ended: {self.process.stderr.read()[-2000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"{op} failed in the browser: {answer['error']}")
        return answer["value"]

    def eval(self, expression: str):
        return self("eval", expression=expression)

    def close(self):
        try:
            self.process.stdin.write('{"op": "close"}\n')
            self.process.stdin.flush()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_export(trained_run, tmp_path_factory) -> Path:
    """The session's trained digits run exported with its encoder (OUT.onnx + OUT-encoder.onnx)."""
    from toolkit.export import export_onnx

    path = tmp_path_factory.mktemp("web-export") / "digits.onnx"
    export_onnx(trained_run, path, encoder=True)
    return path


@pytest.fixture(scope="module")
def sampler(digits_export) -> Sampler:
    return Sampler(digits_export, device="cpu")


@pytest.fixture(scope="module")
def page(digits_export, tmp_path_factory) -> Path:
    if MISSING:
        pytest.skip(f"browser test: {MISSING}")
    return build_page(digits_export, tmp_path_factory.mktemp("web") / "page")


@pytest.fixture(scope="module")
def server(page):
    server = serve(page, 0)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        pytest.skip(f"browser test: {MISSING}")
    driver = Driver()
    yield driver
    driver.close()


@pytest.fixture
def studio(browser, server):
    """The digits page, freshly opened (all attributes off, seed 0, temperature 1, 8 samples)."""
    opened = browser("open", url=url(server))
    assert opened["errors"] == [], opened["errors"]
    return browser


# --- helpers --------------------------------------------------------------------------------------


def grid_tiles(driver: Driver, count: int, size) -> np.ndarray:
    """The page's grid canvas, read back from it and cut into its `count` tiles: uint8 [count, H, W, 3]."""
    driver.eval("cvae.idle()")
    grid = driver.eval("cvae.grid()")
    state = driver.eval("cvae.state()")
    pixels = np.frombuffer(base64.b64decode(grid["rgba"]), np.uint8).reshape(grid["height"], grid["width"], 4)
    assert (pixels[..., 3] == 255).all()
    (height, width), pad, columns = size, state["pad"], state["columns"]
    tiles = []
    for index in range(count):
        top, left = pad + (index // columns) * (height + pad), pad + (index % columns) * (width + pad)
        tiles.append(pixels[top : top + height, left : left + width, :3])
    return np.stack(tiles)


def set_range(driver: Driver, selector: str, value: float) -> None:
    """A range input as a user drags it (playwright's fill does not take range inputs)."""
    driver.eval(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = {json.dumps(str(value))};"
        f" e.dispatchEvent(new Event('input')); }})()"
    )


def js_noise(seed: int, count: int) -> np.ndarray:
    """The page's documented generator (app.js): xoshiro128** seeded by fmix32 of a Weyl sequence,
    Box-Muller, float32."""
    mask = 0xFFFFFFFF
    state = seed & mask

    def seeder() -> int:
        nonlocal state
        state = (state + 0x9E3779B9) & mask
        z = ((state ^ (state >> 16)) * 0x85EBCA6B) & mask
        z = ((z ^ (z >> 13)) * 0xC2B2AE35) & mask
        return z ^ (z >> 16)

    s = [seeder() for _ in range(4)]
    rotl = lambda x, k: ((x << k) | (x >> (32 - k))) & mask  # noqa: E731

    def draw() -> int:
        result = (rotl((s[1] * 5) & mask, 7) * 9) & mask
        t = (s[1] << 9) & mask
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]  # noqa: E702
        s[2] ^= t
        s[3] = rotl(s[3], 11)
        return result

    out = np.empty(count, np.float32)
    for i in range(0, count, 2):
        u1, u2 = (draw() + 0.5) / 2**32, (draw() + 0.5) / 2**32
        radius = math.sqrt(-2 * math.log(u1))
        out[i] = radius * math.cos(2 * math.pi * u2)
        if i + 1 < count:
            out[i + 1] = radius * math.sin(2 * math.pi * u2)
    return out


def one_hot(sampler: Sampler, *names: str) -> np.ndarray:
    row = np.zeros(len(sampler.attributes), np.float32)
    for name in names:
        row[sampler.attributes.index(name)] = 1
    return row


# --- the page's files (no browser) --------------------------------------------------------------------


@needs_ort_web
def test_page_holds_the_export_its_metadata_and_only_the_ort_files_it_loads(digits_export, tmp_path):
    out = build_page(digits_export, tmp_path / "page")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        [
            "index.html",
            "app.js",
            "style.css",
            "model.json",
            "digits.onnx",
            "digits-encoder.onnx",
            web_build.OWNER,
            *(f"ort/{name}" for name in web_build.ORT_FILES),
        ]
    )
    assert (out / "digits.onnx").read_bytes() == digits_export.read_bytes()
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["attributes"] == [f"digit_{i}" for i in range(10)]
    assert manifest["decoder"]["metadata"]["cvae_tk.format"] == "sampler/1"
    assert manifest["encoder"]["metadata"]["cvae_tk.format"] == "encoder/1"
    assert manifest["encoder"]["metadata"]["preprocessing"]["size"] == manifest["image_size"] == [32, 32]
    assert (
        manifest["onnxruntime_web"]
        == json.loads((ROOT / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    )
    # the page ships inside the installed package (package data), not only in the source tree
    from importlib import resources

    static = resources.files("toolkit.web") / "static"
    assert all((static / name).is_file() for name in web_build.PAGE_FILES)
    assert (out / "app.js").read_bytes() == (static / "app.js").read_bytes()


@needs_ort_web
def test_a_rebuild_with_another_export_drops_the_old_model_and_a_decoder_only_export_has_no_encoder(
    exported, digits_export, tmp_path
):
    out = tmp_path / "page"
    build_page(digits_export, out)
    build_page(exported, out)  # the session's plain export: no encoder beside it
    assert not (out / "digits-encoder.onnx").exists()
    assert json.loads((out / "model.json").read_text())["encoder"] is None


@needs_ort_web
def test_the_page_never_goes_into_the_exports_own_folder(digits_export, tmp_path):
    """A rebuild replaces the earlier page's model files: in the export's own folder those would be
    the user's exports."""
    folder = tmp_path / "exports"
    folder.mkdir()
    for name in ("digits.onnx", "digits-encoder.onnx"):
        shutil.copyfile(digits_export.with_name(name), folder / name)
    with pytest.raises(UserError, match="is the folder of digits.onnx itself"):
        build_page(folder / "digits.onnx", folder)
    assert sorted(path.name for path in folder.iterdir()) == ["digits-encoder.onnx", "digits.onnx"]


@needs_ort_web
def test_a_rebuild_that_fails_halfway_leaves_no_model_json(exported, digits_export, tmp_path, monkeypatch):
    """model.json is what the page loads first: while the files change it is absent, so a page half
    rebuilt (here the encoder's copy fails, as on a full disk) cannot pair a new decoder with an old
    encoder."""
    out = tmp_path / "page"
    build_page(digits_export, out)
    real = web_build._copy

    def failing(source, target):
        if target.name.endswith("-encoder.onnx"):
            raise OSError(28, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(web_build, "_copy", failing)
    with pytest.raises(OSError):
        build_page(digits_export, out)
    assert not (out / "model.json").exists()


def test_missing_onnxruntime_web_is_one_error_naming_both_places(digits_export, tmp_path, monkeypatch):
    places = [tmp_path / "beside-toolkit" / "dist", tmp_path / "here" / "dist"]
    monkeypatch.setattr(web_build, "ort_dist_candidates", lambda: places)
    with pytest.raises(UserError) as caught:
        build_page(digits_export, tmp_path / "page")
    message = str(caught.value)
    assert (
        str(places[0]) in message
        and str(places[1]) in message
        and "--ort-dist" in message
        and "setup-js.sh" in message
    )
    assert not (tmp_path / "page").exists()  # refused before anything was written
    # run from the project folder the two places are one ("neither X holds ...")
    monkeypatch.setattr(web_build, "ort_dist_candidates", lambda: places[:1])
    with pytest.raises(UserError, match=re.escape(f"not found: no ort.webgpu.min.mjs in {places[0]}; run")):
        build_page(digits_export, tmp_path / "page")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / web_build.ORT_FILES[0]).write_text("")
    with pytest.raises(UserError, match=r"--ort-dist .*partial lacks ort-wasm-simd-threaded\.asyncify\.mjs"):
        build_page(digits_export, tmp_path / "page", ort_dist=tmp_path / "partial")


def test_an_encoder_or_a_non_export_is_refused(digits_export, tmp_path):
    with pytest.raises(UserError, match="is an encoder: give the decoder"):
        web_build.model_manifest(digits_export.with_name("digits-encoder.onnx"))
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="is not an ONNX model"):
        web_build.model_manifest(tmp_path / "x.onnx")


@needs_ort_web
def test_serve_gives_wasm_and_module_scripts_their_mime_types_on_localhost(digits_export, tmp_path):
    out = build_page(digits_export, tmp_path / "page")
    server = serve(out, 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        types = {}
        for name in (
            "ort/ort-wasm-simd-threaded.asyncify.wasm",
            "ort/ort.webgpu.min.mjs",
            "app.js",
            "model.json",
            "index.html",
        ):
            with urllib.request.urlopen(url(server) + name) as response:
                types[name] = response.headers["Content-Type"]
                if name == "model.json":
                    assert json.loads(response.read())["name"] == "digits"
                    assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    finally:
        server.shutdown()
        server.server_close()
    assert types["ort/ort-wasm-simd-threaded.asyncify.wasm"] == "application/wasm"
    assert types["ort/ort.webgpu.min.mjs"] == types["app.js"] == "text/javascript"
    assert types["model.json"] == "application/json" and types["index.html"].startswith("text/html")


@needs_ort_web
def test_cli_web_writes_the_page_and_refuses_a_missing_export_in_one_line(digits_export, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "web", *map(str, args)],  # noqa: E731
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    done = run(digits_export, "--out", tmp_path / "page")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "page" / "index.html").is_file() and "wrote" in done.stdout
    missing = run(tmp_path / "nope.onnx", "--out", tmp_path / "page2")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "model file not found" in missing.stderr and "Traceback" not in missing.stderr


# --- in the browser ---------------------------------------------------------------------------------


@needs_browser
def test_the_page_runs_on_wasm_and_loads_nothing_from_outside(studio, server):
    assert studio.eval("cvae.backend") == "wasm"  # headless with --disable-gpu: no WebGPU adapter
    log = studio("requests")
    assert log["errors"] == []
    base = url(server)
    assert all(request.startswith(base) for request in log["requests"]), log["requests"]
    loaded = {request[len(base) :] for request in log["requests"]}
    assert {f"ort/{name}" for name in web_build.ORT_FILES} <= loaded  # the files build_page copies are those it loads
    assert {"model.json", "digits.onnx", "digits-encoder.onnx", "app.js", "style.css"} <= loaded
    assert studio("visible", selector="#attributes .toggle") == 10 and studio("visible", selector="#filter") == 0


def show_threes(page, sampler, seed: int):
    """digit_3 ticked, temperature 0.7 and five rows of given noise on `page`: (the conditions, the
    noise, the Sampler's output for them), which the grid must show."""
    page("check", selector="input[name=digit_3]")
    set_range(page, "#temperature", 0.7)
    noise = np.random.default_rng(seed).standard_normal((5, sampler.latent_dim), dtype=np.float32)
    page.eval(f"cvae.setNoise({json.dumps(noise.tolist())})")
    threes = np.repeat(one_hot(sampler, "digit_3")[None], 5, axis=0)
    return threes, noise, sampler.run(threes, noise, temperature=0.7)


@needs_browser
def test_grid_pixels_match_the_python_sampler_on_the_same_noise(studio, sampler):
    attributes, noise, output = show_threes(studio, sampler, seed=1)
    expected = to_uint8(output)
    got = grid_tiles(studio, 5, sampler.image_size)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    # the raw float output of the decoder in the browser, against ONNX Runtime in Python
    raw = studio.eval(
        f"cvae.run({{attributes: {json.dumps(attributes.tolist())}, noise: {json.dumps(noise.tolist())}, temperature: 0.7}})"
    )
    assert (
        np.abs(
            np.asarray(raw, np.float32).reshape(expected.shape[0], 3, 32, 32) - sampler.run(attributes, noise, 0.7)
        ).max()
        < 1e-5
    )


@needs_browser
def test_seeded_noise_is_the_documented_generator_and_drives_the_grid(studio, sampler):
    studio("fill", selector="#count", value="3")
    studio("fill", selector="#seed", value="7")
    studio.eval("cvae.idle()")
    state = studio.eval("cvae.state()")
    noise = np.asarray(state["noise"], np.float32)
    assert state["seed"] == 7 and state["count"] == 3
    assert np.abs(noise - js_noise(7, 3 * sampler.latent_dim)).max() < 1e-6
    assert abs(float(noise.mean())) < 0.5 and 0.5 < float(noise.std()) < 1.5  # standard normal, roughly (48 values)
    expected = to_uint8(sampler.run(np.zeros((3, 10), np.float32), noise.reshape(3, -1)))
    first = grid_tiles(studio, 3, sampler.image_size)
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1
    studio("fill", selector="#count", value="5")  # more samples: the first ones keep their noise
    more = grid_tiles(studio, 5, sampler.image_size)
    assert np.array_equal(more[:3], first)
    studio("fill", selector="#seed", value="8")
    assert not np.array_equal(grid_tiles(studio, 3, sampler.image_size), first)


@needs_browser
def test_toggling_an_attribute_changes_the_grid(studio, sampler):
    studio("check", selector="input[name=digit_3]")
    threes = grid_tiles(studio, 8, sampler.image_size)
    assert studio.eval("cvae.state().attributes") == one_hot(sampler, "digit_3").tolist()
    studio("uncheck", selector="input[name=digit_3]")
    studio("check", selector="input[name=digit_7]")
    sevens = grid_tiles(studio, 8, sampler.image_size)
    assert studio.eval("cvae.state().attributes") == one_hot(sampler, "digit_7").tolist()
    changed = np.abs(threes.astype(int) - sevens.astype(int)) > 8
    assert changed.mean() > 0.05, f"only {changed.mean():.1%} of the pixels changed"
    noise = np.asarray(studio.eval("cvae.state().noise"), np.float32).reshape(8, -1)
    expected = to_uint8(sampler.run(np.repeat(one_hot(sampler, "digit_7")[None], 8, axis=0), noise))
    assert np.abs(sevens.astype(int) - expected.astype(int)).max() <= 1


@needs_browser
def test_download_is_the_grid_as_png(studio, sampler, tmp_path):
    studio("check", selector="input[name=digit_5]")
    studio.eval("cvae.idle()")
    name = studio("download", selector="#download", path=str(tmp_path / "grid.png"))
    assert name == "digits-seed0.png"
    grid = studio.eval("cvae.grid()")
    shown = np.frombuffer(base64.b64decode(grid["rgba"]), np.uint8).reshape(grid["height"], grid["width"], 4)[..., :3]
    saved = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert saved.shape == (2 + 2 * 34, 2 + 4 * 34, 3)  # 8 tiles of 32, 4 a row, 2 pixels of padding
    assert np.array_equal(saved, shown)


@needs_browser
def test_a_dropped_photo_is_encoded_and_edited_as_the_python_sampler_does(studio, sampler, tmp_path):
    edit_a_dropped_photo(studio, sampler, tmp_path)


def edit_a_dropped_photo(studio: Driver, sampler: Sampler, folder: Path, levels: int = 1) -> None:
    """Drop a real test-split digit on the open page: prepared exactly, encoded as `sampler.encode`,
    its reconstruction and an edit within `levels` grey levels of `sampler.edit`."""
    from toolkit.data.digits import digit_samples

    sample = next(digit_samples("test", 32))  # a real test-split digit, at the model's size (crop null)
    photo_path = folder / "photo.png"
    photo_path.write_bytes(sample.image)
    photo = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"))
    digit = f"digit_{int(np.argmax(sample.attributes))}"
    other = "digit_8" if digit != "digit_8" else "digit_1"
    assert studio("visible", selector="#drop") == 1
    studio("check", selector=f"input[name={digit}]")  # the photo's attributes: the toggles when it arrives
    studio("files", selector="#photo-file", path=str(photo_path))
    studio.eval("(async () => { while (!cvae.state().photo) await new Promise((r) => setTimeout(r, 20)); })()")
    state = studio.eval("cvae.state()")
    pixels = np.asarray(state["photo"]["pixels"], np.float32).reshape(3, 32, 32)
    assert np.array_equal(np.round(pixels * 255).astype(np.uint8).transpose(1, 2, 0), photo)  # prepared exactly
    z = sampler.encode(photo, {digit: 1})[0]
    assert np.abs(np.asarray(state["photo"]["z"], np.float32) - z).max() < 1e-5
    tiles = grid_tiles(studio, 3, sampler.image_size)
    assert np.array_equal(tiles[0], photo)
    reconstruction = sampler.edit(photo, {digit: 1})
    assert np.abs(tiles[1].astype(int) - reconstruction.astype(int)).max() <= levels
    studio("uncheck", selector=f"input[name={digit}]")
    studio("check", selector=f"input[name={other}]")
    edited = grid_tiles(studio, 3, sampler.image_size)
    expected = sampler.edit(photo, {digit: 1}, {digit: 0, other: 1})
    assert np.abs(edited[2].astype(int) - expected.astype(int)).max() <= levels
    assert np.array_equal(edited[1], tiles[1]) and not np.array_equal(edited[2], tiles[2])
    studio("click", selector="#clear-photo")
    assert studio.eval("(async () => { await cvae.idle(); return cvae.state().photo; })()") is None


# --- the export variants: fp16, uint8 output, temperature input, int8 -----------------------------------

# What `cvae-tk export` makes besides the plain fp32 file, each page driven as the fp32 one is. Two
# fp32 files (fp16 arithmetic keeps float32 inputs and outputs; uint8 [B, H, W, 3] output with a
# `temperature` input) and the int8 (QDQ) files quantized from the plain export and from that one:
# both output types, all three precisions, both ways of applying the temperature. Each has an
# encoder (an int8 file edits with its fp32 file's).
VARIANTS = {  # name: (export_onnx options or the fp32 file it is quantized from, its model.json facts)
    "fp16": (dict(fp16=True), dict(precision="fp16", output="float32_nchw", temperature_input=False)),
    "uint8-temperature": (
        dict(uint8=True, temperature_input=True),
        dict(precision="fp32", output="uint8_nhwc", temperature_input=True),
    ),
    "int8": ("digits", dict(precision="int8", output="float32_nchw", temperature_input=False)),
    "uint8-temperature-int8": (
        "digits-uint8-temperature",
        dict(precision="int8", output="uint8_nhwc", temperature_input=True),
    ),
}
# The page's raw float output against ONNX Runtime's in Python on the same file, as tight for every
# precision as for fp32 (measured: 1.5e-7 for fp16 and int8, on wasm): onnxruntime-web's wasm backend
# is ONNX Runtime's CPU kernels built for wasm. The CPU provider runs most of an fp16 graph's ops in
# float32 between casts, in both; the int8 file's products are exact integers (7-bit weights: no
# saturation on any x86 kernel, see toolkit/quantize.py) requantized by the same float arithmetic.
# (WebGPU would compute fp16 in fp16: not driven here, headless Chromium has no adapter.)
RAW_TOLERANCE = 1e-5
# The grid's pixels against the Sampler's, in grey levels: 1 (a value on a rounding edge), for all.
LEVELS = 1


@pytest.fixture(scope="module")
def variant_exports(trained_run, digits_export, tmp_path_factory) -> dict[str, Path]:
    """The session's run exported as each of VARIANTS, with the encoder, by the exporter and quantizer
    `cvae-tk export --fp16 / --uint8 / --temperature-input / --int8 --encoder` call."""
    from toolkit.export import export_onnx
    from toolkit.quantize import quantize_export

    folder = tmp_path_factory.mktemp("web-variants")
    for name in ("digits.onnx", "digits-encoder.onnx"):  # the plain export, which --int8 quantizes
        shutil.copyfile(digits_export.with_name(name), folder / name)
    paths = {}
    for name, (made, _) in VARIANTS.items():
        if isinstance(made, dict):
            paths[name] = export_onnx(trained_run, folder / f"digits-{name}.onnx", encoder=True, **made)[0]
        else:  # OUT-int8.onnx beside OUT.onnx, whose encoder it edits with
            paths[name] = quantize_export(trained_run, folder / f"{made}.onnx")[0]
            assert paths[name].name == f"digits-{name}.onnx"
    return paths


@pytest.fixture(scope="module")
def variant_pages(variant_exports, tmp_path_factory) -> dict[str, str]:
    """Each variant's page, served: its address."""
    if MISSING:
        pytest.skip(f"browser test: {MISSING}")
    servers = {
        name: serve(build_page(path, tmp_path_factory.mktemp(f"web-{name}") / "page"), 0)
        for name, path in variant_exports.items()
    }
    yield {name: url(server) for name, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def as_pixels(output: np.ndarray) -> np.ndarray:
    """A Sampler.run output (float32 [B, 3, H, W] or uint8 [B, H, W, 3]) as uint8 [B, H, W, 3]."""
    return output if output.dtype == np.uint8 else to_uint8(output)


def levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@needs_browser
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_export_variants_page_samples_toggles_and_edits_as_the_python_sampler(
    variant, browser, variant_exports, variant_pages, tmp_path
):
    """The fp32 tests above, on the page of each variant: the grid against Sampler.run on the same
    noise and temperature, the raw output against ONNX Runtime in Python, an attribute toggled, the
    temperature control, a dropped photo edited."""
    facts = VARIANTS[variant][1]
    sampler = Sampler(variant_exports[variant], device="cpu")
    opened = browser("open", url=variant_pages[variant])
    assert opened["errors"] == [], opened["errors"]
    model = browser.eval("cvae.model")
    shown = {key: model[key] for key in ("output", "temperature_input")}
    assert {"precision": model["decoder"]["metadata"]["precision"], **shown} == facts
    source = VARIANTS[variant][0]  # an int8 file edits with the encoder of the fp32 file it was quantized from
    assert model["encoder"]["file"] == f"{source if isinstance(source, str) else f'digits-{variant}'}-encoder.onnx"
    info = browser.eval("document.querySelector('#model-info').textContent")
    assert facts["precision"] in info, info  # the page says which file it runs
    assert ("uint8 output" in info) == (facts["output"] == "uint8_nhwc"), info
    assert ("temperature input" in info) == facts["temperature_input"], info
    size = sampler.image_size

    # the grid, on given noise at temperature 0.7: the graph's own input, or the noise scaled
    threes, noise, expected = show_threes(browser, sampler, seed=1)
    got = grid_tiles(browser, 5, size)
    assert levels_apart(got, as_pixels(expected)) <= LEVELS
    raw = browser.eval(
        f"cvae.run({{attributes: {json.dumps(threes.tolist())}, noise: {json.dumps(noise.tolist())}, temperature: 0.7}})"
    )
    if facts["output"] == "uint8_nhwc":
        assert levels_apart(np.asarray(raw).reshape(expected.shape), expected) <= LEVELS
    else:
        error = float(np.abs(np.asarray(raw, np.float32).reshape(expected.shape) - expected).max())
        assert error < RAW_TOLERANCE, f"{variant}: raw float output {error:.2e} from ONNX Runtime in Python"

    # another attribute: another grid, the Sampler's
    browser("uncheck", selector="input[name=digit_3]")
    browser("check", selector="input[name=digit_7]")
    sevens = grid_tiles(browser, 5, size)
    changed = np.abs(got.astype(int) - sevens.astype(int)) > 8
    assert changed.mean() > 0.05, f"only {changed.mean():.1%} of the pixels changed"
    sevens_attributes = np.repeat(one_hot(sampler, "digit_7")[None], 5, axis=0)
    assert levels_apart(sevens, as_pixels(sampler.run(sevens_attributes, noise, temperature=0.7))) <= LEVELS

    # the temperature: 0 is the prior mean (one image for every noise), 2 the Sampler's at 2
    set_range(browser, "#temperature", 0)
    flat = grid_tiles(browser, 5, size)
    assert browser.eval("cvae.state().temperature") == 0
    assert all(np.array_equal(tile, flat[0]) for tile in flat)
    assert levels_apart(flat, as_pixels(sampler.run(sevens_attributes, noise, temperature=0))) <= LEVELS
    set_range(browser, "#temperature", 2)
    hot = grid_tiles(browser, 5, size)
    assert levels_apart(hot, as_pixels(sampler.run(sevens_attributes, noise, temperature=2))) <= LEVELS
    assert not np.array_equal(hot, sevens)
    browser("uncheck", selector="input[name=digit_7]")
    set_range(browser, "#temperature", 1)

    edit_a_dropped_photo(browser, sampler, tmp_path, LEVELS)


# WebGPU without a GPU: Chromium's SwiftShader adapter (Vulkan on the CPU), as a browser whose GPU
# lacks 'shader-f16' (SwiftShader has none), where the page must not open an fp16 export on WebGPU.
WEBGPU_ARGS = ("--enable-unsafe-webgpu", "--enable-unsafe-swiftshader")


@pytest.fixture(scope="module")
def webgpu_browser():
    if MISSING:
        pytest.skip(f"browser test: {MISSING}")
    driver = Driver(WEBGPU_ARGS)
    yield driver
    driver.close()


@needs_browser
# SwiftShader compiles every kernel on the CPU (~10 s a page): fp32, fp16 (the fallback) and the
# int8 file with uint8 output and a temperature input (the other variants' graphs are parts of these)
@pytest.mark.parametrize("variant", ["fp32", "fp16", "uint8-temperature-int8"])
def test_on_webgpu_every_variant_runs_there_or_on_wasm_and_matches_the_python_sampler(
    variant, webgpu_browser, request
):
    """The page chooses WebGPU where the browser gives an adapter. An fp16 export on an adapter
    without 'shader-f16' opened there and failed at its first run (the page showed only an error);
    now it runs on wasm. The others run on WebGPU, their grids within LEVELS of the Sampler."""
    if variant == "fp32":
        path, address = request.getfixturevalue("digits_export"), url(request.getfixturevalue("server"))
    else:
        path, address = (request.getfixturevalue(name)[variant] for name in ("variant_exports", "variant_pages"))
    opened = webgpu_browser("open", url=address)
    adapter = webgpu_browser.eval(
        "(async () => { const a = navigator.gpu && await navigator.gpu.requestAdapter();"
        " return a && {f16: a.features.has('shader-f16')}; })()"
    )
    if adapter is None:
        pytest.skip(f"this Chromium gives no WebGPU adapter with {' '.join(WEBGPU_ARGS)}")
    assert opened["errors"] == [], opened["errors"]
    fp16 = variant.startswith("fp16")
    assert opened["backend"] == ("wasm" if fp16 and not adapter["f16"] else "webgpu")
    assert webgpu_browser.eval("document.querySelector('#backend').textContent") == opened["backend"]
    sampler = Sampler(path, device="cpu")
    _, _, output = show_threes(webgpu_browser, sampler, seed=2)
    expected = as_pixels(output)
    assert levels_apart(grid_tiles(webgpu_browser, 5, sampler.image_size), expected) <= LEVELS


# --- many attributes (CUB-sized) -------------------------------------------------------------------------

# 200 + 312 = 512 names, as CUB's --condition both
CUB_LIKE = [f"{i + 1:03d}.Species_{i + 1}" for i in range(200)] + [
    f"has_{part}::value_{k}"
    for part in ("bill_shape", "wing_color", "upperparts_color", "breast_pattern")
    for k in range(78)
]


@pytest.fixture(scope="module")
def many_page(tmp_path_factory, browser):
    """A tiny untrained 8x8 model with CUB's 512-way condition, exported by the real exporter."""
    import torch

    from toolkit.export import export_onnx
    from toolkit.model import CVAE, ModelSpec, save_model

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("many") / "run"
    save_model(CVAE(ModelSpec(attributes=list(CUB_LIKE), image_size=(8, 8), latent_dim=4)), run_dir)
    path, _ = export_onnx(run_dir, run_dir.parent / "cub-like.onnx")
    server = serve(build_page(path, run_dir.parent / "page"), 0)
    yield path, url(server)
    server.shutdown()
    server.server_close()


@needs_browser
def test_many_attributes_get_a_filter_and_groups(browser, many_page):
    path, address = many_page
    assert browser("open", url=address)["errors"] == []
    groups = browser.eval(
        "[...document.querySelectorAll('#attributes .group')].map((g) => [g.dataset.group, g.querySelectorAll('.toggle').length])"
    )
    assert groups == [
        ["classes", 200],
        ["has_bill_shape", 78],
        ["has_wing_color", 78],
        ["has_upperparts_color", 78],
        ["has_breast_pattern", 78],
    ]
    assert browser("visible", selector="#filter") == 1
    assert browser("visible", selector="#attributes .toggle") == 0  # groups start closed
    browser("fill", selector="#filter", value="wing_color::value_1")  # value_1, value_10..19
    assert browser("visible", selector="#attributes .toggle") == 11
    assert browser("visible", selector="#attributes .group") == 1
    browser("check", selector="input[name='has_wing_color::value_12']")
    browser.eval("cvae.idle()")
    assert browser.eval("document.querySelector('.group[data-group=has_wing_color] .count').textContent") == "1/78"
    state = browser.eval("cvae.state()")
    assert [i for i, v in enumerate(state["attributes"]) if v] == [CUB_LIKE.index("has_wing_color::value_12")]
    sampler = Sampler(path, device="cpu")
    noise = np.asarray(state["noise"], np.float32).reshape(state["count"], -1)
    expected = to_uint8(
        sampler.run(np.repeat(np.asarray(state["attributes"], np.float32)[None], len(noise), axis=0), noise)
    )
    assert np.abs(grid_tiles(browser, len(noise), (8, 8)).astype(int) - expected.astype(int)).max() <= 1
    browser("fill", selector="#filter", value="")
    assert browser("visible", selector="#attributes .group") == 5


@needs_ort_web
def test_a_stale_encoder_beside_the_export_is_refused(digits_export, tmp_path):
    """An encoder of other weights (the decoder was exported again without --encoder) would edit with the wrong z."""
    import onnx

    proto = onnx.load(str(digits_export))
    for entry in proto.metadata_props:
        if entry.key == "weights_sha256":
            entry.value = "0" * 64  # as if from other weights
    onnx.save(proto, str(tmp_path / "digits.onnx"))
    shutil.copyfile(digits_export.with_name("digits-encoder.onnx"), tmp_path / "digits-encoder.onnx")
    with pytest.raises(UserError, match="is not the encoder of"):
        build_page(tmp_path / "digits.onnx", tmp_path / "page")
    assert not (tmp_path / "page").exists()


def fake_dist(folder: Path) -> Path:
    """A dist/ with the files the page copies (their bytes do not matter to the build)."""
    folder.mkdir(parents=True)
    for name in web_build.ORT_FILES:
        (folder / name).write_text("// stand-in\n")
    return folder


def test_a_folder_of_the_users_own_files_is_never_overwritten(digits_export, tmp_path):
    """`--out site` holding the user's index.html used to be replaced silently, style.css, app.js too."""
    dist = fake_dist(tmp_path / "dist")
    site = tmp_path / "site"
    (site / "ort").mkdir(parents=True)
    (site / "index.html").write_text("<h1>my homepage</h1>")
    (site / "ort" / "ort.webgpu.min.mjs").write_text("mine")
    with pytest.raises(
        UserError, match="--out .*site holds files that cvae-tk did not write there \\(index.html, ort/"
    ):
        build_page(digits_export, site, ort_dist=dist)
    assert sorted(p.relative_to(site).as_posix() for p in site.rglob("*")) == [
        "index.html",
        "ort",
        "ort/ort.webgpu.min.mjs",
    ]
    assert (site / "index.html").read_text() == "<h1>my homepage</h1>"

    notes = tmp_path / "notes"  # other files of the user's, under names the page does not use, stay beside it
    notes.mkdir()
    (notes / "README.txt").write_text("mine")
    build_page(digits_export, notes, ort_dist=dist)
    assert (notes / "README.txt").read_text() == "mine" and (notes / "model.json").is_file()


def test_an_earlier_page_is_rebuilt_also_one_killed_halfway_or_built_before_the_owner_file(digits_export, tmp_path):
    dist = fake_dist(tmp_path / "dist")
    out = build_page(digits_export, tmp_path / "page", ort_dist=dist)
    assert (out / web_build.OWNER).is_file()
    (out / "model.json").unlink()  # a rebuild killed halfway: model.json goes first, comes back last
    build_page(digits_export, out, ort_dist=dist)
    (out / web_build.OWNER).unlink()  # a page written before the owner file: its model.json tells
    build_page(digits_export, out, ort_dist=dist)
    assert json.loads((out / "model.json").read_text())["format"] == web_build.FORMAT


# --- serving: only the page, on a port checked first ----------------------------------------------


def _status(server, path: str, method: str = "GET") -> int:
    request = urllib.request.Request(url(server).rstrip("/") + path, method=method)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_server_answers_only_the_pages_own_files(tiny_onnx, tmp_path, capfd):
    """`--serve` was SimpleHTTPRequestHandler over the whole folder: the user's other files beside the
    page, folder listings, and links inside it leading anywhere (a home folder) were all served. Now
    only the page's files (index.html, app.js, style.css, model.json, ort/..., the models model.json
    names), and not through a link that leads out of the folder; `..` and its encodings never left it."""
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    out = build_page(tiny_onnx, tmp_path / "page", ort_dist=fake_dist(tmp_path / "dist"))
    (out / "notes.txt").write_text("mine")
    shutil.copyfile(tiny_onnx, out / "other.onnx")  # an .onnx file model.json does not name
    (out / "home").symlink_to(outside)
    (out / "ort" / "secret.txt").symlink_to(outside / "secret.txt")
    (out / "style.css").unlink()
    (out / "style.css").symlink_to(outside / "secret.txt")  # a page file that leads out
    server = serve(out, 0)
    served = ("/", "/index.html", "/index.html?v=2", "/app.js", "/model.json", "/tiny.onnx", "/ort/ort.webgpu.min.mjs")
    refused = (
        "/notes.txt",
        "/other.onnx",
        "/home/secret.txt",
        "/home/",
        "/ort/",
        "/ort/secret.txt",
        "/style.css",
        "/.cvae-tk-web",
        "/../private/secret.txt",
        "/%2e%2e/private/secret.txt",
        "/%2E%2E%2Fprivate%2Fsecret.txt",
        "/index.html/",
    )
    try:
        for status, paths in ((200, served), (404, refused)):
            for path in paths:
                assert _status(server, path) == status, path
                assert _status(server, path, "HEAD") == status, path
        assert _status(server, "/", "OPTIONS") == 501 and _status(server, "/index.html", "POST") == 501
    finally:
        server.shutdown()
        server.server_close()
    assert "warning: not serving style.css: it leads out of the page's folder" in capfd.readouterr().err


def test_serve_takes_its_port_before_the_page_is_built_and_stops_cleanly_on_ctrl_c(tiny_onnx, tmp_path):
    """A port in use (or below 1024 without root) was found after the page was built; --port without
    --serve did nothing, silently. Both are one line before anything is written. Ctrl-C stops a
    serving `cvae-tk web` with exit 0 and no traceback."""
    import signal
    import socket

    dist = fake_dist(tmp_path / "dist")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "toolkit.cli", "web", str(tiny_onnx), "--ort-dist", str(dist), "--out"]
    run = lambda *args: subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )  # noqa: E731
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run(tmp_path / "page", "--serve", "--port", taken.getsockname()[1])
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1, busy.stderr
    assert "Address already in use; choose another --port" in busy.stderr and not (tmp_path / "page").exists()
    idle = run(tmp_path / "page", "--port", 9000)
    assert idle.returncode == 2 and "--port 9000 does nothing without --serve" in idle.stderr
    assert not (tmp_path / "page").exists()

    serving = subprocess.Popen(
        [*command, str(tmp_path / "page"), "--serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )
    try:
        lines = [serving.stdout.readline(), serving.stdout.readline()]
        assert lines[1].startswith(f"serving {tmp_path / 'page'} at http://127.0.0.1:"), lines
        with urllib.request.urlopen(lines[1].split(" at ")[1].split(" ")[0] + "model.json") as response:
            assert json.loads(response.read())["name"] == "tiny"
        serving.send_signal(signal.SIGINT)
        out, err = serving.communicate(timeout=30)
    finally:
        serving.kill()
    assert serving.returncode == 0 and err == "", err


def test_a_privileged_port_is_named_as_such(tmp_path, monkeypatch):
    """As a user who is not root (this runs as root: the refusal is the kernel's, injected here)."""
    import errno

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(web_build, "ThreadingHTTPServer", refused)
    with pytest.raises(
        UserError, match=r"cannot serve on 127.0.0.1:80: Permission denied \(ports below 1024 need root\)"
    ):
        web_build.bind(tmp_path, 80)


def test_an_export_whose_name_is_a_page_file_is_refused(tiny_onnx, tmp_path):
    """The export is copied into the page under its own name: one named index.html replaced the page
    with the model (exit 0); model.json, app.js, ort alike. Only NAME.onnx is taken."""
    dist = fake_dist(tmp_path / "dist")
    for name in ("index.html", "app.js", "ort", "tiny", ".onnx"):
        shutil.copyfile(tiny_onnx, tmp_path / name)
        with pytest.raises(UserError, match=r"expected an export whose name ends in .onnx"):
            build_page(tmp_path / name, tmp_path / "page", ort_dist=dist)
    assert not (tmp_path / "page").exists()


def test_a_second_build_into_one_folder_is_refused_while_the_first_writes(tiny_onnx, tmp_path):
    """Two builds at once could leave model.json naming a model the other removed, or pair one's
    decoder with the other's encoder: the second is refused, as a second shard build is."""
    from toolkit.ownership import FolderLock

    dist = fake_dist(tmp_path / "dist")
    out = build_page(tiny_onnx, tmp_path / "page", ort_dist=dist)
    with FolderLock(out, "page build", "--out", "model files"):  # the first build, still writing
        with pytest.raises(UserError, match=r"another page build \(pid \d+ on this machine\) is writing --out"):
            build_page(tiny_onnx, out, ort_dist=dist)
    build_page(tiny_onnx, out, ort_dist=dist)
    assert not (out / ".lock").exists()
