"""EXPERIMENT (issue 25): does the key bound rank the bin of the key a retrieval step needs?

For needle prompts of the suite (haystack: wiki validation prose, the text a default may be chosen
on), the prompt and its correct answer run through the dense SmolLM2-135M (teacher forcing). At each
answer row, in every layer and head, the key dense attention weighs most is found; unless it is a
sink (the first 4 keys) or inside the last 16 (the window SEA always keeps), the rank of its bin
among the row's K=256 bins is recorded under each signal an undistilled SEA estimator can add:

* ``mean``: the mean-key logit, scale * q . mean(k) + log(size) (``key_bins``, on by default);
* ``bound``: the key bound, scale * (q+ . max(k) + q- . min(k)) + log(size) (``key_bounds``);
* ``sum``: both at weight 1, what ``sea.patch(model, key_bounds=True)`` starts from (beside the
  kernel's log-share, left out here).

At 4k tokens with k=64 a head has about 4 bins of 16 keys, two of them forced (sink, window), so
a needed key is found when its bin ranks in the first few. Prints the median rank and the share
of ranks below 4 and 16, and writes them as JSON.

    PYTHONPATH=src python benchmarks/needle_bin_ranks.py --length 4096 --prompts 5 \
        --json benchmarks/results/needle_bin_ranks_4k.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.core.cells import cell_edges
from sea_attention.core.estimator.kernel_bins import binned_key_logits, prefix_sums
from sea_attention.core.estimator.key_bounds import bin_bound_logits, bound_table
from sea_attention.core.ops.reference import repeat_kv
from sea_attention.hf import layer_override, patch
from sea_attention.tools.bench import machine_info
from sea_attention.tools.baselines.retrieval import RetrievalConfig, suite_prompts

WIDTH, SINKS, WINDOW = 256, 4, 16  # the causal defaults (SEAConfig)


class RankProbe:
    """A layer override recording, for the last ``answer`` rows, the rank of the dense top key's
    bin under each signal; the layer itself runs dense."""

    def __init__(self) -> None:
        self.answer = 0
        self.ranks: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, call):
        q, k = call.query.float(), call.key.float()  # (1, H, T, d), (1, H_kv, T, d)
        heads, tokens, kv_heads = q.shape[1], q.shape[2], k.shape[1]
        rows = torch.arange(tokens - self.answer, tokens)
        logits = (q[:, :, rows] @ repeat_kv(k, heads // kv_heads).transpose(-1, -2)) * call.scaling
        top = logits.masked_fill(torch.arange(tokens)[None, :] > rows[:, None], -torch.inf).argmax(-1)[0]  # (H, R)
        valid = torch.ones(1, tokens, dtype=torch.bool)
        lengths = (rows + 1)[None]
        grouped = q[:, :, rows].view(1, kv_heads, heads // kv_heads, len(rows), -1)
        mean = binned_key_logits(grouped, prefix_sums(k, valid), lengths, WIDTH, call.scaling).flatten(1, 2)[0]
        bound = bin_bound_logits(grouped, bound_table(k, valid, WIDTH), lengths, WIDTH, call.scaling).flatten(1, 2)[0]
        edges = cell_edges(lengths, WIDTH)[0]  # (R, K + 1)
        bins = (torch.searchsorted(edges.contiguous(), top.T.contiguous(), right=True) - 1).T  # (H, R)
        free = (top >= SINKS) & (top < rows[None, :] - WINDOW)  # not a key SEA keeps anyway
        for name, signal in (("mean", mean), ("bound", bound), ("sum", mean + bound)):
            target = signal.gather(-1, bins[..., None])
            self.ranks[name].append((signal > target).sum(-1)[free])
        return call.dense()[0], None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model)
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        text = Path(folder) / "wiki_validation.txt"
        text.write_text(assets.load_text("wiki", "validation"))
        config = RetrievalConfig(("needle",), (args.length,), args.prompts, haystacks=(str(text),))
        prompts = suite_prompts(tokenizer, config)[("needle", args.length)]
    probe = RankProbe()
    for prompt in prompts:
        answer = tokenizer(prompt.answer, add_special_tokens=False, return_tensors="pt").input_ids[0]
        probe.answer = len(answer)
        with torch.no_grad(), layer_override(model, probe):
            model(torch.cat([prompt.ids, answer])[None])
    out = {"model": "smollm2-135m", "haystack": "wiki validation", "length": args.length, "prompts": args.prompts,
           "width": WIDTH, "machine": machine_info(), "signals": {}}
    for name, parts in probe.ranks.items():
        ranks = torch.cat(parts).float()
        out["signals"][name] = {"steps": ranks.numel(), "median_rank": float(ranks.median()),
                                "below_4": float((ranks < 4).float().mean()),
                                "below_16": float((ranks < 16).float().mean())}
        print(f"{name:6s} {ranks.numel()} (row, layer, head) steps: median rank {ranks.median():.0f}, "
              f"rank < 4 {out['signals'][name]['below_4']:.3f}, rank < 16 {out['signals'][name]['below_16']:.3f}")
    write_text(args.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
