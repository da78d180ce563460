"""rows.row_table: every (sample, head, row) reads the right row, in place when the layout allows."""

import pytest
import torch

from sea_attention.core.rows import row_table, same_layout


def layouts():
    base = torch.randn(2, 3, 7, 5)
    spare = torch.randn(2, 3, 11, 5)
    spare[:, :, :7] = base
    yield "contiguous", base, True
    yield "view with spare rows", spare[:, :, :7], True
    yield "one sample of a batch", torch.randn(4, 3, 7, 5)[1:2], True
    yield "expanded heads", base[:, :1].expand(-1, 3, -1, -1), True
    yield "transposed (B, T, H, f) memory", base.transpose(1, 2).contiguous().transpose(1, 2), False
    yield "features across rows", base.transpose(-1, -2).contiguous().transpose(-1, -2), False


@pytest.mark.parametrize("name, x, in_place", list(layouts()), ids=[name for name, *_ in layouts()])
def test_every_row_is_read_from_its_place(name, x, in_place):
    table = row_table(x)
    bsz, heads, count, _ = x.shape
    b, h, t = torch.meshgrid(torch.arange(bsz), torch.arange(heads), torch.arange(count), indexing="ij")
    assert torch.equal(table.rows[table.row(b, h, t)], x)
    assert torch.equal(table.starts(bsz, heads, x.device).squeeze(-1), table.row(b[..., 0], h[..., 0], t[..., 0]))
    assert (table.rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()) == in_place


def test_two_layouts_are_read_through_one_index():
    a = torch.randn(2, 3, 11, 5)[:, :, :7]
    b = torch.randn(2, 3, 7, 5)
    table_a, table_b = same_layout(a, b)
    index = table_a.row(torch.tensor(1), torch.tensor(2), torch.tensor(6))
    assert torch.equal(table_a.rows[index], a[1, 2, 6]) and torch.equal(table_b.rows[index], b[1, 2, 6])
