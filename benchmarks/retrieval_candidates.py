"""EXPERIMENT (issue 25): do exact refinement (SEAConfig.candidates) or the key bounds keep the needle and the copy?

The default ``patch(model)`` (undistilled) with ``candidates = c``: the estimate selects cells for
c times the budget and each head keeps its exactly best share (``core/refine.py``). Runs the suite's
own code path (``score_runs``, as ``sea compare --task``) for SEA at k, optionally beside dense,
on the suite's test haystacks or, with ``--validation``, on a haystack of wiki validation prose (the
text a default may be chosen on), and with ``--perplexity N`` the perplexity of ``sea eval`` on N wiki
validation windows (SEA at k beside dense). ``--key-bounds`` patches with ``key_bounds=True`` (the
upper-bound bin signal) and ``--mean-key-weight w`` starts every layer's mean-key weight at w (0: the
bounds replace the mean key). Writes the JSON after every row, so a stopped run keeps them.

    PYTHONPATH=src python benchmarks/retrieval_candidates.py --candidates 4 --tasks needle copy \
        --lengths 1024 2048 --json benchmarks/results/retrieval_candidates4.json
    PYTHONPATH=src python benchmarks/retrieval_candidates.py --key-bounds --validation --lengths 1024 2048 \
        --json benchmarks/results/retrieval_bounds_validation.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sea_attention.app import assets
from sea_attention.tools.bench.runtime import machine_info
from sea_attention.atomic import write_text
from sea_attention.hf import from_pretrained, patch, sea_layers, set_runtime
from sea_attention.tools.baselines.retrieval import RetrievalConfig, format_retrieval_table, score_runs
from sea_attention.tools.distill.data import tokenize
from sea_attention.tools.evaluate import BudgetSweep, evaluate_budgets, format_table


def haystacks(validation: bool, folder: Path) -> tuple[str, ...]:
    """The suite's own corpora (test splits), or one file of wiki validation text."""
    if not validation:
        return RetrievalConfig().haystacks
    path = folder / "wiki_validation.txt"
    path.write_text(assets.load_text("wiki", "validation"))
    return (str(path),)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--tasks", nargs="*", default=["needle"], help="suite tasks (none: skip retrieval)")
    parser.add_argument("--perplexity", type=int, default=0, help="wiki validation windows of 1,024 tokens (0: skip)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["sea"], choices=("dense", "sea"))
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--validation", action="store_true", help="hide the needles in wiki validation prose")
    parser.add_argument("--model", help="a saved SEA model (sea distill --out) instead of the undistilled patch")
    parser.add_argument("--key-bounds", action="store_true", help="patch with key_bounds=True")
    parser.add_argument("--mean-key-weight", type=float, default=1.0, help="initial mean-key weight of every layer")
    parser.add_argument("--json", required=True)
    parser.add_argument("--machine-note", default=None, help="how loaded the machine was (recorded in the JSON)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model:
        model, tokenizer = from_pretrained(args.model)
        set_runtime(model, candidates=args.candidates)
    else:
        model, tokenizer = assets.load_model("smollm2-135m")
        patch(model, candidates=args.candidates, key_bounds=args.key_bounds)
        for _, _, layer in sea_layers(model):
            layer.estimator.key_scale.data.fill_(args.mean_key_weight)
    model.eval()
    out = {"model": args.model or "smollm2-135m (undistilled patch)", "k": args.k, "candidates": args.candidates,
           "key_bounds": args.key_bounds, "mean_key_weight": args.mean_key_weight,
           "threads": torch.get_num_threads(), "machine": {**machine_info(), "note": args.machine_note}}
    start = time.time()
    if args.perplexity:
        tokens = tokenize(tokenizer, assets.load_text("wiki", "validation"))[: args.perplexity * 1024]
        rows = evaluate_budgets(model, tokens, BudgetSweep(1024, 1024, [args.k], oracle=False, progress=False))
        out["perplexity"] = {"data": "wiki", "split": "validation", "seq_len": 1024, "tokens": int(tokens.numel()),
                             "rows": [asdict(r) for r in rows]}
        out["seconds"] = round(time.time() - start)
        write_text(args.json, json.dumps(out, indent=1))
        print(format_table(rows), flush=True)
    if not args.tasks:
        return
    with tempfile.TemporaryDirectory() as folder:
        config = RetrievalConfig(tuple(args.tasks), tuple(args.lengths), args.prompts,
                                 haystacks=haystacks(args.validation, Path(folder)))
        out["setup"] = {**asdict(config), "haystacks": ["wiki validation"] if args.validation else config.haystacks}
        runs = [(method, None if method == "dense" else args.k) for method in args.methods]

        def save(rows: list) -> None:
            out["rows"], out["seconds"] = [asdict(r) for r in rows], round(time.time() - start)
            write_text(args.json, json.dumps(out, indent=1))

        rows = score_runs(model, tokenizer, runs, config, on_row=save)
    print(format_retrieval_table(rows), flush=True)


if __name__ == "__main__":
    main()
