"""``SEAAttention(..., query_rows=...)``: a subset of rows equals those rows of the full forward,
outputs and gradients (what row-subset distillation relies on)."""

import pytest
import torch

from conftest import make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig

CASES = [  # heads, kv_heads, pad, grouping, path, gating, output_mode, estimator options
    (4, 2, 0, "query", "sparse", True, "mix", {}),
    (4, 2, 5, "query_head", "sparse", True, "norm", {}),
    (6, 3, 3, "query", "reference", False, "mix", {}),
    (4, 4, 4, "query", "sparse", True, "mix", dict(kernel_bins=False, key_bins=False, sinks=0, local_window=0,
                                                    position_code="learned")),
]


def _module(heads, kv_heads, grouping, path, gating, mode, options) -> SEAAttention:
    config = SEAConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=16, causal=True, k=6, estimate_width=8,
                       max_positions=128, grouping=grouping, attention_path=path, gating=gating, output_mode=mode,
                       query_chunk=7, **options)
    torch.manual_seed(0)
    module = SEAAttention(config).double()
    for p in module.parameters():  # leave the zero-initialised CNN residual: every part must matter
        p.data.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("heads, kv_heads, pad, grouping, path, gating, mode, options", CASES)
def test_rows_equal_the_full_forwards_rows_with_gradients(heads, kv_heads, pad, grouping, path, gating, mode, options):
    module = _module(heads, kv_heads, grouping, path, gating, mode, options)
    q, k, v = make_qkv(2, heads, kv_heads, 40, 40, 16, dtype=torch.float64)
    mask = padding_mask(2, 40, pad, left=True)
    rows = torch.tensor([0, 1, 7, 8, 9, 23, 39])
    results = []
    for subset in (None, rows):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        module.zero_grad()
        out = module(*inputs, attention_mask=mask, query_rows=subset, return_attention=path == "reference")
        pick = (lambda x, dim: x.index_select(dim, rows)) if subset is None else (lambda x, dim: x)
        fields = {"context": pick(out.context, 2), "estimate": pick(out.estimate, 2),
                  "logits": pick(out.estimate_logits, 2), "nnz": pick(out.nnz, 2), "cells": pick(out.cells, 2),
                  "lengths": pick(out.lengths, 1)}
        if gating:
            fields["gates"] = pick(out.gates, 2)
        if out.attention is not None:
            fields["attention"] = pick(out.attention, 2)
        loss = (fields["context"] * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum() \
            + (fields["estimate"].square() * torch.arange(8, dtype=torch.float64)).sum()
        loss.backward()
        grads = [x.grad for x in inputs] + [p.grad.clone() for p in module.parameters() if p.grad is not None]
        results.append((fields, grads))
    (full, full_grads), (part, part_grads) = results
    assert part["context"].shape[2] == len(rows)
    for name in full:
        torch.testing.assert_close(part[name], full[name], atol=1e-10, rtol=1e-9, msg=name)
    assert len(part_grads) == len(full_grads)
    for a, b in zip(part_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_the_estimator_is_computed_on_the_rows_only():
    module = _module(4, 2, "query", "sparse", True, "mix", {})
    q, k, v = make_qkv(1, 4, 2, 32, 32, 16, dtype=torch.float64)
    out = module(q, k, v, query_rows=torch.tensor([3, 30]))
    assert out.estimated.shape == (1, 4, 2, 8) and out.estimate_rows is None  # the output holds just the rows
    assert out.context.shape == (1, 4, 2, 16) and out.lengths.tolist() == [[4, 31]]


@pytest.mark.parametrize("rows, match", [
    (torch.tensor([3, 3]), "strictly increasing"),
    (torch.tensor([5, 2]), "strictly increasing"),
    (torch.tensor([0, 32]), r"in \[0, 32\)"),
    (torch.tensor([-1]), r"in \[0, 32\)"),
    (torch.tensor([], dtype=torch.long), "non-empty"),
    (torch.tensor([1.0]), "torch.long"),
    ([1, 2], "torch.long"),
])
def test_bad_rows_are_refused(rows, match):
    module = _module(4, 2, "query", "sparse", True, "mix", {})
    q, k, v = make_qkv(1, 4, 2, 32, 32, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        module(q, k, v, query_rows=rows)


@pytest.mark.parametrize("what", ["bidirectional", "block", "state"])
def test_rows_are_refused_where_they_are_not_defined(what):
    config = SEAConfig(num_heads=4, num_kv_heads=2, head_dim=16, causal=what != "bidirectional", k=6,
                       estimate_width=8, grouping="block" if what == "block" else "query")
    module = SEAAttention(config).double()
    q, k, v = make_qkv(1, 4, 2, 32, 32, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="query_rows needs a causal SEA layer"):
        module(q, k, v, query_rows=torch.tensor([1, 2]), state=DecodeState() if what == "state" else None)


def test_rows_on_the_flex_path_equal_the_full_forwards_rows():
    config = SEAConfig(num_heads=4, num_kv_heads=2, head_dim=16, causal=True, k=6, estimate_width=8,
                       attention_path="flex")
    module = SEAAttention(config)
    q, k, v = make_qkv(2, 4, 2, 40, 40, 16)
    mask = padding_mask(2, 40, 3, left=True)
    rows = torch.tensor([0, 5, 20, 39])
    with torch.no_grad():  # CPU FlexAttention is forward only
        full = module(q, k, v, attention_mask=mask).context.index_select(2, rows)
        part = module(q, k, v, attention_mask=mask, query_rows=rows).context
    torch.testing.assert_close(part, full, atol=1e-6, rtol=1e-6)
