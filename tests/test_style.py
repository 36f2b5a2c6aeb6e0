"""The code's style is ruff's (configured in pyproject.toml), checked with the tests so that the
README's test command and CI hold every change to it: `ruff format .` and `ruff check --fix .` make a
change pass."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")  # the dev extra installs it into the environment
    if beside.is_file():
        return [str(beside)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -e '.[dev]')")


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_the_code_is_ruff_clean(command):
    done = subprocess.run([*_ruff(), *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"`ruff {' '.join(command)}` fails; `ruff format .` / `ruff check --fix .` fix most:\n{done.stdout[-3000:]}{done.stderr[-1000:]}"
    )
