"""`AttentionEstimator`: q, k, v -> a compressed (K-wide) attention estimate per query and head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..cells import every_cell_live, key_ranks, live_cells, valid_key_positions
from ..config import SEAConfig
from ..decoding import DecodeState
from ..gates import GATE_BIAS
from .decoder import BidirectionalDecoder, CausalDecoder, TokenEncoder
from .features import RandomFeatures, causal_linear_attention, layer_seed, linear_attention
from .kernel_bins import PrefixSums, StateSums, decoding_sums, edge_dots, key_logits, log_mass, prefix_sums
from .key_bounds import BoundTable, bin_bound_logits, bound_table
from .positions import LearnedPositionCode, tent_code

if TYPE_CHECKING:
    from ..call import SEACall

KERNEL_SCALE_INIT = 0.5  # initial weight of the kernel's log-share beside the mean-key logits (weight 1)


@dataclass
class Estimate:
    """What the estimator predicts for each query and head."""

    logits: Tensor  # (B, H, Tq, K) raw CNN output; (B, H, n, K) when only ``rows`` were estimated
    probs: Tensor  # like logits: softmax over the row's live bins; 0 for dead bins and padding queries
    gate_logits: Tensor  # (B, H, Tq, 2): s0 scales the sparse attention, s1 mixes in the average branch
    rows: Tensor | None = None  # (n,) the query rows that logits and probs hold; None: all of them


@dataclass
class BinInputs:
    """What the binned signals read for every row (``AttentionEstimator._bin_inputs``)."""

    queries: list[Tensor]  # (B, H_kv, G, Tq, f_i): phi(q) (kernel_bins) and/or q (key_bins), float32
    sums: list[PrefixSums] | StateSums  # of phi(k) and/or k over positions 0..Tk (``kernel_bins.prefix_sums``;
    # a later decoding call's: its state's sums at the bin edges, moved to its rows)
    bounds: BoundTable | None = None  # key_bounds: the keys' block extremes (``key_bounds.py``)
    q: Tensor | None = None  # key_bounds: (B, H_kv, G, Tq, d) the queries read against them


class AttentionEstimator(nn.Module):
    """Performer features (+ positional code) -> per-token encoder -> CNN decoder (+ the kernel's
    own binned attention, ``kernel_bins``) -> softmax."""

    def __init__(self, config: SEAConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, heads, width = config.head_dim, config.num_heads, config.estimate_width
        self.features = RandomFeatures(d, config.num_features, config.feature_kind, seed=self._seed(0))
        learned = config.position_code == "learned"
        self.positions = LearnedPositionCode(config.max_positions, d) if learned else None
        performer_width = d if config.position_code == "none" else 2 * d
        self.encoder = TokenEncoder(d, width // config.width_downsample, config.cnn_channels, performer_width,
                                    GATE_BIAS[config.gate_form])
        # weights per head of the binned signals in the logits, started where the two signals together
        # covered the most teacher attention without training (SmolLM2, benchmarks/estimator_signals.py)
        self.kernel_scale = nn.Parameter(torch.full((heads, 1, 1), KERNEL_SCALE_INIT)) if config.kernel_bins else None
        self.key_scale = nn.Parameter(torch.ones(heads, 1, 1)) if config.key_bins else None
        self.bound_scale = nn.Parameter(torch.ones(heads, 1, 1)) if config.key_bounds else None
        # the binned kernel needs softmax-kernel (FAVOR+) features; ReLU ones recall little of the attention
        self.kernel_features = None
        if config.kernel_bins and config.feature_kind != "favor":
            self.kernel_features = RandomFeatures(d, config.num_features, "favor", seed=self._seed(0) + 1)
        decoder = CausalDecoder if config.causal else BidirectionalDecoder
        self.decoder = decoder(heads, config.cnn_channels, width)
        if config.kernel_bins or config.key_bins:  # the CNN starts as a zero residual on the binned signals
            self.decoder.start_at_zero()

    def _seed(self, redraw: int) -> int:
        return layer_seed(self.config.seed, self.layer_idx, redraw)

    def maybe_redraw_features(self, step: int) -> bool:
        """Redraw the random features when ``step`` is a multiple of the redraw interval."""
        interval = self.config.feature_redraw_interval
        if interval and step > 0 and step % interval == 0:
            self.features.redraw(self._seed(step // interval))
            if self.kernel_features is not None:
                self.kernel_features.redraw(self._seed(step // interval) + 1)
            return True
        return False

    def position_code(self, key_valid: Tensor, positions: Tensor | None,
                      rank_offset: Tensor | None = None) -> Tensor | None:
        """(B, Tk, d) positional code of every key, 0 on padding keys; None for ``position_code="none"``.

        ``rank_offset`` (B,) counts valid keys before these ones (decoding).
        """
        if self.config.position_code == "none":
            return None
        ranks = key_ranks(key_valid)
        if rank_offset is not None:
            ranks = ranks + rank_offset.unsqueeze(-1)
        if self.positions is not None:  # padding keys read row 0 (their code is zeroed below)
            code = self.positions((ranks if positions is None else positions).masked_fill(~key_valid, 0))
        else:
            code = tent_code(ranks, key_valid.sum(-1), self.config.head_dim)
        return code * key_valid.unsqueeze(-1)

    def forward(self, call: "SEACall", rows: Tensor | None = None) -> Estimate:
        """The estimate of a call's queries (``call.q`` (B, H, Tq, d) against its keys).

        With a decoding state (causal only), keys before ``state.seen`` are taken from the
        state instead of being recomputed, and the state is updated. ``rows`` (causal): estimate
        only these sorted query rows, possibly none (the gates still cover every row, and a
        decoding state still takes every row).
        """
        if rows is not None and not self.config.causal:
            raise ValueError("estimating some rows only needs a causal estimator")
        performer, bins = self.per_position(call)
        hidden = self.encoder.hidden(performer, self._own_values(call, 0, call.q.shape[2]))  # (B, H, Tq, 2d)
        gate_logits = self.encoder.gates(hidden)  # every row has gates, estimated or not: (B, H, Tq, 2)
        logits = self._cnn_logits(hidden, call, rows).float()  # (B, H, Tq or n, K)
        return self._estimate(logits, gate_logits, call, bins, rows)

    def per_position(self, call: "SEACall") -> tuple[Tensor, BinInputs | None]:
        """The work done once per position, whatever rows are estimated: the Performer output
        (B, H, Tq, p) in the parameters' dtype and the binned signals' inputs (None when off).
        A decoding state gets its Performer sums and prefix sums here."""
        phi_q, phi_k, performer = self._performer(call)
        bins = self._bin_inputs(call, phi_q, phi_k) if self.config.binned else None
        return performer.to(self._param_dtype), bins

    def estimate_span(self, performer: Tensor, bins: BinInputs | None, call: "SEACall", lo: int,
                      hi: int, rows: Tensor | None = None) -> Estimate:
        """The estimate of the consecutive query rows [lo, hi) only (causal, no state read), from
        ``per_position``'s results: its ``logits`` and ``probs`` hold those rows (or only ``rows``,
        sorted absolute rows inside the span), its ``gate_logits`` every row of the span.

        A causal row's logits depend on its decoder input row and the ``HISTORY_ROWS`` before it,
        so the encoder and the CNN run on rows [lo - HISTORY_ROWS, hi) only (from row 0, the
        convolutions' zero padding, as in the full forward). Nothing here is Tq x K wide.
        """
        first = max(0, lo - CausalDecoder.HISTORY_ROWS)
        hidden = self.encoder.hidden(performer[:, :, first:hi], self._own_values(call, first, hi))  # (B, H, r, 2d)
        row_mask = call.query_valid[:, None, first:hi, None].to(hidden.dtype)  # (B, 1, r, 1)
        gate_logits = self.encoder.gates(hidden[:, :, lo - first:])  # (B, H, n, 2)
        if rows is None:
            logits = self.decoder(self.encoder.image(hidden), row_mask)[:, :, lo - first:]  # (B, H, n, K)
            rows = torch.arange(lo, hi, device=hidden.device)
        else:  # the span's rows are at [lo - first, hi - first) of hidden; a row's history lies inside
            logits = self._decode_rows(hidden, row_mask, rows - first)
        return self._estimate(logits.float(), gate_logits, call, bins, rows)

    def remember_cnn_rows(self, performer: Tensor, call: "SEACall") -> None:
        """Fill an empty decoding state's CNN history (the last ``HISTORY_ROWS`` decoder input rows
        and their masks, zero rows before the start) from ``per_position``'s Performer output:
        what ``_decode`` leaves in the state, for a prefill that decoded its rows in spans."""
        rows, tq = CausalDecoder.HISTORY_ROWS, call.q.shape[2]
        first = max(0, tq - rows)
        hidden = self.encoder.hidden(performer[:, :, first:], self._own_values(call, first, tq))
        image = self.encoder.image(hidden)  # (B, H*c, r, K/4)
        mask = call.query_valid[:, None, first:, None].to(image.dtype)  # (B, 1, r, 1)
        short = rows - image.shape[2]  # a prompt shorter than the history: zero rows in front
        call.state.cnn_rows = torch.nn.functional.pad(image, (0, 0, short, 0))
        call.state.cnn_mask = torch.nn.functional.pad(mask, (0, 0, short, 0))

    def _own_values(self, call: "SEACall", lo: int, hi: int) -> Tensor:
        """The values of query rows [lo, hi) in the parameters' dtype: (B, H_kv, hi - lo, d)."""
        return call.v[:, :, call.first + lo:call.first + hi].to(self._param_dtype)

    def _estimate(self, logits: Tensor, gate_logits: Tensor, call: "SEACall", bins: BinInputs | None,
                  rows: Tensor | None) -> Estimate:
        """The CNN's logits (B, H, Tq or n, K) plus the binned signals, softmaxed over the live bins."""
        lengths = call.lengths if rows is None else call.lengths.index_select(1, rows)  # (B, Tq or n)
        if bins is not None and logits.shape[2]:
            logits = logits + self._bin_signal(bins, lengths, rows, call.scale)
        width = self.config.estimate_width
        if every_cell_live(lengths, width):  # no dead bin and no padding row: nothing to mask
            return Estimate(logits, torch.softmax(logits, dim=-1), gate_logits.float(), rows)
        live = live_cells(lengths, width).unsqueeze(1)  # (B, 1, Tq or n, K)
        # a finite fill keeps padding rows (no live bin) NaN-free, also in backward
        probs = torch.softmax(logits.masked_fill(~live, torch.finfo(logits.dtype).min), dim=-1)
        probs = probs.masked_fill(~live, 0.0)
        return Estimate(logits, probs, gate_logits.float(), rows)

    @property
    def _param_dtype(self) -> torch.dtype:
        return self.encoder.to_row.weight.dtype

    def _performer(self, call: "SEACall") -> tuple[Tensor, Tensor, Tensor]:
        """Performer over (positional code ++ V), a coarse histogram of where each query looks:
        phi(q) (B, H_kv, G, Tq, m), phi(k) of the new keys and the output (B, H, Tq, p)."""
        q, k, v, state = call.q, call.k, call.v, call.state
        bsz, heads, tq, _ = q.shape
        kv_heads = k.shape[1]
        past = state.seen if state is not None else 0
        new_valid = call.key_valid[:, past:]  # the keys this call adds
        new_positions = call.positions[:, past:] if call.positions is not None else None
        code = self.position_code(new_valid, new_positions, state.valid_keys if past else None)  # (B, Tk', d)
        values = v[:, :, past:].float()
        if code is not None:
            values = torch.cat([code.float().unsqueeze(1).expand(-1, kv_heads, -1, -1), values], dim=-1)
        if not bool(new_valid.all()):  # zero padding values (non-finite ones SEAAttention already zeroed)
            values = values * new_valid[:, None, :, None]  # (B, H_kv, Tk', p)
        root = math.sqrt(call.scale)
        phi_q = self.features(q, is_query=True, root=root).view(bsz, kv_heads, heads // kv_heads, tq, -1)
        phi_k = self.features(k[:, :, past:], is_query=False, root=root) * new_valid[:, None, :, None]
        if self.config.causal:
            performer, performer_state = causal_linear_attention(
                phi_q, phi_k, values, state=state.performer if past else None)
            if state is not None:
                state.performer = performer_state
        else:
            performer = linear_attention(phi_q, phi_k, values)
        return phi_q, phi_k, performer.reshape(bsz, heads, tq, values.shape[-1])

    def _cnn_logits(self, hidden: Tensor, call: "SEACall", rows: Tensor | None) -> Tensor:
        """The CNN decoder's logits (B, H, Tq, K), or (B, H, n, K) for ``rows`` only."""
        row_mask = call.query_valid[:, None, :, None].to(hidden.dtype)
        if not self.config.causal:
            return self._decode_packed(self.encoder.image(hidden), call.query_valid)
        if rows is None or call.state is not None:
            return self._decode(self.encoder.image(hidden), row_mask, call.state, rows)
        return self._decode_rows(hidden, row_mask, rows)

    def _bin_inputs(self, call: "SEACall", phi_q: Tensor, phi_k: Tensor) -> BinInputs:
        """What the binned signals read (``kernel_bins.py``): the queries and the prefix sums over
        positions of [phi(k), k] (whichever are on), which decoding keeps in its state."""
        past = call.state.seen if call.state is not None else 0
        q, new_k = call.q, call.k[:, :, past:]
        bsz, kv_heads, groups, tq = phi_q.shape[:4]
        root = math.sqrt(call.scale)
        queries = []  # the queries read against the prefix-summed key vectors
        if self.config.kernel_bins:
            if self.kernel_features is not None:
                phi_q = self.kernel_features(q, is_query=True, root=root).view(bsz, kv_heads, groups, tq, -1)
            queries.append(phi_q)
        grouped = q.float().view(bsz, kv_heads, groups, tq, -1)  # (B, H_kv, G, Tq, d)
        if self.config.key_bins:
            queries.append(grouped)
        new_rows, state = self._per_key(new_k, phi_k, root), call.state
        if state is not None and state.bin_sums is not None:  # a later decoding call: the state's edges move
            state.bin_sums.append(call.key_valid[:, past:], new_rows)
            sums = StateSums(state.bin_sums, state.bin_sums.sources(call.k), call.key_valid)
            if tq == 1:  # a decoding step: its edges, estimated or not
                sums.follow(call.lengths, self.config.estimate_width)
        else:
            sums = self._bin_sums(new_rows, call.key_valid[:, past:], state)
        if not self.config.key_bounds:
            return BinInputs(queries, sums)
        table = bound_table(new_k, call.key_valid[:, past:], self.config.estimate_width,
                            call.state.key_bounds if call.state is not None else None)
        if call.state is not None:
            call.state.key_bounds = table
        return BinInputs(queries, sums, table, grouped)

    def _bin_signal(self, bins: BinInputs, lengths: Tensor, rows: Tensor | None, scale: float) -> Tensor:
        """(B, H, Tq or n, K): the weighted binned signals added to the CNN's logits.

        ``kernel_bins``: log of the FAVOR+ kernel's attention share per bin; ``key_bins``: each
        bin's logit through its mean key; ``key_bounds``: an upper bound of its largest logit.
        ``lengths`` are those of ``rows`` (all rows: None).
        """
        queries = bins.queries if rows is None else [x.index_select(3, rows) for x in bins.queries]
        dots, sizes = edge_dots(queries, bins.sums, lengths, self.config.estimate_width)
        signal = 0.0
        if self.config.kernel_bins:
            signal = self.kernel_scale * log_mass(dots[0], sizes).flatten(1, 2)
        if self.config.key_bins:
            signal = signal + self.key_scale * key_logits(dots[-1], sizes, scale).flatten(1, 2)
        if self.config.key_bounds:
            q = bins.q if rows is None else bins.q.index_select(3, rows)
            bounds = bin_bound_logits(q, bins.bounds, lengths, self.config.estimate_width, scale)
            signal = signal + self.bound_scale * bounds.flatten(1, 2)
        return signal  # query head h = kv head h // G, group h % G

    def _per_key(self, keys: Tensor, phi_k: Tensor, root: float) -> list[Tensor]:
        """The per-key rows the binned signals sum, of ``keys`` (B, H_kv, n, d): phi(k) (kernel_bins; ``phi_k``
        when the estimator's own features are FAVOR+) and/or k (key_bins), float32."""
        rows = []
        if self.config.kernel_bins:
            rows.append(phi_k if self.kernel_features is None else self.kernel_features(keys, is_query=False, root=root))
        if self.config.key_bins:
            rows.append(keys.float())
        return rows

    def _bin_sums(self, per_key: list[Tensor], new_valid: Tensor, state: DecodeState | None) -> list[PrefixSums]:
        """Prefix sums of each per-key signal over positions 0..Tk; a decoding state's first call also fills
        the state, which keeps the running sums at its last row's bin edges (``kernel_bins.decoding_sums``)."""
        dtype = getattr(torch, self.config.bin_sums_dtype)
        if state is None:
            return [prefix_sums(x, new_valid, dtype=dtype) for x in per_key]
        stored = [True] * self.config.kernel_bins + [False] * self.config.key_bins  # k is the KV cache's
        sums, state.bin_sums = decoding_sums(per_key, new_valid, dtype, self.config.estimate_width, stored)
        return sums

    def _decode_rows(self, hidden: Tensor, row_mask: Tensor, rows: Tensor) -> Tensor:
        """Logits (B, H, n, K) of some query rows only (causal).

        A causal row's logits depend on its decoder input row and the HISTORY_ROWS before it.
        Each run of consecutive rows [a, b) is decoded from the input rows [a - HISTORY_ROWS, b),
        the runs packed end to end into one image: a kept row's history lies inside its own run's
        segment, so the packing changes nothing it sees. Rows before the start are masked zero
        rows, exactly what the convolutions' zero padding gives a full forward.
        """
        packed, own = _packed_history(rows, CausalDecoder.HISTORY_ROWS)  # (P,), (n,)
        inside = (packed >= 0).to(row_mask.dtype)[:, None]
        image = self.encoder.image(hidden.index_select(2, packed.clamp_min(0)))  # (B, H*c, P, w)
        mask = row_mask.index_select(2, packed.clamp_min(0)) * inside  # (B, 1, P, 1)
        return self.decoder(image, mask).index_select(2, own)  # (B, H, n, K)

    def _decode_packed(self, image: Tensor, query_valid: Tensor) -> Tensor:
        """Bidirectional CNN on the valid rows moved to the front, logits moved back.

        The decoder's stride-2 convolution pairs rows by absolute position, so an odd amount of
        left padding would pair a sample's rows differently; packed, every sample's rows start
        at row 0 and any padding is trailing, which the zeroed padding rows make exact.
        """
        row_mask = query_valid[:, None, :, None].to(image.dtype)
        if bool(query_valid.all()):
            return self.decoder(image, row_mask)
        order = valid_key_positions(query_valid)[:, None, :, None]  # (B, 1, Tq, 1): valid rows first
        packed = image.gather(2, order.expand(-1, image.shape[1], -1, image.shape[-1]))
        logits = self.decoder(packed, row_mask.gather(2, order))
        return torch.empty_like(logits).scatter_(2, order.expand(-1, logits.shape[1], -1, logits.shape[-1]), logits)

    def _decode(self, image: Tensor, row_mask: Tensor, state: DecodeState | None,
                rows: Tensor | None = None) -> Tensor:
        """Run the CNN decoder; with a state, on the remembered rows + the new ones, which the state
        keeps. ``rows`` (with a state): the logits of these rows only, (B, H, n, K); none at all
        skips the decoder (a block decoding step that does not select)."""
        if state is None:
            return self.decoder(image, row_mask)
        history = CausalDecoder.HISTORY_ROWS
        if state.cnn_rows is None:  # zero rows with mask 0 act exactly like the convolutions' zero padding
            state.cnn_rows = image.new_zeros(*image.shape[:2], history, image.shape[-1])
            state.cnn_mask = row_mask.new_zeros(row_mask.shape[0], 1, history, 1)
        image = torch.cat([state.cnn_rows.to(image.dtype), image], dim=2)
        row_mask = torch.cat([state.cnn_mask.to(row_mask.dtype), row_mask], dim=2)
        # copies, not views: a view of a prefill's image would keep all its rows alive with the state
        state.cnn_rows, state.cnn_mask = image[:, :, -history:].clone(), row_mask[:, :, -history:].clone()
        if rows is None:
            return self.decoder.tail(image, row_mask)
        if not rows.numel():
            heads, width = self.config.num_heads, self.config.estimate_width
            return image.new_zeros(image.shape[0], heads, 0, width)
        # only the rows asked for, each with its history (``_packed_history``; the state's rows lead)
        packed, own = _packed_history(rows + history, history)  # no row before the remembered ones
        return self.decoder(image.index_select(2, packed), row_mask.index_select(2, packed)).index_select(2, own)


def _packed_history(rows: Tensor, history: int) -> tuple[Tensor, Tensor]:
    """The input rows that decode ``rows`` (sorted): each run of consecutive rows [a, b) needs rows
    a - history .. b - 1. Returns those positions for all runs, end to end (P,), negative before
    the start, and where each of ``rows`` sits among them (n,)."""
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = rows[1:] != rows[:-1] + 1
    span = torch.where(starts, history + 1, 1)  # input rows each query row adds to the packing
    ends = span.cumsum(0)
    step = torch.arange(int(ends[-1]), device=rows.device) - torch.repeat_interleave(ends - span, span)
    packed = torch.repeat_interleave(rows - span + 1, span) + step
    return packed, ends - 1
