"""Run one or more load levels against one server; stop when it saturates.

A sweep walks increasing load (concurrency or rate levels) and stops at the first
level where the server is saturated: error rate above ``max_error_rate``, SLO
attainment below ``min_slo_attainment`` (only with ``--slo``), or the bounded run
hitting its time limit. The saturating level is kept in the results — it is the
answer to "where does it saturate?".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .client import Target
from .loadgen import LoadShape, RunResult, run_load
from .metrics import Summary, summarize
from .workloads import RequestSpec


@dataclass(frozen=True)
class RunSettings:
    max_duration: float = 600.0
    request_timeout: float = 300.0
    warmup: int = 0
    seed: int = 0
    progress: bool = True
    slo_ms: dict | None = None


@dataclass(frozen=True)
class StopRule:
    max_error_rate: float = 0.05
    min_slo_attainment: float = 0.9


@dataclass
class LevelResult:
    shape: LoadShape
    run: RunResult
    summary: Summary
    target: str = "A"
    repeat: int = 0


def parse_sweep(text: str, burstiness: float = 1.0, cap: int | None = None) -> list[LoadShape]:
    """``concurrency=1,8,32`` or ``rate=0.5,1,2`` (rates may be capped by ``cap``)."""
    key, _, values = text.partition("=")
    key = key.strip().lower()
    try:
        nums = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: numbers expected") from None
    if not nums:
        raise ValueError(f"--sweep {text!r}: no levels")
    if key == "concurrency":
        return [LoadShape(concurrency=int(v)) for v in nums]
    if key == "rate":
        return [LoadShape(concurrency=cap, rate=v, burstiness=burstiness) for v in nums]
    raise ValueError(f"--sweep {text!r}: use concurrency=... or rate=...")


def saturation_reason(level: LevelResult, rule: StopRule) -> str | None:
    """Why this level counts as saturated, or None."""
    s = level.summary
    if s.error_rate > rule.max_error_rate:
        return f"error rate {s.error_rate:.1%} > {rule.max_error_rate:.1%} at {level.shape.label}"
    attainment = s.slo_attainment
    if attainment is not None and attainment < rule.min_slo_attainment:
        return (f"SLO attainment {attainment:.1%} < {rule.min_slo_attainment:.1%} "
                f"at {level.shape.label}")
    if level.run.timed_out:
        return f"run hit its time limit at {level.shape.label}"
    return None


def run_level(
    specs: list[RequestSpec], target: Target, shape: LoadShape, settings: RunSettings,
    *, label: str = "A", repeat: int = 0,
) -> LevelResult:
    """One bounded run (blocking; owns its event loop)."""
    desc = f"{label} {shape.label}" + (f" #{repeat + 1}" if repeat else "")
    run = asyncio.run(run_load(
        specs, target, shape,
        max_duration=settings.max_duration, request_timeout=settings.request_timeout,
        seed=settings.seed, warmup=settings.warmup, progress=settings.progress, desc=desc,
    ))
    return LevelResult(shape, run, summarize(run.records, run.duration_s, settings.slo_ms),
                       target=label, repeat=repeat)


def run_sweep(
    specs: list[RequestSpec], target: Target, shapes: list[LoadShape], settings: RunSettings,
    rule: StopRule, log=print,
) -> tuple[list[LevelResult], str | None]:
    """Run levels in order until one saturates; returns results and the stop reason."""
    results: list[LevelResult] = []
    for shape in shapes:
        level = run_level(specs, target, shape, settings)
        results.append(level)
        log(one_line(level))
        reason = saturation_reason(level, rule)
        if reason and len(shapes) > 1:
            return results, "saturated: " + reason
    return results, None


def one_line(level: LevelResult) -> str:
    s = level.summary
    return (
        f"[{level.target}] {level.shape.label}: "
        f"{s.completed} ok, {s.failed} failed, {s.cancelled} cancelled in {s.duration_s:.1f}s | "
        f"{s.request_throughput:.2f} req/s, {s.output_throughput:.1f} out tok/s | "
        f"TTFT p50 {s.ttft.median:.0f} ms p99 {s.ttft.p99:.0f} ms | "
        f"TPOT p50 {s.tpot.median:.1f} ms | E2E p50 {s.e2el.median:.0f} ms"
        + (f" | goodput {s.goodput:.2f} req/s" if s.goodput is not None else "")
    )
