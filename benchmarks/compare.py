"""A/B mode: the same request list against two servers, interleaved, with repeats.

Why interleaved: on a shared machine throughput drifts over minutes; alternating
the order per repeat (A B, B A, A B, …) makes drift hit both sides equally, and
the spread of B/A over repeats shows how much of a difference is noise. Runs are
sequential — running A and B at the same time would make them compete for the
same CPUs and measure the contention instead.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .client import Target
from .loadgen import LoadShape
from .sweep import LevelResult, RunSettings, one_line, run_level
from .workloads import RequestSpec

# Figures whose ratio B/A is reported (dotted names of Summary.figure).
RATIO_FIGURES = (
    "request_throughput", "output_throughput", "total_token_throughput",
    "ttft.median", "ttft.p99", "tpot.median", "tpot.p99", "itl.median", "e2el.median", "e2el.p99",
)


@dataclass
class Ratio:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def to_json(self) -> dict:
        return {"values": self.values, "median": self.median, "min": self.low,
                "max": self.high, "stdev": self.stdev}


@dataclass
class CompareLevel:
    shape: LoadShape
    runs: list[LevelResult] = field(default_factory=list)

    def side(self, label: str) -> list[LevelResult]:
        return [r for r in self.runs if r.target == label]

    def ratios(self) -> dict[str, Ratio]:
        """B/A per repeat (pairs matched by repeat index) for each figure."""
        a = {r.repeat: r.summary for r in self.side("A")}
        b = {r.repeat: r.summary for r in self.side("B")}
        out = {}
        for name in RATIO_FIGURES:
            vals = []
            for rep in sorted(set(a) & set(b)):
                fa, fb = a[rep].figure(name), b[rep].figure(name)
                if fa > 0:
                    vals.append(fb / fa)
            out[name] = Ratio(vals)
        return out


def order_for(repeat: int) -> tuple[str, str]:
    """A B on even repeats, B A on odd ones."""
    return ("A", "B") if repeat % 2 == 0 else ("B", "A")


def run_compare(
    specs: list[RequestSpec], targets: dict[str, Target], shapes: list[LoadShape],
    settings: RunSettings, repeats: int, log=print,
) -> list[CompareLevel]:
    levels = []
    for shape in shapes:
        level = CompareLevel(shape)
        for rep in range(repeats):
            for label in order_for(rep):
                result = run_level(specs, targets[label], shape, settings, label=label, repeat=rep)
                level.runs.append(result)
                log(one_line(result) + f" (repeat {rep + 1}/{repeats})")
        levels.append(level)
    return levels
