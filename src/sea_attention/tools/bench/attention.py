"""Speed and peak memory of the attention alone (no model): SDPA, eager and SEA's paths.

Each (method, length) point runs in a fresh process, so its peak resident memory is its
own: peak RSS during one forward call minus RSS just before it (inputs and modules already
built, warm-up done). Times are medians of repeated forward calls after one untimed warm-up
call (which is also where ``sea_flex`` compiles). ``sea`` is the full forward (every field of
``SEAOutput``), ``sea_chunked`` the same layer's ``context_only`` (the row-chunked path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import check_methods as check_list
from .runtime import in_fresh_process, median_seconds, peak_extra_mb

METHODS = ("sdpa", "eager", "sea", "sea_chunked", "sea_block", "sea_block_chunked", "sea_reference", "sea_flex",
           "sea_bounds", "sea_f32", "sea_chunked_f32", "sea_block_refined_chunked", "sea_long_rows_chunked",
           "sea_long_rows_c16_chunked", "sea_per_query_chunked")
OPT_IN = ("sea_bounds", "sea_f32", "sea_chunked_f32", "sea_block_refined_chunked",
          "sea_long_rows_chunked", "sea_long_rows_c16_chunked", "sea_per_query_chunked")  # opt-in settings, when asked for
DEFAULT_METHODS = tuple(m for m in METHODS if m not in OPT_IN)
CHUNKED = ("sea_chunked", "sea_block_chunked", "sea_chunked_f32", "sea_block_refined_chunked",
           "sea_long_rows_chunked", "sea_long_rows_c16_chunked", "sea_per_query_chunked")  # through context_only: rows in spans
SEA_METHODS = {  # method -> SEAConfig changes
    "sea": {"attention_path": "sparse"},
    "sea_chunked": {"attention_path": "sparse"},
    "sea_block": {"grouping": "block"},
    "sea_block_chunked": {"grouping": "block"},
    "sea_reference": {"attention_path": "reference"},
    "sea_flex": {"attention_path": "flex"},  # per query on every row (the flex path runs no long-rows policy)
    "sea_bounds": {"key_bounds": True},
    "sea_f32": {"bin_sums_dtype": "float32"},
    "sea_chunked_f32": {"bin_sums_dtype": "float32"},
    "sea_block_refined_chunked": {"grouping": "block", "candidates": 4},  # exact refinement of 4x the budget
    "sea_long_rows_chunked": {"block_from": 1024, "block_candidates": 4},  # the long rows' blocks refine 4x the budget
    "sea_long_rows_c16_chunked": {"block_from": 1024, "block_candidates": 16},  # 16x (the default's values)
    "sea_per_query_chunked": {"block_from": 0},  # per query on every row (the default before the long-rows policy)
}


@dataclass
class AttentionBenchPoint:
    method: str
    length: int
    seconds: float | None  # median forward time; None when skipped or failed
    peak_mb: float | None  # peak extra resident memory during one forward
    note: str = ""
    speedup_vs_sdpa: float | None = None  # SDPA's time / this time at the same length


@dataclass
class AttentionBenchSetup:
    heads: int = 12
    head_dim: int = 64
    k: int = 64
    estimate_width: int | None = None  # None: SEAConfig's default
    causal: bool = True
    repeats: int = 3
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.estimate_width is None:  # SEAConfig's default for these shapes, recorded as the K used
            from ...core.config import SEAConfig

            self.estimate_width = SEAConfig(num_heads=self.heads, head_dim=self.head_dim,
                                            causal=self.causal).estimate_width

    def sea_config(self, length: int, **changes):
        from ...core.config import SEAConfig

        return SEAConfig(num_heads=self.heads, head_dim=self.head_dim, causal=self.causal, k=self.k,
                         estimate_width=self.estimate_width, max_positions=max(length, 2048), **changes)

    def inputs(self, length: int) -> tuple[Tensor, Tensor, Tensor]:
        """Random q, k, v of shape (1, H, T, d), the same for every method at this length."""
        torch.manual_seed(0)
        return tuple(torch.randn(1, self.heads, length, self.head_dim) for _ in range(3))


def check_methods(methods) -> tuple[str, ...]:
    """The benchmarked methods in order without repeats (``tools.methods.check_methods``)."""
    return check_list(methods, METHODS)


def estimated_gb(method: str, length: int, heads: int) -> float:
    """Rough peak of the methods that build (H, T, T) fp32 tensors; 0 for the linear-memory ones."""
    if method == "sea_reference":  # scores, mask, probabilities and a temporary
        return 4 * heads * length * length * 4 / 1e9
    if method == "eager":  # two (H, T, T) tensors alive at once, plus the (T, T) additive mask
        return (2 * heads + 1) * length * length * 4 / 1e9
    return 0.0


def eager_attention(q: Tensor, k: Tensor, v: Tensor, additive_mask: Tensor | None) -> Tensor:
    """What transformers calls eager attention: q k^T * scale (+ mask), softmax, @ v."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _forward_call(method: str, length: int, setup: AttentionBenchSetup) -> Callable[[], Tensor]:
    """A no-argument forward of ``method`` on this length's random inputs."""
    q, k, v = setup.inputs(length)
    if method == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=setup.causal)
    if method == "eager":
        # built once per model forward in transformers, shared by the layers: not timed
        mask = torch.full((length, length), float("-inf")).triu(1) if setup.causal else None
        return lambda: eager_attention(q, k, v, mask)
    from ...core.attention import SEAAttention

    module = SEAAttention(setup.sea_config(length, **SEA_METHODS[method])).eval()
    if method in CHUNKED:  # what a patched model runs when only the context is needed
        return lambda: module.context_only(q, k, v)
    return lambda: module(q, k, v).context


def measure_point(method: str, length: int, setup: AttentionBenchSetup) -> AttentionBenchPoint:
    """One point, in this process (``bench_attention`` calls it in a fresh one)."""
    if setup.threads:
        torch.set_num_threads(setup.threads)
    call = _forward_call(method, length, setup)
    with torch.no_grad():
        call()  # warm-up, untimed: kernels, thread pool, FlexAttention's compilation
        seconds = median_seconds(call, setup.repeats)
        peak = peak_extra_mb(call)
    return AttentionBenchPoint(method, length, seconds, peak)


def bench_attention(lengths: list[int], methods: tuple[str, ...] = DEFAULT_METHODS,
                    setup: AttentionBenchSetup | None = None, memory_limit_gb: float = 16.0,
                    timeout_s: float = 1800, progress: bool = True) -> list[AttentionBenchPoint]:
    """Time and measure every method at every length, each point in its own process.

    Methods that would need more than ``memory_limit_gb`` (dense T x T tensors) are skipped
    with a note; a method that raises or dies gets its error as the point's note.
    """
    setup = setup or AttentionBenchSetup()
    methods = check_methods(methods)
    points = []
    for length in lengths:
        for method in methods:
            needed = estimated_gb(method, length, setup.heads)
            if needed > memory_limit_gb:
                point = AttentionBenchPoint(method, length, None, None,
                                            f"skipped: needs ~{needed:.0f} GB > limit {memory_limit_gb:g} GB")
            else:
                point, note = in_fresh_process(measure_point, (method, length, setup), timeout_s)
                point = point or AttentionBenchPoint(method, length, None, None, note)
            points.append(point)
            if progress:
                print(f"  {method:<14} T={length:<7} {_cell(point.seconds, '.3f')} s  "
                      f"{_cell(point.peak_mb, '.0f')} MB  {point.note}", flush=True)
    return add_speedups(points)


def add_speedups(points: list[AttentionBenchPoint]) -> list[AttentionBenchPoint]:
    """Fill ``speedup_vs_sdpa`` wherever SDPA and the method were both measured at that length."""
    sdpa = {p.length: p.seconds for p in points if p.method == "sdpa" and p.seconds}
    for p in points:
        p.speedup_vs_sdpa = sdpa[p.length] / p.seconds if p.seconds and p.length in sdpa else None
    return points


def _cell(value: float | None, spec: str, width: int = 0) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def format_attention_table(points: list[AttentionBenchPoint]) -> str:
    """Time and memory per method and length, and SDPA's time as a multiple of each (speed-up)."""
    add_speedups(points)
    lines = [f"{'method':<14} {'T':>7} {'time (s)':>9} {'peak (MB)':>10} {'x SDPA':>7}  note"]
    for p in points:
        lines.append(f"{p.method:<14} {p.length:>7} {_cell(p.seconds, '.3f', 9)} {_cell(p.peak_mb, '.0f', 10)} "
                     f"{_cell(p.speedup_vs_sdpa, '.2f', 7)}  {p.note}")
    return "\n".join(lines)
