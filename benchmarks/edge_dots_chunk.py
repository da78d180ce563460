"""How many query rows `kernel_bins.edge_dots` should read per call.

    python benchmarks/edge_dots_chunk.py --json benchmarks/results/edge_dots_chunk.json

edge_dots reads, for a chunk of query rows, the prefix sums at every bin edge in place (a sampled
product; until 2026-12 it gathered them into one (B, H_kv, rows, K + 1, f) float64 block first, which
the committed JSON measured). The shapes are one
SmolLM2-135M layer (3 kv heads of 3 query heads each, d = 64, m = 33 FAVOR+ features beside
the 64 raw key coordinates), random inputs, a causal prefix of T rows. Prints seconds per call
for fixed chunks and for the default (``rows_per_chunk``: ``ENTRIES_PER_CALL`` entries) and writes
a JSON with the machine.

"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sea_attention.atomic import write_text
from sea_attention.tools.bench.runtime import machine_info, matmul_gflops
from sea_attention.core.estimator.kernel_bins import edge_dots, prefix_sums, rows_per_chunk

KV_HEADS, GROUPS, FEATURES, DIM = 3, 3, 33, 64


def seconds_per_call(length: int, width: int, chunk: int | None, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    phi_k = torch.rand(1, KV_HEADS, length, FEATURES, generator=generator)
    keys = torch.randn(1, KV_HEADS, length, DIM, generator=generator)
    valid = torch.ones(1, length, dtype=torch.bool)
    kernel_sums, key_sums = prefix_sums(phi_k, valid), prefix_sums(keys, valid)
    sums = [kernel_sums, key_sums]
    queries = [torch.rand(1, KV_HEADS, GROUPS, length, FEATURES, generator=generator),
               torch.randn(1, KV_HEADS, GROUPS, length, DIM, generator=generator)]
    lengths = torch.arange(1, length + 1)[None]
    edge_dots(queries, sums, lengths, width, chunk)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        edge_dots(queries, sums, lengths, width, chunk)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--widths", default="128,256")
    parser.add_argument("--chunks", default="256,64,16,8,4", help="fixed chunks, beside the default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    points = []
    print(f"{'T':>6} {'K':>5} {'chunk':>12} {'s/call':>8}")
    for length in map(int, args.lengths.split(",")):
        for width in map(int, args.widths.split(",")):
            default = rows_per_chunk(torch.empty(1, KV_HEADS, 1, FEATURES + DIM, dtype=torch.float64), width)
            for chunk in [*map(int, args.chunks.split(",")), None]:
                seconds = seconds_per_call(length, width, chunk, args.repeats)
                label = f"default ({default})" if chunk is None else str(chunk)
                points.append({"length": length, "width": width, "chunk": chunk or default, "default": chunk is None,
                               "seconds": round(seconds, 4)})
                print(f"{length:>6} {width:>5} {label:>12} {seconds:>8.3f}", flush=True)
    payload = {"machine": {**machine_info(), "matmul_gflops": round(matmul_gflops(), 1)},
               "setup": vars(args), "points": points}
    write_text(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
