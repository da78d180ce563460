"""Per-token encoder and the CNN decoders that paint each query's compressed attention row.

The decoders treat the estimate as an image: rows are queries, columns are compressed key
bins, heads (times a few channels each) are image channels, so the convolutions share
information between neighbouring queries, bins and heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .per_sample import sample_wise


class TokenEncoder(nn.Module):
    """(Performer output, V) of one token and head -> a narrow CNN input row and two gate logits.

    The Performer output is ``performer_width`` wide: 2d with a positional code beside V, d without.
    """

    def __init__(self, head_dim: int, row_width: int, channels: int, performer_width: int,
                 gate_bias: float = 4.0) -> None:
        super().__init__()
        self.channels = channels
        self.encode = nn.Sequential(nn.Linear(performer_width + head_dim, 2 * head_dim), nn.LayerNorm(2 * head_dim),
                                    nn.GELU())
        self.to_row = nn.Linear(2 * head_dim, row_width * channels)
        self.to_gates = nn.Linear(2 * head_dim, 2)
        # every token's gate logits start at gate_bias (core/gates.py: where each form starts open)
        nn.init.zeros_(self.to_gates.weight)
        nn.init.constant_(self.to_gates.bias, gate_bias)

    @sample_wise  # matrix products over flattened rows round differently by batch size (per_sample.py)
    def hidden(self, performer: Tensor, own_value: Tensor) -> Tensor:
        """performer (B, H, T, p) and each token's own value (B, H_kv, T, d) -> hidden (B, H, T, 2d)."""
        linear, norm, act = self.encode
        width = performer.shape[-1]
        # the first layer reads [performer, own value]: two products instead of a concatenation,
        # and the value's product is done once per kv head
        value_part = F.linear(own_value, linear.weight[:, width:], linear.bias)  # (B, H_kv, T, 2d)
        groups = performer.shape[1] // own_value.shape[1]
        value_part = value_part.repeat_interleave(groups, dim=1) if groups > 1 else value_part
        # the value part (and bias) enters as addmm's input: no separate pass to add them
        both = torch.addmm(value_part.reshape(-1, value_part.shape[-1]), performer.flatten(0, -2),
                           linear.weight[:, :width].T)
        return act(norm(both.view_as(value_part)))

    @sample_wise
    def image(self, hidden: Tensor) -> Tensor:
        """hidden (B, H, T, 2d) -> CNN image (B, H*c, T, w): chunk c of a head's row -> channel h*c + c."""
        bsz, heads, tokens, _ = hidden.shape
        rows = self.to_row(hidden).view(bsz, heads, tokens, self.channels, -1)
        return rows.permute(0, 1, 3, 2, 4).reshape(bsz, heads * self.channels, tokens, -1)

    @sample_wise
    def gates(self, hidden: Tensor) -> Tensor:
        """hidden (B, H, T, 2d) -> gate logits (B, H, T, 2)."""
        return self.to_gates(hidden)

    def forward(self, performer: Tensor, own_value: Tensor) -> tuple[Tensor, Tensor]:
        """-> CNN image (B, H*c, T, w) and gate logits (B, H, T, 2) (inputs as in ``hidden``)."""
        z = self.hidden(performer, own_value)
        return self.image(z), self.gates(z)


class CausalConv(nn.Module):
    """3x3 convolution, dilation 2, that only looks at the current and earlier rows."""

    RECEPTIVE_ROWS = 4  # (kernel - 1) * dilation previous rows

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, dilation=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, W) -> (B, C, T, W)
        # symmetric padding, then drop the rows that looked ahead: cheaper than padding a copy
        rows = x.shape[2]
        out = F.conv2d(x, self.conv.weight, self.conv.bias, padding=(self.RECEPTIVE_ROWS, 2), dilation=2)
        return out[:, :, :rows]

    def tail(self, x: Tensor) -> Tensor:  # (B, C, T, W) -> (B, C, T - RECEPTIVE_ROWS, W)
        """The rows whose whole history is in ``x``: ``forward(x)[:, :, RECEPTIVE_ROWS:]``, without
        computing the first rows (a decoding step needs its own row only)."""
        return F.conv2d(x, self.conv.weight, self.conv.bias, padding=(0, 2), dilation=2)


class CausalDecoder(nn.Module):
    """LN -> causal conv -> ReLU -> causal conv -> ReLU -> x4 wider -> 1x1 conv -> LN.

    A query row sees itself and the 8 rows before it, never a later row. Padding rows are
    zeroed before each convolution, which makes them look exactly like the zero padding
    at the start of a sequence.
    """

    HISTORY_ROWS = 2 * CausalConv.RECEPTIVE_ROWS

    def __init__(self, heads: int, channels: int, width: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(width // 4)
        self.conv_a = CausalConv(heads * channels)
        self.conv_b = CausalConv(heads * channels)
        self.to_heads = nn.Conv2d(heads * channels, heads, kernel_size=1)
        self.norm_out = nn.LayerNorm(width)

    def start_at_zero(self) -> None:
        """Output 0 until trained (a zero-initialised residual on other logits)."""
        nn.init.zeros_(self.norm_out.weight)

    @sample_wise  # oneDNN convolutions round differently by batch size (per_sample.py)
    def forward(self, image: Tensor, row_mask: Tensor) -> Tensor:
        """image (B, H*c, T, K/4), row_mask (B, 1, T, 1) -> logits (B, H, T, K), one sample at a time."""
        x = self._normed(image, row_mask)
        x = torch.relu(self.conv_a(x)) * row_mask
        return self._logits(self.to_heads(torch.relu(self.conv_b(x))))  # from (B, H, T, K/4)

    @sample_wise
    def tail(self, image: Tensor, row_mask: Tensor) -> Tensor:
        """``forward(image, row_mask)[:, :, HISTORY_ROWS:]``: the logits of the rows after the first
        ``HISTORY_ROWS``, which hold their history (a decoding state's remembered rows)."""
        x = self._normed(image, row_mask)
        x = torch.relu(self.conv_a.tail(x)) * row_mask[:, :, CausalConv.RECEPTIVE_ROWS:]
        return self._logits(self.to_heads(torch.relu(self.conv_b.tail(x))))

    def _normed(self, image: Tensor, row_mask: Tensor) -> Tensor:
        """The convolutions' input: normalised, padding rows zeroed, channels innermost in memory
        (oneDNN's own layout: a 264-row prefill span's three convolutions 11.0 -> 7.8 ms, 2 threads;
        a decoding step's no different), which the convolutions and the ReLUs keep."""
        return (self.norm_in(image) * row_mask).contiguous(memory_format=torch.channels_last)

    def _logits(self, x: Tensor) -> Tensor:
        """(B, H, T, K/4) after the 1x1 convolution -> logits (B, H, T, K)."""
        # nearest-neighbour x4 along the bins, then LayerNorm(K). The 1x1 convolution commutes
        # with the upsampling, and four copies of a row have that row's mean and variance, so
        # both run at K/4 and only the affine part runs at K.
        x = F.layer_norm(x.contiguous(), x.shape[-1:], eps=self.norm_out.eps).repeat_interleave(4, dim=-1)
        return torch.addcmul(self.norm_out.bias, x, self.norm_out.weight)


class BidirectionalDecoder(nn.Module):
    """Strided conv -> ReLU -> conv -> ReLU -> x2 taller -> conv -> bilinear x2 wider."""

    def __init__(self, heads: int, channels: int, width: int) -> None:
        super().__init__()
        inner = heads * channels
        self.width = width
        self.down = nn.Conv2d(inner, inner, kernel_size=3, stride=(2, 1), padding=1)
        self.mid = nn.Conv2d(inner, inner, kernel_size=3, padding=1)
        self.to_heads = nn.Conv2d(inner, heads, kernel_size=3, padding=1)

    def start_at_zero(self) -> None:
        """Output 0 until trained (a zero-initialised residual on other logits)."""
        nn.init.zeros_(self.to_heads.weight)
        nn.init.zeros_(self.to_heads.bias)

    @sample_wise
    def forward(self, image: Tensor, row_mask: Tensor) -> Tensor:
        """image (B, H*c, T, K/2), row_mask (B, 1, T, 1) -> logits (B, H, T, K), one sample at a time."""
        tokens = image.shape[2]
        x = torch.relu(self.down(image * row_mask)) * row_mask[:, :, ::2]
        x = torch.relu(self.mid(x))
        x = x.repeat_interleave(2, dim=2)[:, :, :tokens] * row_mask
        x = self.to_heads(x)
        return F.interpolate(x, size=(tokens, self.width), mode="bilinear", align_corners=False)
