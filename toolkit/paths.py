"""Paths and the libraries written in Rust or C++ (safetensors, ONNX Runtime), which take a path only
as UTF-8 text.

Linux allows any bytes in a file name; Python gives the ones that are not UTF-8 as surrogate escapes
(`os.fsdecode(b"runs/\\xff")`), which such a library cannot encode: safetensors' reader says "not
valid UTF-8", ONNX Runtime "incompatible constructor arguments". So readers open a file with Python
and hand the library its bytes (our weights and models are MBs). Where a library must have the name
itself (it finds other files beside it, or keeps files there), `library_name` refuses such a path in
one line instead. And `as_path`: what the library's functions take as a path. Standard library only: the sampler imports it without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.errors import UserError, printable


def is_utf8(path: str | os.PathLike) -> bool:
    """Whether a library that takes UTF-8 text can be given `path` by name."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: bytes that are not UTF-8
        return False
    return True


def shown(path: str | os.PathLike) -> str:
    """`path` as printable text: its bytes that are not UTF-8 as \\xNN (not as lone surrogates), control
    characters escaped (errors.printable, as every error line is shown)."""
    return printable(os.fsdecode(path))


def library_name(path: str | os.PathLike, library: str) -> str:
    """str(path) for `library`, which opens it by name; a UserError when the path is not UTF-8."""
    if not is_utf8(path):
        raise UserError(
            f"{shown(path)}: the path is not valid UTF-8, and {library} takes paths as UTF-8 only; "
            "rename or move it to a UTF-8 path"
        )
    return os.fspath(path)


def as_path(value, expected: str) -> Path:
    """`value` as a Path, taking what Python's file APIs take (str, os.PathLike, bytes: os.fsdecode);
    anything else a TypeError here, naming the argument (`expected`: "f(path): expected the run
    folder"), rather than pathlib's deep inside."""
    try:
        return Path(os.fsdecode(value))
    except TypeError:
        raise TypeError(f"{expected} as a str, os.PathLike or bytes, got {type(value).__name__}") from None
