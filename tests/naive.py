"""Readable loop versions of the cell <-> key mapping, the oracle for the vectorised code."""

import torch


def naive_cell_keys(length, width, cell, cap):
    """Key ranks that cell `cell` of a row with `length` valid keys emits."""
    start = cell * length // width
    end = (cell + 1) * length // width
    size = end - start
    n = min(size, cap)
    return [start + ((2 * o + 1) * size) // (2 * n) for o in range(n)]


def naive_cells_to_keys(cells, lengths, key_valid, cap):
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
                        for r in naive_cell_keys(length, width, c, cap):
                            out.add((b, h, i, positions[r]))
    return out
