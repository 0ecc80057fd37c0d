#!/usr/bin/env bash
# Installs what the shared response-cache test (tests/test_response_cache.py) needs:
#   * Debian's `redis-server` (apt) when missing — the test starts its own on loopback;
#   * PyPI `redis` (redis.asyncio client) into the venv given as $1 (default .venv).
set -euo pipefail

VENV="${1:-.venv}"

if ! command -v redis-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

if ! "$VENV/bin/python" -c "import redis" 2>/dev/null; then
    "$VENV/bin/pip" install -q "redis>=5"
fi

redis-server --version
"$VENV/bin/python" -c "import importlib.metadata as m; print('redis', m.version('redis'))"
