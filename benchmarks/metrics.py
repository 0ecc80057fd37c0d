"""Aggregate per-request records into the figures users compare.

Same arithmetic as ``vllm bench serve`` so both tools agree:

* throughputs divide by the whole benchmark duration (first dispatch to last
  completion), not by per-request time;
* input tokens are the server-reported prompt tokens of *successful* requests;
* TPOT statistics only include requests with more than one output token, but for
  goodput such requests count as TPOT = 0 (they cannot break a TPOT SLO);
* percentiles are numpy's linear interpolation; latencies are reported in ms.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from .stream import RequestRecord

SLO_KEYS = ("ttft", "tpot", "e2el")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Stats:
    """Distribution summary in milliseconds (all zeros when there is no sample)."""

    count: int
    mean: float
    median: float
    p90: float
    p99: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, seconds: Iterable[float]) -> "Stats":
        values = np.asarray(list(seconds), dtype=float) * 1000.0
        if values.size == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            count=int(values.size),
            mean=float(np.mean(values)),
            median=float(np.median(values)),
            p90=float(np.percentile(values, 90)),
            p99=float(np.percentile(values, 99)),
            std=float(np.std(values)),
            min=float(np.min(values)),
            max=float(np.max(values)),
        )


@dataclass
class Summary:
    """Figures of one benchmark run (one load level against one server)."""

    duration_s: float
    sent: int
    completed: int
    failed: int
    cancelled: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    errors: dict[str, int] = field(default_factory=dict)
    slo_ms: dict[str, float] = field(default_factory=dict)
    good_completed: int | None = None
    goodput: float | None = None
    usage_missing: int = 0

    @property
    def error_rate(self) -> float:
        """Failed / finished (cancelled-at-deadline requests are not failures)."""
        finished = self.completed + self.failed
        return self.failed / finished if finished else 0.0

    @property
    def slo_attainment(self) -> float | None:
        """Share of completed requests meeting every SLO."""
        if self.good_completed is None:
            return None
        return self.good_completed / self.completed if self.completed else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_rate"] = self.error_rate
        data["slo_attainment"] = self.slo_attainment
        return data

    def figure(self, name: str) -> float:
        """A scalar figure by dotted name, e.g. ``request_throughput`` or ``ttft.median``."""
        if "." in name:
            stat, attr = name.split(".", 1)
            return float(getattr(getattr(self, stat), attr))
        return float(getattr(self, name))


def parse_slo(text: str | None) -> dict[str, float]:
    """Parse ``ttft=500,tpot=50ms,e2el=2s`` into milliseconds per key.

    Bare numbers are milliseconds (as in vLLM's ``--goodput``); ``s``/``ms``
    suffixes are accepted. ``e2e`` is an alias of ``e2el``.
    """
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part and ":" not in part:
            raise ValueError(f"SLO {part!r}: expected KEY=VALUE (keys: {', '.join(SLO_KEYS)})")
        key, value = part.replace(":", "=", 1).split("=", 1)
        key = key.strip().lower()
        key = "e2el" if key == "e2e" else key
        if key not in SLO_KEYS:
            raise ValueError(f"SLO key {key!r} unknown (keys: {', '.join(SLO_KEYS)})")
        value = value.strip().lower()
        scale = 1.0
        if value.endswith("ms"):
            value = value[:-2]
        elif value.endswith("s"):
            value, scale = value[:-1], 1000.0
        try:
            number = float(value) * scale
        except ValueError:
            raise ValueError(f"SLO {part!r}: value is not a number") from None
        if number <= 0:
            raise ValueError(f"SLO {part!r}: value must be positive")
        slo[key] = number
    return slo


def _meets_slo(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    observed = {
        "ttft": record.ttft or 0.0,
        "tpot": record.tpot or 0.0,  # ≤ 1 output token: TPOT counts as 0
        "e2el": record.e2e or 0.0,
    }
    return all(observed[key] * 1000.0 <= limit for key, limit in slo_ms.items())


def summarize(
    records: list[RequestRecord], duration_s: float, slo_ms: dict[str, float] | None = None
) -> Summary:
    """Aggregate records of one run whose wall-clock length was ``duration_s``."""
    slo_ms = dict(slo_ms or {})
    done = [r for r in records if r.ok]
    cancelled = [r for r in records if not r.ok and r.error_class == "cancelled"]
    failed = [r for r in records if not r.ok and r.error_class != "cancelled"]
    total_in = sum(r.prompt_tokens or 0 for r in done)
    total_out = sum(r.output_tokens for r in done)
    dur = duration_s if duration_s > 0 else float("nan")
    good = sum(1 for r in done if _meets_slo(r, slo_ms)) if slo_ms else None
    return Summary(
        duration_s=duration_s,
        sent=len(records),
        completed=len(done),
        failed=len(failed),
        cancelled=len(cancelled),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(done) / dur,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        ttft=Stats.of(r.ttft for r in done if r.ttft is not None),
        tpot=Stats.of(t for t in (r.tpot for r in done) if t is not None),
        itl=Stats.of(gap for r in done for gap in r.itl),
        e2el=Stats.of(r.e2e for r in done if r.e2e is not None),
        errors=dict(Counter(r.error_class for r in records if not r.ok and r.error_class)),
        slo_ms=slo_ms,
        good_completed=good,
        goodput=(good / dur) if good is not None else None,
        usage_missing=sum(1 for r in done if not r.usage_reported),
    )
