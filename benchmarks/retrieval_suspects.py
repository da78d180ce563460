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
    # 4,096 tokens, the 5 prompts of retrieval_needle4k_candidates1.json; finer bins with --width 512 / 1024
    PYTHONPATH=src python benchmarks/retrieval_suspects.py --length 4096 --prompts 5 \
        --variants cells_mass,cells_max --json benchmarks/results/retrieval_suspects_needle_4k.json
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.core.cells import cell_lengths, cells_to_keys, forced_ranges, key_bins
from sea_attention.core.ops.reference import reference_attention, repeat_kv
from sea_attention.core.selection import select_cells
from sea_attention.hf import layer_override, patch, sea_budget, sea_layers, set_runtime
from sea_attention.hf.decoding import decode_state
from sea_attention.tools.baselines.retrieval import RetrievalConfig, score_prompts, suite_prompts

VARIANTS = ("sea", "sea_nogate", "sea_query_head", "cells_mass", "cells_mass_head", "cells_max", "cells_meankey",
            "sea_dense_context", "sea_dense_answer")


def bin_scores(kind: str, logits, probs, bins, lengths, width: int):
    """(B, H, C, K) scores of each row's bins from its exact logits / probs (B, H, C, Tk); ``bins``
    (C, Tk) is each key's bin in each row (``key_bins``, clamped)."""
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
    """SEA's bins, forced bins, grouped budget and stretching, with bins scored exactly by ``kind``.

    ``width``: the bins per row (None: the layer's ``estimate_width``). Each chunk of rows scores
    only the keys its rows can see (the causal prefix); ``reference=True`` scores every key of
    every row (the plain path the test compares with). Cells stretch to keys by SEA's own rule
    (``cells_to_keys``; with the layer's ``forced_keys``, forced cells stand for their keys only).
    """

    kind: str  # mass, max, meankey
    k: int
    grouping: str = "query"
    chunk: int = 256
    width: int | None = None
    reference: bool = False

    def __call__(self, call):
        if not bool(call.key_valid.all()):
            raise ValueError("the experiment takes unpadded single prompts")
        tq, tk = call.query.shape[2], call.key.shape[2]
        keys = repeat_kv(call.key, call.sea.config.kv_groups).float()  # (1, H, Tk, d)
        values = repeat_kv(call.value, call.sea.config.kv_groups).float()
        pieces = []
        for lo in range(0, tq, self.chunk):
            rows = min(self.chunk, tq - lo)
            seen = tk if self.reference else tk - tq + lo + rows  # keys any row of the chunk can see
            positions = torch.arange(tk - tq + lo, tk - tq + lo + rows)  # (C,) the rows' own key positions
            pieces.append(self._rows(call, call.query[:, :, lo:lo + rows].float(), keys[:, :, :seen],
                                     values[:, :, :seen], positions))
        return torch.cat(pieces, 2), None

    def _rows(self, call, q, keys, values, positions):
        """Attention of the rows q (1, H, C, d) at ``positions`` (C,) over keys/values (1, H, S, d)."""
        cfg, seen = call.sea.config, keys.shape[2]
        width = self.width or cfg.estimate_width
        logits = (q @ keys.transpose(-1, -2)) * call.scaling  # (1, H, C, S)
        logits = logits.masked_fill(torch.arange(seen)[None, :] > positions[:, None], float("-inf"))
        lengths = (positions + 1)[None]  # (1, C)
        bins = key_bins(torch.arange(seen)[None, :], lengths[0][:, None], width).clamp(0, width - 1)  # (C, S)
        scores = bin_scores(self.kind, logits, logits.softmax(-1), bins, lengths, width)
        exact = getattr(cfg, "forced_keys", False) and self.grouping.startswith("query")
        cells = select_cells(scores, lengths, self.k, self.grouping, self.chunk, cfg.sinks, cfg.local_window, exact)
        forced = forced_ranges(self.k, cfg.sinks, cfg.local_window, exact)
        mask = cells_to_keys(cells, lengths, call.key_valid[:, :seen], cap=self.k, forced=forced)
        return logits.masked_fill(~mask.dense_mask(q.shape[1], seen), float("-inf")).softmax(-1) @ values


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
def variant(model, name: str, k: int, width: int | None = None):
    """Run ``model`` as ``name`` inside the block (``width``: the bins of the cells_* variants)."""
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
    elif name.startswith("cells_"):
        kind, _, head = name.removeprefix("cells_").partition("_")
        with layer_override(model, CellOverride(kind, k, "query_head" if head else "query", width=width)):
            yield
    else:
        raise ValueError(f"variants must be some of {','.join(VARIANTS)}, got {name!r}")


def kept_rows(path: Path, setup: dict, names: list[str]) -> list[dict]:
    """The rows of an earlier run of the same setup (task, length, prompts, k) at ``path``, less those
    of the variants rerun now; [] when there is none."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    same = all(earlier["setup"].get(key) == setup[key] for key in ("task", "length", "prompts", "k"))
    if not same:
        raise ValueError(f"{path} holds another setup ({earlier['setup']}): --keep needs the same task, length, "
                         "prompts and k")
    return [row for row in earlier["rows"] if row["method"] not in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--width", type=int, default=None, help="bins per row of the cells_* variants "
                        "(default: the layer's estimate_width); their rows are then named cells_*@K<width>")
    parser.add_argument("--keep", action="store_true", help="keep the other variants' rows of an existing --json")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants must be some of {','.join(VARIANTS)}, got {','.join(unknown)}")
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model)
    config = RetrievalConfig((args.task,), (args.length,), args.prompts)
    prompts = suite_prompts(tokenizer, config)[(args.task, args.length)]
    width = args.width or sea_layers(model)[0][2].config.estimate_width  # the patch's own K by default
    print(f"(a) cap: at L={args.length + 8} bins hold <= {-(-(args.length + 8) // width)} keys, cap k={args.k}")
    labels = [f"{n}@K{args.width}" if args.width and n.startswith("cells_") else n for n in names]
    rows = kept_rows(Path(args.json), vars(args), labels) if args.keep else []
    for name, label in zip(names, labels):
        started = time.perf_counter()
        with variant(model, name, args.k, args.width):
            row = score_prompts(model, tokenizer, prompts, config.new_tokens(args.task), label, args.k)
        rows.append({**asdict(row), "seconds": time.perf_counter() - started})
        print(f"{label:<16} {row.correct}/{row.prompts} acc {row.accuracy:.2f} {row.answers}", flush=True)
        out = {"setup": vars(args), "machine": "2-core AMD EPYC, shared/loaded", "rows": rows}
        write_text(args.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
