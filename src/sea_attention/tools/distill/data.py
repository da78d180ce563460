"""Training batches: fixed-length windows of a tokenised text, a pure function of the step.

Because the batch of step s depends only on (seed, s), a resumed run sees exactly the
batches an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one (N,) long tensor, without special tokens (as the paper's LM data)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


class TokenWindows:
    """Random windows of ``seq_len`` tokens; ``batch(step, n)`` is deterministic."""

    def __init__(self, tokens: Tensor, seq_len: int, seed: int = 0) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if tokens.numel() < seq_len:
            raise ValueError(f"the text has {tokens.numel()} tokens, fewer than seq_len={seq_len}: "
                             "use more text or a shorter --seq-len")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    @property
    def num_windows(self) -> int:
        return self.tokens.numel() - self.seq_len + 1

    def batch(self, step: int, batch_size: int) -> Tensor:
        """(batch_size, seq_len) token ids for optimizer micro-step ``step``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.num_windows, (batch_size,), generator=generator)
        offsets = torch.arange(self.seq_len)
        return self.tokens[starts[:, None] + offsets]
