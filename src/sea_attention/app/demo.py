"""`sea demo`: the whole path on a real pretrained model, on a CPU, in about eight minutes.

Load SmolLM2-135M, patch it with SEA, distil the estimator on Wikipedia text, compare
perplexity against the dense model, the oracle selection and a sliding window with attention
sinks at k = 32, 64, 128, measure per layer the teacher attention SEA's keys cover beside the
oracle's and the window's (``sea diagnose``), save the distilled model, that plot and a
picture of one layer's attention, and ask dense and SEA for a number hidden in test prose at
1k and 2k tokens (the retrieval suite's ``needle`` task, ``sea compare --task needle``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .cli_args import int_list, non_negative_int, output_dir, positive_int

MODEL_K = 64  # the patched model's own budget: the one diagnosed, plotted and saved


def add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="distil and evaluate SEA on SmolLM2-135M (about 8 min on 2 CPU cores)")
    demo.add_argument("--out", type=output_dir, default="sea-demo", help="directory for the model, results and plot (default: sea-demo)")
    demo.add_argument("--steps", type=positive_int, default=40,
                      help="estimator distillation steps (the undistilled estimator is already close: "
                           "see docs/results.md)")
    demo.add_argument("--seq-len", type=positive_int, default=512, help="tokens per training window")
    demo.add_argument("--query-rows", type=non_negative_int, default=128,
                      help="query rows trained per window and layer (0: every row); row subsets reach a lower "
                           "held-out perplexity per CPU-minute (docs/results.md, distillation per CPU-minute)")
    demo.add_argument("--updates-per-pass", type=positive_int, default=4,
                      help="optimizer steps per teacher forward, each on fresh rows")
    demo.add_argument("--eval-len", type=positive_int, default=1024,
                      help="tokens per evaluation window (the estimator has no length limit)")
    demo.add_argument("--eval-tokens", type=positive_int, default=2048, help="test tokens to evaluate")
    demo.add_argument("--k", dest="k_list", type=int_list, default=[32, 64, 128], help="budgets to evaluate")
    demo.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True)
    demo.add_argument("--needle-prompts", type=non_negative_int, default=3,
                      help="needle prompts per length for the retrieval row, dense and SEA (0: skip)")
    demo.add_argument("--needle-lengths", type=int_list, default=[1024, 2048], help="needle prompt lengths")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=run_demo)


def window_rows(model, tokens, seq_len: int, budgets: list[int], progress: bool = True) -> list:
    """The training-free competitor at each budget: the first 4 keys and the last k - 4."""
    from ..tools.baselines.compare import method_attention
    from ..tools.evaluate import PerplexityRow, perplexity

    rows = []
    for k in budgets:
        with method_attention(model, "window_sinks", k):
            ppl, count = perplexity(model, tokens, seq_len, seq_len, desc=f"window_sinks k={k}", progress=progress)
        rows.append(PerplexityRow("window", k, ppl, count))
    return rows


def run_demo(args) -> int:
    """``sea demo``: load -> distil -> evaluate -> save -> diagnose -> plot, on SmolLM2-135M."""
    from . import assets
    from ..hf import patch

    started = time.perf_counter()
    out = Path(args.out)
    torch.manual_seed(args.seed)
    print("1/7 loading smollm2-135m (the first run converts the bundled GGUF once, ~40 s)")
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model, k=MODEL_K)
    test = _tokens(tokenizer, "test")[: args.eval_tokens]
    history = _distil(model, _tokens(tokenizer, "train"), args)
    trained = time.perf_counter()
    rows = _evaluate(model, test, args)
    _save(model, tokenizer, rows, args, {"distill_seconds": round(trained - started, 1),
                                          "history": [round(h.loss, 5) for h in history]})
    _diagnose(model, test, args, out)
    _plot_layer(model, test, out)
    _retrieval(model, tokenizer, args, out)
    print(f"done in {time.perf_counter() - started:.0f} s: model, results.json, diagnosis.json, coverage.png, "
          f"attention.png{' and retrieval.json' if args.needle_prompts else ''} in {out}")
    return 0


def _tokens(tokenizer, split: str) -> torch.Tensor:
    from . import assets
    from ..tools.distill import tokenize

    return tokenize(tokenizer, assets.load_text("wiki", split))


def _distil(model, train: torch.Tensor, args) -> list:
    from ..tools.distill import DistillConfig, Distiller, TokenWindows

    subset = f"{args.query_rows} query rows of " if args.query_rows else ""
    print(f"2/7 distilling the estimator: {args.steps} steps on {subset}{args.seq_len}-token windows, "
          f"{args.updates_per_pass} per teacher pass (base model frozen)")
    config = DistillConfig(stage="estimator", steps=args.steps, seq_len=args.seq_len, lr=2e-3,
                           warmup_steps=max(1, args.steps // 10), seed=args.seed, checkpoint_every=0,
                           query_rows=args.query_rows, updates_per_pass=args.updates_per_pass)
    history = Distiller(model, TokenWindows(train, args.seq_len, args.seed), config).run(progress=not args.quiet)
    print(f"    loss {history[0].loss:.4f} -> {history[-1].loss:.4f}  "
          f"(estimate KL {history[0].estimate_kl:.3f} -> {history[-1].estimate_kl:.3f})")
    return history


def _evaluate(model, test: torch.Tensor, args) -> list:
    from ..tools.evaluate import BudgetSweep, evaluate_budgets, format_table

    print(f"3/7 perplexity on {test.numel()} test tokens, windows of {args.eval_len}")
    sweep = BudgetSweep(args.eval_len, args.eval_len, args.k_list, oracle=args.oracle, progress=not args.quiet)
    rows = evaluate_budgets(model, test, sweep)
    rows += window_rows(model, test, args.eval_len, args.k_list, progress=not args.quiet)
    print(format_table(rows))
    return rows


def _save(model, tokenizer, rows: list, args, run: dict) -> None:
    from ..hf import save_pretrained
    from ..tools.evaluate import write_json

    out = Path(args.out)
    print(f"4/7 saving the distilled model to {out} (load it with sea_attention.from_pretrained)")
    save_pretrained(model, out, base_model="smollm2-135m", tokenizer=tokenizer)
    write_json(rows, out / "results.json", model="smollm2-135m", data="wiki/test", seq_len=args.eval_len,
               train_seq_len=args.seq_len, query_rows=args.query_rows, updates_per_pass=args.updates_per_pass,
               distill_steps=args.steps, **run)


def _diagnose(model, test: torch.Tensor, args, out: Path) -> None:
    from ..tools.diagnose import DiagnoseConfig, diagnose, plot_diagnosis, write_diagnosis_json

    print(f"5/7 per layer, the teacher attention SEA's keys cover at k={MODEL_K} "
          f"({min(args.eval_len, test.numel())} test tokens)")
    diagnosis = diagnose(model, test[: args.eval_len], DiagnoseConfig(k=MODEL_K, seq_len=args.eval_len),
                         progress=not args.quiet)
    summary = diagnosis.summary()
    print(f"    coverage: SEA {summary['coverage_sea']:.3f}, oracle {summary['coverage_oracle']:.3f}, window "
          f"{summary['coverage_window_sinks']:.3f}; recall of the oracle's covered mass {summary['recall']:.3f}")
    write_diagnosis_json(diagnosis, out / "diagnosis.json", model="smollm2-135m", data="wiki/test", k=MODEL_K)
    plot_diagnosis(diagnosis, out / "coverage.png", "SmolLM2-135M + SEA: teacher attention on the keys "
                   f"each method selects, k={MODEL_K}, {diagnosis.tokens} wiki-test tokens")


def _plot_layer(model, test: torch.Tensor, out: Path) -> None:
    from ..hf import sea_layers
    from ..tools.viz import capture_attention, plot_attention

    print("6/7 plotting one layer's attention")
    snapshot = capture_attention(model, test[:256].unsqueeze(0), layer=3, head=0)
    width = sea_layers(model)[0][2].config.estimate_width
    plot_attention(snapshot, out / "attention.png", f"SmolLM2-135M + SEA (k={MODEL_K}, K={width}): layer 3, head 0")


def _retrieval(model, tokenizer, args, out: Path) -> None:
    from dataclasses import asdict

    from ..tools.baselines.retrieval import RetrievalConfig, format_retrieval_table, retrieval_rows
    from ..tools.bench import write_bench_json

    if not args.needle_prompts:
        print("7/7 retrieval skipped (--needle-prompts 0)")
        return
    config = RetrievalConfig(("needle",), tuple(args.needle_lengths), args.needle_prompts)
    print(f"7/7 retrieval: a number hidden in test prose, {args.needle_prompts} prompts at "
          f"{', '.join(map(str, args.needle_lengths))} tokens, dense vs SEA at k={MODEL_K}")
    rows = retrieval_rows(model, tokenizer, ("dense", "sea"), (MODEL_K,), config, progress=not args.quiet)
    print(format_retrieval_table(rows))
    write_bench_json(rows, out / "retrieval.json", model="smollm2-135m (distilled by sea demo)", setup=asdict(config))
