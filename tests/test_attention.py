import pytest
import torch

from conftest import exact_attention, make_qkv, padding_mask
from sea_attention import DecodeState, SEAAttention, SEAConfig


def sea(heads=4, kv_heads=2, dim=16, causal=True, **kw):
    defaults = dict(k=4, estimate_width=8, max_positions=256)
    return SEAAttention(SEAConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, causal=causal,
                                  **{**defaults, **kw}))


ANCHOR_GRID = [  # batch, heads, kv_heads, tq, tk, dim, pad, causal
    (1, 1, 1, 1, 1, 8, 0, True),
    (2, 4, 4, 32, 32, 16, 0, True),
    (3, 4, 2, 40, 40, 16, 5, True),
    (2, 6, 3, 7, 50, 8, 4, True),  # a query suffix, as in decoding
    (2, 4, 1, 1, 33, 16, 3, True),  # one new token
    (2, 4, 2, 30, 30, 16, 0, False),
    (3, 4, 4, 25, 25, 8, 6, False),
    (2, 6, 2, 5, 21, 8, 2, False),
]


@pytest.mark.parametrize("batch, heads, kv_heads, tq, tk, dim, pad, causal", ANCHOR_GRID)
@pytest.mark.parametrize("path", ["sparse", "reference"])
@pytest.mark.parametrize("grouping", ["query", "query_head", "head"])
def test_full_budget_without_gating_is_exact_attention(batch, heads, kv_heads, tq, tk, dim, pad, causal, path, grouping):
    if causal and grouping == "head":
        grouping = "query"
    module = sea(heads, kv_heads, dim, causal, gating=False, attention_path=path, grouping=grouping, query_chunk=8)
    q, k, v = make_qkv(batch, heads, kv_heads, tq, tk, dim)
    mask = padding_mask(batch, tk, pad, left=causal)
    state = None
    if causal and tq < tk:  # a causal query suffix continues the state of a prefill of the other keys
        state, past = DecodeState(), tk - tq
        module(torch.randn(batch, heads, past, dim), k[:, :, :past], v[:, :, :past],
               attention_mask=mask[:, :past], state=state)
    out = module(q, k, v, attention_mask=mask, k_budget=tk, state=state)
    expected = exact_attention(q, k, v, mask, causal)
    rows = mask[:, tk - tq:]
    torch.testing.assert_close(out.context.transpose(1, 2)[rows], expected.transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)
    assert bool((out.context.transpose(1, 2)[~rows] == 0).all())


@pytest.mark.parametrize("causal, gating, mode", [(True, True, "mix"), (True, False, "norm"), (False, True, "norm")])
def test_sparse_and_reference_paths_agree_with_gradients(causal, gating, mode):
    torch.manual_seed(1)
    a = sea(causal=causal, gating=gating, output_mode=mode, attention_path="sparse", query_chunk=5)
    b = sea(causal=causal, gating=gating, output_mode=mode, attention_path="reference")
    b.load_state_dict(a.state_dict())
    a.double(), b.double()  # float64: the two paths must agree to rounding, not to fp32 noise
    q, k, v = make_qkv(2, 4, 2, 24, 24, 16, dtype=torch.float64)
    mask = padding_mask(2, 24, 3, left=causal)
    grads = []
    for module in (a, b):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = module(*inputs, attention_mask=mask, return_attention=True)
        (out.context.square().sum() + out.estimate.square().sum()).backward()
        grads.append((out, [x.grad for x in inputs], {n: p.grad for n, p in module.named_parameters()}))
    (oa, ga, pa), (ob, gb, pb) = grads
    torch.testing.assert_close(oa.context, ob.context, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(oa.attention, ob.attention, atol=1e-10, rtol=1e-10)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)
    for name in pa:
        if pa[name] is not None or pb[name] is not None:
            torch.testing.assert_close(pa[name], pb[name], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_causality_canary(kv_heads):
    """Changing key/value j never changes an output row before j (gating on, default k)."""
    module = sea(heads=4, kv_heads=kv_heads, k=3, estimate_width=8)
    t, j = 48, 30
    q, k, v = make_qkv(1, 4, kv_heads, t, t, 16)
    base = module(q, k, v)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    k2[:, :, j:] += torch.randn_like(k2[:, :, j:]) * 5
    v2[:, :, j:] += torch.randn_like(v2[:, :, j:]) * 5
    q2[:, :, j:] += torch.randn_like(q2[:, :, j:]) * 5
    changed = module(q2, k2, v2)
    torch.testing.assert_close(changed.context[:, :, :j], base.context[:, :, :j], atol=0, rtol=0)
    torch.testing.assert_close(changed.estimate[:, :, :j], base.estimate[:, :, :j], atol=0, rtol=0)
    assert not torch.allclose(changed.context[:, :, j:], base.context[:, :, j:])


def test_left_padding_matches_unpadded_sequence():
    module = sea(k=3)
    q, k, v = make_qkv(1, 4, 2, 30, 30, 16)
    pad = 6
    padded = [torch.cat([torch.randn(1, x.shape[1], pad, 16), x], 2) for x in (q, k, v)]
    mask = torch.ones(1, 30 + pad, dtype=torch.bool)
    mask[:, :pad] = False
    plain = module(q, k, v)
    with_pad = module(*padded, attention_mask=mask)
    torch.testing.assert_close(with_pad.context[:, :, pad:], plain.context, atol=1e-5, rtol=1e-5)
    assert torch.equal(with_pad.nnz[:, :, pad:], plain.nnz)


def test_right_padding_matches_unpadded_bidirectional():
    module = sea(causal=False, k=3)
    q, k, v = make_qkv(1, 4, 2, 21, 21, 16)
    pad = 5
    padded = [torch.cat([x, torch.randn(1, x.shape[1], pad, 16)], 2) for x in (q, k, v)]
    mask = torch.ones(1, 21 + pad, dtype=torch.bool)
    mask[:, 21:] = False
    torch.testing.assert_close(module(*padded, attention_mask=mask).context[:, :, :21], module(q, k, v).context,
                               atol=1e-5, rtol=1e-5)


def test_outputs_shapes_and_nnz():
    module = sea(k=4, estimate_width=8, sinks=0, local_window=0)  # bins of 8 keys: forced ones would pass k
    q, k, v = make_qkv(2, 4, 2, 64, 64, 16)
    out = module(q, k, v, return_attention=True)
    assert out.context.shape == (2, 4, 64, 16)
    assert out.estimate.shape == (2, 4, 64, 8)
    assert out.nnz.shape == (2, 4, 64) and out.attention.shape == (2, 4, 64, 64)
    torch.testing.assert_close(out.estimate.sum(-1), torch.ones(2, 4, 64))
    torch.testing.assert_close((out.attention > 0).sum(-1), out.nnz)
    # heads compete for one budget per query: a head may get no key, then its row is empty
    torch.testing.assert_close(out.attention.sum(-1), (out.nnz > 0).float())
    assert float(out.nnz[:, :, 8:].float().mean()) == pytest.approx(4, rel=0.25)
    assert bool((out.nnz.sum(1) >= 1).all())


def test_dynamic_k_never_selects_fewer_keys():
    module = sea(k=4, estimate_width=8)
    q, k, v = make_qkv(1, 4, 2, 80, 80, 16)
    counts = [module(q, k, v, k_budget=b).nnz.sum(1) for b in (1, 2, 4, 8, 16, 80)]
    for small, large in zip(counts, counts[1:]):
        assert bool((large >= small).all())
    assert bool((counts[-1][0] == 4 * torch.arange(1, 81)).all())  # budget >= T: everything


def test_bfloat16_runs_close_to_float32():
    module = sea(k=4)
    q, k, v = make_qkv(1, 4, 2, 32, 32, 16)
    ref = module(q, k, v, k_budget=32)
    low = module(q.bfloat16(), k.bfloat16(), v.bfloat16(), k_budget=32)
    assert low.context.dtype == torch.bfloat16
    torch.testing.assert_close(low.context.float(), ref.context, atol=5e-2, rtol=5e-2)
    module.bfloat16()
    assert module(q.bfloat16(), k.bfloat16(), v.bfloat16()).context.dtype == torch.bfloat16


def test_feature_redraw_follows_interval():
    module = sea(feature_redraw_interval=3)
    before = module.estimator.features.projection.clone()
    assert not module.maybe_redraw_features(2)
    assert module.maybe_redraw_features(3)
    assert not torch.equal(before, module.estimator.features.projection)


def test_too_long_for_positional_table():
    module = sea(max_positions=16, position_code="learned")
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16)
    with pytest.raises(ValueError, match="max_positions is 16"):
        module(q, k, v)


@pytest.mark.parametrize("estimator", [{}, dict(key_bins=False), dict(kernel_bins=False)])
def test_binned_estimators_have_no_length_limit(estimator):
    """Binned signals and no positional table (the causal default): max_positions is not a limit."""
    module = sea(max_positions=16, **estimator)
    assert module.estimator.positions is None
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16)
    assert module(q, k, v).context.isfinite().all()


def test_an_undistilled_default_estimator_selects_by_its_signals():
    """The CNN starts as a zero residual: the estimate is the softmax of the weighted binned signals."""
    module = sea(k=8, estimate_width=8).eval()
    assert float(module.estimator.decoder.norm_out.weight.detach().abs().sum()) == 0.0
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16)
    out = module(q, k, v)
    module.estimator.key_scale.data.zero_()
    module.estimator.kernel_scale.data.zero_()
    flat = module(q, k, v).estimate[:, :, 39]  # no signal left: every live bin alike
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / 8))
    assert not torch.allclose(out.estimate[:, :, 39], flat)


@pytest.mark.parametrize("shapes, kwargs, message", [
    (((1, 4, 8), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "q must have shape"),
    (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "config.num_heads is 4"),
    (((1, 4, 8, 16), (1, 4, 8, 16), (1, 4, 8, 16)), {}, "num_kv_heads=2"),
    (((1, 4, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8)), {}, "config.head_dim is 16"),
    (((1, 4, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "must not outnumber keys"),
    (((1, 4, 5, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "causal query suffix needs the DecodeState"),
    (((2, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "batch sizes differ"),
    (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 7, 16)), {}, "same length"),
    (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"attention_mask": torch.ones(1, 7, dtype=torch.bool)}, "attention_mask must have shape"),
    (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"attention_mask": torch.full((1, 8), 0.5)}, "must be bool"),
    (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"k_budget": 0}, "k_budget must be a positive integer"),
])
def test_bad_inputs_raise_clear_errors(shapes, kwargs, message):
    module = sea()
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        module(q, k, v, **kwargs)


def test_integer_mask_is_accepted():
    module = sea()
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16)
    mask = torch.ones(1, 8, dtype=torch.long)
    torch.testing.assert_close(module(q, k, v, attention_mask=mask).context, module(q, k, v).context)


def test_gates_start_almost_open():
    module = sea(gate_form="sigmoid")
    q, k, v = make_qkv(1, 4, 2, 16, 16, 16)
    gates = module(q, k, v).gates
    torch.testing.assert_close(gates, torch.full_like(gates, torch.sigmoid(torch.tensor(4.0)).item()))


@pytest.mark.parametrize("causal", [True, False])
def test_identity_gates_start_as_the_ungated_layer_and_train(causal):
    """gate_form="identity": scale and mix start at exactly 1, so an untrained layer returns what the same
    layer without gates returns (bit for bit, at a full budget exact attention); both gates get gradients."""
    torch.manual_seed(0)
    gated = sea(causal=causal, gate_form="identity", k=16, query_chunk=5)
    plain = sea(causal=causal, gating=False, k=16, query_chunk=5)
    plain.load_state_dict(gated.state_dict())
    q, k, v = make_qkv(2, 4, 2, 16, 16, 16)
    out = gated(q, k, v)
    assert torch.equal(out.gates, torch.ones_like(out.gates))
    assert torch.equal(out.context, plain(q, k, v).context)
    (out.context * torch.randn_like(out.context)).sum().backward()
    bias_grad = gated.estimator.encoder.to_gates.bias.grad
    assert bias_grad is not None and bool((bias_grad != 0).all())


def test_norm_mode_keeps_padding_queries_at_zero():
    module = sea(output_mode="norm")
    with torch.no_grad():
        module.output_norm.bias.fill_(0.3)
    q, k, v = make_qkv(1, 4, 2, 10, 10, 16)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[:, :3] = False
    out = module(q, k, v, attention_mask=mask).context
    assert bool((out[:, :, :3] == 0).all()) and bool((out[:, :, 3:] != 0).any())


def _args(tq=8, tk=8, batch=1, dtype=torch.float32):
    q, k, v = make_qkv(batch, 4, 2, tq, tk, 16)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype))


def _mutated_k(module):
    module.config.k = -3
    return {}


BAD_CALLS = [  # (what the call gets, the error it must raise)
    (lambda m: {"scale": float("nan")}, "scale must be a finite positive number"),
    (lambda m: {"scale": float("inf")}, "scale must be a finite positive number"),
    (lambda m: {"scale": -1.0}, "scale must be a finite positive number"),
    (lambda m: {"scale": 0}, "scale must be a finite positive number"),
    (lambda m: {"scale": True}, "scale must be a finite positive number"),
    (_mutated_k, "k must be a positive integer, got -3"),
    (lambda m: {"positions": torch.full((1, 8), -1)}, r"positions must be >= 0"),
    (lambda m: {**_args(tq=0, tk=0)}, r"at least one sample and one query"),
    (lambda m: {**_args(batch=0)}, r"at least one sample and one query"),
    (lambda m: {**_args(tq=0)}, r"at least one sample and one query"),
    (lambda m: {**_args(dtype=torch.int64)}, "q must have a floating dtype"),
    (lambda m: {"q": _args()["q"].numpy()}, "q must be a torch.Tensor, got numpy.ndarray"),
    (lambda m: {"attention_mask": [[1] * 8]}, "attention_mask must be a torch.Tensor"),
]


@pytest.mark.parametrize("make, message", BAD_CALLS)
def test_nonsense_arguments_raise_clear_errors(make, message):
    module = sea()
    kwargs = {**_args(), **make(module)}
    with pytest.raises(ValueError, match=message):
        module(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_huge_budget_selects_every_key_like_a_budget_of_tk():
    module = sea()
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16)
    huge, full = module(q, k, v, k_budget=2 ** 62), module(q, k, v, k_budget=20)
    assert torch.equal(huge.context, full.context) and torch.equal(huge.nnz, full.nnz)


def test_positions_of_padding_keys_are_never_read():
    module = sea()
    q, k, v = make_qkv(1, 4, 2, 12, 12, 16)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, :3] = False
    positions = torch.arange(12).unsqueeze(0) - 3
    expected = module(q, k, v, attention_mask=mask, positions=positions.clamp_min(0)).context
    positions[:, :3] = torch.tensor([-7, 10 ** 6, -1])  # anything: these keys are padding
    torch.testing.assert_close(module(q, k, v, attention_mask=mask, positions=positions).context, expected)


NAN_LAYERS = [dict(), dict(grouping="query_head"), dict(grouping="block", query_block=8), dict(output_mode="norm"),
              dict(attention_path="reference")]


@pytest.mark.parametrize("layer", NAN_LAYERS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_causality_canary_under_non_finite_inputs(layer, which):
    """A NaN/inf at position j changes no row before j; the rows that see it are NaN."""
    module = sea(heads=4, kv_heads=2, k=3, **layer)
    generator = torch.Generator().manual_seed(7)
    t = 40
    q, k, v = make_qkv(2, 4, 2, t, t, 16)
    base = module(q, k, v).context
    for _ in range(4):
        j = int(torch.randint(1, t, (1,), generator=generator))
        inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        inputs[which][0, int(torch.randint(0, inputs[which].shape[1], (1,), generator=generator)), j, 3] = \
            float("nan") if j % 2 else float("inf")
        out = module(inputs["q"], inputs["k"], inputs["v"]).context
        torch.testing.assert_close(out[:, :, :j], base[:, :, :j], atol=0, rtol=0)
        torch.testing.assert_close(out[1], base[1], atol=0, rtol=0)  # the other sample
        if which != "q":  # a bad key or value reaches every later row; a bad query only its own
            assert bool(out[0, :, j:].isnan().all())
        else:
            assert bool(out[0, :, j].isnan().all())


@pytest.mark.parametrize("causal, layer", [(True, dict()), (True, dict(grouping="block", query_block=8)),
                                           (False, dict()), (False, dict(grouping="head")),
                                           (True, dict(attention_path="reference"))])
def test_non_finite_padding_is_never_read(causal, layer):
    module = sea(causal=causal, k=3, **layer)
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16)
    mask = padding_mask(2, 30, 7, left=causal)
    clean = module(q, k, v, attention_mask=mask).context
    for x, fill in ((q, float("nan")), (k, float("inf")), (v, float("nan"))):
        x[~mask[:, None, :, None].expand_as(x)] = fill
    dirty = module(q, k, v, attention_mask=mask).context
    assert not dirty.isnan().any()
    torch.testing.assert_close(dirty, clean, atol=1e-6, rtol=1e-6)


def test_decoding_with_a_nan_key_equals_the_full_forward():
    module = sea(k=3).eval()
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16)
    k[0, 1, 12, 0] = float("nan")
    full = module(q, k, v).context
    state, parts = DecodeState(), []
    for start, end in ((0, 10), (10, 15), (15, 20)):
        parts.append(module(q[:, :, start:end], k[:, :, :end], v[:, :, :end], state=state).context)
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert bool(full[:, :, 12:].isnan().all()) and not full[:, :, :12].isnan().any()


@pytest.mark.parametrize("grouping", ["query", "query_head", "head"])  # block: cut at absolute positions
@pytest.mark.parametrize("left", [True, False])
def test_bidirectional_output_ignores_any_amount_of_padding(grouping, left):
    module = sea(causal=False, k=3, grouping=grouping, query_block=8)
    q, k, v = make_qkv(1, 4, 2, 21, 21, 16)
    plain = module(q, k, v).context
    for pad in range(6):
        noise = [torch.randn(1, x.shape[1], pad, 16) for x in (q, k, v)]
        padded = [torch.cat([n, x] if left else [x, n], 2) for n, x in zip(noise, (q, k, v))]
        mask = torch.ones(1, 21 + pad, dtype=torch.bool)
        if left:
            mask[:, :pad] = False
        else:
            mask[:, 21:] = False
        rows = slice(pad, None) if left else slice(0, 21)
        torch.testing.assert_close(module(*padded, attention_mask=mask).context[:, :, rows], plain,
                                   atol=1e-5, rtol=1e-5, msg=f"pad={pad}")
