#!/usr/bin/env bash
# Create .venv beside the project (if missing) and install cvae-tk into it with its test tools.
# Idempotent: reinstalls only when pyproject.toml changed. Works offline from a package mirror.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.cvae-tk-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing cvae-tk and its dependencies into .venv (first time: a few minutes, ~6 GB for torch)"
  if ! .venv/bin/python -m pip install --disable-pip-version-check -e '.[dev]' > .venv/install.log 2>&1; then
    grep -v "is ignored: it is neither" .venv/install.log | tail -30
    echo "setup: pip install failed (full log: .venv/install.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
