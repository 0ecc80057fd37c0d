"""PNG plots with matplotlib (Agg backend: no display needed, works headless/CI).

latency vs load, throughput vs load, and TTFT / ITL distributions (as CDFs, which
stay readable with several series on one axis).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .sweep import LevelResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x(level: LevelResult) -> float:
    return float(level.shape.concurrency) if math.isinf(level.shape.rate) else level.shape.rate


def _xlabel(levels: list[LevelResult]) -> str:
    return "concurrency" if all(math.isinf(l.shape.rate) for l in levels) else "request rate (req/s)"


def _style_x(ax, levels: list[LevelResult]) -> None:
    """Log-2 x axis when levels span a wide range (e.g. concurrency 1, 8, 32)."""
    xs = [_x(l) for l in levels]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)


def _save_vs_load(fig, axes, levels: list[LevelResult], xlabel: str, title: str, path,
                  legend_size: int):
    """The shared finish of the load plots: x axis, grid, legend, title, PNG."""
    for ax in axes:
        _style_x(ax, levels)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _series(levels: list[LevelResult]) -> dict[str, list[list[LevelResult]]]:
    """target → list of level groups (repeats of the same shape grouped)."""
    out: dict[str, dict[str, list[LevelResult]]] = {}
    for l in levels:
        out.setdefault(l.target, {}).setdefault(l.shape.label, []).append(l)
    return {t: list(g.values()) for t, g in out.items()}


def write_plots(levels: list[LevelResult], out_dir: Path, names: dict[str, str]) -> list[Path]:
    """Write the four PNGs; ``names`` maps target label → legend text."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    series = _series(levels)
    xlabel = _xlabel(levels)

    def agg(groups, fig):
        xs = [_x(g[0]) for g in groups]
        ys = [float(np.median([l.summary.figure(fig) for l in g])) for g in groups]
        return xs, ys

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for target, groups in series.items():
        for ax, (fig_name, title) in zip(axes, (
            ("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"), ("e2el", "E2E latency (ms)"),
        )):
            for stat, style in (("median", "-o"), ("p99", "--x")):
                xs, ys = agg(groups, f"{fig_name}.{stat}")
                ax.plot(xs, ys, style, label=f"{names.get(target, target)} {stat}")
            ax.set_title(title)
    paths.append(_save_vs_load(fig, axes, levels, xlabel, "Latency vs load", out_dir / "latency_vs_load.png", 7))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, groups in series.items():
        for ax, (fig_name, title) in zip(axes, (
            ("request_throughput", "requests/s"), ("output_throughput", "output tokens/s"),
        )):
            xs, ys = agg(groups, fig_name)
            ax.plot(xs, ys, "-o", label=names.get(target, target))
            ax.set_title(title)
    paths.append(_save_vs_load(fig, axes, levels, xlabel, "Throughput vs load", out_dir / "throughput_vs_load.png", 8))

    for metric, title, fname in (("ttft", "TTFT", "ttft_cdf.png"), ("itl", "Inter-token latency",
                                                                     "itl_cdf.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for target, groups in series.items():
            for g in groups:
                if metric == "ttft":
                    vals = [r.ttft for l in g for r in l.run.records if r.ok and r.ttft is not None]
                else:
                    vals = [x for l in g for r in l.run.records if r.ok for x in r.itl]
                if not vals:
                    continue
                v = np.sort(np.asarray(vals) * 1000.0)
                ax.plot(v, np.arange(1, v.size + 1) / v.size,
                        label=f"{names.get(target, target)} {g[0].shape.label}")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of samples ≤ x")
        ax.set_title(f"{title} distribution (CDF)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / fname)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
