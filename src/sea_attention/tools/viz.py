"""Look at SEA's attention: the teacher's map, SEA's compressed estimate and SEA's sparse map."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import write_file
from ..core.cells import stretch_estimate
from ..hf import LayerCall, layer_override, no_cache, sea_layers
from ..core.ops.reference import exact_attention


@dataclass
class AttentionSnapshot:
    """One layer and head of one sequence."""

    layer: int
    head: int
    teacher: Tensor  # (T, T) dense attention of the same weights
    estimate: Tensor  # (T, K) SEA's compressed estimate
    stretched: Tensor  # (T, T) the estimate stretched back to the keys (each bin's share spread over its keys)
    sparse: Tensor  # (T, T) SEA's sparse attention probabilities
    nnz: Tensor  # (T,) keys per query in this head
    causal: bool = True
    first_row: int = 0  # the sequence position of row 0 (after ``rows``)

    def rows(self, start: int, stop: int) -> AttentionSnapshot:
        """Query rows [start, stop) of this snapshot only; a causal one keeps only the keys < stop,
        which those rows can see (a long row range then still shows whole key columns)."""
        count = self.teacher.shape[0]
        if not 0 <= start < stop <= count:
            raise ValueError(f"rows {start}:{stop} are outside the snapshot's {count} query rows "
                             f"(need 0 <= start < stop <= {count})")
        keys = stop if self.causal else self.teacher.shape[1]
        return dataclasses.replace(self, teacher=self.teacher[start:stop, :keys], estimate=self.estimate[start:stop],
                                   stretched=self.stretched[start:stop, :keys], sparse=self.sparse[start:stop, :keys],
                                   nnz=self.nnz[start:stop], first_row=self.first_row + start)


@torch.no_grad()
def capture_attention(model: nn.Module, input_ids: Tensor, layer: int, head: int,
                      k_budget: int | None = None) -> AttentionSnapshot:
    """Run the SEA model on one sequence (1, T) and keep one layer's maps."""
    num_layers = len(sea_layers(model))
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    kept: dict[str, Tensor] = {}

    def keep(call: LayerCall):
        if call.layer_idx != layer:
            return None
        heads = call.query.shape[1]
        if not 0 <= head < heads:
            raise ValueError(f"head must be in [0, {heads}), got {head}")
        _, teacher = exact_attention(call.query, call.key, call.value, call.key_valid, call.scaling, call.causal)
        out = call.sea(call.query, call.key, call.value, attention_mask=call.key_valid, scale=call.scaling,
                       k_budget=k_budget, return_attention=True)
        stretched = stretch_estimate(out.estimate[:1, head:head + 1], call.key_valid[:1], out.lengths[:1])
        kept.update(teacher=teacher[0, head], estimate=out.estimate[0, head], stretched=stretched[0, 0],
                    sparse=out.attention[0, head], nnz=out.nnz[0, head])
        return out.context, None

    model.eval()
    with layer_override(model, keep):
        model(input_ids=input_ids[:1].to(next(model.parameters()).device), **no_cache(model))
    causal = sea_layers(model)[layer][2].config.causal
    return AttentionSnapshot(layer, head, **{name: t.float().cpu() for name, t in kept.items()}, causal=causal)


def plot_attention(snapshot: AttentionSnapshot, path: str | Path, title: str = "") -> Path:
    """Save the teacher's map, SEA's estimate stretched back to the keys (the interpretable
    estimated attention matrix) and SEA's sparse map side by side, all in key coordinates so
    that the teacher's heavy-hitter columns line up across panels (log colour scale). Rows are
    labelled with their sequence positions (see ``AttentionSnapshot.rows``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    floor = 1e-4
    panels = [
        ("teacher attention (dense)", snapshot.teacher),
        (f"SEA estimate (K={snapshot.estimate.shape[-1]} bins per row, stretched to keys)", snapshot.stretched),
        (f"SEA sparse attention (mean {snapshot.nnz.float().mean():.1f} keys/query)", snapshot.sparse),
    ]
    rows, keys = snapshot.teacher.shape
    extent = (-0.5, keys - 0.5, snapshot.first_row + rows - 0.5, snapshot.first_row - 0.5)
    fig = Figure(figsize=(16, 5.4), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    axes = fig.subplots(1, 3)
    for ax, (name, values) in zip(axes, panels):
        image = ax.imshow(values.clamp_min(floor).numpy(), norm=LogNorm(vmin=floor, vmax=1.0), cmap="magma",
                          aspect="auto", extent=extent,
                          interpolation="antialiased")  # with more keys than pixels, single-key columns stay visible
        ax.set_title(name)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(image, ax=axes, shrink=0.85, label="probability")
    fig.suptitle(title or f"layer {snapshot.layer}, head {snapshot.head}")
    return write_file(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
