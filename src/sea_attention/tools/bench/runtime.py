"""What every benchmark needs: fresh processes, timing, peak memory, machine info, atomic files.

A point runs in a fresh (spawned) process so that its peak resident memory is its own and a
crash or an out-of-memory kill of one point does not end the whole run.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...atomic import write_text


# ---------------------------------------------------------------------------------------- processes
def _child(fn: Callable[..., Any], args: tuple, results) -> None:
    try:
        results.put(("ok", fn(*args)))
    except Exception as error:  # reported as the point's note: one failing method must not end the run
        results.put(("error", f"{type(error).__name__}: {error}".strip()))


def in_fresh_process(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[Any, str]:
    """Run ``fn(*args)`` (a module-level function) in a spawned process.

    Returns ``(result, "")``, or ``(None, note)`` when it raised, died or timed out.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(fn, args, results))
    process.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:  # read before join: a child blocks at exit until its queued result is read
                status, value = results.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not process.is_alive() and results.empty():
                    return None, f"failed (exit {process.exitcode})"
                if time.monotonic() > deadline:
                    return None, f"timed out after {timeout_s:.0f} s"
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    return (value, "") if status == "ok" else (None, f"error: {value}")


# ---------------------------------------------------------------------------------------- timing
def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (warm the call up before)."""
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This process's fp32 matmul rate in GFLOP/s (a ``size`` x ``size`` product, median time)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and kernels
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats) / 1e9


# ---------------------------------------------------------------------------------------- memory
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


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so that reusing them counts as new RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mb``: the peak resident memory the block adds on
    top of what is resident before it, in MB (Linux; the heap is trimmed first, so that reused free
    memory does not hide the block's allocations). Enter it after the warm-up: compilation and
    one-off caches then stay out of the number."""

    def __enter__(self) -> "PeakMemory":
        _release_free_memory()
        _reset_peak()
        self.before, self.mb = _rss_mb("VmRSS"), float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.mb = _rss_mb("VmHWM") - self.before


def peak_extra_mb(call: Callable[[], Any]) -> float:
    """Peak resident memory one call adds on top of what is resident before it, in MB (``PeakMemory``)."""
    with PeakMemory() as peak:
        call()
    return peak.mb


# ---------------------------------------------------------------------------------------- reports
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """torch, threads, CPUs, the CPU's model and the vector ISA torch's kernels use ('AVX2', 'AVX512', ...):
    one CPU model name covers machines whose speeds differ 2x by ISA."""
    return {"torch": torch.__version__, "threads": threads or torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def write_bench_json(points: list, path: str | Path, threads: int | None = None, **sections: Any) -> Path:
    """Write ``{"machine": ..., **sections, "points": [...]}`` atomically (points are dataclasses)."""
    payload = {"machine": machine_info(threads), **sections, "points": [asdict(p) for p in points]}
    return write_text(path, json.dumps(payload, indent=2) + "\n")
