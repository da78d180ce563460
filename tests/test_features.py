import math

import pytest
import torch

from sea_attention.core.estimator.features import (
    RandomFeatures, causal_linear_attention, linear_attention, orthogonal_gaussian_projection,
)


def naive_causal(phi_q, phi_k, values):
    """Quadratic form of causal linear attention: the oracle for the chunked version."""
    tq, tk = phi_q.shape[-2], phi_k.shape[-2]
    scores = phi_q @ phi_k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, Tq, Tk)
    scores = scores * torch.ones(tq, tk).tril(tk - tq)
    return (scores @ values.unsqueeze(2)) / (scores.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("tq, tk, chunk", [(10, 10, 3), (10, 10, 128), (4, 17, 2), (1, 9, 1)])
def test_causal_linear_attention_matches_quadratic(tq, tk, chunk):
    phi_q = torch.rand(2, 2, 3, tq, 5) + 0.01
    phi_k = torch.rand(2, 2, tk, 5) + 0.01
    values = torch.randn(2, 2, tk, 6)
    out, _ = causal_linear_attention(phi_q, phi_k, values, chunk=chunk)
    torch.testing.assert_close(out, naive_causal(phi_q, phi_k, values))


def test_causal_state_continues_a_sequence():
    phi_q = torch.rand(1, 1, 1, 12, 4) + 0.01
    phi_k = torch.rand(1, 1, 12, 4) + 0.01
    values = torch.randn(1, 1, 12, 3)
    full, _ = causal_linear_attention(phi_q, phi_k, values, chunk=5)
    first, state = causal_linear_attention(phi_q[..., :7, :], phi_k[:, :, :7], values[:, :, :7])
    second, _ = causal_linear_attention(phi_q[..., 7:, :], phi_k[:, :, 7:], values[:, :, 7:], state=state)
    torch.testing.assert_close(torch.cat([first, second], -2), full)


def test_one_key_at_a_time_continues_a_sequence_like_the_full_forward():
    """Decoding steps (one new key, the only query) take the one-product path: the same outputs
    and final state as one call over every key, from a state or from nothing."""
    phi_q = torch.rand(2, 2, 3, 6, 4) + 0.01
    phi_k = torch.rand(2, 2, 6, 4) + 0.01
    values = torch.randn(2, 2, 6, 3)
    full, full_state = causal_linear_attention(phi_q, phi_k, values, chunk=4)
    outs, state = [], None
    for t in range(6):
        out, state = causal_linear_attention(phi_q[..., t:t + 1, :], phi_k[:, :, t:t + 1], values[:, :, t:t + 1],
                                             state=state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, -2), full)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a, b)


def test_bidirectional_equals_unmasked_quadratic():
    phi_q = torch.rand(1, 2, 2, 6, 4) + 0.01
    phi_k = torch.rand(1, 2, 9, 4) + 0.01
    values = torch.randn(1, 2, 9, 3)
    scores = phi_q @ phi_k.unsqueeze(2).transpose(-1, -2)
    expected = (scores @ values.unsqueeze(2)) / (scores.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(linear_attention(phi_q, phi_k, values), expected)


def test_projection_rows_are_orthogonal_within_a_block():
    w = orthogonal_gaussian_projection(16, 16, torch.Generator().manual_seed(0))
    unit = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(unit @ unit.T, torch.eye(16), atol=1e-5, rtol=0)


def test_favor_features_approximate_the_softmax_kernel():
    d, m = 16, 4096
    features = RandomFeatures(d, m, "favor", seed=0)
    q, k = torch.randn(8, d) * 0.3, torch.randn(8, d) * 0.3
    approx = features(q, is_query=False) @ features(k, is_query=False).T
    exact = torch.exp(q @ k.T) - 0  # FAVOR+ estimates exp(q.k) up to the small epsilon
    assert float(((approx - exact).abs() / exact).mean()) < 0.1


def test_features_are_positive_and_redraw_changes_them():
    for kind in ("favor", "relu"):
        features = RandomFeatures(8, 20, kind, seed=1)
        x = torch.randn(5, 8)
        assert bool((features(x, is_query=True) > 0).all())
        before = features.projection.clone()
        features.redraw(seed=2)
        assert not torch.equal(before, features.projection)
