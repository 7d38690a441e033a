"""Memories as components (docs/design.md, "Memories"): a memory kind is one config, one module and
a commit strategy; the model adds, removes and commits it with no caller knowing its kind; configs
and checkpoints written before the memories were listed load through the migration."""
import dataclasses
import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cl_arch import EpisodicConfig, PlasticConfig, PlasticTransformer, ReadoutConfig, Session
from cl_arch.consolidate import fold
from cl_arch.memory import MEMORY_KINDS, MemoryConfig, OutputMemory
from cl_arch.memory.output import shifted_keys


# ---------------------------------------------------------------------- a toy kind, defined only here
@dataclass(frozen=True)
class HalfCommit:
    """A commit of its own: ``P <- P + 0.5 E`` (no reward term), the trace following the state."""

    trace_follows_state = True

    def trace_decay(self, memory):
        return torch.exp(-memory.A_log.exp())

    def rates(self, memory):
        one = torch.ones_like(memory.eta_s)
        return {"gamma": one, "eta_s": 0.5 * one, "eta_r": torch.zeros_like(one)}

    def clip(self, memory):
        return None

    def trainable(self, memory):
        return {}


@dataclass
class BigramConfig(MemoryConfig):
    """A bigram cache: keyed by the one-hot of the last token, values the next token."""

    kind = "test_bigram"
    name: str = "bigram"
    scale: float = 3.0

    def build(self, host):
        return BigramMemory(self, host.vocab_size, host)


class BigramMemory(OutputMemory):
    def __init__(self, config: BigramConfig, vocab_size: int, rule):
        super().__init__(rule, 1, vocab_size, vocab_size, "onehot", HalfCommit())
        self.config = config
        self.A_log = torch.nn.Parameter(torch.full((1,), -math.log(1e4)))
        self.beta_logit = torch.nn.Parameter(torch.full((1,), 0.9).logit())
        self.read_scale = torch.nn.Parameter(torch.full((1,), config.scale))

    def cache_shape(self, batch_size):
        return (batch_size, 1, self.head_k_dim)

    def project_qkv(self, h, cache=None, ids=None):
        q = F.one_hot(ids, self.head_k_dim).to(torch.promote_types(h.dtype, torch.float32))
        k = shifted_keys(q, cache)
        B, T, K = q.shape
        return q.unsqueeze(2), k.unsqueeze(2), None, q[:, -1:]


def tiny(memories=(), seed=0):
    torch.manual_seed(seed)
    cfg = PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, n_attn_heads=2, mlp_ratio=2.0,
                        chunk_size=8, recurrent_threshold=4, memories=list(memories))
    return PlasticTransformer(cfg).double().eval()


def test_a_memory_kind_defined_in_one_file_works_with_sessions_fold_and_files(tmp_path):
    m = tiny([ReadoutConfig(heads=1)])
    base = {k: v.clone() for k, v in m.state_dict().items()}
    mem = m.add_memory(BigramConfig())
    assert m.bigram is mem and m.fast_layers()[-1] is mem and m.fast_layer_names()[-2:] == ["readout", "bigram"]
    assert all(torch.equal(m.state_dict()[k], v) for k, v in base.items())  # nothing else moved
    assert mem.W0.dtype == torch.float64  # the model's dtype

    # it reads: a bigram seen once is predicted the next time its first token comes
    text = list(b"qz qz qz qz")
    with torch.no_grad():
        logits, _ = m(torch.tensor([text]))
        with m.memories_off("bigram"):
            plain, _ = m(torch.tensor([text]))
    gain = (logits - plain)[0, -2, ord("z")] - (logits - plain)[0, -2].mean()  # after the last "q"
    assert gain > 1.0

    # a session commits it with its own strategy: P = 0.5 * (S_T - M) under the state-following trace
    s = Session(m)
    s.observe(text)
    S_T, M = s.state.layers[-1].S.clone(), mem.resting_state(1, None)
    s.end_episode()
    assert torch.allclose(s.P[-1], 0.5 * (S_T - M), atol=1e-12)

    # save / load: the registry builds it from config.json, and the P of a saved session fits it
    m.save_pretrained(tmp_path / "model")
    meta = json.load(open(tmp_path / "model" / "config.json"))
    assert meta["config"]["memories"][-1] == {"kind": "test_bigram", "name": "bigram", "scale": 3.0}
    loaded = PlasticTransformer.from_pretrained(tmp_path / "model")
    assert loaded.fingerprint() == m.fingerprint() and isinstance(loaded.bigram, BigramMemory)
    s.save(tmp_path / "s.safetensors")
    s2 = Session.load(loaded, tmp_path / "s.safetensors")
    assert torch.equal(s2.P[-1], s.P[-1])

    # fold: the session's P goes into W0, and the model alone computes what it computed with P
    ids = torch.tensor([list(b"qz q")])
    with torch.no_grad():
        with_p, _ = loaded(ids, state=loaded.init_state(1, s2.P))
    fold(loaded, [p[0] for p in s2.P])
    with torch.no_grad():
        after, _ = loaded(ids)
    assert torch.allclose(after, with_p, atol=1e-10)

    # remove: the model is the one it was
    loaded.remove_memory("bigram")
    assert loaded.memory("bigram") is None and [c.name for c in loaded.config.memories] == ["readout"]


def test_an_unknown_kind_in_a_file_is_named(tmp_path):
    m = tiny([BigramConfig()])
    m.save_pretrained(tmp_path)
    saved = MEMORY_KINDS.pop("test_bigram")
    try:
        with pytest.raises(ValueError, match="unknown memory kind 'test_bigram'"):
            PlasticTransformer.from_pretrained(tmp_path)
    finally:
        MEMORY_KINDS["test_bigram"] = saved


def test_surgery_refuses_taken_names_and_keeps_the_old_model_working():
    m = tiny([ReadoutConfig(heads=1)])
    with pytest.raises(ValueError, match="names must be unique"):
        m.add_memory(ReadoutConfig())
    for bad in ("blocks", "forward", "lm_head"):
        with pytest.raises(ValueError, match=f"cannot be named '{bad}'|attribute"):
            m.add_memory(EpisodicConfig(name=bad))
    with pytest.raises(ValueError, match="memory config"):
        m.add_memory({"kind": "episodic"})
    with pytest.raises(KeyError, match="no memory named 'episodic'"):
        m.remove_memory("episodic")
    assert [c.name for c in m.config.memories] == ["readout"] and len(m.fast_layers()) == 2
    with torch.no_grad():
        m(torch.tensor([[1, 2, 3]]))


def test_memories_off_restores_order_and_config():
    m = tiny([ReadoutConfig(heads=1), EpisodicConfig(features=64)])
    names, config = m.fast_layer_names(), m.config
    with m.memories_off("readout"):
        assert m.fast_layer_names()[-1:] == ["episodic"] and m.memory("readout") is None
        with torch.no_grad():
            m(torch.tensor([[5, 6]]))
    assert m.fast_layer_names() == names and m.config is config


def test_legacy_flat_configs_migrate_and_keep_their_fingerprint():
    """A config written before the memories were listed (readout_* / episodic_* fields) reads as the
    same memories, writes back in the new layout, and hashes as it did (the fingerprints recorded in
    checkpoints and session files stay valid)."""
    flat = {"d_model": 32, "n_layers": 2, "n_heads": 2, "head_k_dim": 8, "head_v_dim": 8, "n_attn_heads": 2,
            "readout_heads": 1, "readout_values": "embed", "readout_commit_span": 100.0,
            "episodic_heads": 1, "episodic_features": 64, "episodic_seed": 3}
    cfg = PlasticConfig.from_dict(flat)
    assert cfg.memories == [ReadoutConfig(heads=1, values="embed", commit_span=100.0),
                            EpisodicConfig(features=64, seed=3, commit_span=100.0)]
    assert PlasticConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # what earlier versions hashed: every non-default flat field (n_layers=2 also sets layer_types)
    assert cfg.to_diff_dict() == {**flat, "layer_types": ["fast", "attn"]}
    assert PlasticConfig.from_dict({"readout_heads": 0}).memories == []
    with pytest.raises(ValueError, match="both 'memories' and"):
        PlasticConfig.from_dict({"readout_heads": 1, "memories": []})
    with pytest.raises(ValueError, match="unknown keys \\['readout_colour'\\]"):
        PlasticConfig.from_dict({"readout_colour": 1})
    # a config the flat layout cannot say hashes in the new layout
    other = dataclasses.replace(cfg, memories=[BigramConfig()])
    assert "memories" in other.to_diff_dict()


def test_the_shipped_model_migrates_bitwise(tmp_path):
    """The shipped model in the layout of before the verdict memory and the error write (issue 25: remove it;
    issue 24: back to the delta write), which the flat config of earlier versions can say (the error write it
    cannot: legacy_dict refuses it), has the fingerprint its flat config records; a folder with that flat
    config loads through the migration with it, saves in the new layout, and the new folder gives bitwise
    the same logits and fingerprint."""
    import cl_arch
    from cl_arch.config import legacy_dict
    from safetensors.torch import save_file

    shipped = cl_arch.load_default()
    raw = json.load(open(f"{cl_arch.default_model_dir()}/config.json"))
    assert shipped.fingerprint() == raw["fingerprint"]
    shipped.remove_memory("verdict")
    assert legacy_dict(shipped.config) is None  # the error write has no flat field
    shipped.set_write("episodic", "delta", chunk=1)
    fp = "645f24a7ec02f335"  # fcaaa96fc0d8094e for the weights shipped before issue 24's training
    assert shipped.fingerprint() == fp
    flat = tmp_path / "flat"
    flat.mkdir()
    meta = {**raw, "config": legacy_dict(shipped.config), "fingerprint": fp}
    (flat / "config.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in shipped._export_tensors().items()}, str(flat / "model.safetensors"),
              metadata={"fingerprint": fp})
    old = PlasticTransformer.from_pretrained(flat).eval()
    assert "episodic_heads" in meta["config"] and old.fingerprint() == fp
    tmp_path = tmp_path / "new"
    old.save_pretrained(tmp_path)
    assert "memories" in json.load(open(tmp_path / "config.json"))["config"]
    new = PlasticTransformer.from_pretrained(tmp_path).eval()
    ids = torch.tensor([list(b"def f(x):\n    return x\n")])
    with torch.no_grad():
        assert torch.equal(old(ids)[0], new(ids)[0])
    assert new.fingerprint() == old.fingerprint()


def test_memory_states_name_every_fast_slot():
    from cl_arch import PlasticConfig, PlasticTransformer

    torch.manual_seed(0)
    model = PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                                             layer_types=["attn", "fast"]))
    _, state = model(torch.tensor([[1, 2, 3, 4]]))
    slots = model.memory_states(state)
    assert list(slots) == ["blocks.1", "readout"] and slots["readout"] is state.fast()[-1]
    model.remove_memory("readout")
    with pytest.raises(ValueError, match="fast slots"):
        model.memory_states(state)
