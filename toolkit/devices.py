"""Where PyTorch work runs outside Accelerate (evaluation, the classifier, editing, the sweep's
judging): the one reading of a `--device` option."""

from __future__ import annotations

import torch

from toolkit.errors import UserError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a UserError."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': expected auto | cpu | cuda") from None
