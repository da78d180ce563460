"""How a head's k keys split between the forced sink/window keys and the estimate's choice, by row length.

For one query row of L keys (SmolLM2's shape: 9 heads, K=256, k=64, sinks 4, local window 16; a random
estimate, the selection does not depend on it beyond which cells), the grouped top-k
(``selection.select_cells``) and the keys its cells stand for (``cells.cells_to_keys``): keys per head
in all, those of the forced cells, and those the estimate chose. Run it on a source tree
(``PYTHONPATH=<tree>/src``) to compare two rules; needs nothing but the core.

    PYTHONPATH=src python benchmarks/forced_budget.py --json benchmarks/results/forced_budget.json
"""

from __future__ import annotations

import argparse
import inspect
import json

import torch

from sea_attention.atomic import write_text
from sea_attention.core import cells as cells_module
from sea_attention.core.cells import cells_to_keys, forced_cells
from sea_attention.core.selection import select_cells

HEADS, WIDTH, K, SINKS, WINDOW = 9, 256, 64, 4, 16


def split(length: int) -> dict:
    """Keys per head of one row of ``length`` keys: all, forced, chosen by the estimate."""
    torch.manual_seed(0)
    lengths = torch.tensor([[length]])
    estimate = torch.rand(1, HEADS, 1, WIDTH).softmax(-1)
    cells = select_cells(estimate, lengths, K, "query", sinks=SINKS, window=WINDOW)
    forced = forced_cells(lengths, WIDTH, min(SINKS, K // 4), min(WINDOW, K // 4))[:, None]  # (1, 1, 1, K)
    options = {}
    if "forced" in inspect.signature(cells_to_keys).parameters:  # the rule since 2026-12-05
        options["forced"] = cells_module.forced_keys(K, SINKS, WINDOW)
    valid = torch.ones(1, length, dtype=torch.bool)
    every = cells_to_keys(cells, lengths, valid, cap=K, **options).nnz(HEADS).float().mean().item()
    chosen = cells_to_keys(cells & ~forced, lengths, valid, cap=K, **options).nnz(HEADS).float().mean().item()
    return {"length": length, "keys_per_head": every, "forced_keys_per_head": every - chosen,
            "estimate_keys_per_head": chosen, "estimate_cells": int((cells & ~forced).sum()),
            "forced_cells": int((cells & forced).sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = [split(n) for n in args.lengths]
    for r in rows:
        print(f"L={r['length']:>6}: {r['keys_per_head']:5.1f} keys per head = {r['forced_keys_per_head']:5.1f} forced "
              f"+ {r['estimate_keys_per_head']:5.1f} chosen by the estimate ({r['estimate_cells']} cells of the query's)")
    setup = {"heads": HEADS, "estimate_width": WIDTH, "k": K, "sinks": SINKS, "local_window": WINDOW}
    write_text(args.json, json.dumps({"setup": setup, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
