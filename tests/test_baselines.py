"""Training-free selectors: each against its one-row-at-a-time reference, exact key counts,
causality, chunking, and the statistics the comparison reports."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_qkv, padding_mask
from sea_attention.tools.baselines import SELECTORS, CompareConfig, SelectionStats, SelectorOverride, query_chunks
from sea_attention.tools.baselines.compare import method_attention
from sea_attention.tools.baselines.oracle import (
    grouped_oracle_reference, oracle_head_mask, oracle_head_reference, oracle_mask,
)
from sea_attention.tools.baselines.quest import quest_mask, quest_reference
from sea_attention.tools.baselines.window_sinks import window_sinks_mask, window_sinks_reference
from sea_attention.tools.evaluate import oracle_attention, perplexity
from sea_attention.hf import LayerCall, dense_attention, layer_override, no_cache, patch, sea_budget, set_runtime
from sea_attention.core.ops.reference import allowed_keys, exact_attention

HEADS, KV_HEADS, DIM = 4, 2, 8


def one_chunk(q, k, v, key_valid, causal):
    """All query rows as one chunk."""
    (chunk,) = query_chunks(q, k, v, key_valid, 1.0 / DIM**0.5, causal, size=q.shape[2])
    return chunk


def inputs(batch=2, tq=40, tk=40, causal=True, pad=5):
    q, k, v = make_qkv(batch, HEADS, KV_HEADS, tq, tk, DIM)
    return one_chunk(q, k, v, padding_mask(batch, tk, pad), causal)


def valid_rows(chunk):
    """(B, 1, C, 1) bool: non-padding query rows (references skip the others)."""
    return chunk.query_valid[:, None, :, None]


@pytest.mark.parametrize("tq", [40, 7])  # a whole prefix, and the last rows only (as in decoding)
@pytest.mark.parametrize("k", [1, 6, 64])
def test_window_sinks_matches_reference(tq, k):
    chunk = inputs(tq=tq)
    expected = window_sinks_reference(chunk.key_valid, HEADS, tq, k)
    assert torch.equal(window_sinks_mask(chunk, k), expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k", [3, 9])
def test_oracles_match_references(causal, k):
    chunk = inputs(causal=causal, tq=24, tk=24)
    probs = chunk.teacher[1]
    assert torch.equal(oracle_head_mask(chunk, k), oracle_head_reference(probs, chunk.allowed, k))
    assert torch.equal(oracle_mask(chunk, k), grouped_oracle_reference(probs, chunk.allowed, k))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k, page", [(8, 4), (12, 4), (6, 3)])
@pytest.mark.parametrize("tq", [50, 9])
def test_quest_matches_reference(causal, k, page, tq):
    chunk = inputs(causal=causal, tq=tq, tk=50)
    expected = quest_reference(chunk.query, chunk.key, chunk.key_valid, causal, k, page)
    assert torch.equal(quest_mask(chunk, k, page) & valid_rows(chunk), expected)


def test_exact_keys_per_query():
    chunk, k, page = inputs(), 12, 4
    lengths = chunk.lengths[:, None, :]  # (B, 1, C)
    dense_rows = torch.minimum(lengths, torch.tensor(k))
    assert torch.equal(window_sinks_mask(chunk, k).sum(-1), dense_rows.expand(-1, HEADS, -1))
    assert torch.equal(oracle_head_mask(chunk, k).sum(-1), dense_rows.expand(-1, HEADS, -1))
    assert torch.equal(oracle_mask(chunk, k).sum((1, -1)), HEADS * dense_rows[:, 0])  # shared across heads
    # quest: the visible part of the own page, plus k // P - 1 full earlier pages
    own = (lengths - 1) % page + 1
    expected = torch.where(lengths <= k, lengths, own + (k // page - 1) * page) * (lengths > 0)
    assert torch.equal(quest_mask(chunk, k, page).sum(-1), expected.expand(-1, HEADS, -1))


def test_selections_stay_inside_the_allowed_keys_and_short_rows_are_dense():
    chunk, k = inputs(), 16
    for name, selector in SELECTORS.items():
        selected = selector(chunk, k)
        assert not (selected & ~chunk.allowed).any(), name
        short = chunk.short_rows(k).expand_as(selected)
        assert torch.equal(selected[short], chunk.everything()[short]), name


def test_bad_arguments_name_what_is_accepted():
    chunk = inputs()
    with pytest.raises(ValueError, match="k >= page_size"):
        quest_mask(chunk, 8, page_size=16)
    with pytest.raises(ValueError, match="causal attention only"):
        window_sinks_mask(inputs(causal=False), 8)
    with pytest.raises(ValueError, match="methods must be some of dense,oracle"):
        CompareConfig(methods=("dense", "h2o"))
    with pytest.raises(ValueError, match="coverage_skip"):
        CompareConfig(coverage_skip=1.0)


def call_for(q, k, v, key_valid, causal=True):
    return LayerCall(module=None, sea=None, layer_idx=0, query=q, key=k, value=v, key_valid=key_valid,
                     scaling=DIM**-0.5, causal=causal, output_attentions=False)


@pytest.mark.parametrize("method", list(SELECTORS))
def test_chunking_changes_nothing(method):
    q, k, v = make_qkv(2, HEADS, KV_HEADS, 40, 40, DIM)
    call = call_for(q, k, v, padding_mask(2, 40, 5))
    whole, _ = SelectorOverride(SELECTORS[method], 16, chunk_size=1000)(call)
    pieces, _ = SelectorOverride(SELECTORS[method], 16, chunk_size=7)(call)
    torch.testing.assert_close(pieces, whole)


def test_dense_override_is_exact_attention_and_oracle_is_sea_evals():
    q, k, v = make_qkv(2, HEADS, KV_HEADS, 30, 30, DIM)
    call = call_for(q, k, v, padding_mask(2, 30, 4))
    valid = call.key_valid[:, None, :, None]  # padding rows' outputs are never used
    dense, _ = SelectorOverride(SELECTORS["dense"], 8, chunk_size=8)(call)
    torch.testing.assert_close(dense * valid, exact_attention(q, k, v, call.key_valid, call.scaling, True)[0] * valid)
    oracle, _ = SelectorOverride(SELECTORS["oracle"], 8, chunk_size=8)(call)
    torch.testing.assert_close(oracle * valid, oracle_attention(call, 8)[0] * valid)


def test_stats_count_keys_and_teacher_mass():
    q, k, v = make_qkv(1, HEADS, KV_HEADS, 32, 32, DIM)
    call = call_for(q, k, v, torch.ones(1, 32, dtype=torch.bool))
    stats = {name: SelectionStats() for name in ("dense", "window_sinks")}
    for name, s in stats.items():
        SelectorOverride(SELECTORS[name], 8, s, chunk_size=10)(call)
    assert stats["dense"].coverage() == pytest.approx(1.0)
    assert stats["dense"].keys_per_query() == pytest.approx(sum(range(1, 33)) / 32)
    assert stats["window_sinks"].keys_per_query() == pytest.approx(sum(min(i, 8) for i in range(1, 33)) / 32)
    # coverage is the teacher's probability summed over the selected keys, averaged over (row, head)
    _, probs = exact_attention(q, k, v, call.key_valid, call.scaling, True)
    chunk = one_chunk(q, k, v, call.key_valid, True)
    expected = (probs * window_sinks_mask(chunk, 8)).sum(-1).mean()
    assert stats["window_sinks"].coverage() == pytest.approx(float(expected), rel=1e-5)
    assert stats["window_sinks"].coverage() < 0.999
    late = SelectionStats(skip=0.5)
    SelectorOverride(SELECTORS["window_sinks"], 8, late)(call)
    expected_late = (probs * window_sinks_mask(chunk, 8)).sum(-1)[..., 16:].mean()
    assert late.coverage() == pytest.approx(float(expected_late), rel=1e-5)


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=128)
    return patch(LlamaForCausalLM(config).eval(), k=4, estimate_width=8)


@pytest.mark.parametrize("method", [*SELECTORS, "sea"])
def test_causality_canary(method):
    """Changing a later token changes no earlier output."""
    model, t = tiny_model(), 37
    ids = torch.randint(0, 50, (1, 60))
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 50
    with method_attention(model, method, 16):
        before = model(input_ids=ids, **no_cache(model)).logits
        after = model(input_ids=changed, **no_cache(model)).logits
    torch.testing.assert_close(after[:, :t], before[:, :t])
    assert not torch.allclose(after[:, t:], before[:, t:])


def test_dense_method_perplexity_is_the_dense_model():
    model = tiny_model()
    tokens = torch.randint(0, 50, (64,))
    with dense_attention(model):
        expected, _ = perplexity(model, tokens, 32, 32, progress=False)
    with method_attention(model, "dense", None):
        got, _ = perplexity(model, tokens, 32, 32, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    with method_attention(model, "window_sinks", 8):  # a sparse method differs from dense
        sparse, _ = perplexity(model, tokens, 32, 32, progress=False)
    assert sparse != pytest.approx(expected, rel=1e-4)


def test_allowed_keys_of_a_chunk_match_the_project_rule():
    chunk = inputs(tq=9, tk=40)
    assert torch.equal(chunk.allowed, allowed_keys(chunk.key_valid, 9, True))


@pytest.mark.parametrize("grouping", ["query", "block"])
def test_sea_stats_count_the_keys_sea_attended(grouping):
    model = tiny_model()
    set_runtime(model, grouping=grouping, query_block=8)
    ids = torch.randint(0, 50, (1, 48))
    stats, reported = SelectionStats(), []

    def record_nnz(call):  # returns None: the layer then runs SEA as usual
        reported.append(call.run_sea().nnz.float().mean())

    with torch.no_grad():
        with method_attention(model, "sea", 6, stats):
            model(input_ids=ids, **no_cache(model))
        with sea_budget(model, 6), layer_override(model, record_nnz):
            model(input_ids=ids, **no_cache(model))
    assert stats.keys_per_query() == pytest.approx(float(sum(reported) / len(reported)), rel=1e-6)
    assert 0 < stats.coverage() < 1
