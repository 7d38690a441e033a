"""The episodic memory's sparse decode step (kernels/episodic) against the dense rule in float64: outputs,
final states and traces at 1e-10 for both write rules, odd lengths, state passed in and out through the
dense layout, keys with no active feature, the lazily kept decay folded back, NaN-poisoned output
buffers, buffers updated in place; the memory's one-token calls against its dense rule, the in-place
decoder, and the shipped model's sessions. About 10 s with one thread on an idle core (36 s at load 8)."""
import pytest
import torch
import torch.nn.functional as F

from cl_arch.kernels.episodic import (
    SparseEpisodicState,
    active,
    naive_episodic,
    naive_episodic_step,
    sparse_delta_step,
    sparse_episodic,
    sparse_error_step,
    sparse_error_write,
)
from cl_arch.kernels.error_write.naive import naive_error_write

TOL = {"atol": 1e-10, "rtol": 1e-10}


def _inputs(B, T, H, Fdim, V, seed=0, decay=0.5, rest=True, trace=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def keys():  # the episodic keys' shape: a thresholded, unit-length random feature vector
        return F.normalize(F.relu(torch.randn(B, T, H, Fdim, generator=g, dtype=dtype) - 1.5), dim=-1)

    q, k = keys(), keys()
    k[:, 0] = 0  # the first write key of an episode is the zero cache: no write
    return {"q": q, "k": k, "v": torch.randn(B, T, H, V, generator=g, dtype=dtype),
                "beta": torch.rand(B, T, H, generator=g, dtype=dtype),
                "g": -decay * torch.rand(B, T, H, generator=g, dtype=dtype),
                "initial_state": torch.randn(B, H, Fdim, V, generator=g, dtype=dtype),
                "resting_state": torch.randn(H, Fdim, V, generator=g, dtype=dtype) if rest else None,
                "initial_trace": torch.randn(B, H, Fdim, V, generator=g, dtype=dtype) if trace else None}


# (B, T, H, F, V, decay, resting state, initial trace); decay 8 folds the lazy scale back many times
CASES = [(1, 1, 1, 16, 8, 0.5, True, True), (2, 37, 2, 64, 12, 0.5, True, True), (2, 63, 4, 32, 16, 0.5, False, True),
         (3, 29, 1, 48, 10, 8.0, True, False), (1, 64, 1, 256, 9, 1e-5, True, True)]
IDS = [f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-g{c[5]}{'-M' if c[6] else ''}{'-E' if c[7] else ''}" for c in CASES]


@pytest.mark.parametrize("B,T,H,Fdim,V,decay,rest,trace", CASES, ids=IDS)
def test_sparse_delta_equals_the_naive_rule(B, T, H, Fdim, V, decay, rest, trace):
    x = _inputs(B, T, H, Fdim, V, decay=decay, rest=rest, trace=trace)
    want = naive_episodic(**x)
    got = sparse_episodic(**x)
    for name, a, b in zip(("o", "S", "E"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_naive_rule_is_the_plastic_rule_the_memory_runs():
    """The reference is the rule ``run_rule`` runs: plastic_rule's naive backend, trace decay = the state's."""
    from cl_arch.kernels.plastic import plastic_rule
    x = _inputs(2, 23, 2, 32, 7)
    lam = x["g"][0, 0].exp()  # a constant decay per head, as the memory's
    g = lam.log().expand_as(x["g"]).contiguous()
    want = plastic_rule(x["q"], x["k"], x["v"], x["beta"], g, lam=lam, scale=1.0, initial_state=x["initial_state"],
                        initial_trace=x["initial_trace"], resting_state=x["resting_state"], backend="naive")
    got = naive_episodic(**{**x, "g": g})
    for name, a, b in zip(("o", "S", "E"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=name)


@pytest.mark.parametrize("B,T,H,Fdim,V,decay,rest,trace", CASES[1:4], ids=IDS[1:4])
def test_sparse_error_write_equals_the_naive_rule(B, T, H, Fdim, V, decay, rest, trace):
    x = _inputs(B, T, H, Fdim, V, decay=decay, rest=rest, trace=trace)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, V, (B, T), generator=g)
    base = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    scale = torch.randn(H, generator=g, dtype=torch.float64)
    p0 = torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64), -1)
    args = (x["q"], x["k"], targets, base, x["beta"], x["g"], scale, x["initial_state"], x["resting_state"], p0)
    read, S, p = naive_error_write(*args)
    read2, S2, p2, E2 = sparse_error_write(*args, initial_trace=x["initial_trace"])
    # the trace under the state commit: E_T = (S_T - M) + prod(decay) (E_0 - (S_0 - M))
    M = 0 if x["resting_state"] is None else x["resting_state"].expand_as(S)
    E0 = 0 if x["initial_trace"] is None else x["initial_trace"]
    E = (S - M) + x["g"].sum(1).exp()[..., None, None] * (E0 - (x["initial_state"] - M))
    for name, a, b in (("read", read2, read), ("S", S2, S), ("p", p2, p), ("E", E2, E)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_state_in_and_out_through_the_dense_layout_and_odd_splits():
    x = _inputs(2, 41, 2, 48, 11)
    o, S, E = sparse_episodic(**x)
    cut = 17
    first = {n: (t[:, :cut] if n in "qkv" or n in ("beta", "g") else t) for n, t in x.items()}
    o1, S1, E1 = sparse_episodic(**first)
    second = {n: (t[:, cut:] if n in "qkv" or n in ("beta", "g") else t) for n, t in x.items()}
    second.update(initial_state=S1, initial_trace=E1)
    o2, S2, E2 = sparse_episodic(**second)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, **TOL)
    torch.testing.assert_close(S2, S, **TOL)
    torch.testing.assert_close(E2, E, **TOL)


def test_steps_update_buffers_in_place_and_overwrite_poisoned_outputs():
    x = _inputs(2, 9, 3, 40, 6)
    M, S0 = x["resting_state"], x["initial_state"]
    st = SparseEpisodicState.from_dense(S0, M, x["initial_trace"])
    ptrs = (st.UM.data_ptr(), st.c.data_ptr(), st.Y.data_ptr())
    S, E = S0, x["initial_trace"]
    out = torch.empty(2, 3, 6, dtype=torch.float64)
    for t in range(9):
        out.fill_(float("nan"))
        o = sparse_delta_step(st, active(x["q"][:, t]), active(x["k"][:, t]), x["v"][:, t], x["beta"][:, t],
                              x["g"][:, t], out=out)
        want, S, E = naive_episodic_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], x["g"][:, t],
                                         S, M, E)
        assert o is out
        torch.testing.assert_close(out, want, **TOL)
    assert (st.UM.data_ptr(), st.c.data_ptr(), st.Y.data_ptr()) == ptrs
    got_S, got_E = st.to_dense()
    torch.testing.assert_close(got_S, S, **TOL)
    torch.testing.assert_close(got_E, E, **TOL)


def test_keys_with_no_active_feature_read_the_rest_and_write_nothing():
    B, H, Fdim, V = 2, 2, 32, 5
    x = _inputs(B, 1, H, Fdim, V)
    zero = torch.zeros(B, H, Fdim, dtype=torch.float64)
    M, S0 = x["resting_state"], x["initial_state"]
    st = SparseEpisodicState.from_dense(S0, M)
    g = torch.full((B, H), -0.3, dtype=torch.float64)
    o = sparse_delta_step(st, active(zero), active(zero), x["v"][:, 0], x["beta"][:, 0], g)
    assert torch.equal(o, torch.zeros_like(o))
    S, _ = st.to_dense()
    torch.testing.assert_close(S, M + g.exp()[..., None, None] * (S0 - M), **TOL)


def test_error_step_in_place_and_zero_keys():
    B, H, Fdim, V = 2, 1, 24, 7
    x = _inputs(B, 3, H, Fdim, V)
    st = SparseEpisodicState.from_dense(x["initial_state"], x["resting_state"],
                                        p=torch.zeros(B, V, dtype=torch.float64))
    base = torch.randn(B, V, dtype=torch.float64)
    out = torch.full((B, V), float("nan"), dtype=torch.float64)
    zero = torch.zeros(B, H, Fdim, dtype=torch.float64)
    read = sparse_error_step(st, active(zero), active(zero), torch.tensor([1, 4]), base, x["beta"][:, 0],
                             x["g"][:, 0], torch.ones(H, dtype=torch.float64), out=out)
    assert read is out and torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(st.p, torch.softmax(base, -1), **TOL)
    with pytest.raises(ValueError, match="no p buffer"):
        sparse_error_step(SparseEpisodicState.from_dense(x["initial_state"]), active(zero), active(zero),
                          torch.tensor([1, 4]), base, x["beta"][:, 0], x["g"][:, 0], torch.ones(H))


def test_a_fixed_number_of_active_entries_is_exact_and_bad_sizes_are_refused():
    x = _inputs(1, 1, 1, 64, 4)
    q = x["q"][:, 0]
    nnz = int((q != 0).sum())
    idx, val = active(q, n=nnz + 5)
    dense = torch.zeros_like(q).scatter_(-1, idx, val)
    assert torch.equal(dense, q)
    with pytest.raises(ValueError, match="n must be in"):
        active(q, n=65)
    with pytest.raises(ValueError, match="c has shape"):
        SparseEpisodicState(torch.zeros(1, 1, 4, 2, 3), torch.ones(2, 1))


def test_dense_round_trip_keeps_no_trace_buffer_for_an_episode_at_rest():
    x = _inputs(2, 1, 2, 16, 5)
    M, S = x["resting_state"], x["initial_state"]
    st = SparseEpisodicState.from_dense(S, M, E=S - M)
    assert st.Y is None
    S2, E2 = st.to_dense()
    torch.testing.assert_close(S2, S, **TOL)
    torch.testing.assert_close(E2, S - M, **TOL)
    parts = SparseEpisodicState.from_dense(S, (M, 0.5 * M))  # M given as parts (W0, P)
    S3, E3 = parts.to_dense()
    torch.testing.assert_close(S3, S, **TOL)
    torch.testing.assert_close(E3, torch.zeros_like(S), **TOL)


# ---------------------------------------------------------------- the memory's one-token calls
def _model(write, W0=False, values="onehot"):
    from cl_arch import EpisodicConfig, PlasticConfig, PlasticTransformer, ReadoutConfig
    torch.manual_seed(0)
    cfg = PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, layer_types=["attn", "fast"],
                        memories=[ReadoutConfig(), EpisodicConfig(heads=2, write=write, features=128, threshold=0.5,
                                                                  span=50.0, commit_span=10.0, values=values)])
    model = PlasticTransformer(cfg).double().eval()
    if W0:  # a fold wrote into W0: M = W0 + P read at the active rows
        with torch.no_grad():
            model.episodic.W0.normal_(0, 0.1)
    return model


def _decode(model, ids, sparse, P=None, modulation=None):
    model.episodic.sparse_decode = sparse
    state, logits = model.init_state(ids.shape[0], P), []
    with torch.no_grad():
        out, state = model(ids[:, :5], state=state)  # a prefill (the chunked/dense path), then one token a call
        for t in range(5, ids.shape[1]):
            mod = None if modulation is None else modulation[:, t:t + 1]
            out, state = model(ids[:, t:t + 1], state=state, modulation=mod)
            logits.append(out)
    return torch.cat(logits, 1), model.memory_states(state)["episodic"]


@pytest.mark.parametrize("write,W0,P,mod,values", [("delta", False, False, False, "onehot"),
                                                   ("delta", True, True, True, "onehot"),
                                                   ("delta", False, True, False, "embed"),
                                                   ("error", False, True, False, "onehot"),
                                                   ("error", True, False, True, "onehot")],
                         ids=["delta", "delta-W0-P-mod", "delta-embed-P", "error-P", "error-W0-mod"])
def test_the_memory_decodes_on_active_rows_as_the_dense_rule_does(write, W0, P, mod, values):
    model = _model(write, W0, values)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 31), generator=g)
    Ps = None
    if P:
        Ps = [None if s.P is None else s.P for s in model.init_state(2).fast()]
        Ps[-1] = 0.1 * torch.randn(2, *model.episodic.W0.shape, generator=g, dtype=torch.float64)
    modulation = torch.rand(2, 31, generator=g, dtype=torch.float64) if mod else None
    want, s_want = _decode(model, ids, False, Ps, modulation)
    got, s_got = _decode(model, ids, True, Ps, modulation)
    assert float((want - got).abs().max()) < 1e-10
    for name in ("S", "E", "conv"):
        torch.testing.assert_close(getattr(s_got, name), getattr(s_want, name), **TOL, msg=name)


def test_the_sparse_path_is_taken_only_for_one_token_without_autograd(monkeypatch):
    from cl_arch.kernels.episodic import step
    model = _model("delta")
    calls = []
    real = step.dense_delta_step
    monkeypatch.setattr("cl_arch.memory.write.dense_delta_step", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 256, (1, 4))
    st = model.init_state(1)
    _, st = model(ids[:, :1], state=st)  # autograd on: the dense rule
    with torch.no_grad():
        model(ids, state=st)  # four tokens: the dense rule
        assert not calls
        model(ids[:, :1], state=st)
    assert calls == [1]


def test_shipped_model_decodes_the_same_tokens_with_the_sparse_step():
    """The shipped model (fingerprint unchanged): a session's sampled tokens equal and its logits within
    float32 rounding of the dense rule's, for both write rules (48 tokens here; 300 in
    benchmarks/bench_decode.py): its own (the chunked error write) and the one-hot delta rule."""
    import cl_arch
    model = cl_arch.load_default()
    assert model.fingerprint() == "661ce72ea68e89f1"  # b3bc49a57787ce65 before it was trained with error writes
    for write in ("error", "delta"):
        if write == "delta":
            model.set_write("episodic", "delta")
        runs = []
        for sparse in (False, True):
            model.episodic.sparse_decode = sparse
            s = cl_arch.Session(model, adapt=True, seed=0)
            toks = s.generate(list(b"def main():\n    "), max_new_tokens=48, seed=0)
            runs.append((toks, s._next_logits, model.memory_states(s.state)["episodic"].S))
        (t0, z0, S0), (t1, z1, S1) = runs
        assert t0 == t1, write
        assert float((z0 - z1).abs().max()) < 1e-5 and float((S0 - S1).abs().max()) < 1e-5, write


@pytest.mark.parametrize("write", ["delta", "error"])
def test_the_in_place_decoder_equals_the_memory_token_by_token(write):
    """kernels/episodic/decoder.py (the prototype of an allocation-free decode loop) against the memory's own
    one-token calls: reads, S, E and p at 1e-10, the state's buffers never reallocated."""
    from cl_arch.kernels.episodic.decoder import EpisodicDecoder
    from cl_arch.memory import OutputContext
    model = _model(write, W0=True)
    ep = model.episodic
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 12, ep.head_v_dim
    h = torch.randn(B, T, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    base = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mod = torch.rand(B, T, generator=g, dtype=torch.float64)
    P = 0.1 * torch.randn(B, *ep.W0.shape, generator=g, dtype=torch.float64)
    from cl_arch.state import FastLayerState, StepContext
    st = FastLayerState(S=ep.initial_state(B, P).clone(), E=None, P=P, conv=None)
    dec = EpisodicDecoder(ep.R, ep.key_threshold, torch.sigmoid(ep.beta_logit), -ep.A_log.exp(), ep.read_scale,
                          SparseEpisodicState.from_dense(st.S, (ep.W0, P), p=torch.zeros(B, V, dtype=torch.float64)),
                          write=write)
    ptr = dec.state.UM.data_ptr()
    with torch.no_grad():
        for t in range(T):
            out = OutputContext(h=h[:, t:t + 1], ids=ids[:, t:t + 1], embed=model.embed, head=model.lm_head,
                                logits=base[:, t:t + 1])
            want, st = ep(out, st, StepContext(modulation=mod[:, t:t + 1]))
            got = dec.step(h[:, t], ids[:, t], base[:, t], modulation=mod[:, t])
            torch.testing.assert_close(got, want[:, 0], **TOL)
    S, E = dec.state.to_dense()
    torch.testing.assert_close(S, st.S, **TOL)
    torch.testing.assert_close(E, st.E, **TOL)
    if write == "error":
        torch.testing.assert_close(dec.state.p, st.conv[:, 0, -V:], **TOL)
    assert dec.state.UM.data_ptr() == ptr
