#!/usr/bin/env bash
# Installs what the browser test (tests/test_web_ui.py) needs, without downloading any
# browser build of Playwright's own (the machine reaches only package registries):
#   * Debian's `chromium` (apt) when /usr/bin/chromium is missing;
#   * PyPI `playwright` (the Python driver only) into the venv given as $1 (default .venv).
# Never runs `playwright install`: the test launches /usr/bin/chromium via executable_path.
set -euo pipefail

VENV="${1:-.venv}"

if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
    "$VENV/bin/pip" install -q "playwright>=1.45"
fi

/usr/bin/chromium --version 2>/dev/null
"$VENV/bin/python" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
