"""PlasticTransformer: streaming equals one call, checkpoints, fingerprints, gradients, input checks."""
import os

import pytest
import torch

from cl_arch import FastLayerState, ModelState, PlasticConfig, PlasticTransformer


def tiny_config(**kw):
    base = dict(d_model=32, n_layers=4, n_heads=2, head_k_dim=8, head_v_dim=8, n_attn_heads=2,
                mlp_ratio=2.0, chunk_size=8, recurrent_threshold=4)
    base.update(kw)
    return PlasticConfig(**base)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = PlasticTransformer(tiny_config(**kw)).double()
    # W0 and P start at zero; make them non-zero so the tests see them in the outputs.
    with torch.no_grad():
        for layer in model.fast_layers():
            layer.W0.normal_(0, 0.1)
    return model


def stream(model, ids, splits, state=None):
    """Feed ``ids`` in pieces of the given lengths, carrying the state; return concatenated logits."""
    out, t = [], 0
    for n in splits:
        logits, state = model(ids[:, t:t + n], state=state)
        out.append(logits)
        t += n
    assert t == ids.shape[1]
    return torch.cat(out, dim=1), state


def persistent_memory(model, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(B, l.n_heads, l.head_k_dim, l.head_v_dim, generator=g, dtype=torch.float64)
            for l in model.fast_layers()]


# Odd split points; in eval mode with recurrent_threshold=4 the 1- and 3-token pieces decode
# with the recurrent backend and the longer ones with the chunked one (chunk_size=8 does not divide them).
SPLITS = [[1, 13, 23], [37], [20, 1, 1, 3, 12]]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("train_mode", [False, True])
def test_streaming_equals_one_call(window, train_mode):
    model = make_model(attn_window=window)
    model.train(train_mode)
    B, T = 2, 37
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    P = persistent_memory(model, B)
    with torch.no_grad():
        full, full_state = model(ids, state=model.init_state(B, P))
        for splits in SPLITS:
            logits, state = stream(model, ids, splits, state=model.init_state(B, P))
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-7)
            assert state.position == T
            for a, b in zip(state.layers, full_state.layers):
                if isinstance(a, FastLayerState):
                    torch.testing.assert_close(a.S, b.S, rtol=1e-5, atol=1e-7)
                    torch.testing.assert_close(a.E, b.E, rtol=1e-5, atol=1e-7)


def test_window_cache_is_bounded_and_window_changes_outputs():
    ids = torch.randint(0, 256, (1, 30))
    windowed = make_model(attn_window=4).eval()
    _, state = windowed(ids)
    assert all(s.k.shape[2] == 3 for s in state.layers if not isinstance(s, FastLayerState))
    full = make_model().eval()
    with torch.no_grad():
        assert not torch.allclose(windowed(ids)[0][:, 10:], full(ids)[0][:, 10:])
        torch.testing.assert_close(windowed(ids)[0][:, :4], full(ids)[0][:, :4])
    # Exactly what the window promises: with one attention layer only, the output at t is the output of
    # the unwindowed model reading just the last 4 tokens (rotary scores depend on offsets only).
    kw = dict(n_layers=1, layer_types=["attn"], memories=[])  # one layer: the receptive field is the window
    w_attn, f_attn = make_model(attn_window=4, **kw).eval(), make_model(**kw).eval()
    with torch.no_grad():
        out = w_attn(ids)[0]
        for t in range(3, 30):
            torch.testing.assert_close(out[:, t], f_attn(ids[:, t - 3:t + 1])[0][:, -1], rtol=1e-10, atol=1e-10)
        assert not torch.allclose(out[:, 10:], f_attn(ids)[0][:, 10:])  # and the window does cut something


def test_persistent_memory_and_new_episode():
    model = make_model().eval()
    ids = torch.randint(0, 256, (2, 9))
    P = persistent_memory(model, 2)
    with torch.no_grad():
        with_p, state = model(ids, state=model.init_state(2, P))
        without_p, _ = model(ids)
        assert not torch.allclose(with_p, without_p)
        fresh = state.new_episode()
        assert fresh.position == 0 and all(s.S is None for s in fresh.layers if isinstance(s, FastLayerState))
        for a, b in zip(fresh.persistent(), P):
            assert torch.equal(a, b)
        again, _ = model(ids, state=fresh)
        torch.testing.assert_close(again, with_p)


def test_stack_and_select_decode_sessions_together():
    model = make_model().eval()
    ids = torch.randint(0, 256, (2, 11))
    P = persistent_memory(model, 2)
    with torch.no_grad():
        _, s0 = model(ids[:1, :7], state=model.init_state(1, [p[:1] for p in P]))
        _, s1 = model(ids[1:, :7], state=model.init_state(1, [p[1:] for p in P]))
        batched, bstate = model(ids[:, 7:], state=ModelState.stack([s0, s1]))
        alone0, _ = model(ids[:1, 7:], state=s0)
        torch.testing.assert_close(batched[:1], alone0)
        assert bstate.batch_size == 2 and bstate.select(1).batch_size == 1
        # A fresh state must be materialised (S = W0 + P) before it can join a running one.
        with pytest.raises(ValueError, match="materialize_state"):
            ModelState.stack([s0, ModelState(model.init_state(1).layers, 7)])
        with pytest.raises(ValueError, match="positions"):
            ModelState.stack([s0, model.init_state(1)])
        fresh = ModelState(model.materialize_state(model.init_state(1), batch_size=1).layers, 7)
        with pytest.raises(ValueError, match="None in some"):
            ModelState.stack([s0, fresh])  # attention caches differ (empty vs 7 tokens)


def test_save_load_identical(tmp_path):
    model = make_model().eval()
    ids = torch.randint(0, 256, (2, 10))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer_config.json"]  # no temp files
    loaded = PlasticTransformer.from_pretrained(tmp_path).eval()
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.lm_head.weight is loaded.embed.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_fingerprint_changes_with_one_weight():
    model = make_model()
    before = model.fingerprint()
    assert before == model.fingerprint() and len(before) == 16
    with torch.no_grad():
        model.fast_layers()[0].W0[0, 0, 0] += 1e-3
    assert model.fingerprint() != before


def test_from_pretrained_errors(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        PlasticTransformer.from_pretrained(tmp_path / "nope")
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        PlasticTransformer.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)  # garbage header
    with pytest.raises(ValueError, match="corrupt"):
        PlasticTransformer.from_pretrained(tmp_path)
    # Valid file, different weights: the fingerprint check catches it.
    other = make_model(seed=1)
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    weights.write_bytes((other_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="fingerprint"):
        PlasticTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        PlasticTransformer.from_pretrained(tmp_path)


def test_gradients_reach_all_parameters():
    torch.manual_seed(0)
    model = PlasticTransformer(tiny_config()).train()
    ids = torch.randint(0, 256, (2, 20))
    logits, _ = model(ids[:, :-1], return_state=False)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
    loss.backward()
    # The plasticity parameters act through E_T and the reward commit, not through this
    # call's logits, so a language-model loss gives them no gradient.
    commit_only = ("lam_logit", "gamma_logit", "eta_s", "eta_r")
    for name, p in model.named_parameters():
        if name.endswith(commit_only):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    layer = model.fast_layers()[0]
    for p in (layer.W0, layer.A_log, layer.dt_bias, layer.q_proj.weight, layer.k_proj.weight,
              layer.v_proj.weight, layer.b_proj.weight, layer.a_proj.weight, layer.g_proj.weight,
              layer.o_proj.weight, layer.conv.conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_gradient_reaches_lam_through_the_trace():
    model = PlasticTransformer(tiny_config()).train()
    _, state = model(torch.randint(0, 256, (2, 12)))
    sum(s.E.pow(2).sum() for s in state.layers if isinstance(s, FastLayerState)).backward()
    # every memory whose commit has a lam to learn (the readout's state commit ties it to its decay)
    layers = [l for l in model.fast_layers() if "lam_logit" in l.plasticity_parameters()]
    assert layers and all(l.lam_logit.grad.abs().sum() > 0 for l in layers)
    assert model.readout.A_log.grad.abs().sum() > 0  # the readout's trace follows its decay


def test_learn_plasticity_false_freezes_plasticity():
    model = PlasticTransformer(tiny_config(learn_plasticity=False))
    layer = model.fast_layers()[0]
    assert not layer.lam_logit.requires_grad and not layer.gamma_logit.requires_grad
    torch.testing.assert_close(layer.lam, torch.full((2,), 0.5))
    torch.testing.assert_close(layer.gamma, torch.full((2,), 0.98))


@pytest.mark.parametrize("bad", [
    torch.zeros(2, 5),  # float dtype
    torch.full((2, 5), 256, dtype=torch.long),  # out of vocab
    torch.full((2, 5), -1, dtype=torch.long),
    torch.zeros(5, dtype=torch.long),  # wrong ndim
    torch.zeros(1, 2, 5, dtype=torch.long),
])
def test_bad_input_ids_raise(bad):
    model = make_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(bad)


def test_state_batch_mismatch_and_bad_modulation():
    model = make_model()
    _, state = model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(3, 3, dtype=torch.long), state=state)
    with pytest.raises(ValueError, match="modulation"):
        model(torch.zeros(2, 3, dtype=torch.long), modulation=torch.full((2, 3), 2.0))


def test_modulation_zero_means_no_writes():
    model = make_model(layer_types=["fast", "fast"], n_layers=2).eval()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        _, state = model(ids, modulation=torch.zeros(1, 6))
    for layer, s in zip(model.fast_layers(), state.layers):
        # No writes: S is W0 decayed token by token, still proportional to W0 per head.
        ratio = s.S[0] / layer.W0
        assert torch.allclose(ratio, ratio[:, :1, :1].expand_as(ratio))
        assert torch.count_nonzero(s.E) == 0


@pytest.mark.parametrize("kw", [dict(conv_size=0), dict(use_gate=False), dict(lam=None),
                                dict(rule="hebb", layer_types=["fast"] * 4)])
def test_variants_stream_equal_one_call(kw):
    model = make_model(**kw).eval()
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, full_state = model(ids)
        logits, state = stream(model, ids, [2, 9, 1, 7])
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-7)
    if kw.get("lam", 0.5) is None:
        # no trace in the network's fast layers; the readout's state commit keeps its own
        fast = [s for s in state.layers if isinstance(s, FastLayerState)]
        assert all(s.E is None for s in fast[:-1]) and fast[-1].E is not None


def test_a_training_step_never_reads_a_tensor_back_to_the_host(monkeypatch):
    """Input value checks (ids range, modulation range, the rule's NaN/range checks) each cost a device
    sync; they guard user input, not every training step (issue 17): the model's layers never check
    their own activations, and the training loops set ``model.check_inputs = False`` while they run
    (``test_training_loops_turn_input_checks_off``). Counted on CPU by wrapping every Tensor method that
    copies a value to the host."""
    import torch.nn.functional as F
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: (calls.append(_n), _r(self, *a, **k))[1])
    model = make_model(attn_window=8).float().train()
    model.check_inputs = False  # what the training loops set while they run
    ids = torch.randint(0, 256, (2, 41))
    mod = torch.rand(2, 40)
    calls.clear()
    logits, _ = model(ids[:, :-1], modulation=mod, return_state=False)
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert calls == []
    model.check_inputs = True  # the default: a user's call is checked
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.full((1, 3), 300))
    with pytest.raises(ValueError, match="modulation"):
        model(ids[:, :3], modulation=torch.full((2, 3), 2.0))
    assert calls  # and those checks are the host reads


def test_sessions_need_the_protocol_not_the_class():
    """Session works with any PlasticModel (cl_arch.protocols): here a wrapper that is not a
    PlasticTransformer subclass, as a retrofit of another network would be."""
    from cl_arch import Session
    from cl_arch.protocols import FastMemory, PlasticModel

    inner = make_model().float().eval()

    class Wrapper:
        def __init__(self, m):
            self.m, self.config = m, m.config

        device = property(lambda self: self.m.device)

        def __call__(self, *a, **k):
            return self.m(*a, **k)

        def __getattr__(self, name):  # fast_layers, memories, init_state, materialize_state, fingerprint
            return getattr(self.m, name)

    w = Wrapper(inner)
    assert isinstance(inner, PlasticModel) and isinstance(w, PlasticModel)
    assert all(isinstance(layer, FastMemory) for layer in inner.fast_layers())
    s = Session(w)
    s.observe([1, 2, 3, 4])
    s.reward(1.0)
    assert s.episodes == 1 and any(float(p.abs().sum()) > 0 for p in s.P)
    with pytest.raises(ValueError, match="PlasticModel"):
        Session(object())


def test_model_commit_is_each_memory_commit_paired_by_state_slot():
    """model.commit pairs the state's fast slots with fast_layers() and applies each memory's own commit
    (overrides for all); a missing trace raises or commits zeros as asked; unknown overrides are refused."""
    from cl_arch import PlasticConfig, PlasticTransformer

    torch.manual_seed(0)
    m = PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                                         n_attn_heads=2, chunk_size=8)).eval()
    _, state = m(torch.randint(0, 256, (2, 9)), state=m.materialize_state(m.init_state(2), 2))
    P = [torch.randn(2, f.n_heads, f.head_k_dim, f.head_v_dim) for f in m.fast_layers()]
    r, b = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.1])
    got, b_new = m.commit(state, P, r, b, eta_r=0.7)
    for f, p, E, g in zip(m.fast_layers(), P, state.traces(), got):
        want, b_want = f.commit(p, E, r, b, eta_r=0.7)
        assert torch.equal(g, want)
    assert torch.equal(b_new, b_want)
    retention, none = m.commit(state.traces(), P)  # traces given directly, no reward: baseline untouched
    assert none is None and all(torch.equal(a, f.commit(p, E)[0])
                                for a, f, p, E in zip(retention, m.fast_layers(), P, state.traces()))
    for s in state.fast():
        s.E = None
    with pytest.raises(ValueError, match="no eligibility trace"):
        m.commit(state, P, r, b)
    decayed, _ = m.commit(state, P, missing_trace="zeros", gamma=0.5)
    assert all(torch.allclose(d, 0.5 * p) for d, p in zip(decayed, P))
    # no trace and no P (a verdict memory before any generation): that layer's P stays None
    none_P, _ = m.commit(state, [None] + list(P[1:]), missing_trace="zeros", gamma=0.5)
    assert none_P[0] is None and torch.allclose(none_P[1], 0.5 * P[1])
    with pytest.raises(ValueError, match="no eligibility trace"):
        m.commit(state, [None] + list(P[1:]))
    with pytest.raises(ValueError, match="unknown overrides"):
        m.commit(state, P, lamda=0.3)
