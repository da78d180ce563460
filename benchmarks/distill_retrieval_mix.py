"""EXPERIMENT (issue 25): does distilling on text with retrieval and copy patterns keep more needles?

The demo's estimator recipe (40 steps of 128 query rows of 512-token windows, 4 updates per teacher
pass, lr 2e-3, seed 0; ``sea demo``'s ``_distil``) on wiki *train* windows, where a share ``--mix`` of
the windows is replaced by a suite prompt with its answer appended (teacher forcing: the answer rows
show the teacher's retrieval and copy attention): needle, multi_needle and copy prompts built from
wiki and BBC *train* prose (``tools/baselines/tasks.py``'s builders, their own seed), never the
validation or test text the suite's prompts come from. ``--mix 0`` is the demo's recipe. Saves the
distilled model (``save_pretrained``) for ``benchmarks/retrieval_candidates.py --model``.

    PYTHONPATH=src python benchmarks/distill_retrieval_mix.py --mix 0.5 --out /tmp/mix05
    PYTHONPATH=src python benchmarks/retrieval_candidates.py --model /tmp/mix05 --validation \
        --tasks needle copy --lengths 1024 2048 --perplexity 4 --json benchmarks/results/retrieval_mix05.json
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch import Tensor

from sea_attention.app import assets
from sea_attention.hf import patch, save_pretrained
from sea_attention.tools.baselines.tasks import TASKS, PromptSource, split_sentences
from sea_attention.tools.distill import DistillConfig, Distiller, TokenWindows, tokenize

MIX_TASKS = ("needle", "multi_needle", "copy")


class MixedWindows(TokenWindows):
    """``TokenWindows`` whose windows are, with probability ``mix``, a task prompt plus its answer
    (a pure function of (seed, step), as ``TokenWindows``)."""

    def __init__(self, tokens: Tensor, seq_len: int, seed: int, mix: float, source: PromptSource) -> None:
        super().__init__(tokens, seq_len, seed)
        self.mix, self.source = mix, source

    def batch(self, step: int, batch_size: int) -> Tensor:
        windows = super().batch(step, batch_size).clone()
        rng = random.Random(f"mix/{self.seed}/{step}")
        for row in range(batch_size):
            if rng.random() < self.mix:
                windows[row] = self._task_window(rng, windows[row])
        return windows

    def _task_window(self, rng: random.Random, prose: Tensor) -> Tensor:
        """A task prompt, its answer, then ``prose`` (a plain window) up to ``seq_len`` tokens."""
        task = rng.choice(MIX_TASKS)
        answer_room = 16  # the longest answer: copy's 16 tokens, a 7-digit number and a period
        corpus = rng.choice(tuple(self.source.sentences))
        source = PromptSource(self.source.tokenizer, self.source.sentences, corpus)
        prompt = TASKS[task].build(source, self.seq_len - answer_room, rng.uniform(0.05, 0.9), rng)
        answer = prompt.expected if prompt.expected is not None else tokenize(self.source.tokenizer, " " + prompt.answer + ".")
        return torch.cat([prompt.ids, answer, prose])[: self.seq_len]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mix", type=float, required=True, help="share of windows replaced by task prompts")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model)
    train = tokenize(tokenizer, assets.load_text("wiki", "train"))
    sentences = {name: split_sentences(assets.load_text(name, "train"), tokenizer) for name in ("wiki", "bbc")}
    windows = MixedWindows(train, 512, 0, args.mix, PromptSource(tokenizer, sentences))
    config = DistillConfig(stage="estimator", steps=args.steps, seq_len=512, lr=2e-3, warmup_steps=max(1, args.steps // 10),
                           seed=0, checkpoint_every=0, query_rows=128, updates_per_pass=4)
    start = time.time()
    history = Distiller(model, windows, config).run(progress=False)
    print(f"mix {args.mix}: loss {history[0].loss:.4f} -> {history[-1].loss:.4f}, {time.time() - start:.0f} s")
    save_pretrained(model, args.out, base_model="smollm2-135m", tokenizer=tokenizer)


if __name__ == "__main__":
    main()
