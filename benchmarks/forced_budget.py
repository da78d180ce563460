"""How a head's k keys split between the forced sink/window keys and the estimate's choice, by row length.

For one query row of L keys (SmolLM2's shape: 9 heads, K=256, k=64, sinks 4, local window 16; a random
estimate, the selection does not depend on it beyond which cells), the grouped top-k
(``selection.select_cells``) and the keys its cells stand for (``cells.cells_to_keys``): keys per head
in all, those of the forced cells, and those the estimate chose, under both rules (``forced_keys``
False, the default: forced bins count whole; True: a forced bin stands for its forced keys).

    PYTHONPATH=src python benchmarks/forced_budget.py --json benchmarks/results/forced_budget.json
"""

from __future__ import annotations

import argparse
import json

import torch

from sea_attention.atomic import write_text
from sea_attention.core.cells import cells_to_keys, forced_cells, forced_counts, forced_ranges
from sea_attention.core.selection import select_cells

HEADS, WIDTH, K, SINKS, WINDOW = 9, 256, 64, 4, 16


def split(length: int, forced_keys: bool) -> dict:
    """Keys per head of one row of ``length`` keys: all, forced, chosen by the estimate."""
    torch.manual_seed(0)
    lengths = torch.tensor([[length]])
    estimate = torch.rand(1, HEADS, 1, WIDTH).softmax(-1)
    cells = select_cells(estimate, lengths, K, "query", sinks=SINKS, window=WINDOW, forced_keys=forced_keys)
    counts = forced_counts(K, SINKS, WINDOW)
    forced = forced_cells(lengths, WIDTH, *counts)[:, None]  # (1, 1, 1, K)
    valid, rule = torch.ones(1, length, dtype=torch.bool), forced_ranges(K, SINKS, WINDOW, forced_keys)
    every = cells_to_keys(cells, lengths, valid, cap=K, forced=rule).nnz(HEADS).float().mean().item()
    chosen = cells_to_keys(cells & ~forced, lengths, valid, cap=K, forced=rule).nnz(HEADS).float().mean().item()
    return {"forced_keys": forced_keys, "length": length, "keys_per_head": every, "forced_keys_per_head": every - chosen,
            "estimate_keys_per_head": chosen, "estimate_cells": int((cells & ~forced).sum()),
            "forced_cells": int((cells & forced).sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = [split(n, rule) for rule in (False, True) for n in args.lengths]
    for r in rows:
        print(f"forced_keys={r['forced_keys']!s:<5} L={r['length']:>6}: {r['keys_per_head']:5.1f} keys per head = "
              f"{r['forced_keys_per_head']:5.1f} forced + {r['estimate_keys_per_head']:5.1f} chosen by the estimate")
    setup = {"heads": HEADS, "estimate_width": WIDTH, "k": K, "sinks": SINKS, "local_window": WINDOW}
    write_text(args.json, json.dumps({"setup": setup, "machine_note": "key counts, not timings: the same on any machine",
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
