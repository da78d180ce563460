"""Trained baselines (indexer, performer, cosformer): each against its readable dense reference, the
causality canary, the indexer's chunked training loss, save / load, and distillation on a tiny Llama."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_qkv, padding_mask
from sea_attention.tools.baselines import CompareConfig, CompareRow, format_compare_table, query_chunks
from sea_attention.tools.baselines.compare import method_attention, method_runs
from sea_attention.tools.baselines.cosformer import CosformerAttention, CosformerConfig, cosformer_reference
from sea_attention.tools.baselines.indexer import IndexerConfig, LightningIndexer, distil_layer, indexer_reference
from sea_attention.tools.baselines.linear import kernel_attention_reference
from sea_attention.tools.baselines.performer import PerformerAttention, PerformerConfig
from sea_attention.tools.baselines.saving import CONFIG_NAME, WEIGHTS_NAME, load_baseline, save_baseline
from sea_attention.tools.baselines.trained import attach_baseline, baseline_layers
from sea_attention.app.cli import main
from sea_attention.tools.distill import DistillConfig, Distiller, TokenWindows
from sea_attention.tools.distill.losses import hidden_mse, logit_kl
from sea_attention.hf import LayerCall, dense_attention, no_cache, patch
from sea_attention.core.ops.reference import exact_attention

HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = DIM ** -0.5


def tiny_indexer(**config) -> LightningIndexer:
    torch.manual_seed(1)
    return LightningIndexer(HEADS, KV_HEADS, DIM, IndexerConfig(**{"heads": 3, "head_dim": 5, **config}))


def chunk_of(q, k, v, key_valid, causal):
    (chunk,) = query_chunks(q, k, v, key_valid, SCALE, causal, size=q.shape[2])
    return chunk


def layer_call(q, k, v, key_valid, causal=True):
    return LayerCall(module=None, sea=None, layer_idx=0, query=q, key=k, value=v, key_valid=key_valid,
                     scaling=SCALE, causal=causal, output_attentions=False)


# ------------------------------------------------------------------------------------------ indexer
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq", [30, 7])  # a whole prefix, and the last rows only (as in decoding)
@pytest.mark.parametrize("k", [1, 6, 64])
def test_indexer_selection_matches_reference(causal, tq, k):
    q, key, v = make_qkv(2, HEADS, KV_HEADS, tq, 30, DIM)
    key_valid = padding_mask(2, 30, 4)
    indexer, chunk = tiny_indexer(), chunk_of(q, key, v, key_valid, causal)
    selected = indexer.select(chunk, k) & chunk.query_valid[:, None, :, None]
    assert torch.equal(selected, indexer_reference(indexer, q, key, key_valid, causal, k))
    expected_counts = chunk.lengths.clamp_max(k) * chunk.query_valid  # exactly min(L, k) keys, every head
    assert torch.equal(selected.sum(-1), expected_counts[:, None, :].expand(-1, HEADS, -1))


def test_indexer_ties_go_to_the_earlier_keys():
    q, key, v = make_qkv(1, HEADS, KV_HEADS, 20, 20, DIM)
    key_valid = torch.ones(1, 20, dtype=torch.bool)
    indexer = tiny_indexer()
    with torch.no_grad():
        indexer.query.weight.zero_()  # every score 0: all keys tie
    chunk = chunk_of(q, key, v, key_valid, True)
    selected = indexer.select(chunk, 5)
    first = torch.zeros(20, 20, dtype=torch.bool)
    for i in range(20):
        first[i, : min(i + 1, 5)] = True
    assert torch.equal(selected[0, 0], first) and torch.equal(selected, indexer_reference(indexer, q, key,
                                                                                            key_valid, True, 5))


def test_indexer_loss_is_the_dense_kl_and_chunking_changes_nothing():
    q, key, v = make_qkv(2, HEADS, KV_HEADS, 24, 24, DIM)
    key_valid = padding_mask(2, 24, 3)
    call = layer_call(q, key, v, key_valid)
    results = []
    for chunk_size in (5, 1000):
        indexer = tiny_indexer(chunk_size=chunk_size)
        context, kl = distil_layer(indexer, call, loss_scale=0.5)
        results.append((context, kl, [p.grad.clone() for p in indexer.parameters()]))
    (context, kl, grads), (whole_context, whole_kl, whole_grads) = results
    assert kl == pytest.approx(whole_kl, rel=1e-5)
    for grad, whole in zip(grads, whole_grads):
        torch.testing.assert_close(grad, whole, rtol=1e-4, atol=1e-6)

    # the dense formula: KL(mean over heads of the teacher || softmax of I over the allowed keys), mean over rows
    teacher_context, probs = exact_attention(q, key, v, key_valid, SCALE, True)
    torch.testing.assert_close(context, teacher_context)
    indexer = tiny_indexer()
    with torch.no_grad():
        scores = indexer.scores(q, key)  # (B, T, T)
    allowed = torch.ones(24, 24, dtype=torch.bool).tril() & key_valid[:, None, :]
    log_p = torch.log_softmax(scores.masked_fill(~allowed, -1e30), -1)
    target = probs.mean(1)
    row_kl = torch.where(target > 0, target * (target.log() - log_p), torch.zeros(())).sum(-1)
    assert whole_kl == pytest.approx(float(row_kl[key_valid].mean()), rel=1e-5)
    assert whole_kl > 0


# ------------------------------------------------------------------------------------------ linear attentions
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq", [33, 5])
def test_performer_matches_the_dense_kernel_formula(causal, tq):
    q, key, v = make_qkv(2, HEADS, KV_HEADS, tq, 33, DIM)
    key_valid = padding_mask(2, 33, 6)
    performer = PerformerAttention(DIM, causal, PerformerConfig(feature_factor=1), layer_idx=3)
    out = performer(q, key, v, key_valid, SCALE)
    phi_q, phi_k = performer.feature_maps(q, key, SCALE)
    expected = kernel_attention_reference(phi_q, phi_k, v, key_valid, causal)
    valid = key_valid[:, None, key.shape[2] - tq:, None]  # padding rows' outputs are never used
    torch.testing.assert_close((out * valid).double(), expected * valid, rtol=1e-4, atol=1e-5)
    assert performer.features.kind == ("relu" if causal else "favor")
    assert performer.features.num_features == int(DIM * math.log(DIM))


def test_performer_approaches_softmax_with_many_features():
    """FAVOR+ is an unbiased softmax-kernel estimate: many features land near the exact attention."""
    q, key, v = make_qkv(1, HEADS, KV_HEADS, 16, 16, DIM)
    q, key = q * 0.3, key * 0.3  # small logits: a low-variance estimate
    key_valid = torch.ones(1, 16, dtype=torch.bool)
    exact, _ = exact_attention(q, key, v, key_valid, SCALE, causal=False)
    few = PerformerAttention(DIM, False, PerformerConfig(feature_factor=8), 0)(q, key, v, key_valid, SCALE)
    performer = PerformerAttention(DIM, False, PerformerConfig(), 0)
    performer.features = type(performer.features)(DIM, 4096, "favor", seed=0)
    many = performer(q, key, v, key_valid, SCALE)
    assert (many - exact).abs().mean() < 0.5 * (few - exact).abs().mean()
    torch.testing.assert_close(many, exact, atol=0.05, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq", [33, 5])
def test_cosformer_matches_its_formula(causal, tq):
    q, key, v = make_qkv(2, HEADS, KV_HEADS, tq, 33, DIM)
    key_valid = padding_mask(2, 33, 6)
    out = CosformerAttention(causal, CosformerConfig(horizon=40))(q, key, v, key_valid, SCALE)
    expected = cosformer_reference(q, key, v, key_valid, causal, horizon=40)
    valid = key_valid[:, None, key.shape[2] - tq:, None]
    torch.testing.assert_close((out * valid).double(), expected * valid, rtol=1e-4, atol=1e-5)


def test_cosformer_is_padding_invariant_and_refuses_positions_past_its_horizon():
    q, key, v = make_qkv(1, HEADS, KV_HEADS, 20, 20, DIM)
    layer = CosformerAttention(True, CosformerConfig(horizon=20))
    plain = layer(q, key, v, torch.ones(1, 20, dtype=torch.bool), SCALE)
    pad = torch.zeros(1, HEADS, 3, DIM)
    padded_valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)], 1)
    padded = layer(torch.cat([pad, q], 2), torch.cat([pad[:, :KV_HEADS], key], 2), torch.cat([pad[:, :KV_HEADS], v], 2),
                   padded_valid, SCALE)
    torch.testing.assert_close(padded[:, :, 3:], plain)  # ranks, not positions: 3 pads move nothing
    with pytest.raises(ValueError, match="horizon=19 positions, got an input with 20 tokens"):
        CosformerAttention(True, CosformerConfig(horizon=19))(q, key, v, torch.ones(1, 20, dtype=torch.bool), SCALE)


def test_configs_name_their_accepted_values():
    with pytest.raises(ValueError, match="indexer heads must be a positive integer"):
        IndexerConfig(heads=0)
    with pytest.raises(ValueError, match="feature_factor must be a positive integer"):
        PerformerConfig(feature_factor=0)
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        CosformerConfig(horizon=True)
    with pytest.raises(ValueError, match="leaves no random features"):
        PerformerAttention(2, True, PerformerConfig(feature_factor=5), 0)


# ------------------------------------------------------------------------------------------ on a model
CONFIGS = {"indexer": IndexerConfig(heads=2, head_dim=8), "performer": PerformerConfig(),
           "cosformer": CosformerConfig(horizon=64)}


def tiny_model(method=None, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=128)
    model = patch(LlamaForCausalLM(config).eval(), k=4, estimate_width=8)
    if method is not None:
        attach_baseline(model, method, CONFIGS[method])
    return model


@pytest.mark.parametrize("method", list(CONFIGS))
def test_causality_canary(method):
    """Changing a later token changes no earlier output."""
    model, t = tiny_model(method), 37
    ids = torch.randint(0, 50, (1, 60))
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 50
    with torch.no_grad(), method_attention(model, method, 16):
        before = model(input_ids=ids, **no_cache(model)).logits
        after = model(input_ids=changed, **no_cache(model)).logits
    torch.testing.assert_close(after[:, :t], before[:, :t])
    assert not torch.allclose(after[:, t:], before[:, t:])


def test_a_method_runs_only_on_a_model_that_carries_it():
    model = tiny_model("indexer")
    with pytest.raises(ValueError, match="distilled with `sea distill --method performer`; this model carries indexer"):
        with method_attention(model, "performer", None):
            pass
    with pytest.raises(ValueError, match="carries a trained indexer, not a distilled SEA"):
        with method_attention(model, "sea", 8):
            pass
    with pytest.raises(ValueError, match="carries no trained baseline"):
        with method_attention(tiny_model(), "indexer", 8):
            pass
    with pytest.raises(ValueError, match="already carries a trained baseline"):
        attach_baseline(model, "cosformer")
    with pytest.raises(ValueError, match="must be one of indexer,performer,cosformer"):
        attach_baseline(tiny_model(), "reformer")


def test_linear_methods_take_no_budget_and_report_no_selection():
    assert method_runs(("indexer", "performer", "quest"), (16, 32)) == [
        ("dense", None), ("indexer", 16), ("indexer", 32), ("performer", None), ("quest", 16), ("quest", 32)]
    assert CompareConfig(("cosformer",), (8,)).runs() == [("dense", None), ("cosformer", None)]
    table = format_compare_table([CompareRow("performer", None, 30.0, 1.5, None, None, 100, [], [])])
    assert table.splitlines()[1].split() == ["performer", "-", "30.00", "1.500", "-", "-", "100"]


def _perturb(model):
    """Change the base weights and the baseline's parameters, so that loading them matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_and_load_round_trip(tmp_path, method):
    model = tiny_model(method)
    _perturb(model)
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad(), method_attention(model, method, 8):
        expected = model(input_ids=ids, **no_cache(model)).logits
    path = save_baseline(model, tmp_path / method, include_base_weights=True)
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["method"] == method and meta["method_config"] == CONFIGS[method].__dict__
    saved = load_file(str(path / WEIGHTS_NAME))
    assert set(saved) == {n for n in model.state_dict() if ".sea_baseline." in n}
    assert not (path / "sea_config.json").exists()
    loaded, _ = load_baseline(path)
    assert baseline_layers(loaded).name == method and not loaded.training
    with torch.no_grad(), method_attention(loaded, method, 8):
        torch.testing.assert_close(loaded(input_ids=ids, **no_cache(loaded)).logits, expected, atol=0, rtol=0)


def _flip_a_byte(path, name=WEIGHTS_NAME):
    file = path / name
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


def _edit_meta(path, **changes):
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (_flip_a_byte, r"baseline_weights\.safetensors does not match the sha256 recorded in baseline_config\.json"),
    (lambda p: (p / WEIGHTS_NAME).unlink(), r"baseline_weights\.safetensors is missing"),
    (lambda p: _flip_a_byte(p, "model.safetensors"),
     r"model\.safetensors does not match the sha256 recorded in baseline_config\.json"),
    (lambda p: (p / CONFIG_NAME).write_text("{"), r"baseline_config\.json is not valid JSON"),
    (lambda p: _edit_meta(p, method="reformer"), r"baseline_config\.json: method 'reformer' .* cannot be built"),
    (lambda p: _edit_meta(p, method_config={"heads": 2, "head_dim": 8, "colour": 1}), r"cannot be built"),
    (lambda p: _edit_meta(p, method_config={"heads": 3, "head_dim": 8}, sha256=None),
     r"does not match the indexer that baseline_config\.json builds"),
])
def test_a_damaged_save_gives_an_error_naming_the_file(tmp_path, damage, message):
    path = save_baseline(tiny_model("indexer"), tmp_path / "indexer", include_base_weights=True)
    damage(path)
    with pytest.raises(ValueError, match=message):
        load_baseline(path)


def windows():
    base = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(0))
    return TokenWindows(base.repeat(20), seq_len=32, seed=0)


def test_indexer_distillation_learns_and_trains_only_the_indexer():
    model = tiny_model("indexer")
    before = {n: p.clone() for n, p in model.named_parameters()}
    config = DistillConfig(stage="estimator", steps=30, seq_len=32, lr=1e-2, warmup_steps=2, checkpoint_every=0)
    history = Distiller(model, windows(), config, method=baseline_layers(model)).run(progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".sea_baseline." in n for n in changed)
    first, last = (sum(r.estimate_kl for r in h) / 3 for h in (history[:3], history[-3:]))
    assert last < 0.8 * first, (first, last)
    assert all(math.isnan(r.context_mse) for r in history)  # the indexer has no context term


@pytest.mark.parametrize("method", ["performer", "cosformer"])
def test_full_distillation_trains_the_model_through_the_linear_attention(method):
    model = tiny_model(method)
    sea_before = {n: p.clone() for n, p in model.named_parameters() if ".sea." in n}
    query_before = model.model.layers[0].self_attn.q_proj.weight.clone()  # its gradient comes only through attention
    one = TokenWindows(torch.randint(0, 50, (32,), generator=torch.Generator().manual_seed(0)), seq_len=32)
    ids = one.batch(0, 1)
    with torch.no_grad():  # the first step's terms: the method's model against the dense one, same weights
        with dense_attention(model, "sdpa"):
            teacher = model(input_ids=ids, output_hidden_states=True, **no_cache(model))
        with method_attention(model, method, None):
            student = model(input_ids=ids, output_hidden_states=True, **no_cache(model))
    mask = torch.ones_like(ids, dtype=torch.bool)
    config = DistillConfig(stage="full", steps=15, seq_len=32, base_lr=1e-3, warmup_steps=0, checkpoint_every=0)
    history = Distiller(model, one, config, method=baseline_layers(model)).run(progress=False)
    assert history[0].extra["hidden_mse"] == pytest.approx(
        float(hidden_mse(student.hidden_states, teacher.hidden_states, mask, relative=True)), rel=1e-4)
    assert history[0].extra["logit_kl"] == pytest.approx(float(logit_kl(student.logits, teacher.logits, mask)),
                                                         rel=1e-3)
    assert history[-1].loss < 0.9 * history[0].loss  # the same batch every step
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, query_before)
    assert all(torch.equal(p, sea_before[n]) for n, p in model.named_parameters() if ".sea." in n)
    assert all(math.isnan(r.estimate_kl) for r in history)


def test_distiller_refuses_a_stage_a_method_does_not_have_and_a_foreign_checkpoint(tmp_path):
    model = tiny_model("performer")
    with pytest.raises(ValueError, match="performer is distilled with stage full, not 'estimator'"):
        Distiller(model, windows(), DistillConfig(stage="estimator"), method=baseline_layers(model))
    indexer = tiny_model("indexer")
    config = DistillConfig(steps=2, seq_len=32, checkpoint_every=1)
    Distiller(indexer, windows(), config, tmp_path, method=baseline_layers(indexer)).run(progress=False)
    with pytest.raises(ValueError, match="the checkpoint trains indexer, this run sea"):
        Distiller(tiny_model(), windows(), config, tmp_path).resume()


# ------------------------------------------------------------------------------------------ the commands
def test_distil_compare_and_eval_each_trained_baseline(tiny_model_dir, tmp_path, capsys):
    """`sea distill --method M` then `sea compare` / `sea eval` on the result, on a tiny Llama."""
    model, text = str(tiny_model_dir / "model"), str(tiny_model_dir / "text.txt")
    common = ["--data", text, "--steps", "2", "--seq-len", "64", "--quiet", "--checkpoint-every", "0"]
    for method in ("indexer", "performer", "cosformer"):
        out = tmp_path / method
        assert main(["distill", "--model", model, "--method", method, "--out", str(out), *common]) == 0
        assert f"{method}, stage {'estimator' if method == 'indexer' else 'full'}: 2 steps" in capsys.readouterr().out
        meta = json.loads((out / CONFIG_NAME).read_text())
        assert meta["include_base_weights"] == (method != "indexer") and meta["include_tokenizer"]
        report = tmp_path / f"{method}.json"
        assert main(["compare", "--model", str(out), "--data", text, "--split", "all", "--k", "16,32",
                     "--seq-len", "64", "--max-tokens", "256", "--json", str(report), "--quiet"]) == 0
        rows = json.loads(report.read_text())["points"]
        if method == "indexer":
            assert [(r["method"], r["k"]) for r in rows] == [("dense", None), ("indexer", 16), ("indexer", 32)]
            expected = {k: sum(min(i, k) for i in range(1, 65)) / 64 for k in (16, 32)}  # exactly min(L, k) keys
            assert all(r["keys_per_query"] == pytest.approx(expected[r["k"]]) for r in rows[1:])
            assert all(0 < r["coverage"] < 1 for r in rows[1:])
        else:
            assert [(r["method"], r["k"], r["keys_per_query"], r["coverage"]) for r in rows[1:]] == [
                (method, None, None, None)]
        assert all(r["tokens"] == rows[0]["tokens"] and math.isfinite(r["perplexity"]) for r in rows)
    assert main(["eval", "--model", str(tmp_path / "indexer"), "--data", text, "--split", "all", "--k", "16",
                 "--seq-len", "64", "--max-tokens", "256", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "indexer" in printed and "oracle" in printed
    for method, k in (("indexer", 16), ("performer", None)):  # passkey decodes through the method's override
        report = tmp_path / f"passkey_{method}.json"
        assert main(["compare", "--model", str(tmp_path / method), "--task", "passkey", "--k", "16", "--lengths", "64",
                     "--prompts", "2", "--max-new-tokens", "2", "--json", str(report), "--quiet"]) == 0
        rows = json.loads(report.read_text())["points"]
        assert [(r["method"], r["k"], r["prompts"]) for r in rows] == [("dense", None, 2), (method, k, 2)]


@pytest.mark.parametrize("argv, message", [
    (["distill", "--method", "performer", "--stage", "estimator"], "--method performer is distilled with --stage full"),
    (["distill", "--method", "indexer", "--stage", "full"], "--method indexer is distilled with --stage estimator"),
    (["distill", "--method", "performer", "--indexer-heads", "2"], "--indexer-heads applies to --method indexer"),
    (["distill", "--indexer-dim", "8"], "--indexer-dim applies to --method indexer, not sea"),
    (["distill", "--method", "indexer", "--k", "8"], r"\['k'\] shape SEA; --method indexer does not use them"),
])
def test_distill_refuses_combinations_that_do_not_apply(tiny_model_dir, tmp_path, capsys, argv, message):
    assert main([*argv, "--model", str(tiny_model_dir / "model"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_baseline_save_is_refused_where_a_sea_model_is_needed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "indexer"
    model = tiny_model("indexer")
    save_baseline(model, out, include_base_weights=True)
    for argv in (["generate", "--model", str(out), "--prompt", "hi"],
                 ["distill", "--model", str(out), "--out", str(tmp_path / "again")],
                 ["distill", "--model", str(out), "--method", "indexer", "--out", str(tmp_path / "again")]):
        assert main(argv) == 2
        assert re.search("trained baseline|distilled from a base model", capsys.readouterr().err), argv
    assert main(["compare", "--model", str(out), "--methods", "performer", "--data", str(tiny_model_dir / "text.txt"),
                 "--split", "all", "--seq-len", "32", "--max-tokens", "64", "--quiet"]) == 2
    assert "this model carries indexer" in capsys.readouterr().err
