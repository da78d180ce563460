"""EXPERIMENT (issue 25): would a budget that follows the attention's mass retrieve where 64 keys do not?

At 4,096 tokens the exact per-head oracle at k=64 answers fewer needles than dense (docs/results.md,
"Where the needle is lost at 4k tokens"): no selection of 64 keys per query and head retrieves there. A
top-p oracle keeps, per query and head, the smallest set of keys holding ``p`` of the dense attention's
mass (at most ``--cap`` keys), so rows whose attention is spread get more keys and peaked rows fewer. This
runs it on the suite's needles (the suite's own code path, ``score_prompts``, as ``sea compare --task``)
and records the keys per query and head it used (``SelectionStats``), beside dense and ``oracle_head``.
Writes the JSON after every row, so a stopped run keeps them.

    PYTHONPATH=src python benchmarks/retrieval_top_p_oracle.py --p 0.9 --validation --lengths 4096 \
        --json benchmarks/results/retrieval_top_p_oracle_0.9_4k.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.hf import layer_override, patch
from sea_attention.tools.baselines.chunks import QueryChunk, Selector
from sea_attention.tools.baselines.compare import method_attention
from sea_attention.tools.baselines.layer import SelectionStats, SelectorOverride
from sea_attention.tools.baselines.retrieval import RetrievalConfig, score_prompts, suite_prompts
from sea_attention.tools.bench.runtime import machine_info

from retrieval_candidates import haystacks


def top_p_mask(p: float, cap: int) -> Selector:
    """Selector: per query and head, the fewest keys whose dense probabilities sum to at least ``p``
    (the most probable first, equal ones in ``topk``'s order; at most ``cap``; none where a row has no key)."""
    if not 0.0 < p <= 1.0 or cap < 1:
        raise ValueError(f"top-p needs 0 < p <= 1 and cap >= 1, got p={p!r}, cap={cap!r}")

    def select(chunk: QueryChunk, k: int) -> Tensor:
        allowed = chunk.everything()
        probs = chunk.teacher[1].masked_fill(~allowed, 0.0)
        top = probs.topk(min(cap, probs.shape[-1]), dim=-1)  # highest first
        before = top.values.cumsum(-1) - top.values  # the mass of the keys ranked above
        keep = before < p  # the first key always (nothing ranks above it)
        return torch.zeros_like(allowed).scatter_(-1, top.indices, keep) & allowed
    return select


def top_p_reference(probs: Tensor, allowed: Tensor, p: float, cap: int) -> Tensor:
    """The same selection one row at a time: add keys by probability until their sum reaches p (on rows
    without equal probabilities, which is what ``check_against_reference`` feeds it)."""
    selected = torch.zeros_like(probs, dtype=torch.bool)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in probs.shape[:-1])).tolist():
        row = probs[tuple(index)].masked_fill(~allowed[tuple(index)], 0.0)
        total = 0.0
        for key in row.argsort(descending=True, stable=True).tolist()[:cap]:
            if selected[tuple(index)].any() and total >= p:
                break
            selected[(*index, key)] = bool(allowed[(*index, key)])
            total += float(row[key])
    return selected


def check_against_reference() -> None:
    """The vectorised selection equals the row-by-row one on a small random chunk (run at every start)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    chunk = QueryChunk(q, k, v, torch.ones(1, 12, dtype=torch.bool), torch.arange(7, 12), 0.35, True)
    for p, cap in ((0.5, 12), (0.9, 4)):
        expected = top_p_reference(chunk.teacher[1], chunk.everything(), p, cap)
        if not torch.equal(top_p_mask(p, cap)(chunk, 0), expected):
            raise AssertionError(f"top_p_mask differs from its reference at p={p}, cap={cap}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--p", type=float, nargs="+", default=[0.9], help="mass each (query, head) keeps")
    parser.add_argument("--cap", type=int, default=512, help="the most keys a (query, head) keeps")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--methods", nargs="*", default=[], choices=("dense", "oracle_head"),
                        help="also run these beside the top-p oracle (oracle_head at k=64)")
    parser.add_argument("--validation", action="store_true", help="hide the needles in wiki validation prose")
    parser.add_argument("--json", required=True)
    parser.add_argument("--machine-note", default=None, help="how loaded the machine was (recorded in the JSON)")
    args = parser.parse_args()
    check_against_reference()
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model)  # the selectors replace its attention; patched so layer_override reaches every layer
    model.eval()
    out = {"model": "smollm2-135m", "cap": args.cap, "threads": torch.get_num_threads(),
           "machine": {**machine_info(), "note": args.machine_note}, "rows": []}
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        config = RetrievalConfig(("needle",), tuple(args.lengths), args.prompts,
                                 haystacks=haystacks(args.validation, Path(folder)))
        out["setup"] = {**asdict(config), "haystacks": ["wiki validation"] if args.validation else config.haystacks}
        prompts = suite_prompts(tokenizer, config)
        runs = [(method, None) for method in args.methods] + [("top_p", p) for p in args.p]
        for method, p in runs:
            for (task, length), batch in prompts.items():
                if method == "top_p":
                    stats = SelectionStats()  # per row: its own length's keys
                    with layer_override(model, SelectorOverride(top_p_mask(p, args.cap), 0, stats)):
                        row = asdict(score_prompts(model, tokenizer, batch, config.new_tokens(task), method, None))
                    row.update(p=p, keys_per_query=stats.keys_per_query())
                else:
                    k = 64 if method == "oracle_head" else None
                    with method_attention(model, method, k):
                        row = asdict(score_prompts(model, tokenizer, batch, config.new_tokens(task), method, k))
                out["rows"].append(row)
                out["seconds"] = round(time.time() - start)
                write_text(args.json, json.dumps(out, indent=1))
                extra = f" p={p}, {row['keys_per_query']:.1f} keys per query and head" if p is not None else ""
                print(f"{task} {method} length={length}: {row['correct']}/{row['prompts']}{extra}", flush=True)


if __name__ == "__main__":
    main()
