#!/usr/bin/env bash
# The JavaScript side, for `cvae-tk web`, the Node.js example and the browser tests: the pinned npm
# packages of package-lock.json into node_modules/ (onnxruntime-web, onnxruntime-node with the CPU
# binding it ships, playwright-core) and Debian's chromium (playwright drives the system browser;
# no browser download). Idempotent. Without npm, or without chromium and root to install it, it says
# so and those tests skip; a failed install stops here (CI must not pass by skipping the browser):
# CVAE_TK_SKIP_JS=1 skips this set-up on purpose (e.g. offline).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${CVAE_TK_SKIP_JS:-0}" = 1 ]; then
  echo "setup-js: skipped (CVAE_TK_SKIP_JS=1): the Node.js and browser tests will be skipped" >&2
  exit 0
fi
if command -v npm > /dev/null; then
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "setup-js: installing the npm packages of package-lock.json (~450 MB)"
    # onnxruntime-node's install script would fetch GPU add-ons from outside the registry: skip it,
    # the CPU binding is in the package itself
    ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --ignore-scripts > /tmp/cvae-tk-npm.log 2>&1 \
      || { tail -20 /tmp/cvae-tk-npm.log; echo "setup-js: npm ci failed (log: /tmp/cvae-tk-npm.log)" >&2; exit 1; }
  fi
else
  echo "setup-js: no npm here: the Node.js and browser tests will be skipped" >&2
fi
if ! command -v chromium > /dev/null; then
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup-js: installing Debian's chromium for the browser tests (a minute or two)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } > /tmp/cvae-tk-apt.log 2>&1 \
      || { tail -20 /tmp/cvae-tk-apt.log; echo "setup-js: apt-get install chromium failed (log: /tmp/cvae-tk-apt.log)" >&2; exit 1; }
  else
    echo "setup-js: no chromium and no root apt-get: the browser tests will be skipped (install chromium to run them)" >&2
  fi
fi
