"""EXPERIMENT (issue 25): does the FAVOR+ kernel term of the undistilled estimate bury lone needles?

The default ``patch(model)`` (no distillation) scores each bin by
``kernel_scale * log FAVOR+ mass + key_scale * mean-key logit`` (the CNN starts as a zero residual).
This script sets ``kernel_scale`` to one value in every layer (``--kernel-scale``; omitted: the
default 0.5) or builds the estimator without the kernel term (``--no-kernel-bins``), then runs the
suite's own code path (``retrieval_rows``, as ``sea compare --task``) and/or the perplexity of
``sea eval`` (``evaluate_budgets``, no oracle) on the wiki validation split, SEA at k beside dense.

    PYTHONPATH=src python benchmarks/retrieval_kernel_weight.py --kernel-scale 0 --tasks needle copy \
        --lengths 1024 2048 --methods sea --json benchmarks/results/retrieval_kernel0.json
    PYTHONPATH=src python benchmarks/retrieval_kernel_weight.py --kernel-scale 0 --perplexity 4 \
        --json benchmarks/results/ppl_kernel0.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from sea_attention.app import assets
from sea_attention.tools.bench.runtime import machine_info
from sea_attention.atomic import write_text
from sea_attention.hf import patch, sea_layers
from sea_attention.tools.baselines.retrieval import RetrievalConfig, format_retrieval_table, score_runs
from sea_attention.tools.distill.data import tokenize
from sea_attention.tools.evaluate import evaluate_budgets, format_table


def variant_model(kernel_scale: float | None, kernel_bins: bool):
    """SmolLM2-135M patched with the default estimator, its kernel weight set (or the term off)."""
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model) if kernel_bins else patch(model, kernel_bins=False)
    if kernel_scale is not None:
        for _, _, sea in sea_layers(model):
            sea.estimator.kernel_scale.data.fill_(kernel_scale)
    return model.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel-scale", type=float, help="kernel_scale in every layer (default: patch's own)")
    parser.add_argument("--no-kernel-bins", action="store_true", help="patch(model, kernel_bins=False)")
    parser.add_argument("--tasks", nargs="*", default=[], help="suite tasks (none: skip retrieval)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["dense", "sea"], choices=("dense", "sea"))
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--perplexity", type=int, default=0, help="wiki validation windows of --seq-len (0: skip)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--json", required=True)
    parser.add_argument("--machine-note", default=None, help="how loaded the machine was (recorded in the JSON)")
    args = parser.parse_args()
    if args.no_kernel_bins and args.kernel_scale is not None:
        parser.error("--kernel-scale needs the kernel term: drop --no-kernel-bins")
    torch.manual_seed(0)
    model, tokenizer = variant_model(args.kernel_scale, not args.no_kernel_bins)
    out = {"model": "smollm2-135m", "k": args.k, "kernel_scale": args.kernel_scale,
           "kernel_bins": not args.no_kernel_bins, "threads": torch.get_num_threads(),
           "machine": {**machine_info(), "note": args.machine_note}}
    save = lambda: write_text(args.json, json.dumps(out, indent=1))  # noqa: E731
    start = time.time()
    if args.perplexity:
        tokens = tokenize(tokenizer, assets.load_text("wiki", "validation"))[: args.perplexity * args.seq_len]
        ppl = evaluate_budgets(model, tokens, seq_len=args.seq_len, stride=args.seq_len, budgets=[args.k],
                               oracle=False, progress=False)
        out["perplexity"] = {"data": "wiki", "split": "validation", "seq_len": args.seq_len,
                             "tokens": int(tokens.numel()), "rows": [asdict(r) for r in ppl]}
        out["seconds"] = round(time.time() - start)
        save()
        print(format_table(ppl), flush=True)
    if args.tasks:
        config = RetrievalConfig(tuple(args.tasks), tuple(args.lengths), args.prompts)
        out["setup"] = asdict(config)
        runs = [(method, None if method == "dense" else args.k) for method in args.methods]  # no forced dense row

        def save_rows(rows: list) -> None:
            out["rows"], out["seconds"] = [asdict(r) for r in rows], round(time.time() - start)
            save()

        rows = score_runs(model, tokenizer, runs, config, on_row=save_rows)
        print(format_retrieval_table(rows), flush=True)


if __name__ == "__main__":
    main()
