"""Perplexity against the keys per query per head each method actually used, one line per method."""

from __future__ import annotations

from pathlib import Path

from ...atomic import write_file
from .compare import CompareRow


def plot_compare(rows: list[CompareRow], path: str | Path, title: str = "") -> Path:
    """Write a PNG: one line per sparse method over its budgets; dense (dashed) and the linear
    attentions (dotted), which take no budget, as levels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    ax = fig.subplots()
    sparse = list(dict.fromkeys(r.method for r in rows if r.k is not None))
    for method in sparse:
        points = sorted((r.keys_per_query, r.perplexity) for r in rows if r.method == method)
        ax.plot(*zip(*points), marker="o", label=method)
    dense = next((r for r in rows if r.method == "dense"), None)
    if dense is not None:
        ax.axhline(dense.perplexity, linestyle="--", color="gray", label=f"dense ({dense.perplexity:.2f})")
    levels = [r for r in rows if r.k is None and r.method != "dense"]
    for color, r in enumerate(levels, start=len(sparse)):  # the colours after the sparse methods' lines
        ax.axhline(r.perplexity, linestyle=":", color=f"C{color}", label=f"{r.method}, every key ({r.perplexity:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("keys per query per head (measured)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title or "perplexity at equal budget")
    return write_file(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
