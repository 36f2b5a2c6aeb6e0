"""Write files so that a crash, a kill or a full disk never leaves a half-written file under its final name.

Everything the toolkit hands to a user or to a later stage (weights, configs, manifests, exports,
metrics, tables, figures, images) goes through `atomic_path` (or `write_text`, `save_image`, which
use it). `check_output`, `image_format` and `check_writable_size` are the checks made before any work, so that an output
that cannot be written is refused in one line instead of after minutes of computing.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from toolkit.errors import UserError


def _umask() -> int:
    mask = os.umask(0o022)  # read by setting it: once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; rename it to `path` if the block succeeds,
    delete it if the block fails. A `path` that is a link is written through: its target is replaced
    and the link kept, as the shell's `>` does."""
    path = through_link(Path(path))
    tmp = hidden_beside(path, f".{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_file():  # safetensors creates its files 0600: give every output the mode open() gives
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename in (None, str(tmp)):  # a writer's ENOSPC names no file, or our hidden one: name the user's
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """atomic_path for files that belong together (weights and their config): nothing is renamed
    unless the block wrote them all, and the first path is renamed last, so that a reader who takes
    it as the mark of a finished set never finds it beside an older or missing partner."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def through_link(path: Path) -> Path:
    """The file that writing `path` should replace: the target of a link (followed to its end), else
    `path`. Renaming a new file onto the link itself would turn a user's link into a plain file."""
    return Path(os.path.realpath(path)) if _is_link(path) else path


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:  # a name too long (Python < 3.12 raises it): no link there
        return False


def _name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system holding `folder` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not a folder (yet), or no pathconf (Windows)
        return 255


def hidden_beside(path: Path, suffix: str) -> Path:
    """`.<name><suffix>` beside `path` (a temporary, or a file kept aside), with <name> cut where the
    whole would not fit the file system: a final name of 250 bytes is legal, `.<it>.<pid>.tmp` not."""
    room = _name_max(_nearest_existing(path.parent)) - 1 - len(os.fsencode(suffix))
    name = os.fsdecode(os.fsencode(path.name)[:room])
    return path.with_name(f".{name}{suffix}")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# A Rust io::Error as safetensors shows it: "... I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer (PyTorchStreamWriter) when a write fell short: it reports no errno.
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")
_NO_ROOM = 1 << 20  # bytes: a disk with less than this left after a failed write is full


def os_error_from(error: BaseException, path: str | Path | None = None) -> OSError | None:
    """The OSError (with its errno) behind a write failure that a library reports as its own
    exception, or None when the file system is not the cause: safetensors' SafetensorError carries the
    system's "(os error N)"; torch.save's "unexpected pos A vs B" carries nothing, so the file system
    holding `path` is asked: no room left there means ENOSPC, else EIO saying so. An OSError is
    returned as it is."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    found = _RUST_OS_ERROR.search(text)
    if found is not None:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), None if path is None else str(path))
    if isinstance(error, RuntimeError) and path is not None and any(words in text for words in _TORCH_WRITE_FAILED):
        try:
            full = _free_bytes(_nearest_existing(Path(path))) < _NO_ROOM
        except OSError:
            full = False
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        # room left, and still the file system refused bytes: a quota (EDQUOT), a file size limit
        # (EFBIG) or a failing device; the writer does not say which
        return OSError(
            errno.EIO,
            "the write fell short though the disk has room (a disk quota or file size limit reached?)",
            str(path),
        )
    return None


@contextmanager
def os_errors(path: str | Path | None = None) -> Iterator[None]:
    """Around a library's write of `path` (safetensors' save_file, torch.save, Accelerate's save_state):
    a failure the file system caused is raised as an OSError with its errno, so that the toolkit's
    one-line OSError handling applies (a full disk: ENOSPC); any other exception passes unchanged (a bug)."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:
        translated = os_error_from(error, path)
        if translated is None:
            raise
        raise translated from error


def write_state_dict(module, path: str | Path) -> None:
    """A module's weights as fp32 safetensors (never pickle), written to `path` as it is (a temporary
    name from atomic_path/atomic_paths); a failure the file system caused is an OSError."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    with os_errors(path):  # translated before atomic_path removes the temporary
        save_file(state, str(path), metadata={"format": "pt"})


def save_state_dict(module, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        write_state_dict(module, tmp)


# --- images -----------------------------------------------------------------------------------------

_INT_MAX = 2**31 - 1  # Pillow's sizes are C ints
_FOUR_GIB = 2**32 - 1  # a 32-bit file size (BMP) or strip length (TIFF)


@dataclass(frozen=True)
class ImageFormat:
    """A format the toolkit writes images in at their exact size, RGB kept RGB; lossless ones keep
    every pixel. The limits were measured with Pillow 13 (tests/faults/test_outputs.py tries them)."""

    name: str  # PIL's format name
    label: str  # as the user reads it
    max_side: int = _INT_MAX  # pixels per side (libwebp: 16,383; libjpeg: 65,500)
    max_bytes: int | None = None  # the largest file (BMP) or pixel strip (TIFF) its 32-bit fields hold
    modes: tuple[str, ...] | None = None  # modes written as they are, others converted to RGB; None: any
    lossless: bool = True


_PNG = ImageFormat("PNG", "PNG")
_JPEG = ImageFormat("JPEG", "JPEG", max_side=65_500, modes=("RGB", "L", "CMYK"), lossless=False)
_TIFF = ImageFormat("TIFF", "TIFF", max_bytes=_FOUR_GIB)

# The one table of what the toolkit writes: every other extension is refused before any work. Not
# here because they are not faithful: .gif (256 colours), .ico (resized to an icon of at most 256
# pixels), .icns (stretched to 1024x1024), .pgm/.pbm/.pfm (Pillow writes colour PPM data under them),
# and whatever else Pillow registers (.psd and .xbm it cannot write RGB in at all).
IMAGE_FORMATS: dict[str, ImageFormat] = {
    ".png": _PNG,
    ".jpg": _JPEG,
    ".jpeg": _JPEG,
    ".webp": ImageFormat("WEBP", "WebP", max_side=16_383, modes=("RGB", "RGBA"), lossless=False),
    ".bmp": ImageFormat("BMP", "BMP", max_bytes=_FOUR_GIB, modes=("1", "L", "P", "RGB", "RGBA")),
    ".tif": _TIFF,
    ".tiff": _TIFF,
    ".ppm": ImageFormat("PPM", "PPM", modes=("1", "L", "I", "RGB")),
}
_ACCEPTED = ", ".join(list(IMAGE_FORMATS)[:-1]) + f" or {list(IMAGE_FORMATS)[-1]}"
_REFUSED_BECAUSE = {
    ".gif": "GIF holds 256 colours",
    ".ico": "ICO resizes it to an icon of at most 256 pixels",
    ".icns": "ICNS stretches it to a 1024x1024 icon",
    ".pgm": "Pillow writes colour PPM data under it",
    ".pbm": "Pillow writes colour PPM data under it",
    ".pfm": "Pillow writes colour PPM data under it",
}


def _format_spec(path: str | Path) -> ImageFormat:
    """The ImageFormat of the final name's extension (the temporary name ends in .tmp); any other
    extension is a UserError naming the accepted ones."""
    suffix = Path(path).suffix.lower()
    spec = IMAGE_FORMATS.get(suffix)
    if spec is not None:
        return spec
    from PIL import Image

    Image.init()  # every plugin, not only the few PIL loads at first
    if not suffix:
        shown = "no image extension"
    elif suffix in _REFUSED_BECAUSE:
        shown = f"the toolkit does not write the image extension '{suffix}': {_REFUSED_BECAUSE[suffix]}"
    elif suffix in Image.registered_extensions():
        shown = f"the toolkit does not write the image extension '{suffix}'"
    else:
        shown = f"unknown image extension '{suffix}'"
    raise UserError(f"cannot write {path}: {shown} (use {_ACCEPTED})")


def image_format(path: str | Path) -> str:
    """The PIL format the final name's extension asks for; an extension the toolkit does not write
    (IMAGE_FORMATS) is a UserError."""
    return _format_spec(path).name


def _pillow_max_width(bits: int) -> int:
    """The widest image Pillow's encoders take: a row of `bits`-bit pixels must fit a C int of bits
    (measured: RGB 89,478,478 pixels; one more is a MemoryError from every writer)."""
    return _INT_MAX // bits - 7


def _file_bytes(spec: ImageFormat, width: int, height: int, bits: int) -> int:
    """What a 32-bit field of `spec` must hold: the BMP file (rows padded to 4 bytes, 54 bytes of header,
    a palette for 8 bits or fewer) or the TIFF strip (Pillow writes one strip, the whole image)."""
    if spec.name == "BMP":
        palette = 4 * 2**bits if bits <= 8 else 0
        return 54 + palette + (width * bits + 31) // 32 * 4 * height
    return (width * bits + 7) // 8 * height


def _size_problem(spec: ImageFormat, width: int, height: int, bits: int = 24) -> str | None:
    """Why `spec` cannot hold a width x height image of `bits`-bit pixels, or None."""
    if max(width, height) > spec.max_side:
        return f"{spec.label} holds at most {spec.max_side:,} pixels per side"
    if spec.max_bytes is not None and _file_bytes(spec, width, height, bits) > spec.max_bytes:
        needed = _file_bytes(spec, width, height, bits)
        return f"a {spec.label} file holds at most {spec.max_bytes:,} bytes (4 GiB), this one needs {needed:,}"
    if width > _pillow_max_width(bits):
        return f"Pillow writes images at most {_pillow_max_width(bits):,} pixels wide"
    return None


def check_writable_size(
    path: str | Path, width: int, height: int, what: str, smaller: str, option: str | None = None, bits: int = 24
) -> None:
    """A UserError, before any work, unless `path`'s format can hold a width x height image (RGB
    unless `bits` says otherwise): `what` names the image ('a grid of 1 row(s) x 500 images'),
    `smaller` the way to a smaller one ('fewer images (-n)'), `option` the command-line option of `path`.
    An extension the toolkit does not write is refused as image_format refuses it."""
    spec = _format_spec(path)
    problem = _size_problem(spec, int(width), int(height), bits)
    if problem is None:
        return
    where = f"{option} {path}" if option else f"cannot write {path}"
    instead = ".png or " if _size_problem(_PNG, int(width), int(height), bits) is None else ""
    raise UserError(f"{where}: {what} is {width:,} x {height:,} pixels; {problem}: use {instead}{smaller}")


_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 16, "I;16": 16, "RGB": 24}


def save_image(image, path: str | Path, **params) -> Path:
    """Save a PIL image through a temporary name + rename, in the format of `path`'s extension
    (IMAGE_FORMATS); an image the format cannot hold is a UserError before anything is written."""
    path = Path(path)
    spec = _format_spec(path)
    mode = image.mode if spec.modes is None or image.mode in spec.modes else "RGB"  # JPEG, PPM hold no alpha
    check_writable_size(path, image.width, image.height, "the image", "a smaller image", bits=_MODE_BITS.get(mode, 32))
    if mode != image.mode:
        image = image.convert(mode)
    with atomic_path(path) as tmp:
        image.save(tmp, format=spec.name, **params)
    return path


# --- checks before the work ---------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    """The longest part of `path` that is there; a link to nothing counts as there (it blocks
    mkdir as a file would), so that check_output finds it before the work, not after."""
    while path != path.parent:
        try:
            if os.path.lexists(path):
                break
        except OSError:  # a name too long (Python < 3.12 raises it): not there either
            pass
        path = path.parent
    return path


def _dangling_link(path: Path) -> str | None:
    """Why `path` (there, by lexists) cannot be written through: a link to nothing or a loop of links."""
    if not _is_link(path) or path.exists():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13
        return f"{path} is a loop of links"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path} is a loop of links"
    return f"{path} is a link to {os.readlink(path)}, which does not exist; create it or remove the link"


def _check_name_lengths(path: Path) -> None:
    """Every name `path` would create (folders on the way, the file) fits its file system."""
    existing = _nearest_existing(path)
    longest = _name_max(existing)
    for part in path.relative_to(existing).parts:
        if len(os.fsencode(part)) > longest:
            raise UserError(
                f"cannot write {path}: the name '{part[:40]}...' is {len(os.fsencode(part))} bytes long, "
                f"the file system holding {existing} takes at most {longest}; choose a shorter name"
            )


def _free_bytes(folder: Path) -> int:
    if not hasattr(os, "statvfs"):  # Windows
        import shutil

        return shutil.disk_usage(folder).free
    stats = os.statvfs(folder)
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail  # root may use the reserved blocks
    return blocks * stats.f_frsize


def describe_os_error(error: OSError) -> str:
    """'Read-only file system (EROFS)': the system's words and the errno's name."""
    name = errno.errorcode.get(error.errno or 0)
    text = error.strerror or str(error) or type(error).__name__
    return f"{text} ({name})" if name else text


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def file_name(text: str | Path, option: str = "") -> Path:
    """`text`, a file to write, as a Path; refused (one line, naming `option`) when it ends as a folder
    does (`out.png/`, `out.png/.`): Path drops that ending, so the file would be written all the same,
    though the user meant a folder or mistyped. A Path (a default) is taken as it is."""
    if isinstance(text, Path):
        return text
    last = re.split(r"[\\/]" if os.altsep else "/", text)[-1]
    if last not in ("", ".", "..") or not text.strip():  # (an empty name: check_output's line)
        return Path(text)
    ending = "/" if last == "" else ("/" + last if text != last else last)
    name = str(Path(text))  # what Path makes of it: out.png/./ -> out.png
    suggestion = f"a file such as {name}" if Path(name).name not in ("", ".", "..") else "a file name"
    raise UserError(
        f"{(option + ' ') if option else ''}{text}: names a folder (ends with {ending}); expected {suggestion}"
    )


def check_output(path: str | Path, folder: bool = False, needed_bytes: int = 1, inputs=()) -> Path:
    """Refuse, before any work, an output that cannot be written: a file name that is a folder (or,
    with folder=True, a folder that is a file), a parent that is a file, a folder that is read-only
    or not ours, a disk with less than `needed_bytes` free, one of the command's `inputs` (the same
    file, also through a link: it would be replaced by what was made of it). Nothing is created: the
    first existing folder on the way is probed with a temporary file. An empty name, or a link to
    nothing on the way, is refused; a file name that is a link is checked as its target (atomic_path
    writes through it). Returns `path`."""
    if str(path) == "" or str(path).isspace():  # Path("") is ".": an unset shell variable would mean here
        raise UserError(f"expected {'a folder' if folder else 'a file name'} to write, got an empty value")
    given = path = Path(path) if folder else file_name(path)  # a str's trailing / is still there to see
    if not folder and _is_link(path) and path.exists():
        path = through_link(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise UserError(
                f"cannot write {path}: it is {source}, which this command reads; write the result to another file"
            )
    _check_name_lengths(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"cannot write into {path}: it is a file, expected a folder")
    if not folder and path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder, expected a file name")
    existing = _nearest_existing(path if folder else path.parent)
    dangling = _dangling_link(existing)
    if dangling is None and not folder:
        dangling = _dangling_link(path)
    if dangling is not None:
        raise UserError(f"cannot write {path}: {dangling}")
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".cvae-tk-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserError(
            f"cannot write {path}: the folder {existing} is not writable: {describe_os_error(error)}"
        ) from None
    free = _free_bytes(existing)
    if free < needed_bytes:
        raise UserError(
            f"cannot write {path}: the disk holding {existing} is full ({free} bytes free); free some space or write elsewhere"
        )
    return given
