"""PlasticConfig: defaults, validation naming the field, serialisation."""
import dataclasses
import json

import pytest

from cl_arch import PlasticConfig


def test_defaults_alternate_fast_then_attn():
    cfg = PlasticConfig()
    assert cfg.layer_types == ["fast", "attn", "fast", "attn"]
    assert PlasticConfig(n_layers=3).layer_types == ["fast", "attn", "fast"]
    assert cfg.mlp_hidden % 32 == 0 and cfg.mlp_hidden >= int(4.0 * 128 * 2 / 3)


def test_dict_and_json_round_trip():
    cfg = PlasticConfig(d_model=64, n_layers=2, layer_types=["fast", "fast"], lam=None,
                        attn_window=8, rule="hebb")
    assert PlasticConfig.from_dict(cfg.to_dict()) == cfg
    assert PlasticConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert PlasticConfig.from_json(cfg.to_json()) == cfg


def test_from_dict_rejects_unknown_keys_by_name():
    d = PlasticConfig().to_dict()
    d["n_hedas"] = 4
    with pytest.raises(ValueError, match="n_hedas"):
        PlasticConfig.from_dict(d)


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0),
    ("d_model", -8),
    ("n_layers", 2.5),
    ("n_heads", True),
    ("layer_types", ["fast", "mamba", "attn", "attn"]),
    ("layer_types", ["fast"]),
    ("n_attn_heads", 3),  # does not divide d_model=128
    ("attn_window", 0),
    ("conv_size", -1),
    ("conv_size", 1),
    ("rule", "oja"),
    ("lam", 1.5),
    ("gamma", 0.0),
    ("dropout", 1.0),
    ("norm_eps", float("nan")),
    ("commit_clip", 0.0),
    ("baseline_rho", -0.1),
    ("use_gate", "yes"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PlasticConfig(**{field: value})


def test_named_presets():
    """``PlasticConfig.from_name``: the shipped model's architecture is the "demo" preset (its saved
    config differs only in fields added after it was saved, which keep their defaults), overrides
    apply on top, and an unknown name lists the known ones."""
    import os

    import cl_arch
    from cl_arch.train.recall import recall_config

    saved = json.load(open(os.path.join(os.path.dirname(cl_arch.__file__), "assets", "default_model",
                                        "config.json")))["config"]
    shipped = PlasticConfig.from_dict(saved)
    # the verdict memory was added to the pretrained model afterwards (issue 25), untrained, then the episodic
    # memory switched to chunked error writes before training through adaptation (issue 24)
    assert [m.kind for m in shipped.memories] == ["readout", "episodic", "verdict"]
    ep = shipped.memories[1]
    assert (ep.write, ep.write_chunk) == ("error", 64)
    shipped = dataclasses.replace(shipped, memories=[shipped.memories[0],
                                                     dataclasses.replace(ep, write="delta", write_chunk=1)])
    assert shipped == PlasticConfig.from_name("demo")
    assert PlasticConfig.from_name("demo", attn_window=None).attn_window is None
    assert recall_config(d_model=32) == PlasticConfig.from_name("recall", d_model=32)
    with pytest.raises(ValueError, match="known: \\['demo', 'recall'\\]"):
        PlasticConfig.from_name("huge")
    with pytest.raises(ValueError, match="n_heads"):
        PlasticConfig.from_name("demo", n_heads=0)


def test_a_fast_layer_config_alone():
    """A retrofit builds one fast-weight layer from a FastLayerConfig with no model config; a model's
    layers use the FastLayerConfig of its config, so both give the same layer."""
    import torch

    from cl_arch import FastLayerConfig, PlasticTransformer
    from cl_arch.memory import FastWeightLayer
    from cl_arch.state import StepContext

    cfg = PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, n_attn_heads=2, eta_s=0.3)
    fast = cfg.fast_layer()
    assert isinstance(fast, FastLayerConfig) and fast.d_model == 32 and fast.eta_s == 0.3
    torch.manual_seed(0)
    model = PlasticTransformer(cfg)
    alone = FastWeightLayer(FastLayerConfig(**fast.to_dict()))
    alone.load_state_dict(model.blocks[0].mixer.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        y1, s1 = model.blocks[0].mixer(x, None, StepContext())
        y2, s2 = alone(x, None, StepContext())
    assert torch.equal(y1, y2) and torch.equal(s1.S, s2.S)
    with pytest.raises(ValueError, match="FastLayerConfig.n_heads"):
        FastLayerConfig(n_heads=0)
    with pytest.raises(ValueError, match="FastLayerConfig.fast_rest"):
        FastLayerConfig(fast_rest="sometimes")
    with pytest.raises(ValueError, match="PlasticConfig or FastLayerConfig"):
        FastWeightLayer({"d_model": 32})


def test_a_setting_the_flat_layout_cannot_say_changes_the_fingerprint():
    """The fingerprint hashes a config in the flat layout of earlier versions when its memories fit it; an
    error write (or its chunk) is not in that layout, so such a config is hashed whole, not as its delta twin."""
    from cl_arch.config import legacy_dict, migrate_legacy
    from cl_arch.memory import EpisodicConfig, ReadoutConfig

    delta = PlasticConfig(memories=[ReadoutConfig(), EpisodicConfig(heads=1, features=64)])
    flat = legacy_dict(delta)
    assert flat is not None and migrate_legacy(flat)["memories"] == delta.memories
    for mem in (EpisodicConfig(heads=1, features=64, write="error"),
                EpisodicConfig(heads=1, features=64, write="error", write_chunk=64)):
        other = dataclasses.replace(delta, memories=[ReadoutConfig(), mem])
        assert legacy_dict(other) is None
        assert other.to_diff_dict() != delta.to_diff_dict()
    error_readout = dataclasses.replace(delta, memories=[ReadoutConfig(write="error"), delta.memories[1]])
    assert legacy_dict(error_readout) is None and error_readout.to_diff_dict() != delta.to_diff_dict()
