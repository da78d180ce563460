"""Every competitor of SEA in one harness, at equal budget (`sea compare`).

Training-free selectors, one file each, each beside a readable one-row-at-a-time reference:
``dense``, ``oracle`` / ``oracle_head`` (top-k of the true attention), ``window_sinks``
(StreamingLLM) and ``quest`` (page min/max bounds). ``sea`` is the model's own SEA attention.
Trained baselines (``trained.py``; distilled by ``sea distill --method``, saved by ``saving.py``):
``indexer`` (DSA's lightning indexer, top-k of a learned quadratic score), ``performer`` and
``cosformer`` (linear attentions, ``linear.py``), each beside a dense reference formula.

    rows = compare_perplexity(model, tokens, CompareConfig(budgets=(32, 64)))
    print(format_compare_table(rows))
"""

from .chunks import QueryChunk, Selector, query_chunks
from .compare import (
    BUDGET_FREE, DEFAULT_METHODS, METHODS, SELECTORS, CompareConfig, CompareRow, check_methods, compare_perplexity,
    evaluate_method, format_compare_table, method_attention, method_runs,
)
from .layer import LayerStats, SelectionStats, SelectorOverride, SEAOverride
from .saving import load_baseline, save_baseline
from .trained import TRAINED, BaselineLayers, attach_baseline, baseline_layers

__all__ = [
    "BUDGET_FREE", "DEFAULT_METHODS", "METHODS", "SELECTORS", "TRAINED", "BaselineLayers", "CompareConfig",
    "CompareRow", "LayerStats", "QueryChunk", "SEAOverride", "SelectionStats", "Selector", "SelectorOverride",
    "attach_baseline", "baseline_layers", "check_methods", "compare_perplexity", "evaluate_method",
    "format_compare_table", "load_baseline", "method_attention", "method_runs", "query_chunks", "save_baseline",
]
