#!/usr/bin/env bash
# The project's overhead, measured: bare vLLM (A) against the qwen-serve stack (B)
# on the same engine flags, same request list, interleaved, in one run.
#   benchmarks/ab_stack_vs_vllm.sh [OUT_DIR] [extra bench args...]
# Starts both servers on loopback (ephemeral ports), waits until both are ready,
# runs the concurrency sweep, stops both. Needs the embedded model prepared.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/ab-cpu}
shift || true
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-deploy/configs/local-cpu.yaml}
# Two free ports, held (serving/ports.py) until both servers listen: a port only
# picked free could be taken by Ray's workers before the server binds it.
coproc HOLD { "$PY" -c 'import sys; from serving.ports import bind_reusable
held = [bind_reusable("127.0.0.1") for _ in range(2)]
print(*(s.getsockname()[1] for s in held), flush=True); sys.stdin.read()'; }
read -r A_PORT B_PORT <&"${HOLD[0]}"
LOGS=$(mktemp -d)
"$PY" -m serving engine --config "$CONFIG" --port "$A_PORT" >"$LOGS/vllm.log" 2>&1 & A_PID=$!
"$PY" -m serving serve --config "$CONFIG" --port "$B_PORT" \
    >"$LOGS/stack.log" 2>&1 & B_PID=$!
trap 'kill -TERM $A_PID $B_PID 2>/dev/null; wait $A_PID $B_PID 2>/dev/null || true' EXIT
wait_for() {  # URL PATH
  for _ in $(seq 1 900); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "$1$2") == 200 ]] && return 0
    sleep 1
  done
  echo "timed out waiting for $1$2 (logs in $LOGS)" >&2; return 1
}
wait_for "http://127.0.0.1:$A_PORT" /health
wait_for "http://127.0.0.1:$B_PORT" /ready
kill "$HOLD_PID"
"$PY" -m benchmarks --compare "http://127.0.0.1:$A_PORT" "http://127.0.0.1:$B_PORT" \
    --sweep concurrency=1,8,32 -n 64 --repeats 3 --warmup 8 \
    --input-len 128 --output-len 64 --no-progress --output-dir "$OUT" --label stack-vs-vllm "$@"
