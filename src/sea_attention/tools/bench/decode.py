"""Per-token latency of one attention layer while decoding: SDPA against SEA's decoding state.

A prompt of T tokens fills the layer (SEA: its ``DecodeState``; untimed), then ``steps`` single
tokens follow, each timed alone. Keys and values live in storage with room for every step, the
way ``hf.GrowingCache`` keeps them, and both methods read views of it: what differs is only that
SDPA reads every cached key per token while SEA reads its state and its selected keys. Each
(method, length) point runs in a fresh process (``runtime.in_fresh_process``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import check_methods as check_list
from .attention import OPT_IN, SEA_METHODS, AttentionBenchSetup, add_speedups
from .runtime import in_fresh_process

DECODE_METHODS = ("sdpa", "sea", "sea_block", "sea_bounds", "sea_f32")
DEFAULT_DECODE_METHODS = tuple(m for m in DECODE_METHODS if m not in OPT_IN)  # opt-in settings when asked for
SEA_DECODE = {m: SEA_METHODS[m] for m in DECODE_METHODS if m in SEA_METHODS}  # SEAConfig changes, as bench attention


@dataclass
class DecodeBenchPoint:
    method: str
    length: int  # prompt tokens before the timed steps
    seconds: float | None  # median seconds per decoded token; None when it failed
    note: str = ""
    speedup_vs_sdpa: float | None = None


def check_decode_methods(methods) -> tuple[str, ...]:
    """The benchmarked decoding methods in order without repeats (``tools.methods.check_methods``)."""
    return check_list(methods, DECODE_METHODS)


def _step_calls(method: str, length: int, steps: int, setup: AttentionBenchSetup) -> list[Callable[[], Tensor]]:
    """One no-argument call per decoded token, in order (the prompt already consumed)."""
    q, k, v = setup.inputs(length + steps)  # (1, H, T + steps, d); views of them are the cache
    if method == "sdpa":
        attend = torch.nn.functional.scaled_dot_product_attention
        return [lambda t=t: attend(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1])
                for t in range(length, length + steps)]
    from ...core.attention import SEAAttention
    from ...core.decoding import DecodeState

    module = SEAAttention(setup.sea_config(length + steps, **SEA_DECODE[method])).eval()
    state = DecodeState()
    module.context_only(q[:, :, :length], k[:, :, :length], v[:, :, :length], state=state)
    return [lambda t=t: module.context_only(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], state=state)
            for t in range(length, length + steps)]


def measure_decode_point(method: str, length: int, steps: int, setup: AttentionBenchSetup) -> DecodeBenchPoint:
    """One point, in this process (``bench_decode`` calls it in a fresh one): the median of the
    steps after the first quarter (warm-up: thread pool, the state's first growth)."""
    if setup.threads:
        torch.set_num_threads(setup.threads)
    times = []
    with torch.no_grad():
        for call in _step_calls(method, length, steps, setup):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return DecodeBenchPoint(method, length, statistics.median(times[steps // 4:]))


def bench_decode(lengths: list[int], methods: tuple[str, ...] = DEFAULT_DECODE_METHODS,
                 setup: AttentionBenchSetup | None = None, steps: int = 32, timeout_s: float = 1800,
                 progress: bool = True) -> list[DecodeBenchPoint]:
    """Per-token decoding latency of every method after a prompt of every length."""
    if steps < 4:
        raise ValueError(f"--steps must be at least 4 (the first quarter warms up), got {steps}")
    setup = setup or AttentionBenchSetup()
    if not setup.causal:
        raise ValueError("decoding needs causal attention; drop --bidirectional")
    points = []
    for length in lengths:
        for method in check_decode_methods(methods):
            point, note = in_fresh_process(measure_decode_point, (method, length, steps, setup), timeout_s)
            points.append(point or DecodeBenchPoint(method, length, None, note))
            if progress:
                seconds = points[-1].seconds
                print(f"  {method:<10} T={length:<7} {'-' if seconds is None else f'{seconds * 1e3:.2f}'} ms/token  "
                      f"{points[-1].note}", flush=True)
    return add_speedups(points)


def format_decode_table(points: list[DecodeBenchPoint]) -> str:
    """Milliseconds per decoded token per method and prompt length, and SDPA's time as a multiple of each."""
    add_speedups(points)
    lines = [f"{'method':<10} {'T':>7} {'ms/token':>9} {'x SDPA':>7}  note"]
    for p in points:
        ms = "-" if p.seconds is None else f"{p.seconds * 1e3:.2f}"
        speedup = "-" if p.speedup_vs_sdpa is None else f"{p.speedup_vs_sdpa:.2f}"
        lines.append(f"{p.method:<10} {p.length:>7} {ms:>9} {speedup:>7}  {p.note}")
    return "\n".join(lines)
