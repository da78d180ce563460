"""EXPERIMENT (issue 25): which of the undistilled estimator's two binned signals loses the needle.

Zeroes one signal's weight in every layer of the default `patch(model)` (key_bins: the mean-key
logit, kernel_bins: the FAVOR+ log-mass term) and answers the suite's needle prompts greedily.

    PYTHONPATH=src python benchmarks/retrieval_signal_ablation.py --zero kernel_scale --prompt 3
"""

import argparse
import json

import torch

from sea_attention.app import assets
from sea_attention.hf import patch, sea_budget, sea_layers
from sea_attention.tools.baselines.retrieval import RetrievalConfig, score_prompts, suite_prompts

parser = argparse.ArgumentParser()
parser.add_argument("--zero", choices=("kernel_scale", "key_scale", "none"), required=True)
parser.add_argument("--prompts", type=int, default=4)
parser.add_argument("--prompt", type=int, nargs="*", help="only these prompts (default all)")
parser.add_argument("--json", required=True)
args = parser.parse_args()
model, tokenizer = assets.load_model("smollm2-135m")
patch(model)
if args.zero != "none":
    for _, _, sea in sea_layers(model):
        getattr(sea.estimator, args.zero).data.zero_()
config = RetrievalConfig(("needle",), (1024,), args.prompts)
prompts = suite_prompts(tokenizer, config)[("needle", 1024)]
chosen = [prompts[i] for i in args.prompt] if args.prompt else prompts
with sea_budget(model, 64), torch.no_grad():
    row = score_prompts(model, tokenizer, chosen, config.new_tokens("needle"), f"sea_zero_{args.zero}", 64)
print(args.zero, [p.answer for p in chosen], row.answers, flush=True)
json.dump({"zero": args.zero, "prompts": args.prompt, "answers": [p.answer for p in chosen], "row": row.__dict__},
          open(args.json, "w"), indent=1)
