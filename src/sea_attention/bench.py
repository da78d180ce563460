"""Speed and peak-memory benchmarks of the attention alone (no model).

Each (method, length) point runs in a fresh process, so its peak resident memory is its
own: peak RSS during the call minus RSS just before it (inputs and modules already
built). Times are medians of repeated forward calls after one warm-up call.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

METHODS = ("sdpa", "sea", "sea_reference")


@dataclass
class AttentionBenchPoint:
    method: str
    length: int
    seconds: float | None  # median forward time; None when skipped
    peak_mb: float | None  # peak extra resident memory during one forward
    note: str = ""


@dataclass
class AttentionBenchSetup:
    heads: int = 12
    head_dim: int = 64
    k: int = 64
    estimate_width: int = 128
    causal: bool = True
    repeats: int = 3
    threads: int | None = None


def _rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process in MB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Make VmHWM restart from the current RSS (Linux >= 4.0); harmless elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _run_point(method: str, length: int, setup: AttentionBenchSetup, queue) -> None:
    from .attention import SEAAttention
    from .config import SEAConfig

    if setup.threads:
        torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    h, d = setup.heads, setup.head_dim
    q, k, v = (torch.randn(1, h, length, d) for _ in range(3))
    if method == "sdpa":
        def call():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=setup.causal)
    else:
        config = SEAConfig(num_heads=h, head_dim=d, causal=setup.causal, k=setup.k,
                           estimate_width=setup.estimate_width, max_positions=max(length, 2048),
                           attention_path="reference" if method == "sea_reference" else "sparse")
        module = SEAAttention(config).eval()

        def call():
            return module(q, k, v).context
    with torch.no_grad():
        _reset_peak()
        before = _rss_mb("VmRSS")
        call()  # warm-up, and the memory measurement
        peak = _rss_mb("VmHWM") - before
        times = []
        for _ in range(setup.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    queue.put(AttentionBenchPoint(method, length, statistics.median(times), peak))


def estimated_reference_gb(length: int, heads: int) -> float:
    """Rough peak of the dense reference path: a few (H, T, T) fp32 tensors."""
    return 4 * heads * length * length * 4 / 1e9


def bench_attention(lengths: list[int], methods: tuple[str, ...] = METHODS,
                    setup: AttentionBenchSetup | None = None, memory_limit_gb: float = 16.0,
                    timeout_s: float = 1800) -> list[AttentionBenchPoint]:
    """Time and measure every method at every length, each point in its own process."""
    setup = setup or AttentionBenchSetup()
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: expected some of {METHODS}")
    context = mp.get_context("spawn")
    points = []
    for length in lengths:
        for method in methods:
            if method == "sea_reference" and estimated_reference_gb(length, setup.heads) > memory_limit_gb:
                points.append(AttentionBenchPoint(method, length, None, None,
                                                  f"skipped: needs ~{estimated_reference_gb(length, setup.heads):.0f} GB"))
                continue
            queue = context.Queue()
            process = context.Process(target=_run_point, args=(method, length, setup, queue))
            process.start()
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                points.append(AttentionBenchPoint(method, length, None, None, f"timed out after {timeout_s:.0f} s"))
            elif process.exitcode != 0 or queue.empty():
                points.append(AttentionBenchPoint(method, length, None, None, f"failed (exit {process.exitcode})"))
            else:
                points.append(queue.get())
            print(_format_point(points[-1]), flush=True)
    return points


def _format_point(p: AttentionBenchPoint) -> str:
    time_s = f"{p.seconds:9.3f}" if p.seconds is not None else f"{'-':>9}"
    mem = f"{p.peak_mb:10.0f}" if p.peak_mb is not None else f"{'-':>10}"
    return f"{p.method:<14} {p.length:>7} {time_s} {mem}  {p.note}"


def format_attention_table(points: list[AttentionBenchPoint]) -> str:
    """Time and memory per method and length, plus each SEA time as a ratio of SDPA's."""
    sdpa = {p.length: p.seconds for p in points if p.method == "sdpa" and p.seconds}
    lines = [f"{'method':<14} {'T':>7} {'time (s)':>9} {'peak (MB)':>10} {'x SDPA':>7}  note"]
    for p in points:
        ratio = f"{sdpa[p.length] / p.seconds:7.2f}" if p.seconds and p.length in sdpa else f"{'-':>7}"
        time_s = f"{p.seconds:9.3f}" if p.seconds is not None else f"{'-':>9}"
        mem = f"{p.peak_mb:10.0f}" if p.peak_mb is not None else f"{'-':>10}"
        lines.append(f"{p.method:<14} {p.length:>7} {time_s} {mem} {ratio}  {p.note}")
    return "\n".join(lines)


def write_bench_json(points: list, path: str | Path, **metadata) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), **metadata}
    temporary.write_text(json.dumps({**meta, "points": [asdict(p) for p in points]}, indent=2))
    temporary.replace(path)
