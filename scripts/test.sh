#!/usr/bin/env bash
# Set up (if needed) and run the test suite on the CPU. Extra arguments go to pytest.
# Also installs the JavaScript side (npm packages, Debian's chromium) that the browser and Node.js
# tests need: scripts/setup-js.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup-js.sh
exec .venv/bin/python -m pytest "$@"
