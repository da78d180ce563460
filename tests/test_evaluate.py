import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sea_attention.tools.evaluate import (
    BudgetSweep, PerplexityRow, evaluate_budgets, format_table, oracle_attention, perplexity, sliding_windows,
)
from sea_attention.hf import dense_attention, layer_override, patch


@pytest.mark.parametrize("n, seq_len, stride", [(100, 32, 32), (100, 32, 8), (33, 32, 32), (5, 32, 16)])
def test_sliding_windows_score_every_token_once(n, seq_len, stride):
    scored = []
    for begin, end, targets in sliding_windows(n, seq_len, stride):
        assert end - begin <= seq_len
        scored.extend(range(end - targets, end))
    if stride < seq_len:  # overlapping windows: every token but the first, exactly once
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows (the paper's protocol): a window's first token has no context
        assert sorted(scored) == [t for t in range(n) if t % seq_len]


def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_dense_perplexity_matches_the_model_loss():
    model = tiny()
    tokens = torch.randint(0, 50, (64,))
    expected = torch.exp(model(input_ids=tokens[None], labels=tokens[None]).loss).item()
    ppl, count = perplexity(patch(model, k=4, estimate_width=8), tokens, 64, 64, progress=False)
    assert count == 63
    with dense_attention(model):
        dense, _ = perplexity(model, tokens, 64, 64, progress=False)
    assert dense == pytest.approx(expected, rel=1e-5)


def test_oracle_with_full_budget_is_dense_and_small_budget_is_not():
    model = patch(tiny(), k=4, estimate_width=8)
    tokens = torch.randint(0, 50, (48,))
    with dense_attention(model):
        dense, _ = perplexity(model, tokens, 48, 48, progress=False)
    with layer_override(model, lambda call: oracle_attention(call, 48)):
        full, _ = perplexity(model, tokens, 48, 48, progress=False)
    with layer_override(model, lambda call: oracle_attention(call, 1)):
        sparse, _ = perplexity(model, tokens, 48, 48, progress=False)
    assert full == pytest.approx(dense, rel=1e-5)
    assert sparse != pytest.approx(dense, rel=1e-3)


def test_report_rows_and_table():
    model = patch(tiny(), k=4, estimate_width=8)
    rows = evaluate_budgets(model, torch.randint(0, 50, (40,)), BudgetSweep(20, 20, [2, 40], progress=False))
    assert [(r.name, r.k) for r in rows] == [("dense", None), ("oracle", 2), ("sea", 2), ("oracle", 40), ("sea", 40)]
    assert rows[3].perplexity == pytest.approx(rows[0].perplexity, rel=1e-5)  # oracle with every key
    table = format_table([PerplexityRow("dense", None, 10.0, 5), PerplexityRow("sea", 8, 11.0, 5)])
    assert "+10.0%" in table


def test_too_little_text_is_an_error():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny(), torch.tensor([1]), 8, 8, progress=False)
