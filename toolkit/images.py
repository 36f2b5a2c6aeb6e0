"""Open a user's image file as an image viewer (or a browser) shows it: 8-bit sRGB RGB.

    image = open_image("photo.jpg")              # PIL RGB image, as a viewer shows it
    image = as_viewed(Image.open(path))          # the same for an image already open (e.g. after draft())

Pillow's `Image.open(path).convert("RGB")` is not that picture for many real files. What happens here:

- **Orientation**: the EXIF orientation (all 8 values; phones and cameras write it instead of
  rotating the pixels) is applied (as `ImageOps.exif_transpose` does). A broken EXIF block is ignored, as
  viewers ignore it.
- **Colour profile**: an embedded ICC profile (Adobe RGB, Display P3 from phones, a CMYK press
  profile, a grey gamma) is converted to sRGB with LittleCMS, in the profile's own rendering intent,
  as a colour-managed viewer does. A profile that does not parse or does not fit the pixels' colour
  space is ignored (as viewers do), so the pixels count as sRGB.
- **Transparency** (alpha channels, premultiplied alpha, PNG/GIF tRNS, palettes with transparent
  entries) is composited on white, the page background a browser shows by default. Pillow's plain
  convert drops the alpha instead and shows whatever colour hides under it (often black).
- **Deep and float pixels**: 16-bit grey (`I;16`, `I;16B`; `I` as Pillow opens 16-bit PGM/PNG) is
  scaled 0..65535 -> 0..255 (plain convert clips everything above 255 to white); 32-bit float
  (`F`, float TIFF) is read as 0..1 (values outside are clipped, NaN is black). 48/64-bit RGB(A) PNGs
  Pillow already opens as 8-bit RGB(A) (the high byte).
- **CMYK** JPEGs are read as Photoshop writes them (Adobe APP14 marker: inverted), and without the
  marker not inverted, as libjpeg-based browsers do; then the profile, if any, or Pillow's formula.
- **Several frames** (animated GIF, WebP, APNG, multi-page TIFF): the first frame, as a static
  view (a thumbnail, a print) shows it.
- Every container Pillow opens (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM/PGM, ICO, TGA, AVIF, ...).
- **Unreadable files** (empty, truncated, corrupt, not an image, a FIFO or device instead of a file, a
  decompression bomb beyond Pillow's limit of 2 x `Image.MAX_IMAGE_PIXELS` pixels) raise
  `ImageError` (a ValueError) with one line saying why; the header is read before any pixel.

Not covered: PNG gAMA/cHRM chunks without an ICC profile (viewers disagree on them), HDR / wide-gamut
output (everything ends as 8-bit sRGB), formats Pillow has no plugin for (HEIC, RAW).
"""

from __future__ import annotations

import functools
import io
import os
import stat
import struct
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageCms, UnidentifiedImageError

BACKGROUND = (255, 255, 255)  # what transparent pixels show: a browser page's default background

# What Pillow's plugins raise on malformed data (open() turns some into UnidentifiedImageError,
# load() does not): one ImageError for all, so a hostile file is a skipped image, never a crash.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    ZeroDivisionError,
    OverflowError,
    Image.DecompressionBombError,
)
_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# EXIF orientation -> the transpose that shows the image upright (as in ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ICC_SPACE = {"RGB ": "RGB", "GRAY": "L", "CMYK": "CMYK"}  # profile colour space -> Pillow mode it fits


class ImageError(ValueError):
    """A file that does not give an image (the message says why, without the path: callers add it)."""


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def open_file(path: str | Path) -> Image.Image:
    """Image.open(path), header only (pixels are decoded later, so `draft()` can still reduce a JPEG).
    Refuses what is not a regular file (a FIFO would block forever) and decompression bombs."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise ImageError(_reason(error)) from None
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ImageError(f"not a regular file ({kind})")
    if info.st_size == 0:  # an interrupted copy or download: Pillow would say "cannot identify the image format"
        raise ImageError("empty file (0 bytes), expected an image file")
    try:
        with warnings.catch_warnings():
            # Between Pillow's warning (MAX_IMAGE_PIXELS) and error (twice that) lie real photos
            # (100-megapixel cameras): decoded, without a warning per file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except UnidentifiedImageError:  # Pillow's text repeats the path
        raise ImageError(
            "cannot identify the image format (not an image file, or one Pillow has no reader for)"
        ) from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels, the most Pillow decodes "
            "(a decompression bomb, or an image far too big)"
        ) from None
    except _DECODE_ERRORS as error:
        raise ImageError(_reason(error)) from None


def _orientation(image: Image.Image) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data" and goes on
            value = image.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:  # a broken EXIF block: viewers show the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as shown: swapped for the EXIF orientations that turn the image by 90 degrees."""
    w, h = image.size
    return (h, w) if _orientation(image) in (5, 6, 7, 8) else (w, h)


def _eight_bit(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """16-bit and float grey -> (L, alpha of a PNG tRNS grey value or None), scaled as described
    above (Pillow's convert clips instead)."""
    raw = np.asarray(image)
    values = raw.astype(np.float64)
    values = np.nan_to_num(values, nan=0.0) * 255.0 if image.mode == "F" else values / 257.0  # 65535 -> 255
    grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    key = image.info.get("transparency")
    alpha = Image.fromarray(((raw != key) * 255).astype(np.uint8)) if isinstance(key, int) else None
    return grey, alpha


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(colour in its own space: L, RGB, CMYK, ...; alpha, or None without transparency)."""
    alpha = None
    if image.mode == "La":  # premultiplied grey: Pillow converts it to LA (un-premultiplied) only
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # applies tRNS and palette alpha; un-premultiplies RGBa
        alpha = rgba.getchannel("A")
        image = image.convert("L") if image.mode in ("L", "LA") else rgba.convert("RGB")
    return image, alpha


@lru_cache(maxsize=32)
def _to_srgb(icc: bytes, mode: str):
    """A LittleCMS transform from the embedded profile to sRGB, or None where a viewer would ignore the
    profile. Cached: a data set's images usually share one profile."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _ICC_SPACE.get(profile.profile.xcolor_space) != mode:
            return None
        srgb = ImageCms.createProfile("sRGB")
        return ImageCms.buildTransform(profile, srgb, mode, "RGB", ImageCms.getDefaultIntent(profile))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _colour_to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    transform = _to_srgb(bytes(icc), image.mode) if icc else None
    if transform is not None:
        return ImageCms.applyTransform(image, transform)
    return image.convert("RGB")


def as_viewed(image: Image.Image) -> Image.Image:
    """An opened image (lazy or loaded, drafted or not) -> RGB as a viewer shows it (see the module doc).
    Decoding errors become ImageError."""
    try:
        fmt, icc, adobe = image.format, image.info.get("icc_profile"), "adobe" in image.info
        image.load()
        orientation = _orientation(image)
        if orientation != 1:  # what ImageOps.exif_transpose does, without rewriting the EXIF block
            image = image.transpose(_TRANSPOSE[orientation])
        if image.mode in _HIGH_DEPTH:
            colour, alpha = _eight_bit(image)
        else:
            colour, alpha = _split_alpha(image.convert("L") if image.mode == "1" else image)
        if colour.mode not in ("L", "RGB", "CMYK"):  # P, YCbCr, LAB, RGBX...: RGB first, then the profile
            colour = colour.convert("RGB")
        if fmt == "JPEG" and colour.mode == "CMYK" and not adobe:
            # Pillow reads every CMYK JPEG as Adobe-inverted; without the Adobe marker it is not
            colour = ImageChops.invert(colour)
        rgb = _colour_to_srgb(colour, icc)
        if alpha is not None and alpha.getextrema() != (255, 255):
            page = Image.new("RGBA", rgb.size, BACKGROUND + (255,))
            rgb = Image.alpha_composite(page, Image.merge("RGBA", (*rgb.split(), alpha))).convert("RGB")
        return rgb
    except ImageError:
        raise
    except _DECODE_ERRORS as error:
        raise ImageError(_reason(error)) from None


def centre_crop(region: tuple[float, float, float, float], side: int) -> tuple[float, float, float, float]:
    """The square of `side` pixels centred on `region` (left, top, right, bottom), in sub-pixel
    precision: the box the shard builder resizes from (`--crop center:N`), and the one
    toolkit.sampler prepares a photo with, so that both see the same pixels."""
    cx, cy, half = (region[0] + region[2]) / 2, (region[1] + region[3]) / 2, side / 2
    return (cx - half, cy - half, cx + half, cy + half)


@functools.cache
def readable_extensions() -> frozenset[str]:
    """The file extensions ('.jpg', '.webp', ...) of every format Pillow opens here, its plugins included."""
    Image.init()  # every plugin, not only the few Pillow loads at first
    return frozenset(ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN)


def open_image(path: str | Path) -> Image.Image:
    """The image file at `path` as RGB, as a viewer shows it; ImageError naming the file otherwise."""
    if not os.path.exists(path):
        raise ImageError(f"image not found: {path}")
    if os.path.isdir(path):
        raise ImageError(f"{path} is not an image file (it is a folder)")
    try:
        with open_file(path) as image:
            return as_viewed(image)
    except ImageError as error:
        raise ImageError(f"{path} is not an image PIL can read: {error}") from None


def _shows_as_stored(image: Image.Image) -> bool:
    """Whether a plain decoder (`Image.open(data).convert("RGB")`, as the shard reader does) gives
    what a viewer shows: no orientation, no profile, no transparency, no deep or CMYK pixels."""
    return (
        image.mode in ("1", "L", "P", "RGB")
        and "transparency" not in image.info
        and _orientation(image) == 1
        and not image.info.get("icc_profile")
    )


def original_bytes(path: str | Path, quality: int = 95) -> tuple[bytes, str, tuple[int, int]]:
    """For `--size original`: (data, "jpg" or "png", (H, W)). The file's bytes where a plain decoder
    shows them as a viewer does; otherwise (EXIF-rotated, CMYK, a colour profile that changes the
    pixels, transparent, 16-bit) the viewed pixels re-encoded in the file's format (JPEG at `quality`,
    PNG lossless). A file is read only after its header (a regular file, a sane size) was checked."""
    with open_file(path) as header:
        fmt = header.format
        if fmt not in ("JPEG", "PNG"):
            raise ImageError(f"{fmt} image, expected JPEG or PNG for --size original")
        data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if _shows_as_stored(image):
            height, width = image.height, image.width
            try:
                image.draft("RGB", (1, 1))  # decode at 1/8 scale: cheap, still catches truncated files
                image.load()
            except _DECODE_ERRORS as error:
                raise ImageError(_reason(error)) from None
            return data, "jpg" if fmt == "JPEG" else "png", (height, width)
        viewed = as_viewed(image)
    if viewed.size == image.size:
        # e.g. an sRGB profile, a tRNS colour no pixel has: keep the bytes if no pixel differs by more than one level
        with Image.open(io.BytesIO(data)) as plain:
            difference = np.abs(np.asarray(plain.convert("RGB"), np.int16) - np.asarray(viewed, np.int16))
        if difference.max(initial=0) <= 1:
            return data, "jpg" if fmt == "JPEG" else "png", (viewed.height, viewed.width)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        viewed.save(buffer, format="JPEG", quality=quality)
    else:
        viewed.save(buffer, format="PNG")
    return buffer.getvalue(), "jpg" if fmt == "JPEG" else "png", (viewed.height, viewed.width)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]: round(clip(x, 0, 1) * 255), half to even,
    the product in float32 -- what a --uint8 graph computes, and what every grey level of cvae-tk is
    (the sampler's, the grids', the edits'). Torch tensors: `to_uint8(t.detach().float().cpu().numpy())`."""
    return np.round(np.clip(images, 0.0, 1.0) * np.float32(255)).astype(np.uint8).transpose(0, 2, 3, 1)
