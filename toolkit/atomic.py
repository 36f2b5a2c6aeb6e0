"""Write files so that a crash, a kill or a full disk never leaves a half-written file under its final name.

Everything the toolkit hands to a user or to a later stage (weights, configs, manifests, exports,
metrics, tables, figures) goes through `atomic_path`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; rename it to `path` if the block succeeds,
    delete it if the block fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
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
