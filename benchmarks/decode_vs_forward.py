"""How far a patched SmolLM2-135M's decoding logits are from its full forward's, by prefix-sum dtype.

A window of wiki validation prose runs once as a full forward (no cache) and once as a prefill of all
but the last ``--steps`` tokens followed by single-token steps on ``GrowingCache``; the largest
difference of the logits over the decoded rows is printed and written as JSON, per
``bin_sums_dtype``. With float64 sums the two agree to the model's own rounding; float32 rounding in
a bin's sum can decide a near-tie of the top-k differently, and then a selected key changes
(``SEAConfig.bin_sums_dtype``, docs/results.md).

    PYTHONPATH=src python benchmarks/decode_vs_forward.py --lengths 48,2048 \
        --json benchmarks/results/decode_vs_forward.json
"""

from __future__ import annotations

import argparse
import json

import torch

from sea_attention import patch
from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.hf import GrowingCache, cache_kwargs, set_runtime
from sea_attention.tools.bench.runtime import machine_info


@torch.no_grad()
def largest_difference(model, ids: torch.Tensor, steps: int) -> float:
    """max |decoding logits - full forward logits| over the last ``steps`` predicted rows."""
    length = ids.shape[1]
    full = model(input_ids=ids, use_cache=False).logits[0, -steps - 1:-1]
    cache = cache_kwargs(GrowingCache())
    rows = [model(input_ids=ids[:, :length - steps], use_cache=True, **cache).logits[0, -1:]]
    for t in range(length - steps, length - 1):
        rows.append(model(input_ids=ids[:, t:t + 1], use_cache=True, **cache).logits[0])
    return float((torch.cat(rows) - full).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="48,2048", help="window lengths in tokens")
    parser.add_argument("--steps", type=int, default=8, help="tokens decoded one at a time at the end")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model)
    tokens = tokenizer(assets.load_text("wiki", "validation"))["input_ids"]
    points = []
    for dtype in ("float64", "float32"):
        set_runtime(model, bin_sums_dtype=dtype)
        for length in (int(x) for x in args.lengths.split(",")):
            ids = torch.tensor([tokens[:length]])
            points.append({"bin_sums_dtype": dtype, "length": length, "steps": args.steps,
                           "max_abs_logit_difference": largest_difference(model, ids, args.steps)})
            print(f"{dtype}  T={length:5d}  max |decode - full| = {points[-1]['max_abs_logit_difference']:.2e}")
    if args.json:
        write_text(args.json, json.dumps({"machine": machine_info(args.threads), "model": "smollm2-135m (undistilled "
                                          "sea.patch)", "text": "wiki validation", "points": points}, indent=2) + "\n")


if __name__ == "__main__":
    main()
