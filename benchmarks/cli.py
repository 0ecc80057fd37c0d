"""Command line: ``python -m benchmarks …`` and ``qwen-serve bench …`` (via :func:`register`).

Thin glue: parse flags, build the request list once, run (single level, sweep, or
A/B), write JSON + Markdown + PNGs, print a summary. Exit codes: 0 ok, 1 no request
succeeded, 2 bad arguments / unreachable server.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from serving.client.flags import add_url_argument, resolve_url

from . import environment
from .client import Target
from .compare import run_compare
from .loadgen import LoadShape
from .metrics import parse_slo
from .report import (compare_document, compare_markdown, run_document, run_markdown,
                     write_json)
from .sweep import RunSettings, StopRule, parse_sweep, run_sweep
from .tokenizing import open_tokenizer
from .workloads import (LENGTH_CONTROLLED, WORKLOADS, WorkloadOptions, build_requests,
                        default_endpoint)

def add_arguments(p: argparse.ArgumentParser) -> None:
    """All flags (shared by ``python -m benchmarks`` and ``qwen-serve bench``)."""
    t = p.add_argument_group("target")
    add_url_argument(t)
    t.add_argument("--compare", nargs=2, metavar=("URL_A", "URL_B"),
                   help="A/B mode: same requests against both, interleaved; prints B/A")
    t.add_argument("--model", help="model name (default: first of /v1/models, per server)")
    t.add_argument("--compare-models", nargs=2, metavar=("MODEL_A", "MODEL_B"),
                   help="A/B mode between two models (e.g. the base and a LoRA adapter) on "
                        "the one server, or on URL_A and URL_B with --compare")
    t.add_argument("--api-key", default=None,
                   help="bearer key (default: $QWEN_SERVE_API_KEY or $OPENAI_API_KEY)")
    t.add_argument("--endpoint", choices=("chat", "completions"),
                   help="API (default: completions for synthetic/repeated, chat otherwise)")
    t.add_argument("--ignore-eos", choices=("auto", "on", "off"), default="auto",
                   help="send ignore_eos so outputs reach max tokens (auto: for synthetic/"
                        "shared-prefix, if the server accepts it)")
    t.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: server's)")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    w.add_argument("-n", "--num-requests", type=int, default=100,
                   help="requests per load level (the count bound)")
    w.add_argument("--input-len", default="128",
                   help="input tokens: N | uniform:LO:HI | normal:MEAN:STD | exp:MEAN")
    w.add_argument("--output-len", default=None,
                   help="max output tokens, same syntax (default: 128, seed tasks: per task)")
    w.add_argument("--system-prompt-len", type=int, default=512, help="shared-prefix tokens")
    w.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes")
    w.add_argument("--prompt", help="the prompt of the repeated workload")
    w.add_argument("--jsonl", help="user prompts: lines of {prompt|messages[, max_tokens]}")
    w.add_argument("--doc-len", type=int, default=1500, help="summarize: document words")
    w.add_argument("--tokenizer", help="local tokenizer.json / model folder for prompt "
                                       "lengths (default: the server's /tokenize)")
    w.add_argument("--seed", type=int, default=0)

    l = p.add_argument_group("load (every run is bounded by -n and --max-duration)")
    l.add_argument("--concurrency", type=int, default=None, help="fixed concurrency")
    l.add_argument("--rate", type=float, default=None, help="arrival rate req/s (Poisson)")
    l.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrivals: 1 Poisson, <1 burstier, >1 smoother")
    l.add_argument("--sweep", help="levels: concurrency=1,8,32 or rate=0.5,1,2; stops at "
                                   "saturation (with --compare: runs every level)")
    l.add_argument("--max-duration", type=float, default=600.0,
                   help="seconds per run; in-flight requests are cancelled at the limit")
    l.add_argument("--request-timeout", type=float, default=300.0)
    l.add_argument("--warmup", type=int, default=0, help="unmeasured requests before each run")
    l.add_argument("--slo", help="goodput SLOs in ms, e.g. ttft=500,tpot=50[,e2el=5000]")
    l.add_argument("--max-error-rate", type=float, default=0.05, help="sweep stop rule")
    l.add_argument("--min-slo-attainment", type=float, default=0.9, help="sweep stop rule")
    l.add_argument("--repeats", type=int, default=3, help="A/B repeats per level")

    o = p.add_argument_group("output")
    o.add_argument("--output-dir", help="where JSON/Markdown/PNGs go "
                                        "(default benchmarks/results/<time>-<label>)")
    o.add_argument("--label", default=None, help="name for this run (default: workload)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--save-text", action="store_true", help="keep generated texts in JSON")


def _shapes(args: argparse.Namespace) -> list[LoadShape]:
    if args.sweep:
        return parse_sweep(args.sweep, args.burstiness, args.concurrency)
    rate = args.rate if args.rate is not None else math.inf
    conc = args.concurrency if (args.concurrency or args.rate is not None) else 1
    return [LoadShape(concurrency=conc, rate=rate, burstiness=args.burstiness)]


def _target(url: str, model: str | None, args, endpoint: str,
            headers: dict[str, str]) -> tuple[Target, dict]:
    url = url.rstrip("/")
    model = model or environment.first_model(url, headers)
    if args.ignore_eos == "on":
        ignore = True
    elif args.ignore_eos == "off" or args.workload not in LENGTH_CONTROLLED:
        ignore = False
    else:
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        ignore = environment.supports_ignore_eos(url, model, path, headers)
    extra = {"temperature": args.temperature} if args.temperature is not None else {}
    target = Target(base_url=url, model=model, endpoint=endpoint,  # type: ignore[arg-type]
                    api_key=args._api_key, ignore_eos=ignore, extra_body=extra)
    info = environment.server_info(url, headers)
    info.update(model=model, endpoint=endpoint, ignore_eos=ignore)
    return target, info


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command line; returns the exit code."""
    log = print
    try:
        slo = parse_slo(args.slo)
        shapes = _shapes(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.num_requests < 1 or args.max_duration <= 0:
        print("error: --num-requests and --max-duration must be positive", file=sys.stderr)
        return 2
    args._api_key = args.api_key or os.environ.get("QWEN_SERVE_API_KEY") or \
        os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {args._api_key}"} if args._api_key else {}
    endpoint = args.endpoint or default_endpoint(args.workload)
    if args.model and args.compare_models:
        print("error: --model and --compare-models name the model twice; use one",
              file=sys.stderr)
        return 2
    compare = bool(args.compare or args.compare_models)
    if args.compare:
        urls = {"A": args.compare[0], "B": args.compare[1]}
    else:
        urls = {k: resolve_url(args) for k in ("AB" if compare else "A")}
    models = dict(zip("AB", args.compare_models)) if args.compare_models else \
        {k: args.model for k in urls}
    try:
        resolved = {k: _target(u, models[k], args, endpoint, headers) for k, u in urls.items()}
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"error: cannot reach server: {exc}", file=sys.stderr)
        return 2
    targets = {k: v[0] for k, v in resolved.items()}
    infos = {k: v[1] for k, v in resolved.items()}
    if compare:
        # Identical requests on both sides: ignore_eos only if both accept it.
        both = all(t.ignore_eos for t in targets.values())
        targets = {k: dataclasses.replace(t, ignore_eos=both) for k, t in targets.items()}

    opts = WorkloadOptions(
        name=args.workload, input_len=args.input_len, output_len=args.output_len,
        system_prompt_len=args.system_prompt_len, num_prefixes=args.num_prefixes,
        prompt=args.prompt, jsonl=args.jsonl, doc_len=args.doc_len,
    )
    tok_holder: dict[str, Any] = {}

    def tokenizer():
        if "tok" not in tok_holder:
            a = targets["A"]
            tok_holder["tok"] = open_tokenizer(args.tokenizer, a.base_url, a.model, headers)
        return tok_holder["tok"]

    try:
        specs = build_requests(opts, args.num_requests, args.seed, tokenizer)
        if endpoint == "completions":
            for s in specs:
                s.as_prompt()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tok = tok_holder.get("tok")
    config = {
        "workload": args.workload, "endpoint": endpoint, "num_requests": args.num_requests,
        "input_len": args.input_len if args.workload in LENGTH_CONTROLLED else None,
        "output_len": args.output_len or ("128" if args.workload in LENGTH_CONTROLLED else
                                          "task default"),
        "system_prompt_len": args.system_prompt_len if args.workload == "shared-prefix" else None,
        "ignore_eos": targets["A"].ignore_eos, "tokenizer": tok.name if tok else None,
        "tokenizer_exact": tok.exact if tok else None,
        "seed": args.seed, "warmup": args.warmup, "max_duration": args.max_duration,
        "request_timeout": args.request_timeout, "slo_ms": slo,
        "shapes": [s.to_json() for s in shapes],
        "model": targets["A"].model if not args.compare_models else None,
        "models": {k: t.model for k, t in targets.items()} if args.compare_models else None,
        "temperature": args.temperature, "repeats": args.repeats if compare else None,
        "argv": sys.argv[1:],
    }
    if tok is not None and not tok.exact:
        log("warning: no tokenizer available; prompt lengths are approximate (words)")
    settings = RunSettings(
        max_duration=args.max_duration, request_timeout=args.request_timeout,
        warmup=args.warmup, seed=args.seed, progress=not args.no_progress, slo_ms=slo,
    )
    env = environment.machine()
    label = args.label or (f"compare-{args.workload}" if compare else args.workload)
    out_dir = Path(args.output_dir) if args.output_dir else (
        Path(__file__).resolve().parent / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}")

    if compare:
        levels = run_compare(specs, targets, shapes, settings, args.repeats, log=log)
        doc = compare_document(config, env, infos, levels, args.save_text)
        md = compare_markdown(config, env, infos, levels)
        flat = [r for cl in levels for r in cl.runs]
        names = {k: f"{k} {t.model} {t.base_url}" if args.compare_models else f"{k} {urls[k]}"
                 for k, t in targets.items()}
    else:
        flat, stop = run_sweep(specs, targets["A"], shapes, settings,
                               StopRule(args.max_error_rate, args.min_slo_attainment), log=log)
        doc = run_document(config, env, infos, flat, stop, args.save_text)
        md = run_markdown(config, env, infos, flat, stop)
        names = {"A": urls["A"]}
        if stop:
            log(f"sweep stopped — {stop}")
    write_json(out_dir / "result.json", doc)
    (out_dir / "report.md").write_text(md)
    if not args.no_plots:
        from .plots import write_plots

        write_plots(flat, out_dir, names)
    if compare:
        section = md.split("## Every run")[0].split("## Ratio")[1]
        log("Ratio" + section.rstrip())
    log(f"results: {out_dir}")
    return 0 if any(l.summary.completed for l in flat) else 1


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Load-test an OpenAI-compatible server (vllm bench serve "
                               "definitions); A/B with --compare.")
    add_arguments(p)
    return p


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to a parent CLI; ``args.func(args)`` then returns the exit code."""
    p = subparsers.add_parser(
        "bench", help="load-test a server (TTFT/TPOT/ITL/E2E, goodput, sweeps, A/B)",
        description="Load-test an OpenAI-compatible server; A/B with --compare.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
