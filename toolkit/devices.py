"""Where PyTorch work runs outside Accelerate (evaluation, the classifier, editing, the sweep's
judging): the one reading of a `--device` option."""

from __future__ import annotations

import torch

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
