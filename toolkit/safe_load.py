"""Files that may come from someone else are read as data, never unpickled.

Weights (`model.safetensors`, `classifier.safetensors`) are safetensors: a JSON header and raw
tensor bytes, parsed and never executed (`toolkit.model.load_model`, `toolkit.classifier`). They are
read with Python and parsed from the bytes (`read_safetensors`): safetensors' own file reader takes
UTF-8 paths only (toolkit.paths).

An Accelerate checkpoint (`checkpoint-<step>/`) also holds torch pickles: `optimizer.bin`,
`random_states_<rank>.pkl` and `custom_checkpoint_0.pkl` (the LR scheduler, registered with
`register_for_checkpointing`), plus `scaler.pt` under fp16. Accelerate 1.x loads most of them with
`torch.load(weights_only=True)`, but custom checkpoints with `weights_only=False`: a crafted file
there runs code. And when the RNG states fail to load it only logs it, so a resume would silently
stop being exact. `verify_checkpoint` therefore loads every such file first, with
`torch.load(weights_only=True)` and the few numpy globals the RNG states need, and refuses the
folder (a UserError naming the file) unless each one is plain tensors, numbers and strings. Only
then does the trainer hand the folder to `accelerator.load_state`, which unpickles nothing that
has not passed this check. The folder is assumed not to change between the check and the load.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from toolkit.errors import UserError, one_line
from toolkit.paths import library_name

PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # every file accelerate torch.loads ends in one of these
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes: safetensors' own bound on a file's JSON header


def _allowed_globals() -> list:
    """Beyond torch's own weights-only allowlist (tensors, containers, numbers, strings, bytes):
    numpy arrays and dtypes, which `np.random.get_state()` puts in random_states_<rank>.pkl."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_weights_only(path: str | Path, what: str = "checkpoint file"):
    """torch.load(path, weights_only=True) on the CPU, with numpy arrays allowed; anything else
    (a pickle that would call a function or build an object) is a UserError naming the file."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4...": the error says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (not a zip), EOFError, OSError...
        text = str(error)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            called = re.search(r"GLOBAL ([\w.]+)", text)
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            reason = (
                f"unpickling it would call {called.group(1)}, which can run code"
                if called
                else f"the weights-only loader stopped at: {detail.group(1).strip() if detail else 'an unsupported instruction'}"
            )
            raise UserError(
                f"refusing to load {path}: it is not plain tensors and numbers ({reason}); a {what} is only ever "
                "loaded as data (torch.load weights_only=True), never unpickled"
            ) from None
        first = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
        raise UserError(f"{path} is not a readable {what}: {one_line(first)}") from None


def safetensors_shapes(path: str | Path) -> dict[str, tuple]:
    """{tensor name: shape} from a safetensors file's header, read with Python, no tensor read. A
    ValueError (or KeyError, TypeError) for a header that is not one, or that does not account for
    the file's length exactly: `read_safetensors` after it reads only the tensors listed here."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        length = int.from_bytes(stream.read(8), "little")
        if not 2 <= length <= min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise ValueError(f"not a safetensors header: {length:,} bytes said, in a file of {size:,}")
        header = json.loads(stream.read(length))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
    end = 8 + length + max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if end != size:
        raise ValueError(f"its header describes {end:,} bytes, the file holds {size:,}")
    return shapes


def read_safetensors(path: str | Path) -> dict:
    """Every tensor of a safetensors file, on the CPU: read with Python, parsed from the bytes."""
    from safetensors.torch import load

    return load(Path(path).read_bytes())


def check_safetensors(path: str | Path, what: str = "weights file") -> None:
    """Parse a safetensors header (no tensor is read) as Accelerate's loader will, by name; a
    UserError naming the file if it is not one, or if its path cannot be given by name."""
    from safetensors import safe_open

    name = library_name(path, "Accelerate's checkpoint loader (safetensors)")
    try:
        with safe_open(name, framework="pt") as handle:
            handle.keys()
    except Exception as error:
        raise UserError(f"{path} is not a readable safetensors {what}: {one_line(error)}") from None


def verify_checkpoint(folder: str | Path) -> None:
    """Check every file Accelerate's load_state could load from `folder` before it does (see the
    module docstring): torch pickles must load with weights_only=True, safetensors must parse."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in PICKLE_SUFFIXES:
            load_weights_only(path)
        elif path.suffix == SAFETENSORS_SUFFIX:
            check_safetensors(path)
