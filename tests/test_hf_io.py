"""sea_attention.hf.io: save_pretrained / from_pretrained round trips and crash safety."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import sea_attention.hf.io as hf_io
from sea_attention import __version__
from sea_attention.hf import (dense_attention, from_pretrained, patch, save_pretrained, sea_budget, sea_layers,
                              set_budget, set_runtime)
from test_hf_patch import VOCAB, batch, output, tiny_model


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def trained(name: str, **overrides):
    """A patched tiny model whose SEA weights differ from a fresh patch (so loading matters)."""
    model = patch(tiny_model(name), k=3, estimate_width=8, **overrides)
    with torch.no_grad():
        for _, _, sea in sea_layers(model):
            for p in sea.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert-cls"])
@torch.no_grad()
def test_round_trip_with_base_weights(tmp_path, name):
    model = trained(name)
    inputs = batch(name)
    expected = output(model, inputs)
    path = save_pretrained(model, tmp_path / "sea", include_base_weights=True)
    meta = json.loads((path / "sea_config.json").read_text())
    assert meta["include_base_weights"] and meta["architecture"] == type(model).__name__
    assert meta["sea_attention_version"] == __version__ and meta["torch_dtype"] == "float32"
    assert meta["sea_config"]["k"] == 3 and meta["family"] == ("bert" if name == "bert-cls" else name)
    weights = load_file(str(path / "sea_weights.safetensors"))
    assert set(weights) == {k for k in model.state_dict() if ".sea." in k}
    assert any(k.endswith("features.projection") for k in weights)  # buffers too

    loaded, tokenizer = from_pretrained(path)
    assert tokenizer is None and not loaded.training
    assert loaded.config._attn_implementation == "sea"
    torch.testing.assert_close(output(loaded, inputs)[0], expected[0], atol=0, rtol=0)
    with sea_budget(loaded, 5), sea_budget(model, 5):  # same weights at any budget
        torch.testing.assert_close(output(loaded, inputs)[0], output(model, inputs)[0], atol=0, rtol=0)


@torch.no_grad()
def test_saved_base_loads_as_a_plain_dense_model(tmp_path):
    model = trained("llama")
    inputs = batch("llama")
    path = save_pretrained(model, tmp_path / "sea", include_base_weights=True)
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not any(".sea." in k for k in dense.state_dict())
    with dense_attention(model, "sdpa"):
        expected = output(model, inputs)
    torch.testing.assert_close(output(dense, inputs)[0], expected[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_round_trip_from_a_base_directory_with_tokenizer(tmp_path):
    """Without base weights the base is loaded by name (here a local directory) and the tokenizer kept."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    word_tokenizer().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    patch(model, k=3, estimate_width=8)
    with torch.no_grad():
        for _, _, sea in sea_layers(model):
            sea.estimator.key_scale.mul_(2)
            sea.estimator.decoder.norm_out.weight.add_(0.5)  # the CNN starts at zero: make it count
    inputs = batch("llama")
    expected = output(model, inputs)
    path = save_pretrained(model, tmp_path / "sea", tokenizer=word_tokenizer())
    assert json.loads((path / "sea_config.json").read_text())["base_model"] == str(base_dir)
    assert not (path / "config.json").exists()
    loaded, tokenizer = from_pretrained(path, dtype=torch.float32)
    torch.testing.assert_close(output(loaded, inputs)[0], expected[0], atol=0, rtol=0)
    assert tokenizer("w5 w7")["input_ids"] == [5, 7]


def test_dtype_argument(tmp_path):
    path = save_pretrained(trained("opt"), tmp_path / "sea", include_base_weights=True)
    loaded, _ = from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@torch.no_grad()
def test_a_crashed_save_keeps_the_previous_directory(tmp_path, monkeypatch):
    first = trained("llama")
    inputs = batch("llama")
    expected = output(first, inputs)
    path = save_pretrained(first, tmp_path / "sea", include_base_weights=True)

    def crash(tensors, filename, metadata=None):
        save_file(dict(list(tensors.items())[:2]), filename, metadata=metadata)  # half written...
        raise KeyboardInterrupt  # ...then killed

    monkeypatch.setattr(hf_io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(trained("llama", seed=1), path, include_base_weights=True)  # seed: other SEA features
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sea"]  # no temp dirs left behind
    loaded, _ = from_pretrained(path)
    torch.testing.assert_close(output(loaded, inputs)[0], expected[0], atol=0, rtol=0)

    monkeypatch.undo()  # a later successful save replaces it
    second = trained("llama", seed=1)
    save_pretrained(second, path, include_base_weights=True)
    loaded, _ = from_pretrained(path)
    torch.testing.assert_close(output(loaded, inputs)[0], output(second, inputs)[0], atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sea"]


def test_save_and_load_errors(tmp_path):
    model = trained("llama")
    with pytest.raises(ValueError, match="base_model"):
        save_pretrained(model, tmp_path / "a")  # a random model has no name to reload it by
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_pretrained(model, other, include_base_weights=True)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="not SEA-patched"):
        save_pretrained(tiny_model("llama"), tmp_path / "b", include_base_weights=True)

    path = save_pretrained(model, tmp_path / "sea", include_base_weights=True)
    weights = load_file(str(path / "sea_weights.safetensors"))
    weights.pop(next(k for k in weights if k.endswith("projection")))
    save_file(weights, str(path / "sea_weights.safetensors"))
    _drop_checksum(path)  # as a save from before checksums: the strict key check still catches it
    with pytest.raises(ValueError, match="missing"):
        from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        from_pretrained(other)


def _drop_checksum(path, keep_legacy=False):
    """As a save from before checksums (or, ``keep_legacy``, from before the base weights had one)."""
    meta = json.loads((path / "sea_config.json").read_text())
    recorded = meta.pop("sha256")
    if keep_legacy:
        meta["weights_sha256"] = recorded["sea_weights.safetensors"]
    (path / "sea_config.json").write_text(json.dumps(meta))


def _edit_meta(path, **changes):
    meta = json.loads((path / "sea_config.json").read_text())
    for name, value in changes.items():
        if isinstance(value, dict):
            meta[name].update(value)
        else:
            meta[name] = value
    (path / "sea_config.json").write_text(json.dumps(meta))


def _flip_a_byte(path, name="sea_weights.safetensors"):
    file = path / name
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(path):
    file = path / "sea_weights.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    _drop_checksum(path)


def _empty_weights(path):
    (path / "sea_weights.safetensors").write_bytes(b"")
    _drop_checksum(path)


CORRUPTIONS = [  # (how the save is damaged, the error it must give)
    (_flip_a_byte, r"sea_weights\.safetensors does not match the sha256"),
    (lambda p: (_drop_checksum(p, keep_legacy=True), _flip_a_byte(p)), r"sea_weights\.safetensors does not match"),
    (lambda p: _flip_a_byte(p, "model.safetensors"),
     r"model\.safetensors does not match the sha256 recorded in sea_config\.json"),
    (lambda p: (p / "model.safetensors").unlink(), r"model\.safetensors is missing: the save is incomplete"),
    (lambda p: _edit_meta(p, sha256="abc"), r"sea_config\.json: sha256 must map file names to hex digests"),
    (_truncate, r"sea_weights\.safetensors is not a readable safetensors file"),
    (_empty_weights, r"sea_weights\.safetensors is not a readable safetensors file"),
    (lambda p: (p / "sea_weights.safetensors").unlink(), r"sea_weights\.safetensors is missing"),
    (lambda p: (p / "sea_config.json").write_text('{"format_version": 1, "base'), r"sea_config\.json is not valid JSON"),
    (lambda p: (p / "sea_config.json").write_text(""), r"sea_config\.json is not valid JSON"),
    (lambda p: (p / "sea_config.json").write_text("[1, 2]"), r"sea_config\.json must hold a JSON object"),
    (lambda p: _edit_meta(p, sea_config="k=3"), r"sea_config must be a JSON object"),
    (lambda p: (p / "sea_config.json").write_text('{"format_version": 1}'), r"sea_config\.json lacks the fields"),
    (lambda p: _edit_meta(p, torch_dtype="float99"), r"torch_dtype 'float99' is not a torch dtype"),
    (lambda p: _edit_meta(p, sea_config={"estimate_width": 16}), r"holds .* of shape .* the SEA config in sea_config"),
    (lambda p: _edit_meta(p, sea_config={"estimate_width": 7}), r"sea_config\.json: its sea_config does not fit"),
]


@pytest.mark.parametrize("damage, message", CORRUPTIONS)
def test_a_damaged_save_gives_an_error_naming_the_file(tmp_path, damage, message):
    path = save_pretrained(trained("llama"), tmp_path / "sea", include_base_weights=True)
    damage(path)
    with pytest.raises(ValueError, match=message):
        from_pretrained(path)


@torch.no_grad()
def test_a_save_without_checksum_still_loads(tmp_path):
    model = trained("llama")
    inputs = batch("llama")
    path = save_pretrained(model, tmp_path / "sea", include_base_weights=True)
    recorded = json.loads((path / "sea_config.json").read_text())["sha256"]
    assert set(recorded) == {"sea_weights.safetensors", "model.safetensors"}  # every weight file
    assert all(len(digest) == 64 for digest in recorded.values())
    for keep_legacy in (True, False):  # as saved before the base weights had a checksum, or before any had one
        save_pretrained(model, path, include_base_weights=True)
        _drop_checksum(path, keep_legacy)
        loaded, _ = from_pretrained(path)
        torch.testing.assert_close(output(loaded, inputs)[0], output(model, inputs)[0], atol=0, rtol=0)


def test_a_missing_base_model_folder_names_sea_config(tmp_path):
    """Without base weights, the base comes from the folder sea_config.json names: gone, the error says so."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    word_tokenizer().save_pretrained(base_dir)
    model = patch(AutoModelForCausalLM.from_pretrained(base_dir).eval(), k=3, estimate_width=8)
    path = save_pretrained(model, tmp_path / "sea")
    for file in base_dir.iterdir():
        file.unlink()
    base_dir.rmdir()
    with pytest.raises(ValueError, match=rf"sea_config\.json: base_model '{re.escape(str(base_dir))}' \(where this "
                                         r"save, .* loads them from\) cannot be loaded: .* is a folder that does not exist"):
        from_pretrained(path)


def test_a_model_directory_without_tokenizer_says_so(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="base has no usable tokenizer"):
        hf_io.load_model(str(tmp_path / "base"))


@torch.no_grad()
def test_runtime_settings_and_budget_survive_a_reload(tmp_path):
    model = trained("llama")
    set_runtime(model, grouping="block", query_block=4)
    set_budget(model, 2)
    inputs = batch("llama")
    expected = output(model, inputs)
    loaded, _ = from_pretrained(save_pretrained(model, tmp_path / "sea", include_base_weights=True))
    sea = sea_layers(loaded)[0][2]
    assert (sea.config.grouping, sea.config.query_block, sea.k_budget) == ("block", 4, 2)
    torch.testing.assert_close(output(loaded, inputs)[0], expected[0], atol=0, rtol=0)
    set_budget(loaded, None)  # the saved k is still the config's
    assert sea.config.k == 3


def test_layers_with_different_settings_are_not_saved_as_one(tmp_path):
    model = trained("llama")
    sea_layers(model)[0][2].k_budget = 5
    with pytest.raises(ValueError, match="different SEA configs or budgets"):
        save_pretrained(model, tmp_path / "sea", include_base_weights=True)
