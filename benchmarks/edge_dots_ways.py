"""Ways to compute the binned signals' dots, one query row against its K + 1 prefix-sum rows.

    python benchmarks/edge_dots_ways.py --json benchmarks/results/edge_dots_ways.json

The per-query estimator takes one dot per (query row, head, bin edge, signal): for SmolLM2-135M
(3 kv heads of 3 query heads, K = 256) 2 x 257 x 9 per row, at 8k tokens about 38 million. One
call here is a 256-row span against a prefix-sum table of 8,193 rows per kv head, as the row-chunked
prefill makes it. The ways:

* ``sampled float64``: what ``kernel_bins._sampled_dots`` does (``sampled_addmm`` into its own
  pattern), the only one whose rounding of a dot depends on nothing else (the decoding step and
  the full forward read bitwise the same dots);
* ``sampled float32``: the same on float32 tables (``bin_sums_dtype="float32"``);
* ``gather + bmm``, ``gather + product + sum``: the rows gathered into a copy first;
* ``torch.compile``: the gather-product-sum compiled (Inductor's C++), with its compile time.

Prints milliseconds per call and per million dots for 33-wide (FAVOR+ features) and 64-wide (keys)
rows, and writes a JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from sea_attention.atomic import write_text
from sea_attention.core.estimator.kernel_bins import _sampled_dots
from sea_attention.tools.bench.runtime import machine_info, matmul_gflops

KV_HEADS, GROUPS, WIDTH, ROWS = 3, 3, 256, 256


def inputs(length: int, features: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A span's query rows (KV_HEADS * GROUPS * ROWS, f), the table (KV_HEADS * (T + 1), f) and each
    entry's table row (rows, K + 1): the edges of the span's last rows of a causal prefix."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(KV_HEADS * (length + 1), features, generator=generator, dtype=dtype)
    queries = torch.randn(KV_HEADS * GROUPS * ROWS, features, generator=generator, dtype=dtype)
    row_lengths = torch.arange(length - ROWS, length) + 1
    edges = torch.arange(WIDTH + 1)[None] * row_lengths[:, None] // WIDTH  # (ROWS, K + 1)
    starts = (torch.arange(KV_HEADS) * (length + 1)).repeat_interleave(GROUPS)
    columns = (starts[:, None, None] + edges[None]).reshape(-1, WIDTH + 1)
    return queries, table, columns


def gathered_bmm(queries, table, columns):
    return torch.bmm(table[columns], queries[:, :, None])[..., 0]


def gathered_sum(queries, table, columns):
    return (table[columns] * queries[:, None, :]).sum(-1)


def best_ms(call: Callable[[], torch.Tensor], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="prefix-sum rows per kv head, minus one")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile way")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compiled = None if args.no_compile else torch.compile(gathered_sum, dynamic=True)
    points = []
    for features in (33, 64):
        q64, t64, columns = inputs(args.length, features, torch.float64)
        q32, t32 = q64.float(), t64.float()
        ways = {"sampled float64": lambda: _sampled_dots(q64, t64, columns),
                "sampled float32": lambda: _sampled_dots(q32, t32, columns),
                "gather + bmm": lambda: gathered_bmm(q64, t64, columns),
                "gather + product + sum": lambda: gathered_sum(q64, t64, columns)}
        if compiled is not None:
            start = time.perf_counter()
            compiled(q64, t64, columns)
            print(f"torch.compile: {time.perf_counter() - start:.1f} s to compile", flush=True)
            ways["torch.compile"] = lambda: compiled(q64, t64, columns)
        dots = columns.numel()
        for way, call in ways.items():
            ms = best_ms(call, args.repeats)
            points.append({"way": way, "features": features, "dots": dots, "ms": ms, "ns_per_dot": 1e6 * ms / dots})
            print(f"{features:>3} wide  {way:<24} {ms:7.2f} ms per call  {1e6 * ms / dots:6.1f} ns per dot", flush=True)
    if args.json:
        payload = {"machine": {**machine_info(args.threads), "matmul_gflops": matmul_gflops()},
                   "setup": {"length": args.length, "rows": ROWS, "kv_heads": KV_HEADS, "groups": GROUPS,
                             "width": WIDTH, "repeats": args.repeats}, "points": points}
        write_text(args.json, json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
