"""EXPERIMENT (issue 25): which suspect makes the undistilled SEA lose needles that dense finds.

Runs the suite's prompts (``tools/baselines/tasks.py``) through variants of SEA's selection, each a
``layer_override`` (no change to ``core/``), all at k keys per query per head on SmolLM2-135M:

* ``sea``: the default ``sea_attention.patch(model)``, its own path (decoding state, gates);
* ``sea_nogate``: SEA's own selected keys, exact softmax on them, no gates / average branch (e);
* ``sea_query_head``: SEA with grouping ``query_head``, a budget per head (d);
* ``cells_mass``: the same bins, forced sink/window bins, grouped budget and stretching as SEA, but
  each bin scored by its exact attention mass (an oracle estimate): what the bin structure costs;
* ``cells_mass_head``: ``cells_mass`` with a budget per head (d, with a perfect signal);
* ``cells_max``: bins scored by the exact largest probability inside (an upper-bound signal, c);
* ``cells_meankey``: bins scored by softmax(scale * q . mean(k) + log size) alone, the
  undistilled estimator's mean-key signal computed exactly (c);
* ``sea_dense_context``: dense attention on every prompt row but the last; SEA on the answer rows
  (the last prompt row and the decoding steps): is the retrieval step itself what fails?
* ``sea_dense_answer``: SEA on the prompt rows, dense on the answer rows: does the sparse context
  (hidden states built by SEA over the prompt) lose the needle before anyone asks for it?

(a) cap: a selected bin emits min(size, k) keys; with K=256 bins hold <= ceil(L/256) keys, 33 at
8,200 tokens, below k=64, so every selected bin emits all its keys up to 16k tokens: printed, not run.

    PYTHONPATH=src python benchmarks/retrieval_suspects.py --task needle --length 1024 --prompts 10 \
        --json benchmarks/results/retrieval_suspects_needle_1k.json
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

from sea_attention.app import assets
from sea_attention.core.cells import cell_lengths, cells_to_keys, key_bins
from sea_attention.core.ops.reference import reference_attention, repeat_kv
from sea_attention.core.selection import select_cells
from sea_attention.hf import layer_override, patch, sea_budget, set_runtime
from sea_attention.hf.decoding import decode_state
from sea_attention.tools.baselines.retrieval import RetrievalConfig, score_prompts, suite_prompts

VARIANTS = ("sea", "sea_nogate", "sea_query_head", "cells_mass", "cells_mass_head", "cells_max", "cells_meankey",
            "sea_dense_context", "sea_dense_answer")


def bin_scores(kind: str, logits, probs, lengths, width: int):
    """(B, H, C, K) scores of each row's bins from its exact logits / probs (B, H, C, Tk)."""
    tk = logits.shape[-1]
    bins = key_bins(torch.arange(tk)[None, :], lengths[0][:, None], width).clamp(0, width - 1)  # (C, Tk)
    index = bins[None, None].expand_as(probs)
    empty = probs.new_zeros(*probs.shape[:-1], width)
    if kind == "mass":
        return empty.scatter_add_(-1, index, probs)
    if kind == "max":
        return empty.scatter_reduce_(-1, index, probs, "amax", include_self=True)
    sizes = cell_lengths(lengths, width)[:, None].float()  # (B, 1, C, K)
    inside = torch.isfinite(logits)
    sums = empty.scatter_add_(-1, index, torch.where(inside, logits, 0.0))
    mean = torch.where(sizes > 0, sums / sizes.clamp_min(1) + sizes.clamp_min(1).log(), float("-inf"))
    return mean.softmax(-1)


@dataclass
class CellOverride:
    """SEA's bins, forced bins, grouped budget and stretching, with bins scored exactly by ``kind``."""

    kind: str  # mass, max, meankey
    k: int
    grouping: str = "query"
    chunk: int = 256

    def __call__(self, call):
        cfg = call.sea.config
        if not bool(call.key_valid.all()):
            raise ValueError("the experiment takes unpadded single prompts")
        heads, tq, tk = call.query.shape[1], call.query.shape[2], call.key.shape[2]
        keys = repeat_kv(call.key, cfg.kv_groups).float()
        values = repeat_kv(call.value, cfg.kv_groups).float()
        pieces = []
        for lo in range(0, tq, self.chunk):
            q = call.query[:, :, lo:lo + self.chunk].float()  # (1, H, C, d)
            positions = torch.arange(tk - tq + lo, tk - tq + lo + q.shape[2])
            logits = (q @ keys.transpose(-1, -2)) * call.scaling  # (1, H, C, Tk)
            logits = logits.masked_fill(torch.arange(tk)[None, :] > positions[:, None], float("-inf"))
            lengths = (positions + 1)[None]  # (1, C)
            scores = bin_scores(self.kind, logits, logits.softmax(-1), lengths, cfg.estimate_width)
            cells = select_cells(scores, lengths, self.k, self.grouping, self.chunk, cfg.sinks, cfg.local_window)
            mask = cells_to_keys(cells, lengths, call.key_valid, cap=self.k).dense_mask(heads, tk)
            pieces.append(logits.masked_fill(~mask, float("-inf")).softmax(-1) @ values)
        return torch.cat(pieces, 2), None


@dataclass
class NoGateOverride:
    """SEA's own selection (its decoding state kept), exact softmax on the selected keys, no gates."""

    k: int

    def __call__(self, call):
        heads, tq, tk = call.query.shape[1], call.query.shape[2], call.key.shape[2]
        out = call.run_sea(k_budget=self.k, state=decode_state(call.module, call.layer_idx, tq, tk))
        context, _ = reference_attention(call.query, call.key, call.value, out.slots.dense_mask(heads, tk),
                                         call.scaling)
        return context, None


@dataclass
class SplitOverride:
    """SEA (its own state) on one part of the rows, dense attention on the other."""

    k: int
    sea_answers: bool  # True: SEA on the answer rows, dense on the context rows; False: the reverse

    def __call__(self, call):
        heads, tq, tk = call.query.shape[1], call.query.shape[2], call.key.shape[2]
        prefill = tq == tk
        if not prefill and not self.sea_answers:
            return call.dense()[0], None  # decoding rows, dense
        out = call.run_sea(k_budget=self.k, state=decode_state(call.module, call.layer_idx, tq, tk))
        if not prefill:
            return out.context, None
        dense = call.dense()[0]
        context, last = (dense, out.context) if self.sea_answers else (out.context, dense)
        return torch.cat([context[:, :, :-1], last[:, :, -1:]], 2), None  # the last prompt row is an answer row


@contextmanager
def variant(model, name: str, k: int):
    """Run ``model`` as ``name`` inside the block."""
    if name == "sea":
        with sea_budget(model, k):
            yield
    elif name == "sea_query_head":
        set_runtime(model, grouping="query_head")
        try:
            with sea_budget(model, k):
                yield
        finally:
            set_runtime(model, grouping="query")
    elif name in ("sea_dense_context", "sea_dense_answer"):
        with layer_override(model, SplitOverride(k, sea_answers=name == "sea_dense_context")):
            yield
    elif name == "sea_nogate":
        with layer_override(model, NoGateOverride(k)):
            yield
    else:
        kind, _, head = name.removeprefix("cells_").partition("_")
        with layer_override(model, CellOverride(kind, k, "query_head" if head else "query")):
            yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model)
    config = RetrievalConfig((args.task,), (args.length,), args.prompts)
    prompts = suite_prompts(tokenizer, config)[(args.task, args.length)]
    width = 256
    print(f"(a) cap: at L={args.length + 8} bins hold <= {-(-(args.length + 8) // width)} keys, cap k={args.k}")
    rows = []
    for name in args.variants.split(","):
        started = time.perf_counter()
        with variant(model, name, args.k) if name != "dense" else nullcontext():
            row = score_prompts(model, tokenizer, prompts, config.new_tokens(args.task), name, args.k)
        rows.append({**asdict(row), "seconds": time.perf_counter() - started})
        print(f"{name:<16} {row.correct}/{row.prompts} acc {row.accuracy:.2f} {row.answers}", flush=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump({"setup": vars(args), "machine": "2-core AMD EPYC, shared/loaded", "rows": rows}, f, indent=1)
        import os

        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
