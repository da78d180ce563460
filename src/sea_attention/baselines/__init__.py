"""Every competitor of SEA in one harness, at equal budget (`sea compare`).

Training-free selectors, one file each, each beside a readable one-row-at-a-time reference:
``dense``, ``oracle`` / ``oracle_head`` (top-k of the true attention), ``window_sinks``
(StreamingLLM) and ``quest`` (page min/max bounds). ``sea`` is the model's own SEA attention.

    rows = compare_perplexity(model, tokens, CompareConfig(budgets=(32, 64)))
    print(format_compare_table(rows))
"""

from .chunks import QueryChunk, Selector, query_chunks
from .compare import (
    DEFAULT_METHODS, METHODS, SELECTORS, CompareConfig, CompareRow, check_methods, compare_perplexity,
    evaluate_method, format_compare_table, method_attention,
)
from .layer import LayerStats, SelectionStats, SelectorOverride, SEAOverride

__all__ = [
    "DEFAULT_METHODS", "METHODS", "SELECTORS", "CompareConfig", "CompareRow", "LayerStats", "QueryChunk",
    "SEAOverride", "SelectionStats", "Selector", "SelectorOverride", "check_methods", "compare_perplexity",
    "evaluate_method", "format_compare_table", "method_attention", "query_chunks",
]
