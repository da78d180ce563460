"""Readable loop versions of the cell <-> key mapping, the oracle for the vectorised code."""

import torch


def naive_cell_keys(length, width, cell, cap, forced=(0, 0)):
    """Key ranks that cell `cell` of a row with `length` valid keys emits. With ``forced`` (sinks,
    window), in a row of more than ``cap`` keys: a bin holding any of the first ``sinks`` or last
    ``window`` ranks emits those ranks (the whole bin if it holds both kinds), another bin at most
    cap - sinks - window keys."""
    start = cell * length // width
    end = (cell + 1) * length // width
    sinks, window = forced
    if length > cap and (sinks or window):
        heads = [r for r in range(start, end) if r < sinks]
        tails = [r for r in range(start, end) if r >= length - window]
        if heads and not tails or tails and not heads:
            return heads or tails
        if not heads:  # not forced: the estimate's cell
            cap = cap - sinks - window
    size = end - start
    n = min(size, cap)
    return [start + ((2 * o + 1) * size) // (2 * n) for o in range(n)]


def naive_cells_to_keys(cells, lengths, key_valid, cap, forced=(0, 0)):
    """cells (B, H, Tq, K) bool -> set of (b, h, i, key) selected."""
    out = set()
    bsz, heads, tq, width = cells.shape
    for b in range(bsz):
        positions = [j for j in range(key_valid.shape[1]) if key_valid[b, j]]
        for i in range(tq):
            length = int(lengths[b, i])
            for h in range(heads):
                for c in range(width):
                    if cells[b, h, i, c]:
                        for r in naive_cell_keys(length, width, c, cap, forced):
                            out.add((b, h, i, positions[r]))
    return out


def slot_cells_to_keys(cells, lengths, key_valid, cap):
    """The exact slot layout of ``cells_to_keys``, one slot at a time: each query's cells'
    keys in (head, bin) order, then unused slots (head 0, key 0). Returns head, key, valid."""
    bsz, heads, tq, width = cells.shape
    rows = []
    for b in range(bsz):
        positions = [j for j in range(key_valid.shape[1]) if key_valid[b, j]]
        for i in range(tq):
            length = int(lengths[b, i])
            row = [(h, positions[r]) for h in range(heads) for c in range(width) if cells[b, h, i, c]
                   for r in naive_cell_keys(length, width, c, cap)]
            rows.append(row)
    slots = max(1, max(len(r) for r in rows))
    head = torch.zeros(bsz * tq, slots, dtype=torch.long)
    key = torch.zeros(bsz * tq, slots, dtype=torch.long)
    valid = torch.zeros(bsz * tq, slots, dtype=torch.bool)
    for n, row in enumerate(rows):
        for s, (h, j) in enumerate(row):
            head[n, s], key[n, s], valid[n, s] = h, j, True
    return head.view(bsz, tq, slots), key.view(bsz, tq, slots), valid.view(bsz, tq, slots)
