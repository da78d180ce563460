"""Perplexity of one distilled SEA model under the per-query and the query-block groupings.

The estimator is the same; only how its estimate is turned into a selection changes, so
this isolates what the block grouping costs (or gains) in quality. Also reports the mean
keys each query attended per head (the block grouping adds each query's own-block keys).

    .venv/bin/python benchmarks/quality_grouping.py runs/smollm2-est-1024-step60 \
        --seq-len 1024 --k 32,64 --json benchmarks/results/quality_grouping.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sea_attention.app import assets
from sea_attention.app.cli_args import int_list
from sea_attention.tools.distill import tokenize
from sea_attention.tools.evaluate import perplexity
from sea_attention.hf import dense_attention, from_pretrained, layer_override, sea_budget, sea_layers


def mean_keys(model, ids: torch.Tensor) -> float:
    """Mean keys per query per head over all layers for one window."""
    counts = []

    def record(call):
        counts.append(call.run_sea().nnz.float().mean().item())
        return None  # the layer then runs as usual

    with layer_override(model, record), torch.no_grad():
        model(input_ids=ids.unsqueeze(0), use_cache=False)
    return sum(counts) / len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved SEA model directory")
    parser.add_argument("--data", default="wiki")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--k", type=int_list, default=[64])
    parser.add_argument("--blocks", type=int_list, default=[64])
    parser.add_argument("--max-tokens", type=int, default=6144)
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = from_pretrained(args.model)
    tokens = tokenize(tokenizer, assets.load_text(args.data, "test"))[: args.max_tokens + 1]
    rows = []
    started = time.perf_counter()
    with dense_attention(model):
        ppl, n = perplexity(model, tokens, args.seq_len, args.seq_len, desc="dense")
    rows.append({"grouping": "dense", "k": None, "block": None, "perplexity": ppl, "keys_per_query": None, "tokens": n})
    configs = [("query", None)] + [("block", b) for b in args.blocks]
    originals = {name: sea.config for name, _, sea in sea_layers(model)}
    for k in args.k:
        for grouping, block in configs:
            for name, _, sea in sea_layers(model):
                extra = {"query_block": block} if block else {}
                sea.config = originals[name].replace(grouping=grouping, **extra)
            with sea_budget(model, k):
                ppl, n = perplexity(model, tokens, args.seq_len, args.seq_len, desc=f"{grouping} k={k}")
                keys = mean_keys(model, tokens[: args.seq_len])
            rows.append({"grouping": grouping, "k": k, "block": block, "perplexity": ppl, "keys_per_query": keys,
                         "tokens": n})
            print(f"{grouping:6} k={k:<4} block={block or '-':<4} ppl {ppl:8.3f}  keys/query/head {keys:6.1f}", flush=True)
    print(f"{time.perf_counter() - started:.0f} s")
    if args.json:
        path = Path(args.json)
        temporary = path.with_name(f".{path.name}.tmp")  # written whole, then renamed
        temporary.write_text(json.dumps({"model": args.model, "data": f"{args.data}/test", "seq_len": args.seq_len,
                                         "rows": rows}, indent=2))
        temporary.replace(path)


if __name__ == "__main__":
    main()
