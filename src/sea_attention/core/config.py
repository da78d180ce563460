"""`SEAConfig`: every knob of one SEA attention layer, validated on construction."""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, fields
from typing import Any

FEATURE_KINDS = ("favor", "relu")
POSITION_CODES = ("learned", "tent", "none")
# fields added after the first release, with the value that reproduces a config saved without them
LEGACY_DEFAULTS = {"kernel_bins": False, "key_bins": False, "key_bounds": False, "sinks": 0, "local_window": 0,
                   "gate_form": "sigmoid", "block_from": 0}
# (causal, bidirectional) value of the fields whose default depends on ``causal`` (see SEAConfig)
CONTEXT_DEFAULTS = {"kernel_bins": (True, False), "key_bins": (True, True), "sinks": (4, 0), "local_window": (16, 0),
                    "gate_form": ("sigmoid", "identity")}
GROUPINGS = ("query", "query_head", "sample", "head", "block")
CAUSAL_GROUPINGS = ("query", "query_head", "block")  # the others let later queries steal earlier budgets
OUTPUT_MODES = ("mix", "norm")
GATE_FORMS = ("sigmoid", "identity")  # core/gates.py
ATTENTION_PATHS = ("sparse", "reference", "flex")
BIN_SUMS_DTYPES = ("float64", "float32")
BLOCK_CANDIDATES = 4  # block_candidates' value while block_from is 0 (the only one allowed)
LONG_ROWS_FROM = 1024  # block_from's default where the long-rows policy applies (rounded up to a multiple of query_block)
LONG_ROWS_CANDIDATES = 16  # block_candidates' default while block_from is on
# fields whose None resolves by the rest of the config at every validation while they hold the value resolved
# last (``_resolve_auto``): ``to_dict`` saves them as None (so ``replace`` and a reload resolve them again),
# every other reader sees the resolved value
AUTO_FIELDS = ("block_from", "block_candidates")


def performer_features(head_dim: int, feature_factor: int) -> int:
    """m = floor(d ln d / nbf), the Performer's number of random features (the paper's rule)."""
    return int(head_dim * math.log(head_dim) / feature_factor)


@dataclass
class SEAConfig:
    """Configuration of a SEA attention layer.

    Shapes follow the attention they replace: ``num_heads`` query heads of width
    ``head_dim`` and ``num_kv_heads`` key/value heads (grouped-query attention).

    Attributes:
        num_heads: query heads H.
        head_dim: width d of one head.
        num_kv_heads: key/value heads; ``None`` means ``num_heads``. Must divide ``num_heads``.
        causal: decoder (causal) or encoder (bidirectional) attention.
        k: budget, the mean number of keys each query attends to per head.
        estimate_width: K, the width of the compressed attention estimate. Causal
            estimators need a multiple of 4, bidirectional ones a multiple of 2. ``None``
            picks 256 for a causal layer with a binned signal (on SmolLM2 at 1024 tokens and
            k=64, undistilled, it covers 0.86 of the teacher's attention against 0.81 at 128;
            wiki validation), 128 otherwise (the paper's).
        feature_factor: nbf; the Performer uses m = floor(d ln d / nbf) random features.
        feature_kind: ``"relu"`` (generalized ReLU features) or ``"favor"`` (FAVOR+
            positive softmax features); ``None`` picks FAVOR+ when a binned signal is on or
            the layer is bidirectional, ReLU otherwise (the paper's causal models).
        kernel_bins: add the kernel's own compressed attention to the estimate's logits:
            log of phi(q) . phi(k) summed into each row's K bins (``estimator/kernel_bins.py``),
            times a learned weight per head (FAVOR+ features, the estimator's own when
            ``feature_kind="favor"``): the content signal in the estimate's own coordinates,
            at every length. ``None``: on when causal, off when bidirectional (there it lowered
            the undistilled coverage beside ``key_bins``: 0.58 against 0.60, see ``key_bins``).
        key_bins: add each bin's logit through its mean key, scale * q . mean(k) + log(size),
            times a learned weight per head: exact, linear in T (prefix sums of k), at every
            length; a bidirectional row's bins span the whole sample. ``None``: on. With either
            binned signal the CNN starts as a zero residual, so an undistilled estimator already
            selects by these signals. On a fine-tuned MiniLM classifier (BBC topics at 512
            tokens, validation, k=64, undistilled) the mean-key bins alone cover 0.60 of the
            teacher's attention, against 0.16 for the paper's estimator and 0.29 for
            ``kernel_bins`` alone (``benchmarks/encoder_tasks.sh``). Both off, with
            ``sinks = local_window = 0``, is the paper's estimator (causal or bidirectional).
        key_bounds: add, beside ``kernel_bins`` / ``key_bins``, an upper bound of each bin's
            largest logit, scale * (q+ . max(k) + q- . min(k)) + log(size) over blocks of keys
            covering the bin (``estimator/key_bounds.py``), times a learned weight per head:
            a mean key hides one outstanding key among many, the bound does not (retrieval,
            docs/results.md). Costs 3K dots of 2d per query and tables of T + (levels) x T / 4
            rows of 2d per kv head. Off by default: on validation text it ranks needed keys
            higher but answers no more needles.
        bin_sums_dtype: how ``kernel_bins`` / ``key_bins`` store their prefix sums (accumulated in
            float64 either way; ``estimator/kernel_bins.py``). ``"float64"`` (the default): each bin's
            sum is exact to float64 rounding, and a decoding step selects what a full forward
            selects. ``"float32"``: half a call's tables and of the bytes each of the T x (K + 1)
            dots reads, a faster per-query prefill (docs/results.md), at the price of float32
            rounding in each bin's sum, which can decide near-ties between decoding and a full
            forward differently (``tests/test_smollm2.py``'s 48 tokens, prefilled 40 + 5 then decoded:
            logits 3.8e-3 apart, over its 1e-4 tolerance, which float64 meets). The sums are centred
            on the first call's first 16 valid keys: a first call with fewer keys centres on those,
            which makes float32 less precise. A decoding state keeps neither table, only the float64
            running sums at its last row's bin edges (``kernel_bins.BinSums``). No weight depends on it
            (``sea.set_runtime``).
        position_code: what the Performer averages beside V to tell where attention goes:
            ``"learned"`` (a (max_positions, d) table, causal only: rows past the distillation
            length stay untrained), ``"tent"`` (the fixed code of the bidirectional models)
            or ``"none"``; ``None`` picks ``"tent"`` when bidirectional, ``"none"`` when
            causal with a binned signal (the bins already locate the mass), else ``"learned"``.
            ``"none"`` leaves a causal estimator without any length limit.
        sinks: causal only: every head of every query always attends the row's first
            ``sinks`` keys (attention sinks), before the estimate picks the rest.
            ``None``: 4 when causal, else 0.
        local_window: causal only: every head of every query always attends the bins that
            hold the row's last ``local_window`` keys. Both are capped at k // 4 keys each; the
            forced bins count against the budget with all their keys (which grows to hold them
            when it is smaller), so at k=64, K=256 they take half of a head's keys at 4,096 tokens
            and all of them from 8,192 on. ``None``: 16 when causal, else 0.
        forced_keys: how the sinks and the window count (a run-time choice, same weights). False
            (the default): their bins, whole. True: in a row longer than k keys a forced bin stands
            for its sink and window keys only (``cells.cell_range``) and the estimate chooses the
            other k - sinks - window keys at every length; undistilled SmolLM2 at 8,192 tokens, per query
            on every row (``block_from=0``), x1.288 dense instead of x1.522 (wiki validation), at 4,096 and
            1,024 a little worse
            (docs/results.md, "Forced keys").
        grouping: which cells compete for one top-k budget: ``"query"`` (one query
            across all heads; the default), ``"query_head"`` (one query and head),
            ``"sample"`` (a whole sample) or ``"head"`` (a whole sample and head). The
            ``sample`` and ``head`` are bidirectional only: in a causal model they would
            let later queries change the keys of earlier ones. ``"block"``: a block of
            ``query_block`` consecutive positions shares one selection (the ``query``
            selection of its first row when causal, of its mean row otherwise), and causal
            queries also attend their own block's keys up to themselves; the attention is
            then dense block products (``blocks.py``), much faster on long inputs. Blocks
            are cut at absolute positions, so unlike the other groupings the result depends
            on how much left padding a sample has (batched vs single prompts can differ).
        gating: learned gates that scale the sparse attention and mix it with an
            average branch (running mean of V when causal, mean of V otherwise).
        gate_form: how the gates are parametrised and where they start (``core/gates.py``):
            ``"sigmoid"`` (the paper's; they start at 0.982, so an untrained layer returns
            0.964 x sparse + 0.018 x average) or ``"identity"`` (scale and mix start at
            exactly 1: an untrained layer returns the sparse context unchanged, and with the
            oracle selection exact sparse attention). ``None``: sigmoid when causal, identity
            when bidirectional (fine-tuned MiniLM, BBC topics at 512 tokens, all 235 validation
            texts, k=64, undistilled: 192 right against 189 with sigmoid, dense 195; after the
            bounded distillation of ``benchmarks/encoder_tasks.sh`` 184 against 186, dense 187).
        output_mode: ``"mix"`` returns the gated context; ``"norm"`` returns
            LayerNorm(context) + context (over all heads).
        max_positions: rows of the learned positional table (``position_code="learned"``):
            a hard limit, the longest sequence such an estimator accepts. ``patch`` sets it
            to the model's own maximum positions. Unused by the other codes.
        feature_redraw_interval: redraw the random features every this many optimizer
            steps during distillation; 0 keeps them fixed.
        attention_path: ``"sparse"`` (linear memory, the default), ``"reference"``
            (dense T x T masked softmax, the oracle for tests) or ``"flex"`` (PyTorch's
            FlexAttention with a block-sparse mask; forward only on CPU, so calls that need
            gradients there, or the dense attention view, run the sparse path).
        candidates: exact refinement (``refine.py``; ``sparse`` or ``reference`` path): the
            estimate selects cells for ``candidates`` times the budget, every candidate key is
            scored exactly (scale * q . k), and each query and head keeps the best
            ``ceil(n / candidates)`` of its ``n`` candidates, so the heads keep the grouped
            budget's shares and the keys per query stay about ``k`` (a row of fewer than
            ``candidates * k`` keys, offered all of them, keeps ``n * min(k, L) / L``: every key
            when L <= k, as without refinement; ``refine.Refinement.kept``). Per query, it costs
            ``candidates * k`` exact dot products per query and head; with ``grouping="block"`` a
            block's rows share its candidates, which the block product scores anyway, and each
            row keeps its own best (its tile stays whole; a decoding step's one-row product rounds
            the scores differently from the block product, so a near-tie may be kept the other way
            than in the full forward). 1 (the default) is off: a selected cell's keys are all used
            (at most ``k`` of them, spread evenly). Undistilled SmolLM2, k=64, wiki validation
            (docs/results.md): per query on every row, 4 matches the default at 1k (x1.039 of dense against
            x1.038) and halves the gap at 4k (x1.067 against x1.131, measured before short rows
            kept their budget's share); with the block grouping, 4 gives x1.027 at 1k and x1.062
            at 4k.
        dense_layers: the layers (``layer_idx``) that keep the dense model's attention on every row:
            exact softmax over every key, the dense model's output (the length policy with no limit).
            Quest leaves its first two layers dense and MoBA its last three; a dense layer costs what
            dense attention costs (T keys per query), so SEA's cost stays linear in T only in the
            other layers. ``()`` (the default): every layer runs SEA. No weight depends on it, and
            distillation refuses it (a dense layer's gates would get no gradient). Undistilled
            SmolLM2 at 4k tokens, per query on every row (``block_from=0``): layers 3-10 dense take
            wiki-validation perplexity from x1.131 to x1.085 dense, layers 0-2 change nothing (docs/results.md).
        dense_until: the length policy (``dense_rows.py``): a valid query row with at most this many
            keys attends to all of them with exact softmax attention, as the dense model does (its
            output is the dense model's: no gates, no output norm), and only longer rows run SEA.
            Per row, so a decoding step and a full forward agree. A decoding state stays dense (it
            keeps the last 8 queries, the CNN's history, and ``query_block`` more with
            ``grouping="block"`` or ``block_from``) until a row passes the length, then becomes SEA's, built from the
            cached keys and the kept queries. 0 (the default): every row runs SEA. No weight depends on it.
        block_from: the long-rows policy (``grouping/long_rows.py``; causal, with the ``query`` or ``query_head``
            grouping): the query rows at key positions from this one on (in a sample without left padding,
            the rows with more than ``block_from`` keys) run the ``block`` grouping with ``block_candidates``
            (exact refinement), the earlier ones the config's per-query grouping. Per row, so a decoding
            step and a full forward agree; a multiple of ``query_block``, so the first long row opens a
            block. ``None`` (the default): 1,024 (rounded up to a multiple of ``query_block``) where the
            policy applies (causal, per-query grouping, not ``attention_path="flex"``), 0 elsewhere; 0: every
            row runs the config's grouping. No weight depends on it; a config saved before the policy
            existed loads with 0. Undistilled SmolLM2, k=64, 1,024 with 16 candidates (docs/results.md,
            "Sixteen candidates per block"), against 0: wiki validation x1.059 / x1.067 dense at 4k / 8k-token
            windows against x1.131 / x1.522, the suite's needle in its test prose 6/10, 5/10 at 1k / 2k against
            4/10, 5/10 (dense 8/10, 8/10), one layer's prefill faster from 4k tokens (attention-long-rows-c16).
            Left padding moves its blocks (see ``grouping``), so a long row of a left-padded batch can differ
            from the same prompt alone.
        block_candidates: ``candidates`` of the rows ``block_from`` hands to the block grouping. ``None`` (the
            default): 16 while ``block_from`` is on, else 4; another value than 4 with ``block_from=0`` is
            refused (it would change nothing). With 4 the long rows lose the suite's needle (2/10 at 1k and
            2k) and copy less (docs/results.md).
        query_chunk: queries processed together by the sparse path (and per span of a per-query
            grouping's row-chunked prefill); bounds peak memory.
        query_block: positions per block of the ``block`` grouping.
        seed: seed of the random features (the layer index is added per layer).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    causal: bool = True
    k: int = 64
    estimate_width: int | None = None
    feature_factor: int = 8
    feature_kind: str | None = None
    kernel_bins: bool | None = None
    key_bins: bool | None = None
    key_bounds: bool = False
    bin_sums_dtype: str = "float64"
    position_code: str | None = None
    sinks: int | None = None
    local_window: int | None = None
    forced_keys: bool = False
    grouping: str = "query"
    gating: bool = True
    gate_form: str | None = None
    output_mode: str = "mix"
    max_positions: int = 8192
    feature_redraw_interval: int = 0
    attention_path: str = "sparse"
    dense_layers: tuple[int, ...] = ()
    dense_until: int = 0
    query_chunk: int = 256
    query_block: int = 64
    seed: int = 0
    candidates: int = 1
    block_from: int | None = None
    block_candidates: int | None = None

    def __post_init__(self) -> None:
        self._auto = {name: None for name in AUTO_FIELDS if getattr(self, name) is None}  # name -> resolved value
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for name, (causal_default, bidirectional_default) in CONTEXT_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, causal_default if self.causal is True else bidirectional_default)
        if self.feature_kind is None:
            self.feature_kind = "relu" if self.causal and not self.binned else "favor"
        if self.position_code is None:
            self.position_code = "tent" if not self.causal else "none" if self.binned else "learned"
        if self.estimate_width is None:
            self.estimate_width = 256 if self.causal is True and self.binned else 128
        self.validate()

    def _resolve_auto(self) -> None:
        """Resolve the ``AUTO_FIELDS`` left to their default from the rest of the config, again at every
        validation while they hold the value resolved last (a config edited in place, e.g. to
        ``grouping="block"``, gets the defaults of its new values; a field edited to another value stays)."""
        auto = getattr(self, "_auto", {})  # {} for a config pickled before the fields existed
        for name, resolved in auto.items():  # block_from first: block_candidates' default reads it
            if getattr(self, name) in (None, resolved):
                auto[name] = self._default_block_from() if name == "block_from" else self._default_block_candidates()
                setattr(self, name, auto[name])

    def _default_block_from(self) -> int:
        """``LONG_ROWS_FROM`` (a multiple of ``query_block``) where the long-rows policy can run; 0 elsewhere."""
        if self._long_rows_unfit() or isinstance(self.query_block, bool) or not isinstance(self.query_block, int) \
                or self.query_block < 1:  # a bad query_block is refused by validate()
            return 0
        return -(-LONG_ROWS_FROM // self.query_block) * self.query_block

    def _default_block_candidates(self) -> int:
        """``LONG_ROWS_CANDIDATES`` while the long-rows policy is on, else ``BLOCK_CANDIDATES`` (the only value
        allowed then)."""
        return LONG_ROWS_CANDIDATES if self.block_from else BLOCK_CANDIDATES

    def _long_rows_unfit(self) -> str | None:
        """Why the long-rows policy cannot run with this config (None: it can): it hands a causal per-query
        grouping's long rows to the block grouping, which has its own kernel (no flex path)."""
        if self.causal is not True or self.grouping not in ("query", "query_head"):
            return (f"it needs causal=True and grouping 'query' or 'query_head', got causal={self.causal}, "
                    f"grouping={self.grouping!r}")
        if self.attention_path == "flex":
            return ("the block grouping has its own block-sparse kernel: use attention_path='sparse' (or "
                    "'reference') with it")
        return None

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its allowed values (after resolving ``AUTO_FIELDS``)."""
        self._resolve_auto()
        self._validate_fields()
        self._validate_combinations()

    def _validate_fields(self) -> None:
        """Each field on its own: type and range."""
        for name in ("num_heads", "head_dim", "num_kv_heads", "k", "estimate_width",
                     "feature_factor", "max_positions", "query_chunk", "query_block", "candidates",
                     "block_candidates"):
            setattr(self, name, _integer(name, getattr(self, name), 1, "a positive integer"))
        for name in ("feature_redraw_interval", "sinks", "local_window", "dense_until", "block_from"):
            setattr(self, name, _integer(name, getattr(self, name), 0, "a non-negative integer"))
        self.dense_layers = _layer_indices("dense_layers", self.dense_layers)
        if self.head_dim < 2:
            raise ValueError(f"head_dim must be >= 2, got {self.head_dim}")
        for name, allowed in (("feature_kind", FEATURE_KINDS), ("grouping", GROUPINGS), ("output_mode", OUTPUT_MODES),
                              ("gate_form", GATE_FORMS), ("bin_sums_dtype", BIN_SUMS_DTYPES),
                              ("attention_path", ATTENTION_PATHS), ("position_code", POSITION_CODES)):
            _choice(name, getattr(self, name), allowed)
        for name in ("causal", "gating", "kernel_bins", "key_bins", "key_bounds", "forced_keys"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def _validate_combinations(self) -> None:
        """Fields that constrain each other: a combination that cannot run is refused here."""
        if (self.sinks or self.local_window) and not self.causal:
            raise ValueError(f"sinks and local_window apply to causal layers only, got sinks={self.sinks}, "
                             f"local_window={self.local_window} with causal=False")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if (self.position_code == "learned" and not self.causal) or (self.position_code == "tent" and self.causal):
            raise ValueError(f"position_code={self.position_code!r} does not apply when causal={self.causal}: "
                             f"expected one of {('learned', 'none') if self.causal else ('tent', 'none')}")
        if self.causal and self.grouping not in CAUSAL_GROUPINGS:
            raise ValueError(f"grouping={self.grouping!r} is not allowed when causal=True: expected one of "
                             f"{CAUSAL_GROUPINGS}")
        if self.grouping == "block" and self.attention_path == "flex":
            raise ValueError("attention_path='flex' runs the per-query groupings; grouping='block' has its own "
                             "block-sparse kernel: use attention_path='sparse' (or 'reference') with it")
        if self.candidates > 1 and self.attention_path == "flex":
            raise ValueError(f"candidates={self.candidates} (exact refinement) runs on attention_path 'sparse' or "
                             f"'reference'; got attention_path={self.attention_path!r}")
        if self.block_from:
            self._validate_block_from()
        elif self.block_candidates != BLOCK_CANDIDATES:
            raise ValueError(f"block_candidates={self.block_candidates} sets the candidates of the rows block_from "
                             f"hands to the block grouping, and block_from=0 hands it none: set block_from > 0, or "
                             f"leave block_candidates at {BLOCK_CANDIDATES}")
        if self.bin_sums_dtype != "float64" and not self.binned:
            raise ValueError(f"bin_sums_dtype={self.bin_sums_dtype!r} sets how the binned signals store their prefix "
                             "sums: it needs kernel_bins=True or key_bins=True, got both False")
        if self.key_bounds and not (self.kernel_bins or self.key_bins):
            raise ValueError("key_bounds adds to the binned signals: it needs kernel_bins=True or key_bins=True, got "
                             "both False")
        if self.estimate_width % self.width_downsample:
            raise ValueError(f"estimate_width must be a multiple of {self.width_downsample} when causal={self.causal}, "
                             f"got {self.estimate_width}")
        if self.num_features < 1:
            raise ValueError(f"feature_factor={self.feature_factor} leaves no random features for "
                             f"head_dim={self.head_dim}: use a feature_factor <= {performer_features(self.head_dim, 1)}")

    def _validate_block_from(self) -> None:
        """The long-rows policy hands rows of a causal per-query grouping to the block grouping."""
        unfit = self._long_rows_unfit()
        if unfit:
            raise ValueError(f"block_from={self.block_from} hands a causal per-query grouping's long rows to the block "
                             f"grouping: {unfit}, or block_from=0")
        if self.block_from % self.query_block:
            raise ValueError(f"block_from must be a multiple of query_block={self.query_block} (the first long row "
                             f"opens a block), got {self.block_from}")

    # ------------------------------------------------------------------ derived values
    @property
    def num_features(self) -> int:
        """m, the number of Performer random features."""
        return performer_features(self.head_dim, self.feature_factor)

    @property
    def binned(self) -> bool:
        """Whether the logits get a binned signal (``kernel_bins`` or ``key_bins``)."""
        return self.kernel_bins or self.key_bins

    @property
    def width_downsample(self) -> int:
        """How much narrower than K the CNN's input rows are (4 causal, 2 bidirectional)."""
        return 4 if self.causal else 2

    @property
    def cnn_channels(self) -> int:
        """Channels per head inside the CNN decoder (2 causal, 4 bidirectional)."""
        return 2 if self.causal else 4

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "SEAConfig":
        """A validated copy with some fields changed."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown SEAConfig fields {sorted(unknown)}; valid fields: {self.field_names()}")
        return SEAConfig(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The fields as given: ``AUTO_FIELDS`` left to their default are None (resolved again on load),
        unless a field was since edited in place to another value."""
        auto = getattr(self, "_auto", {})  # {} for a config pickled before the fields existed
        return {**asdict(self), **{name: None for name, value in auto.items() if getattr(self, name) == value}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SEAConfig":
        """Rebuild a saved config; fields it predates take their ``LEGACY_DEFAULTS`` value."""
        values = {**LEGACY_DEFAULTS, **values}
        if values["block_from"] == 0:  # saved with the policy off: its candidates did nothing (refused now)
            values["block_candidates"] = BLOCK_CANDIDATES
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise ValueError(f"unknown SEAConfig fields {sorted(unknown)}; valid fields: {cls.field_names()}")
        return cls(**values)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _integer(name: str, value: Any, minimum: int, description: str) -> int:
    """``value`` as a Python int if it is an integer (numpy and 0-d torch integers too, not bools
    or floats) >= ``minimum``; otherwise a ``ValueError`` naming the field."""
    boolean = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    try:
        number = None if boolean else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be {description}, got {value!r} (accepted: int, or an integer type "
                         "such as numpy.int64)")
    return number


def _layer_indices(name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a sorted tuple of distinct layer indices (a list or tuple of integers >= 0, as a
    saved config's JSON list gives it); otherwise a ``ValueError`` naming the field."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of layer indices (integers >= 0), got {value!r}")
    indices = [_integer(name, index, 0, "a list of layer indices (integers >= 0)") for index in value]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name} lists a layer twice: {list(value)!r}")
    return tuple(sorted(indices))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
