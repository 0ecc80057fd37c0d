"""Results on disk: one JSON per run (config + environment + every request) and Markdown.

The JSON keeps per-request records (TTFT, ITLs, tokens, error class) so figures
can be recomputed or re-plotted later without re-running the load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .compare import RATIO_FIGURES, CompareLevel
from .sweep import LevelResult

FORMAT_VERSION = 1


def level_json(level: LevelResult, with_text: bool = False) -> dict[str, Any]:
    return {
        "target": level.target,
        "repeat": level.repeat,
        "shape": level.shape.to_json(),
        "label": level.shape.label,
        "timed_out": level.run.timed_out,
        "started_at": level.run.started_at,
        "summary": level.summary.to_json(),
        "requests": [r.to_json(with_text) for r in level.run.records],
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(obj):  # JSON has no NaN/inf
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    path.write_text(json.dumps(clean(data), indent=1, ensure_ascii=False) + "\n")
    return path


def run_document(config, environment, targets, levels: list[LevelResult], stop_reason,
                 with_text=False) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION, "kind": "run", "config": config, "environment": environment,
        "targets": targets, "stop_reason": stop_reason,
        "levels": [level_json(l, with_text) for l in levels],
    }


def compare_document(config, environment, targets, levels: list[CompareLevel],
                     with_text=False) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION, "kind": "compare", "config": config,
        "environment": environment, "targets": targets,
        "levels": [
            {
                "shape": cl.shape.to_json(), "label": cl.shape.label,
                "ratios_b_over_a": {k: v.to_json() for k, v in cl.ratios().items()},
                "runs": [level_json(r, with_text) for r in cl.runs],
            }
            for cl in levels
        ],
    }


def _row(level: LevelResult) -> str:
    s = level.summary
    good = f"{s.goodput:.2f}" if s.goodput is not None else "–"
    return (
        f"| {level.shape.label} | {s.completed}/{s.sent} | {s.failed} | {s.duration_s:.1f} | "
        f"{s.request_throughput:.2f} | {s.output_throughput:.1f} | {s.total_token_throughput:.1f} | "
        f"{s.ttft.mean:.1f} / {s.ttft.median:.1f} / {s.ttft.p90:.1f} / {s.ttft.p99:.1f} | "
        f"{s.tpot.mean:.2f} / {s.tpot.median:.2f} / {s.tpot.p90:.2f} / {s.tpot.p99:.2f} | "
        f"{s.itl.mean:.2f} / {s.itl.median:.2f} / {s.itl.p90:.2f} / {s.itl.p99:.2f} | "
        f"{s.e2el.mean:.0f} / {s.e2el.median:.0f} / {s.e2el.p90:.0f} / {s.e2el.p99:.0f} | "
        f"{good} |"
    )


_HEADER = (
    "| load | ok/sent | failed | duration s | req/s | out tok/s | total tok/s | "
    "TTFT ms mean/p50/p90/p99 | TPOT ms mean/p50/p90/p99 | ITL ms mean/p50/p90/p99 | "
    "E2E ms mean/p50/p90/p99 | goodput req/s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _env_lines(env: dict[str, Any]) -> list[str]:
    pk = env.get("packages", {})
    return [
        f"- machine: {env.get('cpu')} × {env.get('cpu_count')} CPUs, "
        f"{env.get('mem_total_gib')} GiB RAM, GPUs: {', '.join(env.get('gpus') or []) or 'none'}",
        f"- software: python {env.get('python')}, "
        + ", ".join(f"{k} {v}" for k, v in pk.items()),
        f"- git: {env.get('git', {}).get('commit', '?')}"
        + (" (dirty)" if env.get("git", {}).get("dirty") else ""),
    ]


def _config_lines(config: dict[str, Any]) -> list[str]:
    keys = ("workload", "endpoint", "num_requests", "input_len", "output_len", "ignore_eos",
            "tokenizer", "seed", "warmup", "max_duration", "slo_ms")
    return ["- " + ", ".join(f"{k}={config.get(k)}" for k in keys if k in config)]


def errors_lines(levels: list[LevelResult]) -> list[str]:
    lines = []
    for l in levels:
        if l.summary.errors:
            errs = ", ".join(f"{k}: {v}" for k, v in sorted(l.summary.errors.items()))
            lines.append(f"- [{l.target}] {l.shape.label}: {errs}")
    return lines


def run_markdown(config, environment, targets, levels: list[LevelResult], stop_reason) -> str:
    out = ["# Benchmark run", "", f"Target: {targets['A'].get('base_url')} "
           f"(model {config.get('model')})", ""]
    out += _config_lines(config) + _env_lines(environment) + [""]
    out += [_HEADER] + [_row(l) for l in levels] + [""]
    if stop_reason:
        out += [f"Sweep stopped — {stop_reason}.", ""]
    errs = errors_lines(levels)
    if errs:
        out += ["Errors by class:"] + errs + [""]
    out += ["Definitions follow `vllm bench serve`: TTFT to first token chunk; TPOT = "
            "(E2E − TTFT)/(output tokens − 1); throughput over the whole run; tokens from "
            "the server's usage.", ""]
    return "\n".join(out)


def compare_markdown(config, environment, targets, levels: list[CompareLevel]) -> str:
    out = ["# A/B comparison", "",
           f"- A: {targets['A'].get('base_url')} model {targets['A'].get('model')}  ",
           f"- B: {targets['B'].get('base_url')} model {targets['B'].get('model')}", ""]
    out += _config_lines(config) + _env_lines(environment)
    out += [f"- repeats per level: {config.get('repeats')}, order alternates A B / B A", ""]
    out += ["## Ratio B/A (median over repeats, [min – max])", ""]
    names = {
        "request_throughput": "req/s", "output_throughput": "out tok/s",
        "total_token_throughput": "total tok/s", "ttft.median": "TTFT p50", "ttft.p99": "TTFT p99",
        "tpot.median": "TPOT p50", "tpot.p99": "TPOT p99", "itl.median": "ITL p50",
        "e2el.median": "E2E p50", "e2el.p99": "E2E p99",
    }
    out += ["| load | " + " | ".join(names[f] for f in RATIO_FIGURES) + " |",
            "|---|" + "---|" * len(RATIO_FIGURES)]
    for cl in levels:
        ratios = cl.ratios()
        cells = [f"{ratios[f].median:.3f} [{ratios[f].low:.3f} – {ratios[f].high:.3f}]"
                 for f in RATIO_FIGURES]
        out.append(f"| {cl.shape.label} | " + " | ".join(cells) + " |")
    out += ["", "## Every run", "", _HEADER.replace("| load |", "| target | load |", 1)
            .replace("|---|", "|---|---|", 1)]
    for cl in levels:
        for r in cl.runs:
            out.append(f"| {r.target}#{r.repeat + 1} " + _row(r))
    errs = errors_lines([r for cl in levels for r in cl.runs])
    if errs:
        out += ["", "Errors by class:"] + errs
    out.append("")
    return "\n".join(out)
