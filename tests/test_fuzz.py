"""Seeded fuzzing of SEAAttention: random valid configurations and inputs, checked against
properties that must hold for every one of them.

* the default (sparse / block) path equals the ``attention_path="reference"`` oracle, outputs
  and gradients;
* causality: changing positions >= j changes no output row before j;
* padding invariance: a padded sample gives the outputs of the same sample alone;
* decoding in random chunks with a DecodeState equals one full forward.

Cases are drawn from seeded generators, so a failure names its seed and reproduces. The
default run is a few dozen cases; ``pytest --fuzz-cases N`` draws N per property.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.core.config import CAUSAL_GROUPINGS, GROUPINGS


# the estimator's random features run in fp32 even in a float64 layer, so results that sum the
# estimator's inputs in another order (padded vs alone, chunked vs whole) agree to fp32 rounding
ESTIMATOR_TOL = 1e-6
CAUSAL_ESTIMATORS = [  # the defaults (binned signals, forced sink and window bins), one signal, the paper's
    {}, dict(kernel_bins=False, sinks=1, local_window=3), dict(key_bins=False, sinks=0),
    dict(kernel_bins=False, key_bins=False, sinks=0, local_window=0), dict(key_bounds=True),
    dict(bin_sums_dtype="float32")]


@dataclass
class Case:
    seed: int
    config: SEAConfig
    batch: int
    length: int
    pads: list[int]  # padding tokens of each sample
    left: bool  # padding on the left (else on the right)
    k_budget: int | None

    def __str__(self) -> str:
        c = self.config
        return (f"seed{self.seed}-{'causal' if c.causal else 'bidir'}-{c.grouping}-h{c.num_heads}/{c.num_kv_heads}"
                f"-T{self.length}-pad{'L' if self.left else 'R'}{self.pads}")


def _pick(generator: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _int(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def random_case(seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    causal = bool(_int(g, 0, 1))
    kv_heads, groups = _int(g, 1, 3), _int(g, 1, 3)
    multiple = 4 if causal else 2
    config = SEAConfig(
        num_heads=kv_heads * groups, num_kv_heads=kv_heads, head_dim=_pick(g, [8, 16]), causal=causal,
        k=_int(g, 1, 8), estimate_width=multiple * _int(g, 1, 4), grouping=_pick(g, CAUSAL_GROUPINGS if causal else GROUPINGS),
        gating=bool(_int(g, 0, 1)), output_mode=_pick(g, ["mix", "norm"]), max_positions=64,
        query_chunk=_int(g, 1, 16), query_block=_int(g, 1, 12), seed=seed,
        **(_pick(g, CAUSAL_ESTIMATORS) if causal else {}))
    batch, length = _int(g, 1, 3), _int(g, 1, 40)
    pads = [_int(g, 0, length - 1) if _int(g, 0, 2) else 0 for _ in range(batch)]  # odd amounts included
    left = causal or bool(_int(g, 0, 1))
    k_budget = _pick(g, [None, _int(g, 1, 12), length])
    return Case(seed, config, batch, length, pads, left, k_budget)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = [random_case(seed) for seed in range(metafunc.config.getoption("fuzz_cases"))]
        metafunc.parametrize("case", cases, ids=[str(c) for c in cases])


def inputs(case: Case, requires_grad: bool = False):
    g = torch.Generator().manual_seed(10_000 + case.seed)
    c, t = case.config, case.length
    q = torch.randn(case.batch, c.num_heads, t, c.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(case.batch, c.num_kv_heads, t, c.head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(case.batch, c.num_kv_heads, t, c.head_dim, generator=g, dtype=torch.float64)
    mask = torch.ones(case.batch, t, dtype=torch.bool)
    for b, pad in enumerate(case.pads):
        if pad:
            mask[b, slice(0, pad) if case.left else slice(t - pad, t)] = False
    return [x.requires_grad_(requires_grad) for x in (q, k, v)], mask


def layer(case: Case, **changes) -> SEAAttention:
    torch.manual_seed(case.seed)
    module = SEAAttention(case.config.replace(**changes)).double()
    with torch.no_grad():  # trained-looking weights: gates not all alike, a norm with a bias
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def test_default_path_equals_the_reference_with_gradients(case):
    fast = layer(case)
    slow = layer(case, attention_path="reference")
    slow.load_state_dict(fast.state_dict())
    results = []
    for module in (fast, slow):
        (q, k, v), mask = inputs(case, requires_grad=True)
        out = module(q, k, v, attention_mask=mask, k_budget=case.k_budget)
        loss = out.context.square().sum() + (out.estimate.nan_to_num() * 0.5).square().sum()
        results.append((out, torch.autograd.grad(loss, (q, k, v))))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a.context, b.context, atol=1e-9, rtol=1e-9)
    assert torch.equal(a.nnz, b.nnz) and torch.equal(a.cells, b.cells)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-9)


def test_causality_canary(case):
    if not case.config.causal:
        pytest.skip("bidirectional")
    module = layer(case)
    (q, k, v), mask = inputs(case)
    base = module(q, k, v, attention_mask=mask, k_budget=case.k_budget).context
    j = random_case(case.seed + 1).length % case.length
    changed = [x.clone() for x in (q, k, v)]
    for x in changed:
        x[:, :, j:] += torch.randn_like(x[:, :, j:]) * 3
    after = module(*changed, attention_mask=mask, k_budget=case.k_budget).context
    # float64 rounding only: the slot layout (its width is the widest row's) may change with later rows
    torch.testing.assert_close(after[:, :, :j], base[:, :, :j], atol=1e-12, rtol=0)


def test_padding_invariance(case):
    if case.config.grouping == "block" and case.left:
        pytest.skip("the block grouping cuts blocks at absolute positions (documented)")
    module = layer(case)
    (q, k, v), mask = inputs(case)
    padded = module(q, k, v, attention_mask=mask, k_budget=case.k_budget).context
    for b in range(case.batch):
        rows = mask[b]
        alone = module(*(x[b:b + 1, :, rows] for x in (q, k, v)), k_budget=case.k_budget).context
        torch.testing.assert_close(padded[b:b + 1, :, rows], alone, atol=ESTIMATOR_TOL, rtol=ESTIMATOR_TOL,
                                   msg=f"sample {b}")
        assert bool((padded[b, :, ~rows] == 0).all())


def test_decoding_equals_the_full_forward(case):
    if not case.config.causal:
        pytest.skip("bidirectional")
    module = layer(case).eval()
    (q, k, v), mask = inputs(case)
    with torch.no_grad():
        full = module(q, k, v, attention_mask=mask, k_budget=case.k_budget)
        g = torch.Generator().manual_seed(20_000 + case.seed)
        state, start, parts, cells = DecodeState(), 0, [], []
        while start < case.length:
            end = min(case.length, start + _pick(g, [1, 1, 2, 5, 13]))
            out = module(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end],
                         k_budget=case.k_budget, state=state)
            parts.append(out.context)
            cells.append(out.cells)
            start = end
    torch.testing.assert_close(torch.cat(parts, 2), full.context, atol=ESTIMATOR_TOL, rtol=ESTIMATOR_TOL)
    assert torch.equal(torch.cat(cells, 2), full.cells)  # the same keys are selected
