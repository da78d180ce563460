import pytest
import torch

from naive import naive_cell_keys, naive_cells_to_keys, slot_cells_to_keys
from sea_attention.core.cells import (
    even_pick, cell_lengths, cell_range, cells_to_keys, compress_attention, forced_counts, key_bins, live_cells,
    query_lengths, stretch_estimate,
)
from sea_attention.core.selection import select_cells


@pytest.mark.parametrize("length", [1, 3, 7, 8, 9, 16, 31, 100, 257])
@pytest.mark.parametrize("width", [4, 8, 16])
def test_cells_tile_the_row(length, width):
    lengths = torch.tensor([length])
    sizes = cell_lengths(lengths, width)[0]
    assert int(sizes.sum()) == length
    assert int(live_cells(lengths, width).sum()) == min(length, width)  # no dead bin when L >= K
    # every key rank falls into the cell that contains it
    ranks = torch.arange(length)
    bins = key_bins(ranks, lengths, width)
    for r, b in zip(ranks.tolist(), bins.tolist()):
        assert b * length // width <= r < (b + 1) * length // width


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cap", [1, 3, 100])
def test_cells_to_keys_matches_loop(causal, cap):
    bsz, heads, tq, tk, width = 2, 3, 9, 23, 8
    key_valid = torch.ones(bsz, tk, dtype=torch.bool)
    key_valid[1, :4] = False
    query_valid = key_valid[:, tk - tq:]
    lengths = query_lengths(key_valid, query_valid, causal)
    cells = (torch.rand(bsz, heads, tq, width) < 0.4) & live_cells(lengths, width).unsqueeze(1)
    slots = cells_to_keys(cells, lengths, key_valid, cap=cap, chunk=4)
    got = set()
    for b, i, s in zip(*torch.nonzero(slots.valid, as_tuple=True)):
        got.add((int(b), int(slots.head[b, i, s]), int(i), int(slots.key[b, i, s])))
    assert got == naive_cells_to_keys(cells, lengths, key_valid, cap)
    # no key is emitted twice by the same (query, head)
    assert int(slots.valid.sum()) == len(got)


@pytest.mark.parametrize("width", [8, 6])  # 6: bins not a multiple of 8 (no word-at-a-time scan)
@pytest.mark.parametrize("cap", [1, 3, 100])
def test_cells_to_keys_exact_slot_layout(width, cap):
    """Slot by slot, the layout of the loop version: heads in order, unused slots last, padded keys."""
    bsz, heads, tq, tk = 3, 4, 40, 90
    key_valid = torch.ones(bsz, tk, dtype=torch.bool)
    key_valid[1, :11] = False
    key_valid[2, ::3] = False
    lengths = query_lengths(key_valid, key_valid[:, tk - tq:], causal=True)
    cells = torch.rand(bsz, heads, tq, width) < 0.3
    cells[0, :, 5] = True  # a row with everything selected
    cells[:, :, :, 0] |= ~live_cells(lengths, width)[:, None, :, 0]  # dead cells emit nothing
    for chunk in (1, 7, 256):
        slots = cells_to_keys(cells, lengths, key_valid, cap=cap, chunk=chunk)
        head, key, valid = slot_cells_to_keys(cells, lengths, key_valid, cap)
        assert torch.equal(slots.valid, valid) and torch.equal(slots.head, head) and torch.equal(slots.key, key)


def test_even_picks_exact_in_every_precision():
    """The floating point picks equal integer floor division, up to the ranges each one is used for."""
    for size_top in (60, 3_000, 29_000, 2 ** 21, 2 ** 40, 2 ** 50):
        size = torch.randint(1, size_top, (300, 1))
        emitted = torch.minimum(torch.randint(1, 70, (300, 1)), size)
        offset = torch.arange(70).minimum(emitted - 1)
        largest = int(((2 * offset + 1) * size + 2 * emitted).max())
        expected = ((2 * offset + 1) * size) // (2 * emitted)
        assert torch.equal(even_pick(offset, size, emitted, largest), expected)


def test_slots_are_ordered_by_head_and_never_padding():
    key_valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    lengths = query_lengths(key_valid, key_valid, causal=True)
    cells = live_cells(lengths, 4).unsqueeze(1).expand(1, 2, 8, 4)
    slots = cells_to_keys(cells, lengths, key_valid, cap=10)
    for i in range(8):
        heads = slots.head[0, i][slots.valid[0, i]]
        assert torch.all(heads[1:] >= heads[:-1])
        keys = slots.key[0, i][slots.valid[0, i]]
        assert bool(key_valid[0, keys].all())
        assert bool((keys <= i).all())
    assert int(slots.valid[0, :2].sum()) == 0  # padding queries get nothing


def test_naive_cell_keys_spread_evenly():
    assert naive_cell_keys(100, 4, 1, cap=5) == [27, 32, 37, 42, 47]
    assert naive_cell_keys(8, 4, 2, cap=5) == [4, 5]


def test_compress_and_stretch_preserve_mass():
    bsz, heads, t, width = 2, 2, 13, 4
    key_valid = torch.ones(bsz, t, dtype=torch.bool)
    key_valid[1, :3] = False
    lengths = query_lengths(key_valid, key_valid, causal=True)
    allowed = key_valid[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()
    attn = torch.softmax(torch.randn(bsz, heads, t, t).masked_fill(~allowed, -1e9), -1) * key_valid[:, None, :, None]
    compressed = compress_attention(attn, key_valid, lengths, width)
    rows = key_valid[:, None, :].expand(-1, heads, -1)
    torch.testing.assert_close(compressed.sum(-1)[rows], torch.ones(int(rows.sum())))
    assert bool((compressed.masked_fill(live_cells(lengths, width).unsqueeze(1), 0) == 0).all())  # dead bins empty
    stretched = stretch_estimate(compressed, key_valid, lengths)
    torch.testing.assert_close(stretched.sum(-1)[rows], torch.ones(int(rows.sum())))
    assert bool((stretched.masked_fill(allowed, 0) == 0).all())  # nothing outside the valid prefix


@pytest.mark.parametrize("width", [4, 16])
@pytest.mark.parametrize("cap, forced", [(8, (2, 2)), (16, (4, 4)), (64, (4, 16)), (5, (1, 1)), (12, (0, 3))])
def test_cell_range_emits_the_forced_keys_of_long_rows(width, cap, forced):
    lengths = torch.arange(0, 700)
    bins = torch.arange(width)
    start, size, emitted = cell_range(bins, lengths[:, None], width, cap, forced)
    for length in lengths.tolist():
        for b in range(width):
            want = naive_cell_keys(length, width, b, cap, forced)
            n = int(emitted[length, b])
            got = [int(start[length, b]) + int(p) for p in
                   even_pick(torch.arange(n), size[length, b], torch.tensor(max(n, 1)))] if n else []
            assert got == want, (length, b)


@pytest.mark.parametrize("length", [30, 64, 200, 1000, 4096])
def test_every_head_attends_its_sinks_and_window_key_by_key(length):
    """At every length, however wide the bins: the first sinks and last window keys of every head,
    each once, and about k keys per head in all (the estimate gets k - sinks - window of them)."""
    heads, width, k = 3, 16, 16
    sinks, window = forced_counts(k, 4, 16)  # (4, 4)
    lengths = torch.tensor([[length]])
    estimate = torch.rand(1, heads, 1, width).softmax(-1)
    cells = select_cells(estimate, lengths, k, "query", sinks=4, window=16, forced_keys=True)
    slots = cells_to_keys(cells, lengths, torch.ones(1, length, dtype=torch.bool), cap=k, forced=(sinks, window))
    for h in range(heads):
        keys = slots.key[0, 0][slots.valid[0, 0] & (slots.head[0, 0] == h)].tolist()
        assert len(keys) == len(set(keys))
        assert set(range(sinks)) | set(range(length - window, length)) <= set(keys)
    per_head = slots.nnz(heads)[0, :, 0].float()
    assert abs(float(per_head.mean()) - min(k, length)) <= 0.25 * k, per_head
    got = {(0, int(h), 0, int(key)) for h, key, v in zip(slots.head[0, 0], slots.key[0, 0], slots.valid[0, 0]) if v}
    assert got == naive_cells_to_keys(cells, lengths, torch.ones(1, length, dtype=torch.bool), k, (sinks, window))
