"""The error-driven write (kernels/error_write, memory/write.py): the sparse loop against the naive
reference in float64, state passed in and out, gradients, and the memory inside a model (one call
over a stream equals token-by-token decoding; the commit; save/load; bad settings)."""
import pytest
import torch
import torch.nn.functional as F

from cl_arch import EpisodicConfig, PlasticConfig, PlasticTransformer, ReadoutConfig, Session
from cl_arch.kernels.error_write import error_write


def _inputs(B, T, H, K, V, seed=0, sparse=True, decay=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def keys():
        x = torch.randn(B, T, H, K, generator=g, dtype=dtype)
        return F.normalize(F.relu(x - 1.0), dim=-1) if sparse else x

    q, k = keys(), keys()
    k[:, 0] = 0  # the first write key of an episode is the zero cache: no write
    return dict(q=q, k=k, targets=torch.randint(0, V, (B, T), generator=g),
                base=torch.randn(B, T, V, generator=g, dtype=dtype),
                eta=torch.rand(B, T, H, generator=g, dtype=dtype),
                g=None if decay is None else -decay * torch.rand(B, T, H, generator=g, dtype=dtype),
                scale=torch.randn(H, generator=g, dtype=dtype),
                initial_state=torch.randn(B, H, K, V, generator=g, dtype=dtype),
                resting_state=torch.randn(H, K, V, generator=g, dtype=dtype),
                initial_probs=torch.softmax(torch.randn(B, V, generator=g, dtype=dtype), -1))


CASES = [(1, 1, 1, 16, 8, True, 0.5), (2, 37, 2, 64, 16, True, 0.5), (2, 63, 1, 32, 12, False, None),
         (3, 29, 2, 48, 10, True, 8.0)]  # decay 8: the lazily kept scale is folded back many times


@pytest.mark.parametrize("B,T,H,K,V,sparse,decay", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-{'sparse' if c[5] else 'dense'}-g{c[6]}"
                              for c in CASES])
def test_sparse_loop_equals_the_naive_rule(B, T, H, K, V, sparse, decay):
    x = _inputs(B, T, H, K, V, sparse=sparse, decay=decay)
    want = error_write(**x, backend="naive")
    got = error_write(**x, backend="torch_recurrent")
    for name, a, b in zip(("read", "S", "p"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


def test_a_stream_split_in_two_calls_equals_one_call():
    x = _inputs(2, 40, 2, 32, 9)
    read, S, p = error_write(**x, backend="torch_recurrent")
    first = {k: (v[:, :17] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == 40 else v) for k, v in x.items()}
    r1, S1, p1 = error_write(**first, backend="torch_recurrent")
    second = {k: (v[:, 17:] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == 40 else v) for k, v in x.items()}
    second.update(initial_state=S1, initial_probs=p1)
    r2, S2, p2 = error_write(**second, backend="torch_recurrent")
    torch.testing.assert_close(torch.cat([r1, r2], 1), read, atol=1e-12, rtol=0)
    torch.testing.assert_close(S2, S, atol=1e-12, rtol=0)
    torch.testing.assert_close(p2, p, atol=1e-12, rtol=0)


def test_float32_within_tolerance_and_gradients_through_the_naive_loop():
    x = _inputs(2, 21, 2, 32, 8)
    want = error_write(**x, backend="naive")
    x32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}
    got = error_write(**x32, backend="torch_recurrent")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5)
    small = _inputs(1, 5, 1, 6, 4, sparse=False)
    small["eta"].requires_grad_(True)
    small["scale"].requires_grad_(True)

    def f(eta, scale):
        read, S, p = error_write(**{**small, "eta": eta, "scale": scale})  # auto: the naive loop under autograd
        return read.sum() + S.pow(2).sum() + p.log().sum()

    assert torch.autograd.gradcheck(f, (small["eta"], small["scale"]))


def test_bad_inputs_are_named():
    x = _inputs(1, 4, 1, 8, 5)
    with pytest.raises(ValueError, match="targets must be token ids"):
        error_write(**{**x, "targets": torch.tensor([[0, 1, 5, 2]])})
    with pytest.raises(ValueError, match="base has shape"):
        error_write(**{**x, "base": torch.zeros(1, 3, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="unknown error_write backend"):
        error_write(**x, backend="cuda")
    with pytest.raises(ValueError, match="values='onehot'"):
        EpisodicConfig(write="error", values="embed")
    with pytest.raises(ValueError, match="commit='state'"):
        ReadoutConfig(write="error", commit="trace")
    with pytest.raises(ValueError, match="must be one of"):
        EpisodicConfig(write="hebb")


def _model():
    torch.manual_seed(0)
    cfg = PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, layer_types=["attn", "fast"],
                        memories=[ReadoutConfig(), EpisodicConfig(name="error", write="error", features=128,
                                                                  threshold=0.5, span=50.0, commit_span=10.0)])
    return PlasticTransformer(cfg).double().eval()


def test_in_a_model_one_call_equals_token_by_token_decoding():
    model = _model()
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, s_full = model(ids)
        state, steps = model.init_state(2), []
        for t in range(ids.shape[1]):
            o, state = model(ids[:, t:t + 1], state=state)
            steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)
    a, b = model.memory_states(s_full)["error"], model.memory_states(state)["error"]
    for name in ("S", "E", "conv"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-10, rtol=0, msg=name)
    assert a.conv.shape == (2, 1, 32 + 256)
    # the error memory changed the logits, and only through its own read
    with torch.no_grad(), model.memories_off("error"):
        without, _ = model(ids)
    assert float((full - without).abs().max()) > 1e-3


def test_the_state_commit_carries_what_the_error_memory_learned(tmp_path):
    model = _model()
    text = list(b"for i in range(10):\n    total += i\n" * 6)
    s = Session(model, seed=0)
    first = s.observe(text)
    assert s.end_episode()
    P = model.memory_states(s.state)["error"].P
    assert P is not None and float(P.norm()) > 0
    second = Session.from_bytes(model, s.to_bytes()).observe(text)
    assert float(second[1:].mean()) < float(first[1:].mean())
    model.save_pretrained(tmp_path / "m")
    loaded = PlasticTransformer.from_pretrained(tmp_path / "m").double().eval()
    assert loaded.memory("error").config.write == "error" and loaded.fingerprint() == model.fingerprint()


def test_set_write_switches_a_trained_memory_in_place(tmp_path):
    torch.manual_seed(0)
    model = PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                                             layer_types=["attn", "fast"],
                                             memories=[EpisodicConfig(features=128, threshold=0.5)])).double().eval()
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        delta, _ = model(ids)
    R = model.episodic.R.clone()
    model.set_write("episodic", "error", beta=0.5, scale=1.0)
    assert model.config.memory("episodic").write == "error" and torch.equal(model.episodic.R, R)
    assert float(model.episodic.read_scale[0]) == 1.0
    with torch.no_grad():
        error, state = model(ids)
    assert float((error - delta).abs().max()) > 1e-3 and state.fast()[-1].conv.shape == (1, 1, 32 + 256)
    model.save_pretrained(tmp_path / "m")
    loaded = PlasticTransformer.from_pretrained(tmp_path / "m").double().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], error, atol=1e-12, rtol=0)
    with pytest.raises(KeyError, match="no memory named"):
        model.set_write("readout", "error")
    with pytest.raises(ValueError, match="must be one of"):
        model.set_write("episodic", "hebb")
    assert model.config.memory("episodic").write == "error"  # the refused call changed nothing
