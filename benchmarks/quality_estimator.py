"""Estimator variants at equal distillation budget: SmolLM2-135M, estimator stage, held-out text.

    python benchmarks/quality_estimator.py --variants legacy,kernel_bins --steps 40 --seq-len 1024 \
        --json benchmarks/results/quality_estimator.json

Each variant patches a fresh copy of the model with its SEA config, distils the estimator on
the wiki train split for the same steps and tokens, and is scored on text it never saw (wiki
test, BBC news): dense, the oracle selection (once: it does not depend on the estimator) and
SEA at each k. Writes the table and a JSON with the distillation seconds and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict

import torch

from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.tools.bench.runtime import machine_info, matmul_gflops
from sea_attention.app.cli_args import int_list
from sea_attention.tools.distill import DistillConfig, Distiller, TokenWindows, tokenize
from sea_attention.tools.evaluate import evaluate_budgets, format_table
from sea_attention.hf import patch

VARIANTS = {  # name -> SEAConfig fields on top of k=64, K=128
    "legacy": dict(kernel_bins=False),  # the paper's causal estimator: ReLU features, learned positional table
    "kernel_bins": dict(kernel_bins=True),  # FAVOR+ binned kernel mass added to the logits, no table
    "kernel_bins_m133": dict(kernel_bins=True, feature_factor=2),
    # the paper's estimator (ReLU Performer path, learned table) plus the FAVOR+ binned kernel residual
    "legacy_plus_kernel": dict(kernel_bins=True, feature_kind="relu", position_code="learned"),
}


def run_variant(name: str, args, train, tests: dict, with_oracle: bool) -> dict:
    model, _ = assets.load_model("smollm2-135m")
    patch(model, k=64, estimate_width=128, **VARIANTS[name])
    config = DistillConfig(stage="estimator", steps=args.steps, seq_len=args.seq_len, lr=args.lr,
                           warmup_steps=max(1, args.steps // 10), seed=args.seed, checkpoint_every=0)
    started = time.perf_counter()
    history = Distiller(model, TokenWindows(train, args.seq_len, args.seed), config).run(progress=not args.quiet)
    seconds = time.perf_counter() - started
    result = {"variant": name, "config": VARIANTS[name], "distill_seconds": round(seconds, 1),
              "distill_tokens": args.steps * args.seq_len, "final_estimate_kl": history[-1].estimate_kl, "eval": {}}
    for text_name, tokens in tests.items():
        rows = evaluate_budgets(model, tokens, seq_len=args.eval_seq_len, stride=args.eval_seq_len,
                                budgets=args.k_list, oracle=with_oracle, progress=not args.quiet)
        rows = [r for r in rows if with_oracle or r.name == "sea"]
        print(f"\n{name} on {text_name} ({seconds:.0f} s of distillation, final estimate KL "
              f"{history[-1].estimate_kl:.3f})\n{format_table(rows)}")
        result["eval"][text_name] = [asdict(r) for r in rows]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="legacy,kernel_bins", help=f"some of {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=1024, help="distillation window")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each held-out text")
    parser.add_argument("--eval-data", default="wiki,bbc", help="held-out texts")
    parser.add_argument("--eval-split", default="test", choices=("validation", "test"),
                        help="validation to choose between variants, test to report")
    parser.add_argument("--k", dest="k_list", type=int_list, default=[32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {sorted(VARIANTS)}")
    torch.manual_seed(args.seed)
    _, tokenizer = assets.load_model("smollm2-135m")
    train = tokenize(tokenizer, assets.load_text("wiki", "train"))
    tests = {name: tokenize(tokenizer, assets.load_text(name, args.eval_split))[: args.eval_tokens]
             for name in args.eval_data.split(",")}
    results = [run_variant(name, args, train, tests, with_oracle=(i == 0)) for i, name in enumerate(variants)]
    payload = {"setup": vars(args), "machine": {**machine_info(), "matmul_gflops": round(matmul_gflops(), 1)},
               "python": platform.python_version(), "results": results}
    write_text(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
