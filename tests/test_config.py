import json

import numpy as np
import pytest
import torch

from sea_attention import SEAConfig


def test_defaults_and_derived_values():
    cfg = SEAConfig(num_heads=12, head_dim=64)
    assert cfg.num_kv_heads == 12 and cfg.feature_kind == "favor" and cfg.grouping == "query"
    assert cfg.kernel_bins and cfg.key_bins and cfg.position_code == "none"  # binned signals, no length limit
    assert (cfg.sinks, cfg.local_window) == (4, 16)
    assert cfg.estimate_width == 256  # a binned causal estimator; the paper's K elsewhere
    assert cfg.num_features == 33  # floor(64 ln 64 / 8)
    encoder = SEAConfig(num_heads=12, head_dim=64, causal=False)
    assert encoder.position_code == "tent" and (encoder.sinks, encoder.local_window) == (0, 0)
    assert encoder.key_bins and not encoder.kernel_bins and encoder.feature_kind == "favor"  # mean-key bins only
    paper = SEAConfig(num_heads=12, head_dim=64, kernel_bins=False, key_bins=False, sinks=0, local_window=0)
    assert paper.feature_kind == "relu" and paper.position_code == "learned"  # the paper's causal estimator
    assert paper.estimate_width == encoder.estimate_width == 128
    assert SEAConfig(num_heads=12, head_dim=64, estimate_width=64).estimate_width == 64
    for binned in (SEAConfig(num_heads=12, head_dim=64, key_bins=False), SEAConfig(num_heads=12, head_dim=64, kernel_bins=False)):
        assert binned.feature_kind == "favor" and binned.position_code == "none"
    assert SEAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(k=32).k == 32


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=0), "num_heads must be a positive integer"),
    (dict(num_kv_heads=5), "multiple of num_kv_heads"),
    (dict(k=0), "k must be a positive integer"),
    (dict(k=2.5), "k must be a positive integer"),
    (dict(k=np.float64(8)), "k must be a positive integer, got np.float64(8.0) (accepted: int, or an integer type"),
    (dict(k=np.bool_(True)), "k must be a positive integer, got np.True_"),
    (dict(k=np.int64(0)), "k must be a positive integer, got np.int64(0)"),
    (dict(estimate_width=30), "estimate_width must be a multiple of 4"),
    (dict(feature_kind="cos"), "feature_kind must be one of ('favor', 'relu')"),
    (dict(grouping="batch"), "grouping must be one of"),
    (dict(position_code="tent"), "does not apply when causal=True"),
    (dict(position_code="rope"), "position_code must be one of"),
    (dict(grouping="sample"), "not allowed when causal=True"),
    (dict(output_mode="add"), "output_mode must be one of ('mix', 'norm')"),
    (dict(attention_path="flash"), "attention_path must be one of ('sparse', 'reference', 'flex')"),
    (dict(query_block=0), "query_block must be a positive integer"),
    (dict(feature_factor=10_000), "leaves no random features"),
    (dict(feature_redraw_interval=-1), "feature_redraw_interval must be a non-negative integer"),
    (dict(causal="yes"), "causal must be True or False"),
    (dict(key_bins=1), "key_bins must be True or False"),
    (dict(sinks=-1), "sinks must be a non-negative integer"),
    (dict(local_window=2.5), "local_window must be a non-negative integer"),
    (dict(causal=False, local_window=8), "apply to causal layers only"),
    (dict(bin_sums_dtype="float16"), "bin_sums_dtype must be one of ('float64', 'float32')"),
    (dict(bin_sums_dtype="float32", kernel_bins=False, key_bins=False), "it needs kernel_bins=True or key_bins=True"),
])
def test_bad_values_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SEAConfig(**{"num_heads": 12, "head_dim": 64, **changes})


def test_integer_like_numbers_are_accepted_as_ints():
    """numpy and 0-d torch integers (e.g. from a hyperparameter grid) count as integers and are stored
    as Python ints, so the config still serialises to JSON."""
    config = SEAConfig(num_heads=np.int32(12), head_dim=64, k=np.int64(8), sinks=np.uint8(2),
                       query_block=torch.tensor(16))
    assert (config.k, config.num_heads, config.sinks, config.query_block) == (8, 12, 2, 16)
    assert all(type(v) is int for v in (config.k, config.num_heads, config.sinks, config.query_block))
    assert json.loads(json.dumps(config.to_dict()))["k"] == 8


def test_bidirectional_groupings_and_width():
    SEAConfig(num_heads=4, head_dim=16, causal=False, grouping="sample", estimate_width=6)
    with pytest.raises(ValueError, match="unknown SEAConfig fields"):
        SEAConfig(num_heads=4, head_dim=16).replace(kk=3)


def test_a_config_saved_before_kernel_bins_loads_as_it_was():
    saved = SEAConfig(num_heads=4, head_dim=16).to_dict()
    for name in ("kernel_bins", "key_bins", "sinks", "local_window", "position_code"):
        del saved[name]  # what a save from before these fields holds
    saved["feature_kind"] = "relu"
    restored = SEAConfig.from_dict(saved)
    assert not restored.binned and restored.position_code == "learned"
    assert (restored.sinks, restored.local_window) == (0, 0)


def test_a_bidirectional_config_saved_before_its_key_bins_default_loads_as_it_was():
    """Bidirectional saves made when key_bins defaulted to off (written resolved, or older ones without
    the field) keep the paper's estimator; a fresh bidirectional config gets the mean-key bins."""
    fresh = SEAConfig(num_heads=4, head_dim=16, causal=False)
    saved = fresh.replace(key_bins=False).to_dict()
    assert not SEAConfig.from_dict(saved).binned
    del saved["key_bins"], saved["kernel_bins"]
    assert not SEAConfig.from_dict(saved).binned
    assert SEAConfig.from_dict(fresh.to_dict()) == fresh and fresh.binned


def test_a_config_saved_before_gate_form_keeps_the_sigmoid_gates():
    """Fresh configs: identity gates when bidirectional, the paper's sigmoid ones when causal; saves
    without the field (all made with sigmoid gates) keep them."""
    assert SEAConfig(num_heads=4, head_dim=16, causal=False).gate_form == "identity"
    assert SEAConfig(num_heads=4, head_dim=16).gate_form == "sigmoid"
    for causal in (True, False):
        saved = SEAConfig(num_heads=4, head_dim=16, causal=causal, gate_form="sigmoid").to_dict()
        del saved["gate_form"]
        assert SEAConfig.from_dict(saved).gate_form == "sigmoid"
    with pytest.raises(ValueError, match="gate_form must be one of"):
        SEAConfig(num_heads=4, head_dim=16, gate_form="tanh")
