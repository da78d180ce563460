"""EXPERIMENT (issue 25, tried and not adopted): exact attention on SEA's keys plus the bins it left out.

SEA renormalises its softmax over the keys it selected, so the mass of every other key is dropped.
This ``layer_override`` keeps SEA's selection and adds, for every key it did not select, a weight from
its bin, as a pooled branch would (each bin's unselected keys as one key: its mean value):

* ``dense``: the model's own attention, on the same windows;
* ``none``: exact softmax on SEA's selected keys, no gates or average branch;
* ``sea``: the layer as ``sea.patch`` runs it (gates and average branch);
* ``meankey``: a bin's unselected keys weigh exp(scale * q . mean(k over the bin)) each: the mean-key
  logit the undistilled estimator already computes (a Jensen lower bound of their mass), linear in T;
* ``exact_mass``: they share their exact softmax mass (an oracle of the bin-level branch).

It builds Tq x Tk scores (a measurement, not a method): SmolLM2-135M, undistilled ``sea.patch``, k=64.

    PYTHONPATH=src python benchmarks/residual_bins.py --seq-len 4096 --tokens 8192 --variant meankey \
        --json benchmarks/results/residual_bins_meankey_4k.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.core.cells import key_bins
from sea_attention.core.ops.reference import repeat_kv
from sea_attention.hf import layer_override, patch, sea_budget
from sea_attention.tools.bench.runtime import machine_info
from sea_attention.tools.distill import tokenize
from sea_attention.tools.evaluate import perplexity

VARIANTS = ("dense", "none", "sea", "meankey", "exact_mass")


def residual_context(q, k, v, selected, scale: float, width: int, variant: str, chunk: int = 512):
    """q, k, v (H, T, d) (k, v repeated to every query head), selected (H, T, T) bool: the context (H, T, d)."""
    heads, length, _ = q.shape
    out = torch.empty_like(q)
    for lo in range(0, length, chunk):
        rows = torch.arange(lo, min(lo + chunk, length))
        scores = scale * q[:, rows] @ k.transpose(1, 2)  # (H, c, T)
        causal = torch.arange(length)[None, :] <= rows[:, None]  # (c, T)
        chosen = selected[:, rows] & causal
        peak = scores.masked_fill(~chosen, -math.inf).amax(-1, keepdim=True)
        weights = torch.exp(scores - peak) * chosen
        if variant in ("meankey", "exact_mass"):
            bins = key_bins(torch.arange(length)[None, :], rows[:, None] + 1, width).clamp(0, width - 1)
            bins = bins.expand(heads, -1, -1)
            left = causal & ~chosen

            def per_bin(x):
                return torch.zeros(heads, rows.numel(), width, dtype=x.dtype).scatter_add_(-1, bins, x)

            if variant == "exact_mass":
                share = per_bin(torch.exp(scores - peak) * left) / per_bin(left.float()).clamp_min(1)
            else:
                mean_logit = per_bin(scores * causal) / per_bin(causal.float().expand(heads, -1, -1)).clamp_min(1)
                share = torch.exp(mean_logit - peak)
            weights = weights + share.gather(-1, bins) * left
        out[:, rows] = (weights @ v) / weights.sum(-1, keepdim=True)
    return out


class Override:
    def __init__(self, variant: str) -> None:
        self.variant = variant

    def __call__(self, call):
        if self.variant == "dense":
            return call.dense()[0], None
        out = call.run_sea()
        if self.variant == "sea":
            return out.context, None
        heads, length = call.query.shape[1], call.key.shape[2]
        groups = heads // call.key.shape[1]
        k, v = repeat_kv(call.key, groups)[0], repeat_kv(call.value, groups)[0]
        selected = out.slots.dense_mask(heads, length)[0]
        context = residual_context(call.query[0], k, v, selected, call.scaling, call.sea.config.estimate_width,
                                   self.variant)
        return context.unsqueeze(0), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model)
    ids = tokenize(tokenizer, assets.load_text("wiki", args.split))[: args.tokens]
    start = time.time()
    with sea_budget(model, args.k), torch.no_grad(), layer_override(model, Override(args.variant)):
        ppl, scored = perplexity(model, ids, args.seq_len, args.seq_len, progress=False)
    result = {**vars(args), "perplexity": ppl, "tokens_scored": scored, "seconds": round(time.time() - start, 1),
              "machine": machine_info(1)}
    print(json.dumps(result))
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
