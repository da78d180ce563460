"""Attention snapshots: the estimate stretched back to the keys is a causal distribution per row."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sea_attention.hf import patch
from sea_attention.tools.viz import AttentionSnapshot, capture_attention, plot_attention


def tiny_snapshot(layer: int, head: int) -> AttentionSnapshot:
    """One layer and head of a random tiny Llama (k=3, K=8) on 40 random tokens."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=64, vocab_size=50))
    patch(model.eval(), k=3, estimate_width=8)
    return capture_attention(model, torch.randint(0, 50, (1, 40)), layer=layer, head=head)


def test_snapshot_maps_are_causal_distributions_in_key_coordinates(tmp_path):
    snapshot = tiny_snapshot(layer=1, head=2)
    attended = (snapshot.nnz > 0).float()  # heads compete for one budget: a head may get no key in a row
    for name, total in (("teacher", torch.ones(40)), ("stretched", torch.ones(40)), ("sparse", attended)):
        values = getattr(snapshot, name)
        assert values.shape == (40, 40)
        torch.testing.assert_close(values.sum(-1), total, atol=1e-5, rtol=0)
        assert values.triu(1).abs().max() == 0, f"{name} attends to the future"
    # the stretched estimate keeps each bin's mass: bin b of row 39 (L=40, K=8) is keys 5b..5b+4
    torch.testing.assert_close(snapshot.stretched[39].view(8, 5).sum(-1), snapshot.estimate[39])
    assert plot_attention(snapshot, tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_a_row_range_keeps_those_rows_and_the_keys_they_see(tmp_path):
    snapshot = tiny_snapshot(layer=0, head=1)
    part = snapshot.rows(24, 32)
    assert (part.first_row, part.teacher.shape, part.estimate.shape, part.nnz.shape) == (24, (8, 32), (8, 8), (8,))
    for name in ("teacher", "stretched", "sparse"):
        torch.testing.assert_close(getattr(part, name), getattr(snapshot, name)[24:32, :32], atol=0, rtol=0)
        assert getattr(snapshot, name)[24:32, 32:].abs().max() == 0  # what a causal crop drops is empty
    assert part.rows(2, 4).first_row == 26  # crops compose in sequence positions
    with pytest.raises(ValueError, match=r"rows 30:50 are outside the snapshot's 40 query rows"):
        snapshot.rows(30, 50)
    with pytest.raises(ValueError, match=r"need 0 <= start < stop <= 40"):
        snapshot.rows(5, 5)
    assert plot_attention(part, tmp_path / "rows.png").read_bytes()[:4] == b"\x89PNG"
