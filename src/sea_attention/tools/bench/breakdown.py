"""Where SEA's forward time goes: each stage timed alone, against its matmul floor.

The stages are those of ``SEAAttention.forward``: the estimator, the grouped top-k
(``selection.select_cells``), the cell -> key mapping (``cells.cells_to_keys``), the sparse
attention op (``ops.sparse.sparse_attention``) and the rest (lengths, gating, masking), the
last being the whole forward's time minus the stages'. With the block grouping, the
selection is ``blocks.select_blocks`` and the attention ``ops.block_sparse`` (which maps
cells to keys itself). A stage's floor is its FLOPs at this
machine's fp32 matmul rate: how fast it could be if it were one large matmul.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from .attention import AttentionBenchSetup
from .runtime import in_fresh_process, matmul_gflops, median_seconds

STAGES = {  # grouping -> stages, in forward order
    "query": ("estimator", "selection", "cell_to_key", "sparse_attention", "rest"),
    "block": ("estimator", "selection", "sparse_attention", "rest"),
}
CHUNK = 64  # queries per chunk of the causal linear attention (the chunk part's FLOPs)


def stage_flops(length: int, heads: int, head_dim: int, num_features: int, estimate_width: int,
                cnn_channels: int, width_downsample: int, mean_keys: float, causal: bool = True,
                decoded_rows: int | None = None) -> dict[str, float]:
    """FLOPs of SEA's matmul work for one sequence (B=1, T queries = T keys), by part.

    T = length, H = heads, d = head_dim, m = num_features (Performer), K = estimate_width,
    c = cnn_channels (per head), w = K // width_downsample, S = mean_keys (selected keys per
    query summed over all heads):

    * features: q and k random features, 2 * (2 T H d m)
    * linear_attention: state 2 T H m (2d) * 2, plus (causal) the within-chunk part
      T H 64 (m + 2d) * 2 with chunks of 64 queries
    * encoder: 2 T H (3d * 2d + 2d * 2) + 2 R H (2d * w * c)
    * decoder: two 3x3 convolutions 2 R w (H c)^2 * 9 * 2, then the 1x1 2 R w (H c) H

    R = decoded_rows, the rows the CNN runs on: T, or 9 per selecting row when the block
    grouping estimates only the rows that select (each with its 8-row history).
    * sparse_attention: scores and values on the selected keys, 2 * 2 T S d

    Selection and the cell -> key mapping are memory-bound (no matmul): not listed.
    """
    t, h, d, m = length, heads, head_dim, num_features
    w, c = estimate_width // width_downsample, cnn_channels
    r = t if decoded_rows is None else decoded_rows
    linear = 2 * t * h * m * (2 * d) * 2 + (t * h * CHUNK * (m + 2 * d) * 2 if causal else 0)
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


def measure_breakdown(length: int, setup: AttentionBenchSetup, grouping: str = "query") -> StageBreakdown:
    """Time each stage of the sparse SEA forward at this length (in this process)."""
    from ...core.attention import SEAAttention
    from ...core.blocks import select_blocks, selecting_rows
    from ...core.estimator.decoder import CausalDecoder
    from ...core.cells import cells_to_keys, query_lengths
    from ...core.ops.block_sparse import block_sparse_attention
    from ...core.ops.sparse import sparse_attention
    from ...core.selection import select_cells

    if grouping not in STAGES:
        raise ValueError(f"grouping must be one of {tuple(STAGES)}, got {grouping!r}")
    if setup.threads:
        torch.set_num_threads(setup.threads)
    cfg = setup.sea_config(length, grouping=grouping)
    module = SEAAttention(cfg).eval()
    q, k, v = setup.inputs(length)
    valid = torch.ones(1, length, dtype=torch.bool)
    lengths = query_lengths(valid, valid, cfg.causal)
    scale = cfg.head_dim ** -0.5
    # the calls SEAAttention.forward makes, in order, each on the previous one's output
    rows = selecting_rows(0, length, cfg.query_block) if grouping == "block" and cfg.causal else None
    calls = {"estimator": lambda: module.estimator(q, k, v, valid, valid, lengths, scale, rows=rows)}
    if grouping == "block":
        calls["selection"] = lambda: select_blocks(out["estimator"].probs, lengths, valid, 0, cfg.k, cfg.query_block,
                                                   cfg.causal, estimate_rows=rows)
        calls["sparse_attention"] = lambda: block_sparse_attention(q, k, v, out["selection"], valid, scale, cfg.k)
    else:
        calls["selection"] = lambda: select_cells(out["estimator"].probs, lengths, cfg.k, cfg.grouping,
                                                  cfg.query_chunk)
        calls["cell_to_key"] = lambda: cells_to_keys(out["selection"], lengths, valid, cap=cfg.k,
                                                     chunk=cfg.query_chunk)
        calls["sparse_attention"] = lambda: sparse_attention(q, k, v, out["cell_to_key"], scale, cfg.query_chunk)
    out: dict = {}
    with torch.no_grad():
        for name, call in calls.items():
            out[name] = call()  # warm-up, and the next stage's input
        calls["total"] = lambda: module(q, k, v)
        calls["total"]()
        # interleaved rounds: a load spike on a shared machine hits the stages and the total alike
        rounds = [{name: median_seconds(call, 1) for name, call in calls.items()} for _ in range(setup.repeats)]
    seconds = {name: statistics.median(r[name] for r in rounds) for name in calls}
    total = seconds.pop("total")
    if grouping == "block":
        mean_keys = float(out["sparse_attention"][1].sum()) / length
    else:
        mean_keys = float(out["cell_to_key"].valid.sum()) / length
    flops = stage_flops(length, cfg.num_heads, cfg.head_dim, cfg.num_features, cfg.estimate_width,
                        cfg.cnn_channels, cfg.width_downsample, mean_keys, cfg.causal,
                        None if rows is None else rows.numel() * (CausalDecoder.HISTORY_ROWS + 1))
    gflop = {"estimator": sum(f for part, f in flops.items() if part != "sparse_attention") / 1e9,
             "sparse_attention": flops["sparse_attention"] / 1e9}
    seconds["rest"] = total - sum(seconds.values())  # gating, lengths, masking; noise can make it < 0
    stages = [StageTime(name, seconds[name], gflop.get(name, 0.0)) for name in STAGES[grouping]]
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
