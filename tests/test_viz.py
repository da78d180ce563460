"""Attention snapshots: the estimate stretched back to the keys is a causal distribution per row."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sea_attention.hf import patch
from sea_attention.viz import capture_attention, plot_attention


def test_snapshot_maps_are_causal_distributions_in_key_coordinates(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=64, vocab_size=50))
    patch(model.eval(), k=3, estimate_width=8)
    snapshot = capture_attention(model, torch.randint(0, 50, (1, 40)), layer=1, head=2)
    attended = (snapshot.nnz > 0).float()  # heads compete for one budget: a head may get no key in a row
    for name, total in (("teacher", torch.ones(40)), ("stretched", torch.ones(40)), ("sparse", attended)):
        values = getattr(snapshot, name)
        assert values.shape == (40, 40)
        torch.testing.assert_close(values.sum(-1), total, atol=1e-5, rtol=0)
        assert values.triu(1).abs().max() == 0, f"{name} attends to the future"
    # the stretched estimate keeps each bin's mass: bin b of row 39 (L=40, K=8) is keys 5b..5b+4
    torch.testing.assert_close(snapshot.stretched[39].view(8, 5).sum(-1), snapshot.estimate[39])
    assert plot_attention(snapshot, tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
