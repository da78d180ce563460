import pytest
import torch

from sea_attention.core.cells import (cell_key_counts, cells_to_keys, forced_cells, forced_counts, live_cells,
                                     query_lengths)
from sea_attention.core.selection import cell_budget, max_keys_per_query, select_cells


def estimate_for(lengths, heads, width):
    logits = torch.randn(lengths.shape[0], heads, lengths.shape[1], width) * 3
    live = live_cells(lengths, width).unsqueeze(1)
    return torch.softmax(logits.masked_fill(~live, -1e9), -1) * live


@pytest.mark.parametrize("k, width", [(4, 8), (8, 16), (16, 8)])
def test_budget_regimes(k, width):
    heads = 3
    lengths = torch.arange(0, 400)
    budget = cell_budget(lengths, k, width, heads)
    assert int(budget[0]) == 0
    short = lengths <= k  # every key of short rows
    assert torch.equal(budget[short][1:], heads * lengths[short][1:].clamp_max(width))
    assert bool((budget[1:] >= 1).all())
    assert bool((budget <= heads * lengths.clamp_max(width)).all())
    long = lengths > k * width  # past k*K every cell is capped at k keys: H cells
    assert bool((budget[long] == heads).all())


@pytest.mark.parametrize("grouping", ["query", "query_head"])
@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("sinks, window", [(0, 0), (4, 16)])
def test_keys_per_query_close_to_k_and_bounded(grouping, k, sinks, window):
    heads, width, t = 4, 16, 600
    key_valid = torch.ones(1, t, dtype=torch.bool)
    lengths = query_lengths(key_valid, key_valid, causal=True)
    cells = select_cells(estimate_for(lengths, heads, width), lengths, k, grouping, sinks=sinks, window=window,
                         forced_keys=True)
    forced = forced_counts(k, sinks, window)
    slots = cells_to_keys(cells, lengths, key_valid, cap=k, forced=forced)
    per_query = slots.nnz(heads).sum(1)[0]  # (Tq,)
    assert bool((per_query >= 1).all())
    bound = max_keys_per_query(lengths, k, width, heads, grouping, forced)[0]
    assert bool((per_query <= bound).all())
    assert bool((per_query <= 2 * heads * k).all())
    assert bool((cell_key_counts(cells, lengths, k) <= k).all())  # the per-cell cap
    long_rows = lengths[0] >= k
    mean = per_query[long_rows].float().mean() / heads
    assert abs(float(mean) - k) / k < 0.15, float(mean)
    if grouping == "query_head":
        nnz = slots.nnz(heads)[0][:, long_rows].float()
        assert abs(float(nnz.mean()) - k) / k < 0.15


@pytest.mark.parametrize("grouping", ["query", "query_head", "sample", "head"])
def test_padding_never_selected_and_every_valid_query_served(grouping):
    heads, width, t = 3, 8, 50
    causal = grouping.startswith("query")
    key_valid = torch.ones(2, t, dtype=torch.bool)
    key_valid[0, :7] = False
    key_valid[1, -9:] = False
    lengths = query_lengths(key_valid, key_valid, causal=causal)
    cells = select_cells(estimate_for(lengths, heads, width), lengths, 4, grouping)
    assert not bool((cells & ~live_cells(lengths, width).unsqueeze(1)).any())
    slots = cells_to_keys(cells, lengths, key_valid, cap=4)
    dense = slots.dense_mask(heads, t)
    assert not bool((dense & ~key_valid[:, None, None, :]).any())
    per_query = dense.sum((1, 3))
    assert bool((per_query[key_valid] >= 1).all())
    assert bool((per_query[~key_valid] == 0).all())


@pytest.mark.parametrize("grouping", ["query", "query_head", "sample", "head"])
def test_dynamic_k_is_monotone(grouping):
    heads, width, t = 4, 16, 300
    causal = grouping.startswith("query")
    key_valid = torch.ones(1, t, dtype=torch.bool)
    lengths = query_lengths(key_valid, key_valid, causal=causal)
    estimate = estimate_for(lengths, heads, width)
    previous_cells, previous_count = None, None
    for k in (1, 2, 4, 8, 16, 32, 64, 300):
        cells = select_cells(estimate, lengths, k, grouping)
        count = cells_to_keys(cells, lengths, key_valid, cap=k).nnz(heads).sum(1)
        if previous_cells is not None:
            assert not bool((previous_cells & ~cells).any())  # a superset of cells
            assert bool((count >= previous_count).all())  # never fewer keys
        previous_cells, previous_count = cells, count


def test_sample_grouping_lets_peaky_heads_take_more():
    heads, width, t = 2, 8, 64
    key_valid = torch.ones(1, t, dtype=torch.bool)
    lengths = query_lengths(key_valid, key_valid, causal=False)
    estimate = torch.full((1, heads, t, width), 1.0 / width)
    estimate[:, 0] = 0.0
    estimate[:, 0, :, 0] = 1.0  # head 0 is certain, head 1 is flat
    cells = select_cells(estimate, lengths, 8, "query")
    assert int(cells[0, 0].sum()) >= t  # head 0's one cell wins in every row


def sorted_selection(estimate, lengths, k, grouping):
    """The selection by a full stable sort of each group's scores (the definition)."""
    bsz, heads, tq, width = estimate.shape
    live = live_cells(lengths, width).unsqueeze(1)
    scores = torch.where(live, estimate.float(), -1.0)
    if grouping == "query":
        scores = scores.permute(0, 2, 1, 3).reshape(bsz, tq, heads * width)
        budget = cell_budget(lengths, k, width, heads).unsqueeze(-1)
    else:
        budget = cell_budget(lengths, k, width, 1)[:, None, :, None]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
    picked = ranks < budget
    if grouping == "query":
        picked = picked.view(bsz, tq, heads, width).permute(0, 2, 1, 3)
    return picked


@pytest.mark.parametrize("grouping", ["query", "query_head"])
@pytest.mark.parametrize("levels", [2, 5, 1000])
def test_selection_equals_a_stable_sort_even_with_ties(grouping, levels):
    """Quantised probabilities make many exact ties; ties must go to the lower index."""
    heads, width, t = 4, 16, 300
    key_valid = torch.ones(2, t, dtype=torch.bool)
    key_valid[1, :37] = False
    lengths = query_lengths(key_valid, key_valid, causal=True)
    estimate = (estimate_for(lengths, heads, width) * levels).round() / levels
    estimate[:, 1] = estimate[:, 0]  # identical heads: ties across heads as well
    estimate[0, :, 5:9] = -0.0  # negative zeros tie with zeros, as in a sort
    for k in (1, 3, 8, 64):
        for chunk in (7, 256):
            got = select_cells(estimate, lengths, k, grouping, chunk=chunk)
            assert torch.equal(got, sorted_selection(estimate, lengths, k, grouping)), (k, chunk)


def forced_reference(length, width, sinks, window):
    """Bins holding any of a row's first ``sinks`` or last ``window`` keys, bin by bin."""
    edges = [b * length // width for b in range(width + 1)]
    return [edges[b] < edges[b + 1] and (any(r < sinks for r in range(edges[b], edges[b + 1]))
                                         or any(r >= length - window for r in range(edges[b], edges[b + 1])))
            for b in range(width)]


@pytest.mark.parametrize("sinks, window", [(4, 16), (1, 0), (0, 3), (40, 40)])
def test_forced_cells_hold_the_sinks_and_the_window(sinks, window):
    lengths = torch.arange(0, 200)
    got = forced_cells(lengths, 16, sinks, window)
    expected = torch.tensor([forced_reference(int(n), 16, sinks, window) for n in lengths])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("grouping", ["query", "query_head"])
@pytest.mark.parametrize("k, sinks, window", [(4, 4, 16), (16, 4, 16), (16, 1, 2)])
@pytest.mark.parametrize("forced_keys", [False, True])
def test_forced_cells_come_first_and_the_estimate_fills_the_rest(grouping, k, sinks, window, forced_keys):
    heads, width = 3, 8
    lengths = query_lengths(torch.ones(2, 90, dtype=torch.bool), torch.ones(2, 90, dtype=torch.bool), True)
    estimate = estimate_for(lengths, heads, width)
    picked = select_cells(estimate, lengths, k, grouping, chunk=17, sinks=sinks, window=window, forced_keys=forced_keys)
    sinks, window = min(sinks, k // 4), min(window, k // 4)  # small budgets stay sparse
    forced = forced_cells(lengths, width, sinks, window).unsqueeze(1).expand(-1, heads, -1, -1)
    assert bool(picked[forced].all())  # every head takes the sink and window bins
    # the rest is the plain top-k of the estimate: the budget grown to hold the forced bins, or with
    # forced_keys its budget for the keys the forced ones leave
    group = heads if grouping == "query" else 1
    if forced_keys:
        budget = cell_budget(lengths, k - sinks - window, width, group) + forced[:, 0].sum(-1) * group
        everything = group * lengths.clamp_max(width)  # rows of at most k keys take every cell
        budget = torch.where(lengths > k, torch.minimum(budget, everything), everything)
    else:
        budget = torch.maximum(cell_budget(lengths, k, width, group), forced[:, 0].sum(-1) * group)
    boosted = torch.where(forced, 2.0, estimate)
    flat = boosted.permute(0, 2, 1, 3).reshape(2, 90, -1) if grouping == "query" else boosted
    expected_budget = budget if grouping == "query" else budget[:, None].expand(-1, heads, -1)
    ranks = torch.sort(flat, dim=-1, descending=True, stable=True).indices.argsort(-1)
    expected = ranks < expected_budget.unsqueeze(-1)
    if grouping == "query":
        expected = expected.view(2, 90, heads, width).permute(0, 2, 1, 3)
    assert torch.equal(picked, expected)


def test_forced_cells_are_refused_by_the_sample_groupings():
    lengths = torch.full((1, 5), 5)
    with pytest.raises(ValueError, match="sinks and window apply to the groupings"):
        select_cells(estimate_for(lengths, 2, 4), lengths, 2, "sample", sinks=1)


@pytest.mark.parametrize("width, k, sinks, window, grouping", [(2, 16, 1, 1, "query"), (3, 16, 0, 3, "query_head"),
                                                               (8, 32, 5, 0, "query"), (16, 64, 4, 16, "query")])
def test_max_keys_per_query_bounds_forced_selections(width, k, sinks, window, grouping):
    """Also rows of k - sinks - window < L <= k keys, which attend every key."""
    heads = 3
    forced = forced_counts(k, sinks, window)
    for length in range(1, 3 * k):
        lengths = torch.tensor([[length]])
        estimate = torch.rand(1, heads, 1, width, generator=torch.Generator().manual_seed(length)).softmax(-1)
        cells = select_cells(estimate * live_cells(lengths, width).unsqueeze(1), lengths, k, grouping,
                             sinks=sinks, window=window, forced_keys=True)
        slots = cells_to_keys(cells, lengths, torch.ones(1, length, dtype=torch.bool), cap=k, forced=forced)
        assert int(slots.nnz(heads).sum()) <= int(max_keys_per_query(lengths, k, width, heads, grouping, forced)[0, 0])
        if length <= k:
            assert int(slots.nnz(heads).sum()) == heads * length  # every key
