"""The plastic rule: every backend against the naive reference, and FLA's definition."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from cl_arch.kernels.plastic import plastic_rule
from cl_arch.kernels.plastic import naive_plastic_rule

FAST_BACKENDS = ["torch_chunk", "torch_recurrent"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, dtype=torch.float64, with_g=True, init=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    inputs = dict(
        q=rnd(B, T, H, K),
        k=F.normalize(rnd(B, T, H, K), dim=-1),
        v=rnd(B, T, H, V),
        beta=torch.rand(B, T, H, generator=gen, dtype=torch.float64).to(dtype),
        g=(-0.3 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)).to(dtype) if with_g else None,
        lam=torch.rand(H, generator=gen, dtype=torch.float64).to(dtype),
        initial_state=rnd(B, H, K, V) if init else None,
        initial_trace=rnd(B, H, K, V) if init else None,
    )
    return inputs


def run_with_grads(backend, inputs, rule, seed=1):
    """Forward, then backward of a random projection of (o, S_T, E_T)."""
    leaves = {n: (x.detach().clone().requires_grad_() if x is not None else None) for n, x in inputs.items()}
    o, S, E = plastic_rule(**leaves, rule=rule, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum() for t in (o, S, E))
    loss.backward()
    grads = {n: x.grad for n, x in leaves.items() if x is not None}
    return (o, S, E), grads


CASES = list(itertools.product([1, 63, 64, 100, 257], [1, 4], ["delta", "hebb"], [True, False], [True, False]))


@pytest.mark.parametrize(
    "T,H,rule,with_g,init", CASES,
    ids=[f"B2-T{T}-H{H}-K8-V12-{rule}-{'g' if g else 'nog'}-{'init' if i else 'zero'}" for T, H, rule, g, i in CASES],
)
def test_backends_match_naive_float64(T, H, rule, with_g, init):
    inputs = make_inputs(2, T, H, 8, 12, with_g=with_g, init=init)
    ref_out, ref_grads = run_with_grads("naive", inputs, rule)
    for backend in FAST_BACKENDS:
        out, grads = run_with_grads(backend, inputs, rule)
        for name, a, b in zip(("o", "S_T", "E_T"), out, ref_out):
            assert rel_err(a, b) < 1e-10, (backend, name)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert torch.isfinite(grads[name]).all(), (backend, name)
            assert rel_err(grads[name], ref_grads[name]) < 1e-10, (backend, "d" + name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_low_precision_against_float64_reference(dtype, tol, backend):
    inputs = make_inputs(1, 75, 2, 16, 16, init=True)
    ref = naive_plastic_rule(**inputs)
    low = {n: (x.to(dtype) if x is not None else None) for n, x in inputs.items()}
    low["initial_state"] = inputs["initial_state"].float()
    low["initial_trace"] = inputs["initial_trace"].float()
    low["lam"] = inputs["lam"].float()
    o, S, E = plastic_rule(**low, backend=backend)
    assert o.dtype == dtype and S.dtype == torch.float32
    for a, b in zip((o, S, E), ref):
        assert rel_err(a.double(), b) < tol


def fla_gated_delta_reference(q, k, v, beta, g, scale, h0):
    """flash-linear-attention's recurrent gated delta rule, re-derived from its definition."""
    B, T, H, K = q.shape
    h = h0.clone()
    outs = []
    for t in range(T):
        h = h * g[:, t].exp()[..., None, None]
        v_new = (v[:, t] - (h * k[:, t][..., None]).sum(-2)) * beta[:, t][..., None]
        h = h + k[:, t][..., None] * v_new[..., None, :]
        outs.append(((q[:, t] * scale)[..., None] * h).sum(-2))
    return torch.stack(outs, 1), h


@pytest.mark.parametrize("T", [1, 37, 130])
def test_delta_without_trace_is_fla_gated_delta_rule(T):
    x = make_inputs(2, T, 3, 16, 8, init=True)
    o, S, E = plastic_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], rule="delta", lam=None,
                           scale=0.3, initial_state=x["initial_state"], backend="naive")
    o_ref, h_ref = fla_gated_delta_reference(x["q"], x["k"], x["v"], x["beta"], x["g"], 0.3, x["initial_state"])
    assert E is None
    assert rel_err(o, o_ref) < 1e-12 and rel_err(S, h_ref) < 1e-12


def test_matches_installed_fla_reference_when_available():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    x = make_inputs(1, 50, 2, 16, 16, dtype=torch.float32, init=True)
    o_ref, h_ref = naive.naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"], output_final_state=True)
    o, S, _ = plastic_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                           backend="torch_chunk")
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, h_ref) < 1e-5


def test_state_passed_between_calls_equals_one_call():
    x = make_inputs(2, 90, 2, 8, 8, init=True)
    full = plastic_rule(**x, backend="naive")
    S, E, outs = x["initial_state"], x["initial_trace"], []
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 90)]:
        part = {n: (t[:, lo:hi] if n in ("q", "k", "v", "beta", "g") else t) for n, t in x.items()}
        part.update(initial_state=S, initial_trace=E)
        backend = "torch_recurrent" if hi - lo == 1 else "torch_chunk"
        o, S, E = plastic_rule(**part, backend=backend)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), full[0]) < 1e-10
    assert rel_err(S, full[1]) < 1e-10 and rel_err(E, full[2]) < 1e-10


@pytest.mark.parametrize("backend", ["naive"] + FAST_BACKENDS)
def test_trace_at_lam_zero_and_one(backend):
    x = make_inputs(1, 20, 1, 4, 4)
    x.pop("lam")
    _, S0, E0 = plastic_rule(**x, lam=0.0, backend=backend)
    _, S1, E1 = plastic_rule(**x, lam=1.0, backend=backend)
    # lam = 1: the trace is the sum of all writes = S_T - decayed S_0; with g = None and S_0 = 0, E = S.
    x.pop("g")
    _, S, E = plastic_rule(**x, lam=1.0, backend=backend)
    assert rel_err(E, S) < 1e-10
    # lam = 0: only the last write survives.
    lam0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    _, _, E = plastic_rule(**x, lam=lam0, backend=backend)
    E.sum().backward()
    assert torch.isfinite(lam0.grad).all()
    k, v, beta = x["k"][0, -1, 0], x["v"][0, -1, 0], x["beta"][0, -1, 0]
    _, S_prev, _ = plastic_rule(**{n: (t[:, :-1] if t is not None else None) for n, t in x.items()},
                                backend="naive")
    last_write = beta * torch.outer(k, v - S_prev[0, 0].T @ k)
    assert rel_err(E[0, 0], last_write) < 1e-10


def test_auto_picks_recurrent_for_short_and_chunk_for_long(monkeypatch):
    from cl_arch.kernels import plastic as mod
    called = []
    for name in FAST_BACKENDS:
        fn = mod.BACKENDS[name]
        monkeypatch.setitem(mod.BACKENDS, name, lambda *a, _n=name, _f=fn, **kw: called.append(_n) or _f(*a, **kw))
    for T in (1, 200):
        x = make_inputs(1, T, 1, 4, 4)
        plastic_rule(**x)
    assert called == ["torch_recurrent", "torch_chunk"]


def test_env_forces_backend(monkeypatch):
    from cl_arch.kernels.plastic import resolve_backend
    monkeypatch.setenv("CL_ARCH_BACKEND", "naive")
    assert resolve_backend("chunk", "cpu") == "naive"
    monkeypatch.setenv("CL_ARCH_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CL_ARCH_BACKEND"):
        resolve_backend("chunk", "cpu")


BAD = [
    ("q", lambda x: x.update(q=x["q"][0]), "q must have 4"),
    ("k", lambda x: x.update(k=x["k"][:, :-1]), "k has shape"),
    ("v", lambda x: x.update(v=x["v"][:, :, :1]), "v has shape"),
    ("dtype", lambda x: x.update(v=x["v"].float()), "share a dtype"),
    ("q-nan", lambda x: x["q"].__setitem__((0, 3, 0, 0), float("nan")), "q contains NaN"),
    ("beta-neg", lambda x: x["beta"].__setitem__((0, 2, 0), -0.1), "beta must be >= 0"),
    ("beta-big", lambda x: x["beta"].__setitem__((0, 2, 0), 1.5), "beta must be <= 1"),
    ("g-pos", lambda x: x["g"].__setitem__((0, 1, 0), 0.2), "g must be <= 0"),
    ("lam", lambda x: x.update(lam=1.2), "lam must be <= 1"),
    ("lam-shape", lambda x: x.update(lam=torch.ones(3, dtype=torch.float64)), "lam must be"),
    ("state", lambda x: x.update(initial_state=torch.zeros(1, 1, 3, 3, dtype=torch.float64)), "initial_state has shape"),
    ("state-int", lambda x: x.update(initial_state=torch.zeros(1, 2, 4, 4, dtype=torch.long)), "initial_state must be a floating"),
    ("beta-type", lambda x: x.update(beta=0.5), "beta must be a torch.Tensor"),
]


@pytest.mark.parametrize("what,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(what, mutate, message):
    x = make_inputs(1, 5, 2, 4, 4)
    mutate(x)
    with pytest.raises(ValueError, match=message):
        plastic_rule(**x)


def test_bad_rule_and_backend():
    x = make_inputs(1, 5, 1, 4, 4)
    with pytest.raises(ValueError, match="rule"):
        plastic_rule(**x, rule="oja")
    with pytest.raises(ValueError, match="backend"):
        plastic_rule(**x, backend="cuda_magic")


@pytest.mark.parametrize("backend", ["naive"] + FAST_BACKENDS)
def test_packed_sequences_equal_separate_calls(backend):
    lengths = [5, 1, 70, 33]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)))
    x = make_inputs(1, int(cu[-1]), 2, 8, 4)
    N = len(lengths)
    gen = torch.Generator().manual_seed(3)
    x["initial_state"] = torch.randn(N, 2, 8, 4, generator=gen, dtype=torch.float64)
    x["initial_trace"] = torch.randn(N, 2, 8, 4, generator=gen, dtype=torch.float64)
    o, S, E = plastic_rule(**x, cu_seqlens=cu, backend=backend)
    assert S.shape == (N, 2, 8, 4) and E.shape == (N, 2, 8, 4)
    for n in range(N):
        lo, hi = int(cu[n]), int(cu[n + 1])
        part = {m: (t[:, lo:hi] if m in ("q", "k", "v", "beta", "g") else t) for m, t in x.items()}
        part.update(initial_state=x["initial_state"][n:n + 1], initial_trace=x["initial_trace"][n:n + 1])
        o_n, S_n, E_n = plastic_rule(**part, backend="naive")
        assert rel_err(o[:, lo:hi], o_n) < 1e-10
        assert rel_err(S[n:n + 1], S_n) < 1e-10 and rel_err(E[n:n + 1], E_n) < 1e-10


@pytest.mark.parametrize("bad,message", [
    (torch.tensor([0, 5, 4, 9]), "rise strictly"),
    (torch.tensor([1, 9]), "rise strictly"),
    (torch.tensor([0.0, 9.0]), "integer tensor"),
], ids=["decreasing", "not-from-zero", "float"])
def test_bad_cu_seqlens(bad, message):
    x = make_inputs(1, 9, 1, 4, 4)
    with pytest.raises(ValueError, match=message):
        plastic_rule(**x, cu_seqlens=bad)
