"""`sea diagnose --task`: where SEA's selection loses what dense attention retrieves, per answer step.

For one prompt of the retrieval suite: the dense model's greedy answer and SEA's, then one dense
forward over the prompt and the dense answer (teacher forcing: every layer sees the dense inputs).
At each answer step (the query rows that predict the answer tokens), layer and head it records:

* ``selected``: the fraction of the dense attention's ``top`` keys that SEA's selection holds,
  ``selected_mass``: the same weighted by their dense probability, ``top1_selected`` / ``top1_key``:
  whether SEA holds the dense top-1 key, and its position;
* ``head_rank`` / ``group_rank``: the rank (0 = best) of the bin holding the dense top-1 key in
  the estimate that selected for the step (the step's own row; with the block grouping its block's
  first row, in that row's bins), among the head's K bins and among all H*K bins the ``query``
  grouping compares, beside ``budget`` (the bins the grouped top-k takes for ``candidates`` x k
  keys, ``forced`` of them sink / window bins); ``mass_head_rank`` / ``mass_group_rank``: the same
  ranks if the bins were scored by the step's exact attention mass (an oracle estimate). A top-1
  key in the step's own block (the block grouping's tile, always attended) has rank -1.

And per answer step, how sure each model is of the dense answer token along the dense answer
(``dense_margin`` / ``sea_margin``: its log-probability minus the best other token's; SEA's from one
more forward, SEA's own layers on the same tokens): a small dense margin marks a prompt that any
perturbation of the attention can flip, a negative SEA margin the step where SEA's answer turns.

With the block grouping SEA's selection is read from its attention view (``baselines.layer.sea_selection``:
a key whose probability underflows to 0 is missed there), a dense (H, T, T) tensor per layer.

    report = diagnose_prompt(model, tokenizer, prompt, RetrievalDiagnoseConfig(k=64))
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import write_file, write_text
from ..core.cells import KeySlots, forced_counts, key_bins
from ..core.attention import SEAOutput
from ..core.config import SEAConfig
from ..core.grouping import Grouping
from ..core.selection import query_budget
from ..hf import LayerCall, last_logits, layer_override, no_cache, sea_budget, sea_layers
from .baselines.chunks import query_chunks
from .baselines.compare import method_attention
from .baselines.layer import sea_selection
from .baselines.retrieval import greedy_ids
from .baselines.tasks import TaskPrompt


@dataclass(frozen=True)
class RetrievalDiagnoseConfig:
    k: int = 64  # SEA's keys per query per head
    top: int = 4  # dense top keys checked per (step, layer, head)
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("k", "top", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _ranks(scores: Tensor, picked: Tensor) -> tuple[Tensor, Tensor]:
    """Ranks (0 = best) of bin ``picked`` (B, H, S) in scores (B, H, S, K): per head, and among all heads."""
    value = scores.gather(-1, picked.unsqueeze(-1))  # (B, H, S, 1)
    head = (scores > value).sum(-1)
    everyone = scores.permute(0, 2, 1, 3).flatten(2)  # (B, S, H*K)
    group = (everyone.unsqueeze(1) > value).sum(-1)  # (B, H, S)
    return head, group


@dataclass
class TopKeyProbe:
    """``layer_override``: passes the dense attention on and measures SEA on the last ``steps`` rows."""

    config: RetrievalDiagnoseConfig
    steps: int
    layers: dict[int, dict[str, list]] = field(default_factory=dict)  # layer -> name -> (S, H) lists

    def __call__(self, call: LayerCall) -> tuple[Tensor, None]:
        out = call.run_sea(k_budget=self.config.k, return_attention=not call.grouping.reports_slots)
        tq = call.query.shape[2]
        contexts, last = [], []
        for chunk in query_chunks(call.query, call.key, call.value, call.key_valid, call.scaling, call.causal, 256):
            context, probs = chunk.teacher  # (B, H, C, d), (B, H, C, Tk)
            contexts.append(context)
            last.append(probs)
        probs = torch.cat(last, 2)[:, :, tq - self.steps:]  # (B, H, S, Tk)
        rows = slice(tq - self.steps, tq)
        slots = None if out.slots is None else KeySlots(out.slots.head[:, rows], out.slots.key[:, rows],
                                                        out.slots.valid[:, rows])
        attention = None if out.attention is None else out.attention[:, :, rows]
        selected = sea_selection(call, slots, attention)  # (B, H, S, Tk)
        values, keys = probs.topk(self.config.top, dim=-1)  # (B, H, S, top)
        hit = selected.gather(-1, keys).float()
        measured = {"selected": hit.mean(-1), "selected_mass": (hit * values).sum(-1) / values.sum(-1),
                    "top1_selected": hit[..., 0], "top1_key": keys[..., 0], "top_mass": values.sum(-1),
                    **self._estimate_ranks(call, out, call.sea.grouping, probs, keys[..., 0])}
        self.layers[call.layer_idx] = {name: x[0].transpose(0, 1).tolist() for name, x in measured.items()}
        return torch.cat(contexts, 2), None

    def _estimate_ranks(self, call: LayerCall, out: SEAOutput, grouping: Grouping, probs: Tensor,
                        top1: Tensor) -> dict[str, Tensor]:
        """Where the dense top-1 key (``top1`` (B, H, S)) stands in the estimate that selected for each
        answer step: that of the step's own row (per query) or of its block's first row (block), in that
        row's bins, beside the budget in cells for ``candidates`` x k keys. A top-1 key in the block's own
        tile (attended whatever the estimate) gets rank -1."""
        tq, tk, heads = call.query.shape[2], call.key.shape[2], call.query.shape[1]
        positions = torch.arange(tk - self.steps, tk, device=probs.device)  # (S,) the steps' key positions
        picking = grouping.selecting_positions(positions) - (tk - tq)  # (S,) rows of the call
        if bool((picking < 0).any()):
            raise ValueError("the probe needs the selecting rows in the call: a causal forward from position 0")
        tiles = grouping.tile_starts(positions)  # (S,) keys from here on are attended whatever the estimate
        lengths = out.lengths[:, picking]  # (B, S): the selecting rows' keys, on which their bins lie
        width = out.estimated.shape[-1]
        in_tile = top1 >= tiles  # (B, H, S)
        top_bin = key_bins(top1, lengths[:, None, :], width).clamp(0, width - 1)  # (B, H, S)
        keys = torch.arange(tk, device=probs.device)
        bins = key_bins(keys, lengths[:, :, None], width).clamp(0, width - 1)  # (B, S, Tk)
        estimated = probs * (keys < tiles[:, None])  # (B, H, S, Tk): the mass on keys the estimate chooses among
        mass = probs.new_zeros(*probs.shape[:-1], width).scatter_add_(-1, bins[:, None].expand_as(probs), estimated)
        head_rank, group_rank = _ranks(out.estimate[:, :, picking].float(), top_bin)
        mass_head, mass_group = _ranks(mass, top_bin)
        # what each step's selection was offered (candidate_budget), by the part that runs it (``Grouping.at``)
        caps = [grouping.at(int(p), int(p) + 1).offered(self.config.k, tk) for p in positions]
        budget, forced = torch.zeros_like(lengths), torch.zeros_like(lengths)
        for cap in set(caps):
            steps = torch.tensor([c == cap for c in caps], device=lengths.device)
            budget[:, steps], forced[:, steps] = _offered_cells(lengths[:, steps], cap, width, heads, call.sea.config)
        ranks = {"head_rank": head_rank, "group_rank": group_rank, "mass_head_rank": mass_head,
                 "mass_group_rank": mass_group}
        return {**{name: rank.masked_fill(in_tile, -1) for name, rank in ranks.items()},
                "budget": budget[:, None, :].expand_as(head_rank), "forced": forced[:, None, :].expand_as(head_rank)}


def _offered_cells(lengths: Tensor, cap: int, width: int, heads: int, cfg: SEAConfig) -> tuple[Tensor, Tensor]:
    """The cells a selection offered ``cap`` keys per head selects for rows of ``lengths`` (B, S) keys, and how
    many of them are forced (sink and window cells, over all heads): (B, S) each."""
    budget, forced = query_budget(lengths, cap, width, heads, forced_counts(cap, cfg.sinks, cfg.local_window),
                                  cfg.forced_keys)
    if forced is None:
        return budget, torch.zeros_like(lengths)
    if cfg.forced_keys:  # rows of at most cap keys attend every key: nothing is forced there
        forced = forced & (lengths > cap)[..., None]
    return budget, forced.sum(-1) * heads


@dataclass
class PromptDiagnosis:
    task: str
    length: int
    depth: float
    answer: str  # what the task asks for
    dense_answer: str
    sea_answer: str
    steps: int
    layers: dict[int, dict[str, list]]  # layer -> measurement -> (steps, heads)
    dense_margin: list[float]  # (steps,) log p(dense token) - log p(best other token), dense model
    sea_margin: list[float]  # (steps,) the same under SEA, on the same (dense) tokens

    def layer_means(self, name: str) -> list[list[float]]:
        """(steps, layers): ``name`` averaged over heads."""
        order = sorted(self.layers)
        return [[sum(self.layers[i][name][s]) / len(self.layers[i][name][s]) for i in order] for s in range(self.steps)]


@torch.no_grad()
def diagnose_prompt(model: nn.Module, tokenizer, prompt: TaskPrompt, config: RetrievalDiagnoseConfig) -> PromptDiagnosis:
    """Dense and SEA greedy answers to ``prompt``, SEA's selection along the dense answer, and both models'
    margins for the dense tokens."""
    if not sea_layers(model):
        raise ValueError("the model is not SEA-patched: call sea_attention.hf.patch(model) first")
    with method_attention(model, "dense", None):
        dense = greedy_ids(model, tokenizer, prompt.ids, config.max_new_tokens)
    with sea_budget(model, config.k):
        sea = greedy_ids(model, tokenizer, prompt.ids, config.max_new_tokens)
    forced = torch.cat([prompt.ids, dense[:-1]]).unsqueeze(0).to(next(model.parameters()).device)
    steps = dense.numel()  # row T - 1 + i predicts answer token i: the last ``steps`` rows
    probe, options = TopKeyProbe(config, steps=steps), {**no_cache(model), **last_logits(model, steps)}
    with layer_override(model, probe):
        dense_logits = model(input_ids=forced, **options).logits[0, -steps:]
    with sea_budget(model, config.k):
        sea_logits = model(input_ids=forced, **options).logits[0, -steps:]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return PromptDiagnosis(prompt.task, prompt.length, prompt.depth, prompt.answer, decode(dense), decode(sea),
                           steps, probe.layers, margins(dense_logits, dense), margins(sea_logits, dense))


def margins(logits: Tensor, tokens: Tensor) -> list[float]:
    """(S,) log-probability of each of ``tokens`` (S,) minus that of the best other token, from ``logits`` (S, V):
    positive where the token is the greedy choice."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = tokens.to(logp.device).unsqueeze(-1)
    own = logp.gather(-1, index).squeeze(-1)
    return (own - logp.scatter(-1, index, float("-inf")).amax(-1)).tolist()


def format_prompt_diagnosis(report: PromptDiagnosis) -> str:
    """Per answer step: the dense token's step, the head-mean fraction of dense top keys SEA holds
    in each layer (one digit per layer: 0-9 tenths, '*' = all)."""
    lines = [f"{report.task} @{report.length}, depth {report.depth:.2f}: answer {report.answer!r}, "
             f"dense {report.dense_answer!r}, SEA {report.sea_answer!r}",
             "step  mass-weighted fraction of the dense top keys SEA selected, per layer (0-9 tenths, * = all)"]
    for step, row in enumerate(report.layer_means("selected_mass")):
        digits = "".join("*" if v >= 0.995 else str(min(int(v * 10), 9)) for v in row)
        lines.append(f"{step:>4}  {digits}  mean {sum(row) / len(row):.3f}  "
                     f"margin dense {report.dense_margin[step]:+.2f} SEA {report.sea_margin[step]:+.2f}")
    lines.append("margin: log p(the dense token) - log p(the best other token) along the dense answer")
    return "\n".join(lines)


def write_prompt_diagnosis(report: PromptDiagnosis, path: str | Path, **about) -> Path:
    from .bench.runtime import machine_info

    payload = {**about, "machine": machine_info(), **asdict(report)}
    return write_text(path, json.dumps(payload) + "\n")


def plot_prompt_diagnosis(report: PromptDiagnosis, path: str | Path, title: str = "") -> Path:
    """A PNG: steps x layers heat map of the (mass-weighted) fraction of dense top keys SEA selected,
    and the estimate's grouped rank of the dense top-1 key's bin over its budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    image = top.imshow(report.layer_means("selected_mass"), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    top.set_ylabel("answer step")
    top.set_title(title or f"{report.task}: fraction of dense top-key mass SEA selected (head mean)",
                  fontsize="medium")
    fig.colorbar(image, ax=top)
    order = sorted(report.layers)
    ratio = [[min(r / max(b, 1), 4.0) for r, b in zip(report.layers[i]["group_rank"][0], report.layers[i]["budget"][0])]
             for i in order]
    image = bottom.imshow(torch.tensor(ratio).T.tolist(), aspect="auto", vmin=0, vmax=4, cmap="magma_r")
    bottom.set_ylabel("head")
    bottom.set_xlabel("layer")
    bottom.set_title("step 0: grouped rank of the dense top-1 key's bin / budget (> 1: not selected by the estimate)",
                     fontsize="medium")
    fig.colorbar(image, ax=bottom)
    return write_file(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
