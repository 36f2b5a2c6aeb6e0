"""Write files so that a crash, a kill or a full disk never leaves a half-written file under its final name.

Everything the toolkit hands to a user or to a later stage (weights, configs, manifests, exports,
metrics, tables, figures, images) goes through `atomic_path` (or `write_text`, `save_image`, which
use it). `check_output` and `image_format` are the checks made before any work, so that an output
that cannot be written is refused in one line instead of after minutes of computing.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from toolkit.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; rename it to `path` if the block succeeds,
    delete it if the block fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename in (None, str(tmp)):  # a writer's ENOSPC names no file, or our hidden one: name the user's
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_state_dict(module, path: str | Path) -> None:
    """A module's weights as fp32 safetensors (never pickle)."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


# --- images -----------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _writable_format(suffix: str) -> str | None:
    """The PIL format that writes RGB images under `suffix`, or None. Decided by writing a 1x1 RGB
    image in memory: PIL registers extensions it can only read (.psd) or that cannot hold RGB (.xbm)."""
    from PIL import Image

    Image.init()  # every plugin, not only the few PIL loads at first
    name = Image.registered_extensions().get(suffix)
    if name is None or name not in Image.SAVE:
        return None
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=name)
    except Exception:  # plugins raise OSError, ValueError, KeyError... for what they cannot write
        return None
    return name


def image_format(path: str | Path) -> str:
    """The PIL format the final name's extension asks for (the temporary name ends in .tmp); an
    extension PIL cannot write an RGB image in is a UserError."""
    suffix = Path(path).suffix.lower()
    name = _writable_format(suffix)
    if name is None:
        shown = f"unknown image extension '{suffix}'" if suffix else "no image extension"
        raise UserError(f"cannot write {path}: {shown} (use .png or .jpg)")
    return name


def save_image(image, path: str | Path, **params) -> Path:
    """Save a PIL image through a temporary name + rename, in the format of `path`'s extension."""
    path = Path(path)
    name = image_format(path)
    if name == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")  # JPEG holds no alpha
    with atomic_path(path) as tmp:
        image.save(tmp, format=name, **params)
    return path


# --- checks before the work ---------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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


def check_output(path: str | Path, folder: bool = False, needed_bytes: int = 1) -> Path:
    """Refuse, before any work, an output that cannot be written: a file name that is a folder (or,
    with folder=True, a folder that is a file), a parent that is a file, a folder that is read-only
    or not ours, a disk with less than `needed_bytes` free. Nothing is created: the first existing
    folder on the way is probed with a temporary file. Returns `path`."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"cannot write into {path}: it is a file, expected a folder")
    if not folder and path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder, expected a file name")
    existing = _nearest_existing(path if folder else path.parent)
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
    return path
