"""Perplexity of a SEA model against its dense self, at several budgets (dynamic k).

Rows of a report:
* ``dense``: the same weights with dense attention (the teacher);
* ``sea k=..``: SEA at that budget, no retraining;
* ``oracle k=..``: exact selection on the true attention — per query, the top H*k dense
  attention probabilities across heads, then softmax over the selected keys. It shows
  what the sparsity itself costs; the gap between it and SEA is what the estimator costs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import write_text
from .distributed import Group
from ..hf import LayerCall, dense_attention, layer_override, no_cache, sea_budget, sea_layers
from ..core.ops.reference import allowed_keys, reference_attention


@dataclass
class PerplexityRow:
    name: str
    k: int | None
    perplexity: float
    tokens: int


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, targets) per window: each window predicts only tokens no earlier window did."""
    if seq_len < 2 or stride < 1 or stride > seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        if end - begin < 2:
            break
        windows.append((begin, end, end - max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Tensor, seq_len: int, stride: int, *, desc: str = "perplexity",
               progress: bool = True, group: Group | None = None) -> tuple[float, int]:
    """Sliding-window perplexity of ``model`` on a 1-D token tensor; returns (ppl, tokens scored).

    Under torchrun (``group``) each rank scores its share of the windows and the token-level sums are
    all-reduced: every rank returns the single-process perplexity.
    """
    group = group or Group()
    if tokens.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {tokens.numel()}: use more text")
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    windows = group.shard(sliding_windows(tokens.numel(), seq_len, stride))
    for begin, end, targets in tqdm(windows, desc=desc, disable=not (progress and group.is_main), leave=False,
                                    dynamic_ncols=True):
        ids = tokens[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=ids, **no_cache(model)).logits[0, :-1].float()  # predicts ids[1:]
        labels = ids[0, 1:].clone()
        labels[: labels.numel() - targets] = -100  # already scored by an earlier window
        nll += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        count += targets
    nll, count = group.sum([nll, count])
    return math.exp(nll / max(count, 1)), int(count)


def grouped_oracle_mask(probs: Tensor, allowed: Tensor, k: int) -> Tensor:
    """(B, H, Tq, Tk) bool: per query, its top H*min(L, k) dense probabilities across heads.

    ``probs`` (B, H, Tq, Tk) is the dense attention, ``allowed`` (B, 1 or H, Tq, Tk) the keys each
    row may see (L of them). Heads share the query's budget, so one head may get more than k keys
    and another fewer; keys outside ``allowed`` are never picked, even when probabilities underflow.
    """
    batch, heads, tq, _ = probs.shape
    flat = probs.masked_fill(~allowed, -1.0).transpose(1, 2).reshape(batch, tq, -1)  # (B, Tq, H*Tk)
    budget = heads * allowed[:, 0].sum(-1).clamp_max(k)  # (B, Tq): H*k, or every key of short rows
    top = flat.topk(int(budget.max()), dim=-1).indices
    keep = torch.arange(top.shape[-1], device=top.device) < budget.unsqueeze(-1)
    selected = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, keep)
    return selected.view(batch, tq, heads, -1).transpose(1, 2) & allowed


def oracle_attention(call: LayerCall, k: int) -> tuple[Tensor, None]:
    """Attention restricted to each query's top H*k dense probabilities across heads."""
    q, key = call.query, call.key
    mask = allowed_keys(call.key_valid, q.shape[2], call.causal).expand(-1, q.shape[1], -1, -1)
    _, probs = reference_attention(q, key, call.value, mask, call.scaling)
    context, _ = reference_attention(q, key, call.value, grouped_oracle_mask(probs, mask, k), call.scaling)
    return context, None


def oracle_memory_gb(model: nn.Module, seq_len: int) -> float:
    """Rough peak of the oracle: a few dense (H, T, T) fp32 maps of one layer."""
    heads = max(sea.config.num_heads for _, _, sea in sea_layers(model))
    return 4 * heads * seq_len * seq_len * 4 / 1e9


@dataclass(frozen=True)
class BudgetSweep:
    """What ``evaluate_budgets`` measures: windows of ``seq_len`` every ``stride`` tokens, at each budget."""

    seq_len: int
    stride: int
    budgets: list[int]
    oracle: bool = True  # also the oracle selection, where its dense maps fit in ``oracle_limit_gb``
    progress: bool = True
    oracle_limit_gb: float = 8.0


def evaluate_budgets(model: nn.Module, tokens: Tensor, sweep: BudgetSweep,
                     group: Group | None = None) -> list[PerplexityRow]:
    """Dense, SEA at each budget, and the oracle at each budget where its dense maps fit in memory
    (the windows shared among ``group``'s ranks)."""
    group = group or Group()
    seq_len, stride, oracle, oracle_limit_gb = sweep.seq_len, sweep.stride, sweep.oracle, sweep.oracle_limit_gb
    progress = sweep.progress and group.is_main
    if oracle and oracle_memory_gb(model, seq_len) > oracle_limit_gb:
        if group.is_main:
            print(f"oracle rows skipped: its dense maps need ~{oracle_memory_gb(model, seq_len):.0f} GB "
                  f"(> {oracle_limit_gb:.0f} GB) at seq_len={seq_len}")
        oracle = False
    rows = []
    with dense_attention(model):
        ppl, n = perplexity(model, tokens, seq_len, stride, desc="dense", progress=progress, group=group)
    rows.append(PerplexityRow("dense", None, ppl, n))
    for k in sweep.budgets:
        if oracle:
            with layer_override(model, lambda call, k=k: oracle_attention(call, k)):
                ppl, n = perplexity(model, tokens, seq_len, stride, desc=f"oracle k={k}", progress=progress,
                                    group=group)
            rows.append(PerplexityRow("oracle", k, ppl, n))
        with sea_budget(model, k):
            ppl, n = perplexity(model, tokens, seq_len, stride, desc=f"sea k={k}", progress=progress, group=group)
        rows.append(PerplexityRow("sea", k, ppl, n))
    return rows


def format_table(rows: list[PerplexityRow]) -> str:
    """A plain-text table with each row's change against the dense model."""
    dense = next((r.perplexity for r in rows if r.name == "dense"), None)
    lines = [f"{'model':<8} {'k':>5} {'perplexity':>11} {'vs dense':>9} {'tokens':>8}"]
    for r in rows:
        delta = f"{100 * (r.perplexity / dense - 1):+8.1f}%" if dense else ""
        k = "-" if r.k is None else str(r.k)
        lines.append(f"{r.name:<8} {k:>5} {r.perplexity:>11.2f} {delta:>9} {r.tokens:>8}")
    return "\n".join(lines)


def write_json(rows: list[PerplexityRow], path: str | Path, **metadata) -> None:
    """Write the rows (and any run metadata) as JSON, atomically."""
    write_text(path, json.dumps({**metadata, "rows": [asdict(r) for r in rows]}, indent=2))
