"""Issue 11, item 2: images come out as a person sees them in an image viewer.

Each test writes real files of one kind (EXIF-rotated, transparent, 16-bit, float, CMYK, with a
colour profile, animated, in every container Pillow writes), then compares what the toolkit keeps
(the pixels of a real shard built by `build_shards`, read back with the shard reader's decoder, and
`edit.load_image`, which `edit` and `interpolate` use) with what a viewer shows, computed here
independently with numpy. Shards re-encode as JPEG (lossy): they are compared by the mean colour
of each quadrant's interior; lossless paths pixel by pixel.
"""

import gc
import io
import os
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from toolkit.data.build import ImageSpec, build_shards
from toolkit.data.sources import Record, SourceTable
from toolkit.data.stream import decode
from toolkit.edit import load_image
from toolkit.errors import UserError
from toolkit.images import original_bytes

RED, GREEN, BLUE, YELLOW = (200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 200, 40)


@pytest.fixture(autouse=True)
def every_file_is_closed():
    """Every image file the toolkit opens here it also closes, on every way out: a multi-frame file
    keeps its handle after decoding, a damaged one raises with it open. Left to the garbage
    collector, a handle shows as a ResourceWarning (on another interpreter it may stay open)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


def scene(size=32) -> np.ndarray:
    """Four distinct quadrants: every one of the 8 orientations gives a different picture."""
    a = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    a[:h, :h], a[:h, h:], a[h:, :h], a[h:, h:] = RED, GREEN, BLUE, YELLOW
    return a


def quadrants(a: np.ndarray) -> np.ndarray:
    """Mean colour of the middle of each quadrant [4, 3]: robust to JPEG ringing at the edges."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    qh, qw = h // 4, w // 4
    blocks = [a[y + qh : y + h - qh, x + qw : x + w - qw] for y in (0, h) for x in (0, w)]
    return np.array([b.reshape(-1, a.shape[2]).mean(0) for b in blocks])


def assert_looks_like(stored: np.ndarray, expected: np.ndarray, tolerance: float = 8):
    assert stored.shape == expected.shape
    assert np.abs(quadrants(stored.astype(float)) - quadrants(expected.astype(float))).max() <= tolerance


def shown_upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for pixels stored with an EXIF orientation (the tag says where the stored
    row 0 / column 0 are: 6 = row 0 on the right, so the picture is turned 90 degrees clockwise)."""
    return {
        1: lambda: a,
        2: lambda: a[:, ::-1],  # mirrored left-right
        3: lambda: a[::-1, ::-1],  # turned 180
        4: lambda: a[::-1],  # mirrored top-bottom
        5: lambda: a.transpose(1, 0, 2),  # row 0 on the left, column 0 at the top
        6: lambda: np.rot90(a, -1),  # turned 90 clockwise
        7: lambda: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 on the right, column 0 at the bottom
        8: lambda: np.rot90(a, 1),  # turned 90 anticlockwise
    }[orientation]()


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A transparent pixel as a browser shows it on its default white page."""
    a = alpha.astype(float)[..., None] / 255
    return np.rint(rgb.astype(float) * a + 255 * (1 - a)).astype(np.uint8)


def png_bytes(pixels: np.ndarray, bit_depth: int, colour_type: int, declared=None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): colour type 0 grey, 2 RGB; `declared`
    (W, H): the size the header claims, whatever the data holds."""
    h, w = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", *(declared or (w, h)), bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def build(tmp_path, paths: dict, size="32") -> dict:
    """Build real shards of `paths` ({key: file}) and read every stored image back as the shard
    reader decodes it: {key: uint8 [H, W, 3]}."""
    records = [Record(key, path, np.array([i % 2], np.uint8)) for i, (key, path) in enumerate(paths.items())]
    out = tmp_path / "shards"
    build_shards(
        SourceTable("viewer", ["a"], {"train": records}), out, ImageSpec.parse(size), workers=1, progress=False
    )
    members: dict = {}
    for tar_path in sorted((out / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                members.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
    return {
        key: (decode(sample)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        for key, sample in members.items()
    }


# --- orientation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_every_exif_orientation_is_shown_upright(tmp_path, fmt):
    pixels = scene()
    paths = {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        extra = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        Image.fromarray(pixels).save(path, format=fmt, exif=exif, **extra)
        paths[f"o{orientation}"] = path
    stored = build(tmp_path, paths)
    for orientation, path in enumerate(paths.values(), 1):
        expected = shown_upright(pixels, orientation)
        assert_looks_like(stored[f"o{orientation}"], expected)
        loaded = np.asarray(load_image(path))
        if fmt == "JPEG":
            assert_looks_like(loaded, expected)
        else:
            assert np.array_equal(loaded, expected), orientation


def test_a_rotated_photo_keeps_its_shown_shape_and_a_broken_exif_is_ignored(tmp_path):
    tall = np.zeros((48, 32, 3), np.uint8)
    tall[:24], tall[24:] = RED, BLUE  # stored: red above blue, 32 wide
    exif = Image.Exif()
    exif[0x0112] = 8  # shown turned anticlockwise: red left of blue, 48 wide
    Image.fromarray(tall).save(tmp_path / "turned.png", exif=exif)
    assert np.array_equal(np.asarray(load_image(tmp_path / "turned.png")), np.rot90(tall, 1))
    for name, value in (("zero", 0), ("nine", 9)):  # values outside 1..8 mean nothing: shown as stored
        exif[0x0112] = value
        Image.fromarray(tall).save(tmp_path / f"{name}.png", exif=exif)
        assert np.array_equal(np.asarray(load_image(tmp_path / f"{name}.png")), tall)
    Image.fromarray(tall).save(tmp_path / "garbage.png", exif=b"Exif\x00\x00MM\x00*garbage")
    assert np.array_equal(np.asarray(load_image(tmp_path / "garbage.png")), tall)
    stored = build(tmp_path, {"turned": tmp_path / "turned.png"}, size="32x48")
    assert_looks_like(stored["turned"], np.rot90(tall, 1))


# --- transparency -------------------------------------------------------------------------------------


def test_transparency_is_shown_on_white(tmp_path):
    pixels = scene()
    alpha = np.zeros((32, 32), np.uint8)
    alpha[:, 8:16], alpha[:, 16:24], alpha[:, 24:] = 90, 180, 255  # columns: clear, faint, half, opaque
    rgba = np.dstack([pixels, alpha])
    expected_rgba = on_white(pixels, alpha)
    files = {}
    for fmt, extra in (("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("TGA", {})):
        files[f"rgba_{fmt.lower()}"] = (fmt, Image.fromarray(rgba, "RGBA"), extra, expected_rgba)
    grey = np.full((32, 32), 60, np.uint8)
    files["la_png"] = (
        "PNG",
        Image.fromarray(np.dstack([grey, alpha]), "LA"),
        {},
        on_white(np.dstack([grey] * 3), alpha),
    )
    # A palette with one fully transparent entry (tRNS), as GIF and PNG icons have; the colour under it is black.
    palette = Image.fromarray(np.where(np.arange(32)[None, :] < 16, 0, 1).astype(np.uint8).repeat(32, 0), "P")
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    half_white = np.zeros((32, 32, 3), np.uint8)
    half_white[:, :16], half_white[:, 16:] = 255, RED
    files["p_png"] = ("PNG", palette, {"transparency": 0}, half_white)
    files["p_gif"] = ("GIF", palette, {"transparency": 0}, half_white)
    # Partial alpha per palette entry (tRNS with several values)
    files["p_alpha_png"] = (
        "PNG",
        palette,
        {"transparency": bytes([255, 128])},
        np.where(np.arange(32)[None, :, None] < 16, 0, on_white(np.array([[RED]], np.uint8), np.array([[128]])))
        .astype(np.uint8)
        .repeat(32, 0),
    )
    # tRNS on RGB and grey: one colour is transparent
    files["rgb_trns_png"] = (
        "PNG",
        Image.fromarray(pixels),
        {"transparency": RED},
        np.where((pixels == RED).all(-1, keepdims=True), 255, pixels).astype(np.uint8),
    )
    files["l_trns_png"] = ("PNG", Image.fromarray(grey), {"transparency": 60}, np.full((32, 32, 3), 255, np.uint8))
    paths = {}
    for key, (fmt, image, extra, _) in files.items():
        paths[key] = tmp_path / f"{key}.{fmt.lower()}"
        image.save(paths[key], format=fmt, **extra)
    stored = build(tmp_path, paths)
    for key, (_, _, _, expected) in files.items():
        loaded = np.asarray(load_image(paths[key]))
        assert np.abs(loaded.astype(int) - expected).max() <= 1, key
        assert np.abs(stored[key].astype(float).mean((0, 1)) - expected.astype(float).mean((0, 1))).max() <= 3, key


# --- deep, float and CMYK pixels ------------------------------------------------------------------------


def test_16_bit_and_float_pixels_are_scaled_not_clipped(tmp_path):
    ramp16 = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    shown16 = np.rint(ramp16 / 257).astype(np.uint8)
    rgb48 = np.dstack([ramp16, ramp16[::-1], np.full_like(ramp16, 30000)])
    (tmp_path / "grey16.png").write_bytes(png_bytes(ramp16, 16, 0))
    (tmp_path / "rgb48.png").write_bytes(png_bytes(rgb48, 16, 2))
    Image.fromarray(ramp16).save(tmp_path / "grey16.tiff")  # I;16
    Image.fromarray(ramp16.astype(">u2")).save(tmp_path / "grey16b.tiff")  # I;16B
    (tmp_path / "grey16.pgm").write_bytes(b"P5 32 32 65535\n" + ramp16.astype(">u2").tobytes())  # opens as I
    ramp_f = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    Image.fromarray(ramp_f).save(tmp_path / "float.tiff")  # F, 0..1 as float TIFFs hold it
    expected = {
        "grey16.png": np.dstack([shown16] * 3),
        "grey16.tiff": np.dstack([shown16] * 3),
        "grey16b.tiff": np.dstack([shown16] * 3),
        "grey16.pgm": np.dstack([shown16] * 3),
        "rgb48.png": (rgb48 >> 8).astype(np.uint8),  # Pillow keeps the high byte: within one level of /257
        "float.tiff": np.dstack([np.rint(ramp_f * 255).astype(np.uint8)] * 3),
    }
    for name, shown in expected.items():
        assert np.abs(np.asarray(load_image(tmp_path / name)).astype(int) - shown).max() <= 1, name
    stored = build(tmp_path, {name.replace(".", "_"): tmp_path / name for name in expected})
    for name, shown in expected.items():  # a smooth ramp: JPEG keeps it within a few levels
        assert np.abs(stored[name.replace(".", "_")].astype(int) - shown).mean() <= 3, name


def _without_adobe_marker(jpeg: bytes) -> bytes:
    """The same JPEG without its APP14 'Adobe' segment (as some non-Adobe encoders write CMYK)."""
    at = jpeg.index(b"\xff\xee")
    length = struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
    return jpeg[:at] + jpeg[at + 2 + length :]


def test_cmyk_is_read_as_photoshop_and_browsers_read_it(tmp_path):
    inks = np.zeros((32, 32, 4), np.uint8)
    h = 16
    inks[:h, :h, 0] = 255  # cyan
    inks[:h, h:, 1] = 255  # magenta
    inks[h:, :h, 2] = 255  # yellow
    inks[h:, h:, 3] = 255  # black
    shown = np.zeros((32, 32, 3), np.uint8)
    shown[:h, :h], shown[:h, h:], shown[h:, :h], shown[h:, h:] = (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)
    buffer = io.BytesIO()
    # inverted, with the Adobe marker, as Photoshop
    Image.fromarray(inks, "CMYK").save(buffer, format="JPEG", quality=95)
    (tmp_path / "adobe.jpg").write_bytes(buffer.getvalue())
    # Without the marker a CMYK JPEG holds the inks as they are: Pillow writes 255 - values inverted,
    # i.e. the inks themselves; the marker removed, a viewer reads them as inks.
    buffer = io.BytesIO()
    Image.fromarray(255 - inks, "CMYK").save(buffer, format="JPEG", quality=95)
    (tmp_path / "plain.jpg").write_bytes(_without_adobe_marker(buffer.getvalue()))
    Image.fromarray(inks, "CMYK").save(tmp_path / "cmyk.tiff")
    expected = {"adobe.jpg": shown, "plain.jpg": shown, "cmyk.tiff": shown}
    for name, want in expected.items():
        assert_looks_like(np.asarray(load_image(tmp_path / name)), want, tolerance=10)
    stored = build(tmp_path, {name.replace(".", "_"): tmp_path / name for name in expected})
    for name, want in expected.items():
        assert_looks_like(stored[name.replace(".", "_")], want, tolerance=10)


# --- colour profiles ------------------------------------------------------------------------------------


def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _tags(icc: bytes) -> dict:
    count = struct.unpack(">I", icc[128:132])[0]
    entries = (struct.unpack(">4sII", icc[132 + 12 * i : 144 + 12 * i]) for i in range(count))
    return {sig: (offset, size) for sig, offset, size in entries}


def _with_colorants(icc: bytes, colorants: dict) -> bytes:
    """A matrix profile with other primaries: each XYZType tag (rXYZ, gXYZ, bXYZ) rewritten."""
    data = bytearray(icc)
    tags = _tags(icc)
    for sig, xyz in colorants.items():
        offset = tags[sig][0]
        data[offset + 8 : offset + 20] = struct.pack(">3i", *(round(v * 65536) for v in xyz))
    data[84:100] = bytes(16)  # the profile ID (an MD5) no longer holds: zero means "not computed"
    return bytes(data)


def _colorants(icc: bytes) -> np.ndarray:
    tags = _tags(icc)
    # columns: the primaries in D50 XYZ
    return np.array(
        [
            [v / 65536 for v in struct.unpack(">3i", icc[tags[s][0] + 8 : tags[s][0] + 20])]
            for s in (b"rXYZ", b"gXYZ", b"bXYZ")
        ]
    ).T


def _decode_srgb(v):
    v = v / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _encode_srgb(v):
    v = np.clip(v, 0, 1)
    return np.rint(np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055) * 255)


def test_colour_profiles_are_converted_to_srgb(tmp_path):
    srgb = _srgb_profile()
    tags = _tags(srgb)
    # A profile whose red and green primaries are swapped: unmistakable proof that it is applied.
    swapped = _with_colorants(srgb, {b"rXYZ": _colorants(srgb)[:, 1], b"gXYZ": _colorants(srgb)[:, 0]})
    # Display P3 (iPhone photos): Apple's D50 colorants, the sRGB tone curve.
    p3_primaries = {
        b"rXYZ": (0.515102, 0.241182, -0.001050),
        b"gXYZ": (0.291965, 0.692236, 0.041882),
        b"bXYZ": (0.157153, 0.066574, 0.784378),
    }
    display_p3 = _with_colorants(srgb, p3_primaries)
    assert tags[b"rXYZ"] != tags[b"gXYZ"]
    pixels = scene()
    p3_matrix = np.array([p3_primaries[s] for s in (b"rXYZ", b"gXYZ", b"bXYZ")]).T
    to_srgb = np.linalg.inv(_colorants(srgb)) @ p3_matrix
    p3_shown = _encode_srgb(_decode_srgb(pixels.astype(float)) @ to_srgb.T).astype(np.uint8)
    cases = {
        "swapped.png": ("PNG", swapped, pixels[..., [1, 0, 2]]),
        "swapped.jpg": ("JPEG", swapped, pixels[..., [1, 0, 2]]),
        "p3.jpg": ("JPEG", display_p3, p3_shown),
        "p3.png": ("PNG", display_p3, p3_shown),
        "p3.webp": ("WEBP", display_p3, p3_shown),
        "srgb.png": ("PNG", srgb, pixels),  # an sRGB profile changes nothing
        # a profile that does not parse: ignored, as viewers do
        "broken.png": (
            "PNG",
            b"not a profile at all" * 10,
            pixels,
        ),
    }
    assert np.abs(p3_shown.astype(int) - pixels).max() > 20  # P3 differs visibly from reading the values as sRGB
    for name, (fmt, icc, _) in cases.items():
        extra = {"quality": 97} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        Image.fromarray(pixels).save(tmp_path / name, format=fmt, icc_profile=icc, **extra)
    for name, (fmt, _, want) in cases.items():
        loaded = np.asarray(load_image(tmp_path / name))
        if fmt == "JPEG":
            assert_looks_like(loaded, want, tolerance=4)
        else:
            assert np.abs(loaded.astype(int) - want).max() <= 2, name
    stored = build(tmp_path, {name.replace(".", "_"): tmp_path / name for name in cases})
    for name, (_, _, want) in cases.items():
        assert_looks_like(stored[name.replace(".", "_")], want, tolerance=6)


# --- modes, containers, frames ----------------------------------------------------------------------------


def test_every_container_and_plain_mode(tmp_path):
    pixels = scene()
    grey = pixels.mean(-1).astype(np.uint8)
    bits = (np.indices((32, 32)).sum(0) % 2).astype(bool)
    lab = Image.new("LAB", (32, 32), (0, 128, 128))  # L* = 0, a* = b* = 0: black
    lab.paste((255, 128, 128), (0, 0, 32, 16))  # above L* = 100: white
    cases = {
        "rgb.bmp": (Image.fromarray(pixels), {}, pixels),
        "rgb.ppm": (Image.fromarray(pixels), {}, pixels),
        "grey.pgm": (Image.fromarray(grey), {}, np.dstack([grey] * 3)),
        "rgb.qoi": (Image.fromarray(pixels), {}, pixels),
        "rgb.tga": (Image.fromarray(pixels), {}, pixels),
        "rgb.ico": (Image.fromarray(pixels), {"sizes": [(32, 32)]}, pixels),
        "rgb.webp": (Image.fromarray(pixels), {"lossless": True}, pixels),
        "grey.png": (Image.fromarray(grey), {}, np.dstack([grey] * 3)),
        "bits.png": (Image.fromarray(bits), {}, np.dstack([bits * 255] * 3).astype(np.uint8)),
        "palette.png": (Image.fromarray(pixels).quantize(8), {}, pixels),
        "ycbcr.tiff": (Image.fromarray(pixels).convert("YCbCr"), {}, pixels),
        "lab.tiff": (
            lab,
            {},
            np.where(np.arange(32)[:, None, None] < 16, 255, 0).repeat(32, 1).repeat(3, 2).astype(np.uint8),
        ),
    }
    for name, (image, extra, _) in cases.items():
        image.save(tmp_path / name, **extra)
    for name, (_, _, want) in cases.items():
        tolerance = 3 if name.startswith(("ycbcr", "lab")) else 0  # colour-space round trips
        assert np.abs(np.asarray(load_image(tmp_path / name)).astype(int) - want).max() <= tolerance, name
    stored = build(tmp_path, {name.replace(".", "_"): tmp_path / name for name in cases})
    for name, (_, _, want) in cases.items():
        if name != "bits.png":  # a checkerboard: JPEG smears it; the lossless path checks it above
            assert_looks_like(stored[name.replace(".", "_")], want)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animations_and_multi_page_files_show_their_first_frame(tmp_path, fmt):
    pixels = scene()
    first, second = Image.fromarray(pixels), Image.fromarray(255 - pixels)
    path = tmp_path / f"animated.{fmt.lower()}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    first.save(path, format=fmt, save_all=True, append_images=[second], **extra)
    with Image.open(path) as check:
        assert check.n_frames == 2
    loaded = np.asarray(load_image(path))
    assert np.abs(loaded.astype(int) - pixels).max() <= (12 if fmt == "GIF" else 0)  # GIF: a 256-colour palette
    assert_looks_like(build(tmp_path, {"animated": path})["animated"], pixels)


# --- unreadable files: one line naming the file, never a hang -----------------------------------------------


def test_unreadable_files_are_one_line_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(scene()).save(good)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:-40])
    # A header that declares 60000 x 60000 pixels (a decompression bomb) over a few bytes of data
    (tmp_path / "bomb.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8), 8, 0, declared=(60000, 60000)))
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")  # an interrupted copy: was 'cannot identify the image format'
    os.mkfifo(tmp_path / "pipe.png")  # opening it to read would wait for a writer forever
    (tmp_path / "folder.png").mkdir()
    reasons = {
        "cut.jpg": "truncated",
        "cut.png": "",
        "bomb.png": "decompression bomb",
        "notes.png": "cannot identify",
        "empty.jpg": "empty file (0 bytes), expected an image file",
        "pipe.png": "not a regular file (a FIFO)",
    }
    for name, reason in reasons.items():
        with pytest.raises(UserError) as caught:
            load_image(tmp_path / name)
        message = str(caught.value)
        assert "\n" not in message and str(tmp_path / name) in message and reason in message, message
    with pytest.raises(UserError, match=r"folder.png is not an image file \(it is a folder\)"):
        load_image(tmp_path / "folder.png")
    paths = {"good": good, **{name.replace(".", "_"): tmp_path / name for name in reasons}}
    records = [Record(key, path, np.array([1], np.uint8)) for key, path in paths.items()]
    manifests = build_shards(
        SourceTable("bad", ["a"], {"train": records}),
        tmp_path / "out",
        ImageSpec.parse("32"),
        workers=1,
        progress=False,
    )
    skipped = {s["key"]: s["reason"] for s in manifests["train"]["skipped"]["samples"]}
    assert manifests["train"]["count"] == 1 and set(skipped) == set(paths) - {"good"}
    for name, reason in reasons.items():
        text = skipped[name.replace(".", "_")]
        assert text.startswith(f"{name}: ") and reason in text and "\n" not in text, text


# --- --size original: the bytes are kept only where a plain decoder shows them as a viewer does ------------------


def _jpeg(pixels, **extra) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, **extra)
    return buffer.getvalue()


def test_original_bytes_are_kept_only_where_they_show_as_stored(tmp_path):
    tall = np.zeros((48, 32, 3), np.uint8)
    tall[:24], tall[24:] = RED, BLUE
    (tmp_path / "plain.jpg").write_bytes(_jpeg(tall))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "turned.jpg").write_bytes(_jpeg(tall, exif=exif))
    rgba = np.dstack([tall, np.full((48, 32), 0, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(tall).save(tmp_path / "srgb.png", icc_profile=_srgb_profile())
    Image.fromarray(tall).save(tmp_path / "pic.gif")

    data, ext, size = original_bytes(tmp_path / "plain.jpg")
    assert (data, ext, size) == ((tmp_path / "plain.jpg").read_bytes(), "jpg", (48, 32))
    data, ext, size = original_bytes(tmp_path / "srgb.png")  # an sRGB profile changes no pixel: kept
    assert data == (tmp_path / "srgb.png").read_bytes()
    data, ext, size = original_bytes(tmp_path / "turned.jpg")
    assert ext == "jpg" and size == (32, 48)
    assert_looks_like(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.rot90(tall, -1))
    data, ext, size = original_bytes(tmp_path / "clear.png")
    assert ext == "png" and np.array_equal(
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.full_like(tall, 255)
    )
    with pytest.raises(ValueError, match=r"GIF image, expected JPEG or PNG for --size original"):
        original_bytes(tmp_path / "pic.gif")


def test_original_size_shards_show_rotated_and_transparent_files_as_a_viewer_does(tmp_path):
    tall = np.zeros((48, 32, 3), np.uint8)
    tall[:24], tall[24:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "turned.jpg").write_bytes(_jpeg(tall, exif=exif))
    Image.fromarray(np.dstack([tall, np.zeros((48, 32), np.uint8)]), "RGBA").save(tmp_path / "clear.png")
    records = [
        Record("turned", tmp_path / "turned.jpg", np.array([1], np.uint8)),
        Record("clear", tmp_path / "clear.png", np.array([0], np.uint8)),
    ]
    build_shards(
        SourceTable("orig", ["a"], {"train": records}),
        tmp_path / "out",
        ImageSpec.parse("original"),
        workers=1,
        progress=False,
    )
    with tarfile.open(tmp_path / "out" / "train" / "train-000000.tar") as tar:
        turned = np.asarray(Image.open(io.BytesIO(tar.extractfile("turned.jpg").read())).convert("RGB"))
        clear = np.asarray(Image.open(io.BytesIO(tar.extractfile("clear.png").read())).convert("RGB"))
    assert_looks_like(turned, np.rot90(tall, -1))
    assert np.array_equal(clear, np.full_like(tall, 255))


def test_every_mode_pillow_holds_in_memory_is_shown(tmp_path):
    # The Sampler takes PIL images a program made, in modes no file gives: premultiplied grey (La) has
    # no direct convert to L or RGB in Pillow (it was refused), and must read as its un-premultiplied LA
    from toolkit.images import as_viewed

    grey = np.full((8, 8), 100, np.uint8)
    alpha = np.full((8, 8), 128, np.uint8)
    alpha[0], alpha[1] = 255, 0
    straight = Image.fromarray(np.dstack([grey, alpha]), "LA")
    shown = np.asarray(as_viewed(straight.convert("La")))
    assert np.array_equal(shown, np.asarray(as_viewed(straight)))
    assert shown[0, 0].tolist() == [100] * 3 and shown[1, 0].tolist() == [255] * 3  # opaque; clear: white
    modes = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"]
    modes += ["I;16", "I;16L", "I;16B", "I;16N"]
    for mode in modes:
        image = as_viewed(Image.new(mode, (5, 3)))
        assert (image.mode, image.size) == ("RGB", (5, 3)), mode
