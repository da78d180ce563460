"""A first look at SEA attention on random inputs: exactness, sparsity and dynamic k."""

import time

import torch

from sea_attention import SEAAttention, SEAConfig


def main() -> None:
    torch.manual_seed(0)
    config = SEAConfig(num_heads=12, num_kv_heads=4, head_dim=64, causal=True, k=64, estimate_width=128)
    sea = SEAAttention(config).eval()
    t = 2048
    q, k, v = torch.randn(1, 12, t, 64), torch.randn(1, 4, t, 64), torch.randn(1, 4, t, 64)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)

    exact = SEAAttention(config.replace(gating=False)).eval()
    with torch.no_grad():
        full = exact(q, k, v, k_budget=t)
    print(f"gating off, budget >= T: max |SEA - softmax attention| = {(full.context - dense).abs().max():.2e}")

    print(f"{'k':>6} {'keys/query/head':>16} {'time (s)':>9}")
    for budget in (16, 64, 256):
        start = time.perf_counter()
        with torch.no_grad():
            out = sea(q, k, v, k_budget=budget)
        print(f"{budget:>6} {out.nnz[:, :, budget:].float().mean():>16.1f} {time.perf_counter() - start:>9.2f}")


if __name__ == "__main__":
    main()
