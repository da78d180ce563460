"""Where SEA's forward time goes: each stage timed alone, against its matmul floor.

The stages are those ``SEAAttention.forward`` runs: the estimator, then the grouping's own
``steps()`` (``query``, per query on every row: the grouped top-k, the cell -> key mapping and the
sparse attention op; ``block``: the block selection and the block-sparse op, which maps cells to keys
itself; ``long_rows``, the default's long-rows policy: its per-query rows, then its block rows),
each called exactly as the forward calls it, and the rest (validation, gating, masking), the
whole forward's time minus the stages'. A stage's floor is its FLOPs at this
machine's fp32 matmul rate: how fast it could be if it were one large matmul.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...core.call import SEACall
from ...core.estimator.decoder import CausalDecoder
from ...core.grouping import BlockGrouping, Grouping, LongRowsGrouping, PerQueryGrouping, grouping_for
from .attention import AttentionBenchSetup
from .runtime import in_fresh_process, matmul_gflops, median_seconds

CHUNK = 64  # queries per chunk of the causal linear attention (the chunk part's FLOPs)


@dataclass(frozen=True)
class EstimatorShape:
    """The sizes that set SEA's matmul work (see ``stage_flops``)."""

    heads: int  # H
    head_dim: int  # d
    num_features: int  # m, Performer features
    estimate_width: int  # K
    cnn_channels: int  # c, per head
    width_downsample: int  # K / w
    causal: bool = True

    @classmethod
    def of(cls, config) -> "EstimatorShape":
        return cls(config.num_heads, config.head_dim, config.num_features, config.estimate_width,
                   config.cnn_channels, config.width_downsample, config.causal)


def _stage_names(grouping: type[Grouping]) -> tuple[str, ...]:
    return ("estimator", *grouping.stages, "rest")


STAGES = {"query": _stage_names(PerQueryGrouping), "block": _stage_names(BlockGrouping),
          "long_rows": _stage_names(LongRowsGrouping)}  # in forward order
CONFIGS = {"query": {"grouping": "query", "block_from": 0}, "block": {"grouping": "block"},
           "long_rows": {"grouping": "query"}}  # each breakdown's SEAConfig changes (long_rows: the default)


def stage_flops(shape: EstimatorShape, length: int, mean_keys: float,
                decoded_rows: int | None = None) -> dict[str, float]:
    """FLOPs of SEA's matmul work for one sequence (B=1, T queries = T keys), by part.

    T = length, w = K // width_downsample, S = mean_keys (selected keys per query summed
    over all heads), the rest from ``shape``:

    * features: q and k random features, 2 * (2 T H d m)
    * linear_attention: state 2 T H m (2d) * 2, plus (causal) the within-chunk part
      T H 64 (m + 2d) * 2 with chunks of 64 queries
    * encoder: 2 T H (3d * 2d + 2d * 2) + 2 R H (2d * w * c)
    * decoder: two 3x3 convolutions 2 R w (H c)^2 * 9 * 2, then the 1x1 2 R w (H c) H

    R = decoded_rows, the rows the CNN runs on: T, or fewer when the grouping estimates some rows only
    (each with its 8-row history: ``cnn_rows``).
    * sparse_attention: scores and values on the selected keys, 2 * 2 T S d

    Selection and the cell -> key mapping are memory-bound (no matmul): not listed.
    """
    t, h, d, m = length, shape.heads, shape.head_dim, shape.num_features
    w, c = shape.estimate_width // shape.width_downsample, shape.cnn_channels
    r = t if decoded_rows is None else decoded_rows
    linear = 2 * t * h * m * (2 * d) * 2 + (t * h * CHUNK * (m + 2 * d) * 2 if shape.causal else 0)
    return {
        "features": 2 * (2 * t * h * d * m),
        "linear_attention": linear,
        "encoder": 2 * t * h * (3 * d * 2 * d + 2 * d * 2) + 2 * r * h * (2 * d * w * c),
        "decoder": 2 * r * w * (h * c) ** 2 * 9 * 2 + 2 * r * w * (h * c) * h,
        "sparse_attention": 2 * 2 * t * mean_keys * d,
    }


@dataclass
class StageTime:
    stage: str
    seconds: float
    gflop: float = 0.0  # 0: memory-bound stage (selection, cell -> key, rest): no matmul floor
    floor_seconds: float | None = None


@dataclass
class StageBreakdown:
    length: int
    grouping: str
    total_seconds: float  # the whole forward, median
    mean_keys: float  # S: selected keys per query, over all heads
    stages: list[StageTime] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)  # stage_flops by part


def _forward_steps(module, q, k, v) -> tuple[dict[str, Callable[[], object]], dict, object]:
    """The stages ``SEAAttention.forward`` runs, as named calls that each take the previous
    one's output (the grouping's own ``steps()``), and the final Attended once run."""
    call = SEACall.build(module.config, (q, k, v), {}, module.k_budget)
    grouping = grouping_for(module.config)
    rows = grouping.estimate_rows(call)
    out: dict = {}
    calls = {"estimator": lambda: module.estimator(call, rows)}
    previous = "estimator"
    for name, step in grouping.steps():
        calls[name] = (lambda step=step, prev=previous: step(out[prev], call))
        previous = name
    return calls, out, rows


def cnn_rows(rows: torch.Tensor) -> int:
    """The rows the CNN runs on to estimate ``rows`` (sorted): each row and its history rows (those that
    exist), counted once where neighbouring rows' windows overlap (a run of consecutive rows: one each)."""
    gaps = torch.diff(rows, prepend=rows.new_tensor([-1]))
    return int(gaps.clamp_max(CausalDecoder.HISTORY_ROWS + 1).sum())


def measure_breakdown(length: int, setup: AttentionBenchSetup, grouping: str = "query") -> StageBreakdown:
    """Time each stage of the SEA forward at this length (in this process), by the forward's own steps."""
    from ...core.attention import SEAAttention

    if grouping not in STAGES:
        raise ValueError(f"grouping must be one of {tuple(STAGES)}, got {grouping!r}")
    if setup.threads:
        torch.set_num_threads(setup.threads)
    cfg = setup.sea_config(length, **CONFIGS[grouping])
    module = SEAAttention(cfg).eval()
    q, k, v = setup.inputs(length)
    with torch.no_grad():
        calls, out, rows = _forward_steps(module, q, k, v)
        names = (*calls, "rest")  # the forward's own stages, in order
        for name, call in calls.items():
            out[name] = call()  # warm-up, and the next stage's input
        calls["total"] = lambda: module(q, k, v)
        calls["total"]()
        # interleaved rounds: a load spike on a shared machine hits the stages and the total alike
        rounds = [{name: median_seconds(call, 1) for name, call in calls.items()} for _ in range(setup.repeats)]
    seconds = {name: statistics.median(r[name] for r in rounds) for name in calls}
    total = seconds.pop("total")
    mean_keys = float(out[names[-2]].nnz.sum()) / length  # the last step's Attended
    decoded = None if rows is None else cnn_rows(rows)
    flops = stage_flops(EstimatorShape.of(cfg), length, mean_keys, decoded)
    gflop = {"estimator": sum(f for part, f in flops.items() if part != "sparse_attention") / 1e9,
             "sparse_attention": flops["sparse_attention"] / 1e9}
    seconds["rest"] = total - sum(seconds.values())  # gating, lengths, masking; noise can make it < 0
    stages = [StageTime(name, seconds[name], gflop.get(name, 0.0)) for name in names]
    return StageBreakdown(length, grouping, total, mean_keys, stages, flops)


def add_floors(breakdown: StageBreakdown, gflops_rate: float) -> StageBreakdown:
    """Fill each stage's floor (its FLOPs at ``gflops_rate`` GFLOP/s)."""
    for stage in breakdown.stages:
        stage.floor_seconds = stage.gflop / gflops_rate if stage.gflop > 0 else None
    return breakdown


def _matmul_rate(threads: int | None) -> float:
    if threads:
        torch.set_num_threads(threads)
    return matmul_gflops()


def bench_breakdown(lengths: list[int], setup: AttentionBenchSetup | None = None, timeout_s: float = 1800,
                    progress: bool = True, groupings: tuple[str, ...] = ("query",)) -> tuple[float, list[StageBreakdown]]:
    """The matmul rate (GFLOP/s) and each (grouping, length) breakdown, each in a fresh process.

    Lengths that fail are left out with a printed note.
    """
    setup = setup or AttentionBenchSetup()
    rate, note = in_fresh_process(_matmul_rate, (setup.threads,), timeout_s)
    if rate is None:
        raise RuntimeError(f"could not measure the matmul rate: {note}")
    breakdowns = []
    for grouping in groupings:
        for length in lengths:
            breakdown, note = in_fresh_process(measure_breakdown, (length, setup, grouping), timeout_s)
            if breakdown is None:
                print(f"  breakdown {grouping} T={length}: {note}", flush=True)
                continue
            breakdowns.append(add_floors(breakdown, rate))
            if progress:
                print(f"  breakdown {grouping} T={length}: forward {breakdown.total_seconds:.3f} s", flush=True)
    return rate, breakdowns


def format_breakdown(breakdown: StageBreakdown, gflops_rate: float) -> str:
    """One length's table: stage, seconds, share of the total, GFLOP, floor and time / floor."""
    b = breakdown
    lines = [f"grouping {b.grouping}, T={b.length}: forward {b.total_seconds:.3f} s, {b.mean_keys:.0f} keys/query over all heads, "
             f"matmul {gflops_rate:.0f} GFLOP/s",
             f"  {'stage':<18} {'seconds':>8} {'share':>7} {'GFLOP':>8} {'floor (s)':>10} {'x floor':>8}"]
    total = StageTime("total", b.total_seconds, sum(s.gflop for s in b.stages),
                      sum(s.floor_seconds or 0.0 for s in b.stages))
    for s in b.stages + [total]:
        floor = f"{s.floor_seconds:10.4f}" if s.floor_seconds else f"{'-':>10}"
        ratio = f"{s.seconds / s.floor_seconds:8.1f}" if s.floor_seconds else f"{'-':>8}"
        lines.append(f"  {s.stage:<18} {s.seconds:8.4f} {s.seconds / b.total_seconds:7.1%} {s.gflop:8.3f} {floor} {ratio}")
    return "\n".join(lines)
