"""``SEAAttention.context_only``: the row-chunked inference path equals the full forward's context,
fills a prefill's decoding state as the full forward does, and runs only where it is defined."""

from dataclasses import replace

import pytest
import torch

from conftest import make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.core.call import SEACall
from sea_attention.core.chunked import chunked_runs
from sea_attention.core.grouping import block as block_grouping
from sea_attention.core.ops.block_sparse import BlockSparseAttention


@pytest.fixture(autouse=True)
def short_block_runs(monkeypatch):
    """Block-grouping spans are runs of the block op: 2 blocks here, so these short inputs have several."""
    monkeypatch.setattr(block_grouping, "block_sparse_attention", BlockSparseAttention(chunk_blocks=2))

GRID = [  # heads, kv_heads, tokens, pad, left, config options
    (4, 2, 45, 5, True, {}),  # GQA, left padding, defaults (both binned signals, sinks, window)
    (4, 2, 45, 6, False, dict(grouping="query_head")),  # right padding
    (4, 4, 33, 0, True, dict(kernel_bins=False, key_bins=False, sinks=0, local_window=0,
                             position_code="learned")),  # the paper's estimator
    (6, 3, 50, 4, True, dict(kernel_bins=True, key_bins=False, estimate_width=8, k=3, output_mode="norm")),
    (4, 1, 29, 3, False, dict(kernel_bins=False, key_bins=True, sinks=2, local_window=5, gating=False)),
    (4, 2, 40, 0, True, dict(k=64)),  # budget above the length: every key
    (4, 2, 45, 5, True, dict(key_bounds=True)),  # the upper-bound signal beside the defaults
    (4, 2, 45, 5, False, dict(bin_sums_dtype="float32")),  # float32 prefix sums
    (4, 2, 45, 5, True, dict(grouping="block", query_block=8)),  # spans from a block's first row
    (4, 1, 50, 3, False, dict(grouping="block", query_block=4, key_bounds=True)),
    (4, 2, 45, 5, True, dict(block_from=16, query_block=8)),  # per-query spans up to row 16, then blocks
    (4, 2, 45, 6, False, dict(grouping="query_head", block_from=24, query_block=8, block_candidates=1)),
]


def _module(heads, kv_heads, dtype=torch.float32, **options) -> SEAAttention:
    settings = dict(causal=True, k=6, estimate_width=16, max_positions=128, query_chunk=7) | options
    config = SEAConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=16, **settings)
    torch.manual_seed(0)
    module = SEAAttention(config).to(dtype)
    for p in module.parameters():  # leave the zero-initialised CNN residual: every part must matter
        p.data.add_(0.05 * torch.randn_like(p))
    return module


def _inputs(heads, kv_heads, tokens, pad, left, dtype=torch.float32):
    torch.manual_seed(1)
    q, k, v = make_qkv(2, heads, kv_heads, tokens, tokens, 16, dtype=dtype)
    return q, k, v, padding_mask(2, tokens, pad, left=left)


@pytest.mark.parametrize("heads, kv_heads, tokens, pad, left, options", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_context_equals_the_full_forward(heads, kv_heads, tokens, pad, left, options, dtype):
    module = _module(heads, kv_heads, dtype, **options)
    q, k, v, mask = _inputs(heads, kv_heads, tokens, pad, left, dtype)
    with torch.no_grad():
        call = SEACall.build(module.config, (q, k, v), {"attention_mask": mask})
        assert chunked_runs(module, call)
        full = module(q, k, v, attention_mask=mask)
        chunked = module.context_only(q, k, v, attention_mask=mask)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(chunked, full.context, **tol)
    assert chunked.dtype == full.context.dtype and chunked.shape == full.context.shape


@pytest.mark.parametrize("chunk", [1, 8, 64])
@pytest.mark.parametrize("grouping", ["query", "block"])
def test_every_chunk_size_gives_the_same_context(chunk, grouping, monkeypatch):
    """Spans of ``chunk`` rows (per query) or ``chunk`` blocks of 8 (block: runs of the block op)."""
    monkeypatch.setattr(block_grouping, "block_sparse_attention", BlockSparseAttention(chunk_blocks=chunk))
    module = _module(4, 2, torch.float64, query_chunk=chunk, grouping=grouping, query_block=8)
    q, k, v, mask = _inputs(4, 2, 37, 3, True, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module.context_only(q, k, v, attention_mask=mask),
                                   module(q, k, v, attention_mask=mask).context, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("grouping", ["query", "block"])
def test_a_chunked_prefill_fills_the_state_for_decoding(grouping):
    module = _module(4, 2, grouping=grouping, query_block=8)
    q, k, v, mask = _inputs(4, 2, 40, 4, True)
    with torch.no_grad():
        full = module(q, k, v, attention_mask=mask).context
        for prefill in ("chunked", "full"):
            state, steps = DecodeState(), []
            run = module.context_only if prefill == "chunked" else lambda *a, **o: module(*a, **o).context
            steps.append(run(q[:, :, :30], k[:, :, :30], v[:, :, :30], attention_mask=mask[:, :30], state=state))
            for end in range(31, 41):  # then one token at a time (context_only runs the full forward there)
                steps.append(module.context_only(q[:, :, end - 1:end], k[:, :, :end], v[:, :, :end],
                                                 attention_mask=mask[:, :end], state=state))
            torch.testing.assert_close(torch.cat(steps, 2), full, atol=2e-5, rtol=1e-5, msg=prefill)


@pytest.mark.parametrize("first, tq, chunk, align", [(0, 37, 8, 1), (0, 37, 10, 4), (5, 30, 8, 8), (0, 3, 64, 8),
                                                      (3, 20, 2, 8)])
def test_spans_cover_the_rows_once_and_start_at_aligned_positions(first, tq, chunk, align):
    from sea_attention.core.grouping.base import span_starts

    starts = span_starts(first, tq, chunk, align)
    assert starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < tq
    assert all((first + lo) % align == 0 for lo in starts[1:])


def test_a_spans_selecting_rows_are_on_the_inputs_device():
    from sea_attention.core.grouping import grouping_for

    grouping = grouping_for(_module(4, 2, grouping="block", query_block=8).config)
    rows = grouping.span_estimate_rows(3, 5, 30, torch.device("meta"))  # built, never read: any device works
    assert rows.device.type == "meta" and rows.shape == (4,)  # rows 5, 13, 21, 29: key positions 8, 16, 24, 32


@pytest.mark.parametrize("grouping, rows", [("query", 7), ("block", 16)])
def test_a_span_is_query_chunk_rows_or_one_run_of_the_block_op(grouping, rows):
    from sea_attention.core.grouping import grouping_for

    config = _module(4, 2, grouping=grouping, query_block=8).config  # query_chunk 7; the op runs 2 blocks here
    assert grouping_for(config).span_size() == rows
    assert grouping_for(replace(config, query_chunk=3)).span_size() == (3 if grouping == "query" else 16)


def test_a_state_shorter_than_the_cnn_history_is_filled_like_the_full_forward():
    module = _module(4, 2)
    q, k, v, mask = _inputs(4, 2, 5, 0, True)
    states = [DecodeState(), DecodeState()]
    with torch.no_grad():
        module(q, k, v, attention_mask=mask, state=states[0])
        module.context_only(q, k, v, attention_mask=mask, state=states[1])
    for name in ("cnn_rows", "cnn_mask", "value_sum", "valid_keys"):
        torch.testing.assert_close(getattr(states[1], name), getattr(states[0], name), atol=1e-6, rtol=1e-6)
    assert states[1].seen == states[0].seen == 5


@pytest.mark.parametrize("case", ["grad", "attention", "rows", "bidirectional", "reference"])
def test_calls_the_chunked_path_does_not_define_run_the_full_forward(case):
    options = {"reference": dict(attention_path="reference"),
               "bidirectional": dict(causal=False, estimate_width=16)}.get(case, {})
    module = _module(4, 2, **options)
    q, k, v, mask = _inputs(4, 2, 20, 2, case != "bidirectional")
    extra = {"attention": {"return_attention": True}, "rows": {"query_rows": torch.tensor([3, 4, 9])}}.get(case, {})
    with torch.set_grad_enabled(case == "grad"):
        call = SEACall.build(module.config, (q, k, v), {"attention_mask": mask, **extra})
        assert not chunked_runs(module, call)
        context = module.context_only(q, k, v, attention_mask=mask, **extra)
        assert torch.equal(context, module(q, k, v, attention_mask=mask, **extra).context)
    assert context.requires_grad == (case == "grad")
