"""`sea compare`: every method on the same windows at the same budgets.

Per method and k: perplexity (``evaluate.perplexity``, the project's one implementation, on the
same sliding windows), its ratio to dense, the keys per query per head actually used and the
fraction of the dense attention mass the selection covers, per layer and overall. The linear
attentions (``performer``, ``cosformer``) select nothing and take no budget: one row each,
without keys or coverage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from ..evaluate import perplexity
from ..methods import check_methods as check_list
from ...hf import layer_override, sea_budget
from .chunks import Selector
from .dense import dense_mask
from .layer import SelectionStats, SelectorOverride, SEAOverride
from .oracle import oracle_head_mask, oracle_mask
from .quest import check_budget as quest_budget, quest_mask
from .trained import TRAINED, BaselineLayers, baseline_layers
from .window_sinks import window_sinks_mask

SELECTORS: dict[str, Selector] = {  # the training-free methods
    "dense": dense_mask,
    "oracle": oracle_mask,
    "oracle_head": oracle_head_mask,
    "window_sinks": window_sinks_mask,
    "quest": quest_mask,
}
# sea: the model's own SEA attention at each k; the trained baselines run on a model distilled with them
METHODS: tuple[str, ...] = (*SELECTORS, "sea", *TRAINED)
DEFAULT_METHODS: tuple[str, ...] = ("dense", "oracle", "oracle_head", "window_sinks", "quest", "sea")
BUDGET_FREE: tuple[str, ...] = ("dense", *(name for name, m in TRAINED.items() if not m.selects))  # one row each
BUDGET_CHECKS: dict[str, Callable[[int], None]] = {"quest": quest_budget}  # methods that cannot run at every k


def check_methods(methods) -> tuple[str, ...]:
    """The compared methods in order without repeats (``tools.methods.check_methods``)."""
    return check_list(methods, METHODS)


def method_runs(methods: tuple[str, ...], budgets: tuple[int, ...]) -> list[tuple[str, int | None]]:
    """(method, k) pairs in order: dense once (the reference, always first), the other budget-free
    methods once, the rest per k."""
    return [("dense", None)] + [(m, k) for m in methods if m != "dense"
                                for k in ((None,) if m in BUDGET_FREE else budgets)]


def check_budgets(methods: tuple[str, ...], budgets: tuple[int, ...]) -> None:
    """ValueError for the first (method, k) that cannot run (quest below one page): every pair is
    checked before the first forward, so no finished row is thrown away."""
    for method, k in method_runs(methods, budgets):
        if k is not None and method in BUDGET_CHECKS:
            BUDGET_CHECKS[method](k)


@dataclass(frozen=True)
class CompareConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[int, ...] = (32, 64, 128)  # k: keys per query per head
    seq_len: int = 1024
    stride: int | None = None  # None: seq_len (non-overlapping windows)
    coverage_skip: float = 0.0  # coverage over rows at positions >= skip * window length
    chunk_size: int = 256  # query rows per selection chunk (memory: chunk x keys per head)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", check_methods(self.methods))
        if not self.budgets or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.budgets):
            raise ValueError(f"budgets must be positive integers, got {self.budgets!r}")
        if not 0.0 <= self.coverage_skip < 1.0:
            raise ValueError(f"coverage_skip must be a fraction in [0, 1), got {self.coverage_skip!r}")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise ValueError(f"stride must be in [1, seq_len={self.seq_len}] or None (seq_len), got {self.stride!r}")
        check_budgets(self.methods, self.budgets)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")

    def runs(self) -> list[tuple[str, int | None]]:
        return method_runs(self.methods, self.budgets)

    @property
    def window_stride(self) -> int:
        return self.seq_len if self.stride is None else self.stride


@dataclass
class CompareRow:
    method: str
    k: int | None
    perplexity: float
    ratio: float  # perplexity / dense perplexity
    keys_per_query: float | None  # mean keys per (query, head) actually used, over layers (None: selects nothing)
    coverage: float | None  # mean teacher attention mass on the selected keys, over layers (None: idem)
    tokens: int
    layer_keys: list[float]
    layer_coverage: list[float]


def check_model_runs(model: nn.Module, method: str) -> BaselineLayers | None:
    """ValueError if ``model`` cannot run ``method``: a trained baseline needs a model distilled with
    it, and a model carrying one has untrained SEA layers. Returns the baseline ``method`` runs, if any."""
    trained = baseline_layers(model)
    if method in TRAINED and (trained is None or trained.name != method):
        carries = f"carries {trained.name}" if trained else "carries no trained baseline"
        raise ValueError(f"{method} runs on a model distilled with `sea distill --method {method}`; this model "
                         f"{carries}")
    if method == "sea" and trained is not None:
        raise ValueError(f"this model carries a trained {trained.name}, not a distilled SEA: its SEA layers are "
                         f"untrained; compare it with --methods {trained.name}")
    return trained if method in TRAINED else None


@contextmanager
def method_attention(model: nn.Module, method: str, k: int | None, stats: SelectionStats | None = None,
                     chunk_size: int = 256) -> Iterator[nn.Module]:
    """Run the patched ``model`` with ``method`` at budget ``k`` inside the ``with`` block.

    ``sea`` without ``stats`` is the model's own path untouched (its decoding state included). A
    trained baseline needs a model distilled with it (``sea distill --method NAME``).
    """
    trained = check_model_runs(model, method)
    if trained is not None:
        with layer_override(model, lambda call: (trained.attend(call, k, stats, chunk_size), None)):
            yield model
        return
    if method == "sea":
        with sea_budget(model, k):
            if stats is None:
                yield model
            else:
                with layer_override(model, SEAOverride(stats)):
                    yield model
        return
    if method not in SELECTORS:
        raise ValueError(f"method must be one of {','.join(METHODS)}, got {method!r}")
    with layer_override(model, SelectorOverride(SELECTORS[method], k or 0, stats, chunk_size)):
        yield model


def evaluate_method(model: nn.Module, tokens: Tensor, method: str, k: int | None, config: CompareConfig, *,
                    dense: float | None = None, progress: bool = True) -> CompareRow:
    """One row: perplexity and selection statistics of ``method`` at ``k``."""
    stats = SelectionStats(config.coverage_skip)
    name = method if k is None else f"{method} k={k}"
    with method_attention(model, method, k, stats, config.chunk_size):
        ppl, count = perplexity(model, tokens, config.seq_len, config.window_stride, desc=name,
                                progress=progress)
    layers = stats.per_layer()
    selected = bool(layers)  # the linear attentions select nothing
    return CompareRow(method, k, ppl, ppl / (dense or ppl), stats.keys_per_query() if selected else None,
                      stats.coverage() if selected else None, count, [keys for keys, _ in layers],
                      [cover for _, cover in layers])


def compare_perplexity(model: nn.Module, tokens: Tensor, config: CompareConfig, progress: bool = True,
                       on_row: Callable[[list[CompareRow]], None] | None = None) -> list[CompareRow]:
    """Dense first (the reference of every ratio), then each method at each budget.

    ``on_row(rows so far)`` runs after every row (the CLI rewrites its JSON: a long run that is
    stopped keeps what it finished).
    """
    rows: list[CompareRow] = []
    for method, k in config.runs():
        dense = rows[0].perplexity if rows else None
        rows.append(evaluate_method(model, tokens, method, k, config, dense=dense, progress=progress))
        if on_row is not None:
            on_row(rows)
    return rows


def format_compare_table(rows: list[CompareRow]) -> str:
    """Plain-text table: one line per (method, k)."""
    lines = [f"{'method':<13} {'k':>5} {'perplexity':>11} {'x dense':>8} {'keys/q/h':>9} {'coverage':>9} "
             f"{'tokens':>7}"]
    for r in rows:
        k = "-" if r.k is None else str(r.k)
        keys = "-" if r.keys_per_query is None else f"{r.keys_per_query:.1f}"
        coverage = "-" if r.coverage is None else f"{r.coverage:.3f}"
        lines.append(f"{r.method:<13} {k:>5} {r.perplexity:>11.2f} {r.ratio:>8.3f} {keys:>9} {coverage:>9} "
                     f"{r.tokens:>7}")
    return "\n".join(lines)
