"""What fresher long-row selections cost: one SEA layer's forward at several ``query_block`` values.

The default's long rows share one selection per block of ``query_block`` rows, made by the block's first
row; a pattern that begins inside a block (the copy's cue, a question) is seen only from the next block
on (docs/results.md, "Where retrieval is lost"). Smaller blocks select more often. One causal layer
shaped like SmolLM2-135M's (9 query heads, 3 kv heads, d=64, k=64, the default config otherwise) runs
its row-chunked prefill (``context_only``, what a patched model's forward calls) on random q, k, v of each length, the settings alternating within each repeat so that they
share the machine's state; the median time per setting and its ratio to the first. ``--per-query`` adds
every row selecting its own candidates (``block_from=0, candidates=16``), the freshest selection.

    PYTHONPATH=src python benchmarks/query_block_cost.py --lengths 4096 8192 --blocks 64 16 8 --per-query \
        --threads 2 --json benchmarks/results/query_block_cost.json
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


@torch.no_grad()
def forward_seconds(layers: dict[str, SEAAttention], length: int, repeats: int) -> dict[str, float]:
    """Median seconds of one forward per setting, the settings alternating within each repeat."""
    torch.manual_seed(0)
    config = next(iter(layers.values())).config
    q = torch.randn(1, config.num_heads, length, config.head_dim)
    k, v = (torch.randn(1, config.num_kv_heads, length, config.head_dim) for _ in range(2))
    times: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():  # warm-up
        layer.context_only(q, k, v)
    for _ in range(repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            layer.context_only(q, k, v)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 16, 8], help="query_block values; the first is the baseline")
    parser.add_argument("--per-query", action="store_true", help="also block_from=0, candidates=16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--machine-note", default=None, help="how loaded the machine was (recorded in the JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {f"query_block={block}": {"query_block": block} for block in args.blocks}
    if args.per_query:
        settings["block_from=0, candidates=16"] = {"block_from": 0, "candidates": 16}
    layers = {name: SEAAttention(SEAConfig(num_heads=9, num_kv_heads=3, head_dim=64, k=64, **changes)).eval()
              for name, changes in settings.items()}
    base_name = next(iter(settings))
    rows = []
    for length in args.lengths:
        seconds = forward_seconds(layers, length, args.repeats)
        for name in settings:
            ratio = seconds[name] / seconds[base_name]
            rows.append({"length": length, "setting": name, "seconds": seconds[name], "x_baseline": ratio})
            print(f"T={length:>6} {name}: {seconds[name]:.3f} s  x{ratio:.2f}", flush=True)
    if args.json:
        payload = {"machine": {**machine_info(args.threads), "matmul_gflops": round(matmul_gflops(), 1),
                               "note": args.machine_note}, "repeats": args.repeats, "rows": rows,
                   "config": layers[base_name].config.to_dict()}
        write_text(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
