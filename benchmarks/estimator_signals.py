"""How much of the teacher's attention each training-free selection signal covers, per layer.

For every layer of SmolLM2-135M on held-out text (wiki validation: the split recipes are chosen
on, never the test split), the fraction of the dense attention mass on the keys each selection
takes at budget k, rows past the first quarter of each window:

* ``oracle``: per query the top H*k true probabilities across heads (what the sparsity costs);
* ``cell_oracle``: the grouped top-k on the true attention summed into SEA's K bins (the best
  any estimate in SEA's coordinates can do), also with the sink and window bins forced;
* ``window_sinks``: the first 4 keys and the last k - 4;
* ``kernel``: the FAVOR+ kernel's binned attention share (``kernel_bins``); ``mean_key``: the
  bins' mean-key logits (``key_bins``); and their sum with the kernel's log-share weighted, each
  with the sink and window bins forced (``sinks=4``, ``local_window`` in {8, 16}).

This chose the undistilled estimator's starting point (``KERNEL_SCALE_INIT``, the forced bins).

    python benchmarks/estimator_signals.py --windows 2 --json benchmarks/results/estimator_signals.json
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from sea_attention import patch
from sea_attention.app import assets
from sea_attention.atomic import write_text
from sea_attention.core.cells import compress_attention, forced_cells, query_lengths
from sea_attention.tools.distill import tokenize
from sea_attention.core.estimator.features import RandomFeatures
from sea_attention.core.estimator.kernel_bins import binned_key_logits, binned_log_mass, prefix_sums
from sea_attention.tools.evaluate import grouped_oracle_mask
from sea_attention.hf import LayerCall, layer_override, no_cache
from sea_attention.core.ops.reference import allowed_keys
from sea_attention.core.selection import select_cells


def window_sinks(tq: int, k: int, sinks: int = 4) -> torch.Tensor:
    """(Tq, Tq) bool: the first ``sinks`` keys and the last k - sinks, causal."""
    pos = torch.arange(tq)
    causal = pos[None, :] <= pos[:, None]
    return causal & ((pos[None, :] < sinks) | (pos[None, :] > pos[:, None] - (k - sinks)))


class Coverage:
    """The override: per layer, the teacher mass each signal's selection covers."""

    def __init__(self, k: int, width: int, skip: float, kernel_features: int, weights: list[float]) -> None:
        self.k, self.width, self.skip, self.weights = k, width, skip, weights
        self.features = RandomFeatures(64, kernel_features, "favor", seed=1)
        self.results: dict[str, dict[int, list[float]]] = {}

    def add(self, name: str, layer: int, value: float) -> None:
        self.results.setdefault(name, {}).setdefault(layer, []).append(value)

    def __call__(self, call: LayerCall):
        context, probs = call.dense()
        q, key, valid = call.query.float(), call.key.float(), call.key_valid
        bsz, heads, tq, d = q.shape
        lengths = query_lengths(valid, valid, True)
        binned = compress_attention(probs.float(), valid, lengths, self.width)  # (B, H, T, K)
        rows = slice(int(self.skip * tq), None)
        layer, k = call.layer_idx, self.k

        def cells_cover(scores: torch.Tensor, sinks: int = 0, window: int = 0) -> float:
            cells = select_cells(scores, lengths, k, "query", sinks=sinks, window=window)
            return float((binned * cells).sum(-1)[:, :, rows].mean())

        allowed = allowed_keys(valid, tq, True).expand(-1, heads, -1, -1)
        self.add("oracle", layer, float((probs * grouped_oracle_mask(probs, allowed, k)).sum(-1)[:, :, rows].mean()))
        self.add("window_sinks", layer, float((probs * window_sinks(tq, k)).sum(-1)[:, :, rows].mean()))
        self.add("cell_oracle", layer, cells_cover(binned))
        self.add("cell_oracle+forced16", layer, cells_cover(binned, 4, 16))
        kernel, mean_key = self._signals(q, key, valid, lengths, call.scaling)
        self.add("kernel", layer, cells_cover(kernel.exp()))
        self.add("mean_key", layer, cells_cover(torch.softmax(mean_key, -1)))
        for window in (8, 16):  # capped at k // 4 = 16 at k=64
            self.add(f"mean_key+forced{window}", layer, cells_cover(torch.softmax(mean_key, -1), 4, window))
            for weight in self.weights:
                both = torch.softmax(weight * kernel + mean_key, -1)
                self.add(f"{weight:g}*kernel+mean_key+forced{window}", layer, cells_cover(both, 4, window))
        return context.to(call.query.dtype), None

    def _signals(self, q, key, valid, lengths, scale):
        """(B, H, T, K) kernel log-share and mean-key logits, as the estimator computes them."""
        bsz, heads, tq, d = q.shape
        kv_heads = key.shape[1]
        q5 = q.view(bsz, kv_heads, heads // kv_heads, tq, d)
        root = math.sqrt(scale)
        phi_q = self.features(q5, is_query=True, root=root)
        sums = prefix_sums(self.features(key, is_query=False, root=root), valid)
        kernel = binned_log_mass(phi_q, sums, lengths, self.width).flatten(1, 2)
        mean_key = binned_key_logits(q5, prefix_sums(key, valid), lengths, self.width, scale).flatten(1, 2)
        return kernel, mean_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=2, help="windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--kernel-features", type=int, default=33, help="FAVOR+ features (33 = the default m)")
    parser.add_argument("--weights", default="0.5,1", help="weights of the kernel's log-share beside mean_key")
    parser.add_argument("--skip", type=float, default=0.25, help="coverage over rows past this fraction")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = assets.load_model("smollm2-135m")
    patch(model, k=args.k, estimate_width=args.width)
    ids = tokenize(tokenizer, assets.load_text("wiki", "validation"))
    coverage = Coverage(args.k, args.width, args.skip, args.kernel_features,
                        [float(w) for w in args.weights.split(",")])
    started = time.perf_counter()
    with torch.no_grad(), layer_override(model, coverage):
        for i in range(args.windows):
            model(input_ids=ids[i * args.seq_len:(i + 1) * args.seq_len][None], **no_cache(model))
    table = {name: [sum(v) / len(v) for _, v in sorted(per.items())] for name, per in coverage.results.items()}
    print(f"{'signal':<32} {'mean':>6}  per layer (%)")
    for name, values in table.items():
        print(f"{name:<32} {sum(values) / len(values):6.3f}  " + " ".join(f"{100 * x:3.0f}" for x in values))
    if args.json:
        import json
        write_text(args.json, json.dumps({
            "model": "smollm2-135m", "data": "wiki/validation", "seq_len": args.seq_len, "windows": args.windows,
            "k": args.k, "estimate_width": args.width, "kernel_features": args.kernel_features,
            "coverage_rows_from": args.skip, "seconds": round(time.perf_counter() - started, 1),
            "machine": platform.processor() or platform.machine(),
            "mean": {n: sum(v) / len(v) for n, v in table.items()}, "per_layer": table}, indent=1))


if __name__ == "__main__":
    main()
