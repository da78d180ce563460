"""`sea demo`: the whole path on a real pretrained model, on a CPU, in about ten minutes.

Load SmolLM2-135M, patch it with SEA, distil the estimator on Wikipedia text, compare
perplexity against the dense model, the oracle selection and a sliding window with attention
sinks at k = 32, 64, 128, save the distilled model and a picture of its attention.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .cli_args import int_list, positive_int


def add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="distil and evaluate SEA on SmolLM2-135M (about 10 min on 2 CPU cores)")
    demo.add_argument("--out", default="sea-demo", help="directory for the model, results and plot (default: sea-demo)")
    demo.add_argument("--steps", type=positive_int, default=20,
                      help="estimator distillation steps (the undistilled estimator is already close: see README)")
    demo.add_argument("--seq-len", type=positive_int, default=512, help="tokens per training window")
    demo.add_argument("--eval-len", type=positive_int, default=1024,
                      help="tokens per evaluation window (the estimator has no length limit)")
    demo.add_argument("--eval-tokens", type=positive_int, default=2048, help="test tokens to evaluate")
    demo.add_argument("--k", dest="k_list", type=int_list, default=[32, 64, 128], help="budgets to evaluate")
    demo.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=run_demo)


def window_rows(model, tokens, seq_len: int, budgets: list[int], progress: bool = True) -> list:
    """The training-free competitor at each budget: the first 4 keys and the last k - 4."""
    from .baselines.compare import method_attention
    from .evaluate import PerplexityRow, perplexity

    rows = []
    for k in budgets:
        with method_attention(model, "window_sinks", k):
            ppl, count = perplexity(model, tokens, seq_len, seq_len, desc=f"window_sinks k={k}", progress=progress)
        rows.append(PerplexityRow("window", k, ppl, count))
    return rows


def run_demo(args) -> int:
    from . import assets
    from .distill import DistillConfig, Distiller, TokenWindows, tokenize
    from .evaluate import evaluate_budgets, format_table, write_json
    from .hf import patch, save_pretrained, sea_layers
    from .viz import capture_attention, plot_attention

    started = time.perf_counter()
    out = Path(args.out)
    budgets = args.k_list
    torch.manual_seed(args.seed)

    print("1/5 loading smollm2-135m (the first run converts the bundled GGUF once, ~40 s)")
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model, k=64)
    train = tokenize(tokenizer, assets.load_text("wiki", "train"))
    test = tokenize(tokenizer, assets.load_text("wiki", "test"))[: args.eval_tokens]

    print(f"2/5 distilling the estimator: {args.steps} steps of {args.seq_len} tokens (base model frozen)")
    config = DistillConfig(stage="estimator", steps=args.steps, seq_len=args.seq_len, lr=2e-3,
                           warmup_steps=max(1, args.steps // 10), seed=args.seed, checkpoint_every=0)
    history = Distiller(model, TokenWindows(train, args.seq_len, args.seed), config).run(progress=not args.quiet)
    trained = time.perf_counter()
    print(f"    loss {history[0].loss:.4f} -> {history[-1].loss:.4f}  "
          f"(estimate KL {history[0].estimate_kl:.3f} -> {history[-1].estimate_kl:.3f})")

    print(f"3/5 perplexity on {test.numel()} test tokens, windows of {args.eval_len}")
    rows = evaluate_budgets(model, test, seq_len=args.eval_len, stride=args.eval_len, budgets=budgets,
                            oracle=args.oracle, progress=not args.quiet)
    rows += window_rows(model, test, args.eval_len, budgets, progress=not args.quiet)
    print(format_table(rows))

    print(f"4/5 saving the distilled model to {out} (load it with sea_attention.from_pretrained)")
    save_pretrained(model, out, base_model="smollm2-135m", tokenizer=tokenizer)
    write_json(rows, out / "results.json", model="smollm2-135m", data="wiki/test", seq_len=args.eval_len,
               train_seq_len=args.seq_len,
               distill_steps=args.steps, distill_seconds=round(trained - started, 1),
               history=[round(h.loss, 5) for h in history])

    print("5/5 plotting one layer's attention")
    snapshot = capture_attention(model, test[:256].unsqueeze(0), layer=3, head=0)
    width = sea_layers(model)[0][2].config.estimate_width
    plot_attention(snapshot, out / "attention.png", f"SmolLM2-135M + SEA (k=64, K={width}): layer 3, head 0")
    print(f"done in {time.perf_counter() - started:.0f} s: model, results.json and attention.png in {out}")
    return 0
