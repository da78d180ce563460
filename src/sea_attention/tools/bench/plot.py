"""Plots of the benchmarks against the sequence length.

The attention alone: log-log time and peak memory, with dashed O(T) and O(T^2) lines from the
smallest length's median value, so a method's slope can be read against them (a linear-time
method runs parallel to O(T)). A whole model: prefill and decode tokens/s and the prefill's peak
memory, dense beside SEA.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .attention import AttentionBenchPoint
from .model import MODES, ModelBenchPoint
from ...atomic import write_file


def _reference_lines(ax, xs: list[int], ys: list[float]) -> None:
    """Dashed O(T) and O(T^2) from the median value at the smallest length."""
    if len(set(xs)) < 2:
        return
    lo, hi = min(xs), max(xs)
    start = statistics.median(y for x, y in zip(xs, ys) if x == lo)
    for power, style in ((1, "--"), (2, ":")):
        ax.plot([lo, hi], [start, start * (hi / lo) ** power], style, color="gray", linewidth=1,
                label=f"O(T{'' if power == 1 else '²'})")


def plot_attention_bench(points: list[AttentionBenchPoint], path: str | Path, title: str = "") -> Path:
    """Write a PNG: time (left) and peak memory (right) against T, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(p.method for p in points))
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state (no display needed)
    axes = fig.subplots(1, 2)
    panels = (("seconds", "forward time (s)"), ("peak_mb", "peak extra memory (MB)"))
    for ax, (field, label) in zip(axes, panels):
        xs, ys = [], []
        for method in methods:
            # skipped points have no value; RSS noise can give <= 0 MB, which a log axis cannot show
            measured = [(p.length, getattr(p, field)) for p in points
                        if p.method == method and getattr(p, field) is not None and getattr(p, field) > 0]
            if measured:
                ax.plot(*zip(*measured), marker="o", label=method)
                xs += [x for x, _ in measured]
                ys += [y for _, y in measured]
        _reference_lines(ax, xs, ys)
        _length_axes(ax, sorted({p.length for p in points}), label, "sequence length T")
    fig.suptitle(title or "attention forward, B=1, fp32")
    return write_file(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))


def plot_model_bench(points: list[ModelBenchPoint], path: str | Path, title: str = "") -> Path:
    """Write a PNG: prefill tokens/s, decode tokens/s and the prefill's peak memory against the
    prompt length, dense beside SEA."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"),
              ("prefill_peak_mb", "prefill peak extra memory (MB)"))
    for ax, (field, label) in zip(fig.subplots(1, 3), panels):
        for mode in MODES:
            measured = [(p.length, getattr(p, field)) for p in points
                        if p.mode == mode and getattr(p, field) is not None and getattr(p, field) > 0]
            if measured:
                ax.plot(*zip(*measured), marker="o", label=mode)
        _length_axes(ax, sorted({p.length for p in points}), label, "prompt tokens T")
    fig.suptitle(title or "whole model: dense vs SEA, same weights")
    return write_file(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))


def _length_axes(ax, lengths: list[int], ylabel: str, xlabel: str) -> None:
    """Log axes with the measured lengths as ticks, a grid and the legend (when anything is drawn)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.minorticks_off() if len(lengths) > 1 else None
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
