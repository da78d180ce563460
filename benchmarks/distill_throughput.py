"""Distillation throughput and held-out quality per CPU-minute: every row vs row subsets.

    python benchmarks/distill_throughput.py --trainers all:1,128:4 --minutes 10 --eval-every 2.5 \
        --json benchmarks/results/distill_throughput.json --plot benchmarks/results/distill_throughput.png

Each trainer (``ROWS:UPDATES``: query rows per window trained in each layer, ``all`` for every
row, and optimizer steps per teacher forward) distils a fresh SEA on SmolLM2-135M (estimator
stage, wiki train, constant learning rate after a short warm-up) for the same wall-clock
minutes of distillation, the trainers taking turns (so each sees the same machine load). Every
``--eval-every`` minutes of its own clock a trainer stops and SEA@k is scored on
held-out text (wiki validation by default: this is where recipes are chosen, never on the text
a result is reported on). Prints the throughput (teacher tokens/s, query rows trained per
second in every layer) and the learning curve; writes a JSON and a plot of held-out perplexity
against distillation minutes, one line per trainer.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import torch

from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.tools.bench.runtime import machine_info, matmul_gflops
from sea_attention.tools.distill import DistillConfig, Distiller, TokenWindows, tokenize
from sea_attention.tools.evaluate import evaluate_budgets
from sea_attention.hf import patch


@dataclass(frozen=True)
class Trainer:
    rows: int  # 0: every row
    updates: int

    @property
    def name(self) -> str:
        return f"{'every row' if not self.rows else f'{self.rows} rows'} x {self.updates} per pass"


def parse_trainers(text: str) -> list[Trainer]:
    """``all:1,128:4`` -> trainers; ValueError naming the accepted form otherwise."""
    trainers = []
    for item in text.split(","):
        rows, _, updates = item.partition(":")
        try:
            trainers.append(Trainer(0 if rows == "all" else int(rows), int(updates or 1)))
        except ValueError:
            raise ValueError(f"a trainer is ROWS:UPDATES with ROWS an integer or 'all', got {item!r}") from None
        if trainers[-1].rows < 0 or trainers[-1].updates < 1:
            raise ValueError(f"ROWS must be >= 0 and UPDATES >= 1, got {item!r}")
    return trainers


def held_out_perplexity(model, tokens, args) -> dict[str, float]:
    rows = evaluate_budgets(model, tokens, seq_len=args.seq_len, stride=args.seq_len, budgets=[args.k],
                            oracle=False, progress=False)
    return {r.name: r.perplexity for r in rows}


@dataclass
class Run:
    """One trainer's distillation: its model, distiller, clock and learning curve."""

    trainer: Trainer
    model: torch.nn.Module
    distiller: Distiller
    spent: float = 0.0  # seconds of distillation, evaluation excluded
    curve: list[dict] = field(default_factory=list)  # held-out scores along the way

    def train_until(self, seconds: float) -> None:
        while self.spent < seconds:
            started = time.perf_counter()
            self.distiller.run(progress=False, until=self.distiller.step + 1)
            self.spent += time.perf_counter() - started

    def score(self, held_out, args) -> None:
        point = {"minutes": round(self.spent / 60, 2), "steps": self.distiller.step,
                 **held_out_perplexity(self.model, held_out, args)}
        self.curve.append(point)
        print(f"{self.trainer.name}: {point['minutes']:.1f} min, {point['steps']} steps, "
              f"sea@{args.k} {point['sea']:.2f} (dense {point['dense']:.2f})", flush=True)

    def result(self, args) -> dict:
        history, steps = self.distiller.history, self.distiller.step
        passes = -(-steps // self.trainer.updates)
        return {"trainer": self.trainer.name, "query_rows": self.trainer.rows,
                "updates_per_pass": self.trainer.updates, "steps": steps, "teacher_passes": passes,
                "distill_seconds": round(self.spent, 1),
                "teacher_tokens_per_s": round(passes * args.seq_len / self.spent, 1),
                "rows_per_s": round(sum(r.extra["rows_per_s"] for r in history) / len(history), 1),
                "seconds_per_step": round(self.spent / steps, 2),
                "final_estimate_kl": history[-1].estimate_kl, "curve": self.curve}


def start_run(trainer: Trainer, train, args) -> Run:
    model, _ = assets.load_model("smollm2-135m")
    patch(model, k=args.k, estimate_width=args.estimate_width)
    config = DistillConfig(stage="estimator", steps=10**6, seq_len=args.seq_len, lr=args.lr, warmup_steps=2,
                           schedule="constant", seed=args.seed, checkpoint_every=0, query_rows=trainer.rows,
                           updates_per_pass=trainer.updates)
    return Run(trainer, model, Distiller(model, TokenWindows(train, args.seq_len, args.seed), config))


def plot(results: list[dict], path: str, k: int, dense: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for result in results:
        ax.plot([p["minutes"] for p in result["curve"]], [p["sea"] for p in result["curve"]], marker="o",
                label=f"{result['trainer']} ({result['rows_per_s']:.0f} rows/s)")
    ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("distillation minutes (evaluation excluded)")
    ax.set_ylabel(f"held-out perplexity, SEA k={k}")
    ax.set_title("SmolLM2-135M, estimator stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", type=parse_trainers, default=parse_trainers("all:1,128:4"))
    parser.add_argument("--minutes", type=float, default=10.0, help="distillation minutes per trainer")
    parser.add_argument("--eval-every", type=float, default=2.5, help="minutes of distillation between scores")
    parser.add_argument("--seq-len", type=int, default=1024, help="distillation and evaluation window")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--estimate-width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-data", default="wiki")
    parser.add_argument("--eval-split", default="validation", choices=("validation", "test"))
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    _, tokenizer = assets.load_model("smollm2-135m")
    train = tokenize(tokenizer, assets.load_text("wiki", "train"))
    held_out = tokenize(tokenizer, assets.load_text(args.eval_data, args.eval_split))[: args.eval_tokens]
    runs = [start_run(trainer, train, args) for trainer in args.trainers]
    marks = [min(i * args.eval_every, args.minutes) * 60 for i in range(1 + int(-(-args.minutes // args.eval_every)))]
    for mark in marks:  # the trainers take turns between two scores: each sees the same machine load
        for run in runs:
            run.train_until(mark)
            run.score(held_out, args)
        results = [run.result(args) for run in runs] if mark else []
        payload = {"setup": {**vars(args), "trainers": [t.name for t in args.trainers]},
                   "machine": {**machine_info(), "matmul_gflops": round(matmul_gflops(), 1)},
                   "complete": mark == marks[-1], "results": results}
        if mark:
            write_text(args.json, json.dumps(payload, indent=2) + "\n")  # after every round: a kill keeps it
    print(f"\n{'trainer':<28} {'s/step':>7} {'teacher tok/s':>14} {'rows/s':>8} {'steps':>6}  sea@{args.k}: start -> end")
    for r in results:
        print(f"{r['trainer']:<28} {r['seconds_per_step']:>7.2f} {r['teacher_tokens_per_s']:>14.1f} "
              f"{r['rows_per_s']:>8.1f} {r['steps']:>6}  {r['curve'][0]['sea']:.2f} -> {r['curve'][-1]['sea']:.2f}")
    if args.plot:
        plot(results, args.plot, args.k, results[0]["curve"][0]["dense"])


if __name__ == "__main__":
    main()
