"""One attention layer's row-chunked prefill (``context_only``, what a patched model's prefill runs)
of two source trees of sea-attention, timed in one process, alternating, beside SDPA.

A change of a few percent is smaller than this machine's noise between processes (``sea bench``
times each point in a fresh process), so the two trees run here side by side on the same inputs
and weights, in turns (old, new, then new, old, ...), and the table reads the best time of each.
The outputs are compared too: ``max_abs_diff`` 0 means the change left the numbers as they were.

    python benchmarks/attention_ab.py --old /path/to/old/src --new src --lengths 8192,32768 \
        --heads 9 --kv-heads 3 --repeats 6 --json benchmarks/results/attention_ab.json

The old tree is a checkout of an earlier commit (``git worktree add /tmp/old <commit>``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def _forget_trees() -> None:
    for name in [name for name in sys.modules if name == "sea_attention" or name.startswith("sea_attention.")]:
        del sys.modules[name]


def load_tree(src: str) -> dict:
    """Every module of ``sea_attention`` imported from ``src`` (a tree's ``src`` folder), forgetting any
    other copy first: a snapshot of them, to put back in ``sys.modules`` while this tree runs
    (``Tree.run``), since a function-level import (``context_only``'s of ``chunked``) reads ``sys.modules``
    at call time and would otherwise run the tree loaded last."""
    _forget_trees()
    sys.path.insert(0, str(Path(src).resolve()))
    try:
        for name in ("sea_attention.core.attention", "sea_attention.core.config", "sea_attention.core.chunked",
                     "sea_attention.core.grouping"):
            importlib.import_module(name)
    finally:
        sys.path.pop(0)
    return {name: module for name, module in sys.modules.items()
            if name == "sea_attention" or name.startswith("sea_attention.")}


class Tree:
    """One source tree's layer, run with that tree's modules in ``sys.modules``."""

    def __init__(self, src: str, heads: int, kv_heads: int, length: int, seed: int) -> None:
        self.modules = load_tree(src)
        self.module = layer(self.modules, heads, kv_heads, length, seed)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _forget_trees()
        sys.modules.update(self.modules)
        return self.module.context_only(q, k, v)


def layer(modules: dict, heads: int, kv_heads: int, length: int, seed: int) -> torch.nn.Module:
    """The tree's default SEAAttention for these shapes, its weights drawn from ``seed`` (the CNN's
    output weight too, which starts at zero: a distilled CNN's rounding then counts in the selection)."""
    attention, config = modules["sea_attention.core.attention"], modules["sea_attention.core.config"]
    torch.manual_seed(seed)
    module = attention.SEAAttention(config.SEAConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=64, k=64,
                                                     max_positions=max(length, 2048))).eval()
    torch.nn.init.normal_(module.estimator.decoder.norm_out.weight, std=1.0)
    return module


def measure(args: argparse.Namespace, length: int) -> dict:
    """Best-of-``repeats`` seconds of each tree and of SDPA at one length, and the outputs' difference."""
    trees = {"old": Tree(args.old, args.heads, args.kv_heads, length, 1),
             "new": Tree(args.new, args.heads, args.kv_heads, length, 1)}
    torch.manual_seed(0)
    q = torch.randn(1, args.heads, length, 64)
    k, v = (torch.randn(1, args.kv_heads, length, 64) for _ in range(2))
    groups = args.heads // args.kv_heads
    seconds = {"old": [], "new": [], "sdpa": []}
    with torch.no_grad():
        outputs = {name: tree.run(q, k, v) for name, tree in trees.items()}  # also the warm-up
        for turn in range(args.repeats):
            for name in ("old", "new") if turn % 2 == 0 else ("new", "old"):
                start = time.perf_counter()
                trees[name].run(q, k, v)
                seconds[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                                             v.repeat_interleave(groups, 1), is_causal=True)
            seconds["sdpa"].append(time.perf_counter() - start)
    diff = float((outputs["old"] - outputs["new"]).abs().max())
    return {"length": length, "max_abs_diff": diff, **{f"{name}_seconds": times for name, times in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the earlier tree's src folder")
    parser.add_argument("--new", default=str(SRC), help="the later tree's src folder (default: this checkout's)")
    parser.add_argument("--lengths", default="8192", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--repeats", type=int, default=6, help="timed turns of each tree (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--old-label", default="old", help="what the old tree is (a commit), for the JSON")
    parser.add_argument("--json", help="append this run's rows to this JSON file")
    args = parser.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    torch.set_num_threads(args.threads)
    from sea_attention.tools.bench.runtime import machine_info, matmul_gflops

    run = {"machine": {**machine_info(args.threads), "matmul_gflops": matmul_gflops()},
           "setup": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": 64, "k": 64, "repeats": args.repeats,
                     "old": args.old_label}, "points": []}
    for length in [int(x) for x in args.lengths.split(",")]:
        point = measure(args, length)
        run["points"].append(point)
        print(f"T={length:>6}  old {min(point['old_seconds']):.3f} s  new {min(point['new_seconds']):.3f} s  "
              f"sdpa {min(point['sdpa_seconds']):.3f} s  outputs differ by {point['max_abs_diff']:.1e}", flush=True)
    if args.json:
        path = Path(args.json)
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        from sea_attention.atomic import write_text

        write_text(path, json.dumps({"machine": run["machine"], "runs": runs + [run]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
