"""The length policy (``SEAConfig.dense_until``): rows with at most N keys attend densely, the rest
run SEA; SDPA's dense rows equal the reference; decoding with a state that keeps the queries and
then starts SEA equals one full forward."""

import pytest
import torch

from conftest import exact_attention, make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig
from sea_attention.core.call import SEACall
from sea_attention.core.cells import query_lengths
from sea_attention.core.dense_rows import dense_context, dense_rows
from sea_attention.core.ops.reference import exact_attention as reference_exact


def layer(**options) -> SEAAttention:
    settings = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=3, estimate_width=8, max_positions=256,
                    query_chunk=7) | options
    torch.manual_seed(0)
    module = SEAAttention(SEAConfig(**settings)).eval()
    for p in module.parameters():  # every part must matter (the CNN residual starts at zero)
        p.data.add_(0.05 * torch.randn_like(p))
    return module


def _call(config, q, k, v, mask, **options) -> SEACall:
    return SEACall.build(config, (q, k, v), {"attention_mask": mask, **options})


@pytest.mark.parametrize("causal, tq", [(True, 21), (True, 5), (True, 1), (False, 21)])  # a suffix is causal
@pytest.mark.parametrize("pad, left", [(0, True), (3, True), (4, False)])
def test_the_dense_rows_context_equals_the_reference(causal, pad, left, tq):
    config = SEAConfig(num_heads=4, num_kv_heads=2, head_dim=16, causal=causal, estimate_width=8)
    q, k, v = make_qkv(2, 4, 2, tq, 21, 16, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(2, 21, pad, left=left)
    state = DecodeState(seen=21 - tq) if tq < 21 else None  # a suffix needs a state; dense rows read none of it
    lengths = query_lengths(mask, mask[:, 21 - tq:], causal)
    call = SEACall(q, k, v, mask, mask[:, 21 - tq:], lengths, 3, 0.3, state=state)
    got = dense_context(call, causal)
    want = exact_attention(q, k, v, mask, causal, scale=0.3)
    valid = mask[:, 21 - tq:][:, None, :, None]
    torch.testing.assert_close(got * valid, want.nan_to_num() * valid)
    weights = torch.randn_like(got) * valid
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want.nan_to_num() * weights).sum(), (q, k, v))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("grouping", ["query", "block"])
def test_short_rows_are_exact_and_long_rows_are_seas(pad, grouping):
    until = 12
    module = layer(dense_until=until, grouping=grouping, query_block=4)
    plain = layer(grouping=grouping, query_block=4)
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16)
    mask = padding_mask(2, 30, pad)
    with torch.no_grad():
        out, sea = module(q, k, v, attention_mask=mask, return_attention=True), plain(q, k, v, attention_mask=mask)
        exact, probs = reference_exact(q, k, v, mask, 16 ** -0.5, True)
    rows = dense_rows(_call(module.config, q, k, v, mask), until)  # (B, Tq)
    lengths = mask.long().cumsum(-1) * mask
    assert torch.equal(rows, mask & (lengths <= until)) and bool((~rows & mask).any())
    short, long = rows[:, None, :, None], (~rows & mask)[:, None, :, None]
    torch.testing.assert_close(out.context * short, exact * short)
    torch.testing.assert_close(out.context * long, sea.context * long)
    torch.testing.assert_close(out.attention * short, probs * short)
    assert torch.equal(out.nnz * rows[:, None], (lengths * rows)[:, None].expand(-1, 4, -1).to(out.nnz.dtype))


def test_a_bidirectional_sample_with_few_keys_attends_densely():
    module = layer(causal=False, dense_until=20)
    q, k, v = make_qkv(2, 4, 2, 24, 24, 16)
    mask = padding_mask(2, 24, 6, left=False)  # sample 1 has 18 keys: dense; sample 0 has 24: SEA
    with torch.no_grad():
        out = module(q, k, v, attention_mask=mask)
        sea = layer(causal=False)(q, k, v, attention_mask=mask)
    exact = exact_attention(q, k, v, mask, False)
    torch.testing.assert_close(out.context[1] * mask[1, None, :, None], exact[1] * mask[1, None, :, None])
    torch.testing.assert_close(out.context[0], sea.context[0])


@pytest.mark.parametrize("until", [0, 10, 40])
def test_context_only_equals_the_full_forward(until):
    module = layer(dense_until=until)
    q, k, v = make_qkv(2, 4, 2, 33, 33, 16)
    mask = padding_mask(2, 33, 4)
    with torch.no_grad():
        torch.testing.assert_close(module.context_only(q, k, v, attention_mask=mask),
                                   module(q, k, v, attention_mask=mask).context, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", [[6, 1, 1, 1, 1, 10, 1, 1], [1] * 20, [20]])
@pytest.mark.parametrize("grouping", ["query", "block"])
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("runner", ["context_only", "forward"])
def test_decoding_across_the_length_equals_the_full_forward(schedule, grouping, pad, runner):
    module = layer(dense_until=9, grouping=grouping, query_block=4)
    t = sum(schedule)
    q, k, v = make_qkv(2, 4, 2, t, t, 16)
    mask = padding_mask(2, t, pad)
    state, start, steps, kept = DecodeState(), 0, [], []
    run = module.context_only if runner == "context_only" else lambda *a, **o: module(*a, **o).context
    with torch.no_grad():
        full = module(q, k, v, attention_mask=mask).context
        for size in schedule:
            end = start + size
            steps.append(run(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attention_mask=mask[:, :end],
                             state=state))
            kept.append(state.queries is not None)
            start = end
    torch.testing.assert_close(torch.cat(steps, 2), full, atol=2e-5, rtol=1e-5)
    assert state.seen == t and state.holds_sea
    if runner == "context_only" and schedule[0] < 9:
        assert kept[0]  # the first calls kept their queries instead of SEA's state


def test_a_state_that_keeps_queries_reorders_like_the_batch():
    module = layer(dense_until=12)
    q, k, v = make_qkv(3, 4, 2, 16, 16, 16)
    state = DecodeState()
    with torch.no_grad():
        module.context_only(q[:, :, :10], k[:, :, :10], v[:, :, :10], state=state)
        order = torch.tensor([2, 0, 0])
        state.select(order)
        assert state.queries.shape[0] == 3
        steps = [module.context_only(q[order, :, t - 1:t], k[order, :, :t], v[order, :, :t], state=state)
                 for t in range(11, 17)]
        full = module(q[order], k[order], v[order]).context
    torch.testing.assert_close(torch.cat(steps, 2), full[:, :, 10:], atol=2e-5, rtol=1e-5)


def test_dense_until_is_validated():
    with pytest.raises(ValueError, match="dense_until must be a non-negative integer"):
        SEAConfig(num_heads=4, head_dim=16, dense_until=-1)


def test_a_row_subset_gets_the_full_forwards_rows():
    module = layer(dense_until=10)
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16)
    mask = padding_mask(2, 30, 3)
    rows = torch.tensor([2, 8, 9, 12, 13, 25])
    with torch.no_grad():
        full = module(q, k, v, attention_mask=mask)
        part = module(q, k, v, attention_mask=mask, query_rows=rows)
    torch.testing.assert_close(part.context, full.context[:, :, rows], atol=2e-5, rtol=1e-5)
    assert torch.equal(part.nnz, full.nnz[:, :, rows])


@pytest.mark.parametrize("runner", ["context_only", "forward"])
def test_a_non_finite_key_poisons_only_the_rows_that_see_it(runner):
    module = layer(dense_until=10)
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16)
    k[0, 1, 5, 3] = float("nan")
    with torch.no_grad():
        out = module.context_only(q, k, v) if runner == "context_only" else module(q, k, v).context
    assert bool(out[:, :, 5:].isnan().all()) and bool(out[:, :, :5].isfinite().all())
    clean = k.clone()
    clean[0, 1, 5, 3] = 0.0
    torch.testing.assert_close(out[:, :, :5], exact_attention(q, clean, v, torch.ones(1, 20, dtype=torch.bool),
                                                              True)[:, :, :5])


@pytest.mark.parametrize("grouping, block_from, kept", [("query", 0, 8), ("query_head", 0, 8), ("block", 0, 12),
                                                      ("query", 16, 12)])
def test_a_dense_state_keeps_only_what_seas_state_needs(grouping, block_from, kept):
    """A per-query grouping's SEA state is rebuilt from the keys and the CNN's 8 history rows; the block
    grouping's also needs the rows back to its open block's first (query_block = 4 more), and so does the
    long-rows policy's (left padding can start SEA past block_from whatever dense_until is)."""
    module = layer(dense_until=30, grouping=grouping, query_block=4, block_from=block_from)
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16)
    state = DecodeState()
    with torch.no_grad():
        module.context_only(q[:, :, :15], k[:, :, :15], v[:, :, :15], state=state)
        for t in range(16, 21):
            module.context_only(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t], state=state)
    assert state.queries.shape[2] == kept and not state.holds_sea
    assert state.queries.untyped_storage().nbytes() == state.queries.nbytes  # a copy, not a view of q
    torch.testing.assert_close(state.queries, q[:, :, 20 - kept:])


def test_the_dense_rows_read_no_key_after_the_last_row():
    """A causal span's dense rows are computed on the keys up to its last row only (the cost of a
    prefill's short spans does not grow with the prompt): poisoning later keys changes nothing."""
    module = layer(dense_until=12)
    q, k, v = make_qkv(1, 4, 2, 30, 30, 16)
    call = _call(module.config, q, k, v, torch.ones(1, 30, dtype=torch.bool), query_rows=torch.arange(0, 10))
    late = SEACall(q, k.clone(), v.clone(), call.key_valid, call.query_valid, call.lengths, 3, call.scale,
                   query_rows=call.query_rows)
    late.k[:, :, 10:] = float("nan")
    late.v[:, :, 10:] = float("nan")
    assert torch.equal(dense_context(late, True), dense_context(call, True))
