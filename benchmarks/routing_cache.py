"""Routing and caching measured on real stacks: prefix affinity, adapter affinity, the cache.

  python -m benchmarks.routing_cache prefix [-n 96] [--prefixes 25] [--out DIR]
      Shared-system-prompt workload (a few requests per prompt) on 1 replica, then on 2 replicas with
      round_robin and with prefix_affinity: engine prefix-cache hit rate
      (vllm:prefix_cache_hits / queries, from /metrics) and the share of
      requests each replica served.
  python -m benchmarks.routing_cache adapters [-n 96] [--concurrency 8] [--out DIR]
      Two LoRA adapters on 2 replicas with engine.max_loras 1 (vLLM then batches one
      adapter at a time), requests for either at random: round_robin without and with
      router.adapter_affinity. Latency p50/p90, requests/s, each replica's share, how
      many requests vLLM held back for want of a LoRA slot (sampled), and how often an
      engine put an adapter into a slot (vLLM's "Activating LoRA" debug line).
  python -m benchmarks.routing_cache cache URL [-n 200]
      Repeated identical deterministic queries against a running stack: uncached
      (Cache-Control: no-cache) against cached, request rate and p50 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from .stacks import ROOT, start_stack, stop_stack

SYSTEM = ("You are the support assistant of a hardware shop. Answer briefly and politely, "
          "quote the order number when one is given, never invent stock levels, and "
          "escalate safety issues to a human. ") * 6


def _metric_sums(text: str, name: str) -> dict[str, float]:
    """Per-replica sums of one vLLM counter from the ingress's /metrics."""
    out: dict[str, float] = {}
    for m in re.finditer(rf'^{re.escape(name)}\{{([^}}]*)\}}\s+([0-9.eE+-]+)$', text, re.MULTILINE):
        replica = re.search(r'replica="([^"]*)"', m.group(1))
        key = replica.group(1) if replica else ""
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


async def _send_all(base: str, model: str, n: int, concurrency: int, prefixes: int) -> None:
    """``n`` chat requests spread over ``prefixes`` distinct system prompts, interleaved:
    affinity matters when a prefix's first visit to each replica is a miss."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> None:
            async with sem:
                resp = await client.post(f"{base}/v1/chat/completions", json={
                    "model": model, "max_tokens": 8, "temperature": 0.7,
                    "messages": [{"role": "system", "content": f"Desk {i % prefixes}. {SYSTEM}"},
                                 {"role": "user", "content": f"Question {i}: where is my order {1000 + i}?"}]})
                resp.raise_for_status()
        await asyncio.gather(*(one(i) for i in range(n)))


def measure_prefix(stack, n: int, concurrency: int, prefixes: int) -> dict:
    before = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
    asyncio.run(_send_all(stack.base_url, stack.model, n, concurrency, prefixes))
    after = httpx.get(f"{stack.base_url}/metrics", timeout=30).text

    def delta(name):
        a, b = _metric_sums(after, name), _metric_sums(before, name)
        return {k: a[k] - b.get(k, 0.0) for k in a}

    hits, queries = delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")
    served = delta("vllm:request_success_total")
    total = sum(served.values()) or 1
    return {"hit_rate": sum(hits.values()) / (sum(queries.values()) or 1),
            "share": {k: v / total for k, v in sorted(served.items())},
            "max_share": max(served.values()) / total if served else 0.0}


def cmd_prefix(args) -> int:
    layouts = [("1 replica", ["--set", "topology.replicas=1"]),
               ("2 replicas, round_robin", ["--set", "topology.replicas=2", "--set", "router.policy=round_robin"]),
               ("2 replicas, prefix_affinity", ["--set", "topology.replicas=2",
                                                "--set", "router.policy=prefix_affinity"])]
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for label, extra in layouts:
            stack = start_stack(Path(logs), *extra, "--set", "router.response_cache.enabled=false",
                                name=label.replace(" ", "_").replace(",", ""))
            try:
                results[label] = measure_prefix(stack, args.n, args.concurrency, args.prefixes)
            finally:
                stop_stack(stack)
            print(f"{label}: {json.dumps(results[label])}", flush=True)
    single = results["1 replica"]["hit_rate"] or 1e-9
    lines = ["| layout | prefix-cache hit rate | vs 1 replica | max share of requests |",
             "|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['hit_rate']:.3f} | {r['hit_rate'] / single:.2f}× | {r['max_share']:.2f} |")
    _write(args.out, "prefix-routing", results, lines)
    return 0


LORA_CONFIG = ROOT / "deploy" / "configs" / "local-cpu-lora.yaml"
# The demo adapter under a second name: vLLM gives each name its own adapter id and
# LoRA slot, which is what the routing question is about (the weights being equal
# changes nothing in how the scheduler batches them).
ADAPTERS = ("smollm2-demo-note", "smollm2-demo-note-b")


def _gauge_sum(text: str, name: str, label: str) -> float:
    return sum(float(m.group(2)) for m in re.finditer(
        rf'^{re.escape(name)}\{{([^}}]*)\}}\s+([0-9.eE+-]+)$', text, re.MULTILINE)
        if label in m.group(1))


async def _adapter_load(base: str, n: int, concurrency: int, seed: int) -> dict:
    """``n`` chat requests, each for one of ``ADAPTERS`` at random, ``concurrency`` at once;
    the engines' deferred-request gauge sampled once a second meanwhile."""
    rng = random.Random(seed)
    picks = [rng.choice(ADAPTERS) for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ttfts: list[float] = []
    deferred: list[float] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int, model: str) -> None:
            async with sem:
                started = time.perf_counter()
                first = None
                async with client.stream("POST", f"{base}/v1/chat/completions", json={
                        "model": model, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                        "stream": True,
                        "messages": [{"role": "user", "content": f"Request {i}: name three rivers."}]}
                ) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if first is None and '"content"' in line and '"content":""' not in line:
                            first = time.perf_counter() - started
                latencies.append(time.perf_counter() - started)
                ttfts.append(first if first is not None else latencies[-1])

        async def sample() -> None:
            while not done.is_set():
                text = (await client.get(f"{base}/metrics")).text
                deferred.append(_gauge_sum(text, "vllm:num_requests_waiting_by_reason",
                                           'reason="deferred"'))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), 1.0)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        await asyncio.gather(*(one(i, m) for i, m in enumerate(picks)))
        elapsed = time.perf_counter() - started
        done.set()
        await sampler
    q = statistics.quantiles(latencies, n=10)
    return {"requests": n, "req_s": n / elapsed, "p50_s": statistics.median(latencies),
            "p90_s": q[8], "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": statistics.quantiles(ttfts, n=10)[8],
            "mean_deferred": statistics.fmean(deferred) if deferred else 0.0,
            "max_deferred": max(deferred, default=0.0),
            "latencies_s": sorted(round(x, 3) for x in latencies)}


# vLLM's own logging, plus the LoRA manager's debug line for each adapter it puts
# into a slot: with max_loras 1, every one after the first is a swap.
ACTIVATION_LINE = "Activating LoRA"
ENGINE_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [%(name)s] %(message)s"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain",
                         "stream": "ext://sys.stdout"}},
    "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                "vllm.lora.model_manager": {"level": "DEBUG"}},
}


def _activations(log_path: Path, settle_s: float = 3.0) -> int:
    time.sleep(settle_s)  # Ray forwards worker output to the driver's log with a delay
    return log_path.read_text(errors="replace").count(ACTIVATION_LINE)


def cmd_adapters(args) -> int:
    layouts = [("round_robin", "false"), ("round_robin + adapter affinity", "true")]
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        logging_config = Path(logs) / "vllm-logging.json"
        logging_config.write_text(json.dumps(ENGINE_LOGGING))
        for label, affinity in layouts:
            stack = start_stack(
                Path(logs), "--set", "topology.replicas=2", "--set", "router.policy=round_robin",
                "--set", f"router.adapter_affinity={affinity}",
                "--set", "router.response_cache.enabled=false", "--set", "engine.max_loras=1",
                "--set", f"model.adapters.{ADAPTERS[1]}.source=embedded:{ADAPTERS[0]}",
                name=label.replace(" ", "_").replace("+", ""), config=LORA_CONFIG, timeout_s=900,
                # RAY_DEDUP_LOGS=0: Ray folds like lines of several processes into one.
                env={"VLLM_LOGGING_CONFIG_PATH": str(logging_config), "RAY_DEDUP_LOGS": "0"})
            try:
                # One request per adapter first: both loaded everywhere they will be
                # asked for, so neither run measures first loads.
                asyncio.run(_adapter_load(stack.base_url, 4, 4, seed=99))
                before = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
                activated = _activations(stack.log_path)
                r = asyncio.run(_adapter_load(stack.base_url, args.n, args.concurrency, args.seed))
                after = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
                r["slot_loads"] = _activations(stack.log_path) - activated
            finally:
                stop_stack(stack)
            a, b = (_metric_sums(t, "vllm:request_success_total") for t in (after, before))
            served = {k: a[k] - b.get(k, 0.0) for k in a}
            total = sum(served.values()) or 1
            r["max_share"] = max(served.values()) / total if served else 0.0
            results[label] = r
            print(f"{label}: {json.dumps(r)}", flush=True)
    base = results["round_robin"]
    lines = ["| routing | adapter loads into a slot | E2E p50 | E2E p90 | TTFT p50 / p90 | req/s "
             "| deferred for a LoRA slot (mean / max) | max share of requests |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['slot_loads']} | {r['p50_s']:.2f} s ({r['p50_s'] / base['p50_s']:.2f}×) | "
                     f"{r['p90_s']:.2f} s ({r['p90_s'] / base['p90_s']:.2f}×) | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p90_s']:.2f} s | "
                     f"{r['req_s']:.2f} ({r['req_s'] / base['req_s']:.2f}×) | "
                     f"{r['mean_deferred']:.2f} / {r['max_deferred']:.0f} | {r['max_share']:.2f} |")
    _write(args.out, "adapter-routing", results, lines)
    return 0


def cmd_cache(args) -> int:
    body = {"model": args.model, "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}

    async def run(no_cache: bool) -> tuple[float, float]:
        headers = {"Cache-Control": "no-cache"} if no_cache else {}
        lat = []
        async with httpx.AsyncClient(timeout=120) as client:
            (await client.post(f"{args.url}/v1/chat/completions", json=body)).raise_for_status()  # fill
            sem = asyncio.Semaphore(args.concurrency)

            async def one():
                async with sem:
                    t = time.perf_counter()
                    r = await client.post(f"{args.url}/v1/chat/completions", json=body, headers=headers)
                    r.raise_for_status()
                    lat.append(time.perf_counter() - t)
            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(args.n)))
            return args.n / (time.perf_counter() - start), statistics.median(lat)

    if args.model is None:
        body["model"] = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    uncached = asyncio.run(run(True))
    cached = asyncio.run(run(False))
    results = {"uncached_req_s": uncached[0], "uncached_p50_ms": uncached[1] * 1000,
               "cached_req_s": cached[0], "cached_p50_ms": cached[1] * 1000,
               "speedup": cached[0] / uncached[0]}
    lines = ["| | req/s | p50 latency |", "|---|---|---|",
             f"| uncached (Cache-Control: no-cache) | {uncached[0]:.1f} | {uncached[1] * 1000:.1f} ms |",
             f"| response cache hit | {cached[0]:.1f} | {cached[1] * 1000:.2f} ms |",
             f"| ratio | {results['speedup']:.0f}× | |"]
    print("\n".join(lines))
    _write(args.out, "response-cache", results, lines)
    return 0


def _write(out: str | None, name: str, results: dict, lines: list[str]) -> None:
    print("\n".join(lines))
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (path / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing_cache")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prefix")
    p.add_argument("-n", type=int, default=96)
    # Odd, so round-robin over 2 replicas does not land every prefix on one replica by accident.
    p.add_argument("--prefixes", type=int, default=25, help="distinct system prompts")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out")
    p.set_defaults(func=cmd_prefix)
    p = sub.add_parser("adapters")
    p.add_argument("-n", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    p.set_defaults(func=cmd_adapters)
    p = sub.add_parser("cache")
    p.add_argument("url")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model")
    p.add_argument("--out")
    p.set_defaults(func=cmd_cache)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
