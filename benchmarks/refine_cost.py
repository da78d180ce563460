"""What exact refinement costs: one causal SEA layer's inference forward (``context_only``, the path a
patched model's prefill takes) with ``candidates`` = 1 and 4, at a few lengths.

    PYTHONPATH=src python benchmarks/refine_cost.py --json benchmarks/results/refine_cost.json

B=1, H=12, d=64, k=64, K=256, fp32, random inputs; median of ``--repeats`` calls after a warm-up, both
settings on the same inputs in one process. Writes the machine (CPU, threads, fp32 matmul rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sea_attention import SEAAttention, SEAConfig
from sea_attention.atomic import write_text
from sea_attention.tools.bench.runtime import machine_info, matmul_gflops


def seconds(module: SEAAttention, qkv: tuple, repeats: int) -> float:
    module.context_only(*qkv)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        module.context_only(*qkv)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--candidates", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    points = []
    with torch.no_grad():
        for length in map(int, args.lengths.split(",")):
            qkv = tuple(torch.randn(1, 12, length, 64) for _ in range(3))
            for candidates in map(int, args.candidates.split(",")):
                module = SEAAttention(SEAConfig(num_heads=12, head_dim=64, candidates=candidates)).eval()
                points.append({"length": length, "candidates": candidates,
                               "seconds": round(seconds(module, qkv, args.repeats), 4)})
                print(points[-1], flush=True)
    payload = {"machine": {**machine_info(), "matmul_gflops": round(matmul_gflops(), 1)}, "setup": vars(args),
               "points": points}
    write_text(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
