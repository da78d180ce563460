"""Per-token decode latency of a SEA model against its dense self, at growing contexts.

For each context length: prefill the context through the KV cache, then time single-token
decoding steps (median). SEA keeps per-layer running state, so its step cost should stay
flat apart from reading the ~H*k selected keys; dense attention reads every key.

    .venv/bin/python benchmarks/decode_latency.py --model tiny --contexts 1024,4096,16384
    .venv/bin/python benchmarks/decode_latency.py --model smollm2-135m --contexts 1024,4096,8192
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sea_attention import assets
from sea_attention.hf import dense_attention, patch


def build(name: str, longest: int):
    if name == "tiny":  # narrow, many positions: attention dominates the step
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                             intermediate_size=512, vocab_size=1000, max_position_embeddings=max(longest + 64, 2048))
        model = LlamaForCausalLM(config).eval()
    else:
        model, _ = assets.load_model(name)
    return patch(model, k=64, estimate_width=128, max_positions=model.config.max_position_embeddings)


@torch.no_grad()
def step_latency(model, context: int, steps: int, prefill_chunk: int) -> float:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context + steps))
    cache = DynamicCache()
    for start in range(0, context, prefill_chunk):
        model(input_ids=ids[:, start:min(start + prefill_chunk, context)], past_key_values=cache, use_cache=True)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        model(input_ids=ids[:, context + i:context + i + 1], past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) if steps > 1 else times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' or a model name/path for assets.load_model")
    parser.add_argument("--contexts", default="1024,4096,16384")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    model = build(args.model, max(contexts) + args.steps)
    rows = []
    print(f"{'context':>8} {'dense ms/token':>15} {'SEA ms/token':>13} {'dense/SEA':>10}")
    limit = model.config.max_position_embeddings
    for context in contexts:
        if context + args.steps > limit:  # the decoded tokens must fit the model's positions too
            print(f"context {context} + {args.steps} steps exceeds {limit} positions: using {limit - args.steps}")
            context = limit - args.steps
        with dense_attention(model, "sdpa"):
            dense = step_latency(model, context, args.steps, args.prefill_chunk)
        sea = step_latency(model, context, args.steps, args.prefill_chunk)
        rows.append({"context": context, "dense_ms": 1e3 * dense, "sea_ms": 1e3 * sea})
        print(f"{context:>8} {1e3 * dense:>15.1f} {1e3 * sea:>13.1f} {dense / sea:>10.2f}", flush=True)
    out = Path(args.json or f"benchmarks/results/decode_latency_{Path(args.model).name}.json")
    if out.exists():  # keep earlier contexts measured with the same model
        earlier = [r for r in json.loads(out.read_text())["rows"] if r["context"] not in {r2["context"] for r2 in rows}]
        rows = sorted(earlier + rows, key=lambda r: r["context"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
