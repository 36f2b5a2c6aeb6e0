"""Where PyTorch work runs: outside Accelerate (evaluation, the classifier, editing, the sweep's
judging) the one reading of a `--device` option; for training, the check of the environment
variables Accelerate reads as it is made."""

from __future__ import annotations

import os

import torch
from accelerate.utils import DynamoBackend

from toolkit.errors import UserError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda' or 'cuda:N' as given. Anything else
    torch can name (mps, xpu, meta, ...) is a UserError: the toolkit runs and is tested on these two,
    and torch itself would only fail later, mid-work, with a traceback."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(name)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}': expected auto | cpu | cuda (or cuda:N)")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"--device {name}: no CUDA device is available here (use cpu or auto)")
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return parsed


def _integer(least: int):
    def test(value: str) -> bool:
        try:
            return int(value) >= least
        except ValueError:
            return False

    return test


def _torch_device(value: str) -> bool:
    try:
        torch.device(value)
    except RuntimeError:
        return False
    return True


TRUTH_VALUES = ("1", "0", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n")  # accelerate's str_to_bool
_TRUTH = ("a truth value: 1/0, true/false, yes/no, on/off", lambda value: value.lower() in TRUTH_VALUES)

# The environment variables the Accelerator reads as it is made (`accelerate launch` and torchrun set
# them; a shell may too): name -> (the form expected, its test). A malformed one failed deep inside
# Accelerate with a bare "invalid truth value abc" or "invalid literal for int()" that was blamed on
# the recipe's mixed_precision, raised a traceback, or was taken silently (ACCELERATE_MIXED_PRECISION=xyz
# trained fp32 labelled "precision xyz"; a rank of -5 asked for a distributed launch).
ACCELERATE_ENV = {
    "ACCELERATE_USE_CPU": _TRUTH,
    "ACCELERATE_DEBUG_MODE": _TRUTH,
    "ACCELERATE_CPU_AFFINITY": _TRUTH,
    "FORK_LAUNCHED": _TRUTH,
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": _TRUTH,
    "ACCELERATE_DYNAMO_USE_DYNAMIC": _TRUTH,
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": _TRUTH,
    "ACCELERATE_DYNAMO_BACKEND": (
        "one of " + ", ".join(backend.value.lower() for backend in DynamoBackend),
        lambda value: value.upper() in DynamoBackend.__members__,
    ),
    # taken as written: FP16 trained fp32 labelled "precision FP16"
    "ACCELERATE_MIXED_PRECISION": ("no, fp16, bf16 or fp8", lambda value: value in ("no", "fp16", "bf16", "fp8")),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("an integer >= 1", _integer(1)),
    "ACCELERATE_TORCH_DEVICE": ("a torch device: cpu, cuda or cuda:N", _torch_device),
    # -1: "not distributed" to Accelerate (and to scripts that export their argparse default)
    "LOCAL_RANK": ("an integer >= -1 (this process's rank on its machine; -1: none)", _integer(-1)),
    "RANK": ("an integer >= 0 (this process's rank)", _integer(0)),
    "WORLD_SIZE": ("an integer >= 1 (the number of processes)", _integer(1)),
    "LOCAL_WORLD_SIZE": ("an integer >= 1 (the number of processes on this machine)", _integer(1)),
}


def check_accelerate_env(grad_accum: int, environ=os.environ) -> None:
    """Refuse a malformed ACCELERATE_ENV variable by its name, before the Accelerator reads it; and a
    gradient accumulation that Accelerate would take from the environment over the recipe's."""
    for name, (expected, test) in ACCELERATE_ENV.items():
        value = environ.get(name)
        if value is not None and not test(value):
            raise UserError(f"environment variable {name}={value!r}: expected {expected}; correct or unset it")
    steps = environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if steps is not None and int(steps) != grad_accum:
        raise UserError(
            f"environment variable ACCELERATE_GRADIENT_ACCUMULATION_STEPS={steps} would override the recipe's "
            f"grad_accum={grad_accum} (Accelerate prefers the environment): unset it, or set grad_accum={int(steps)}"
        )
