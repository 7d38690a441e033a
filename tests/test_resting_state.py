"""The resting state M = W0 + P: the fast memory decays toward M, not toward zero
(docs/design.md, "The rule").

Every backend against the naive loop, which applies ``S' = M + a (S - M)`` token by token, in float64:
outputs, final states, traces and every gradient including ``dM``.
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    # As tests/test_triton_kernels.py: the Triton backends run under the interpreter on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cl_arch.kernels.plastic import BACKENDS, plastic_rule  # noqa: E402
from cl_arch.kernels.plastic import naive_plastic_rule  # noqa: E402

from test_plastic_rule import make_inputs, rel_err  # noqa: E402


def _triton_backends():
    try:
        import triton
    except ImportError:
        return []
    if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
        return []
    return [b for b in ("triton_chunk", "triton_recurrent") if b in BACKENDS]


TRITON = _triton_backends()


def run_with_grads(backend, inputs, rule, seed=1, **kw):
    leaves = {n: (x.detach().clone().requires_grad_() if x is not None else None) for n, x in inputs.items()}
    o, S, E = plastic_rule(**leaves, rule=rule, backend=backend, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum() for t in (o, S, E))
    loss.backward()
    return (o, S, E), {n: x.grad for n, x in leaves.items() if x is not None}


def with_rest(inputs, B, H, K, V, shared, seed=7):
    gen = torch.Generator().manual_seed(seed)
    shape = (H, K, V) if shared else (B, H, K, V)
    out = dict(inputs)
    out["resting_state"] = torch.randn(*shape, generator=gen, dtype=torch.float64).to(inputs["q"].dtype)
    return out


CASES = list(itertools.product([1, 63, 130], ["delta", "hebb"], [True, False], [True, False]))


@pytest.mark.parametrize(
    "T,rule,init,shared", CASES,
    ids=[f"B2-T{T}-H3-K8-V12-{r}-{'init' if i else 'rest'}-{'M3d' if s else 'M4d'}" for T, r, i, s in CASES])
def test_backends_match_naive_with_resting_state_float64(T, rule, init, shared):
    inputs = with_rest(make_inputs(2, T, 3, 8, 12, init=init), 2, 3, 8, 12, shared)
    ref_out, ref_grads = run_with_grads("naive", inputs, rule)
    assert "resting_state" in ref_grads
    # The interpreter runs every Triton program in Python: one length (63, odd, several chunks) for it.
    for backend in ["torch_chunk", "torch_recurrent"] + (TRITON if T == 63 else []):
        out, grads = run_with_grads(backend, inputs, rule, **({"chunk_size": 16} if "chunk" in backend else {}))
        for name, a, b in zip(("o", "S_T", "E_T"), out, ref_out):
            assert rel_err(a, b) < 1e-10, (backend, name)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert rel_err(grads[name], ref_grads[name]) < 1e-10, (backend, "d" + name)


def test_zero_resting_state_is_the_plain_rule():
    inputs = make_inputs(2, 40, 2, 8, 8, init=True)
    plain = plastic_rule(**inputs, backend="torch_chunk")
    rest = plastic_rule(**inputs, backend="torch_chunk", resting_state=torch.zeros(2, 8, 8, dtype=torch.float64))
    for a, b in zip(plain, rest):
        assert torch.equal(a, b)


def test_initial_state_none_means_rest():
    inputs = make_inputs(1, 20, 2, 8, 8)
    M = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    a = plastic_rule(**inputs, resting_state=M, backend="torch_recurrent")
    inputs["initial_state"] = M.clone()
    b = plastic_rule(**inputs, resting_state=M, backend="torch_recurrent")
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-12


def test_resting_state_still_read_after_2048_fast_decaying_tokens():
    """With decay toward zero, M placed in S0 is gone (0.5**2048) after 2048 tokens of heads that forget
    half their state per token; decaying toward M, the read still moves with M. Fails on the old rule."""
    B, T, H, K, V = 1, 2048, 2, 8, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.full((B, T, H), 0.5, dtype=torch.float64)
    g = torch.full((B, T, H), -0.7, dtype=torch.float64)
    M = torch.randn(H, K, V, generator=gen, dtype=torch.float64)
    for backend in ("torch_chunk", "torch_recurrent"):
        o0, _, _ = plastic_rule(q, k, v, beta, g, backend=backend)
        o1, _, _ = plastic_rule(q, k, v, beta, g, resting_state=M, backend=backend)
        # the read at the last token differs by (a decayed) M's read: of the order of M itself
        diff = (o1[:, -1] - o0[:, -1]).norm() / o0[:, -1].norm()
        assert diff > 0.1, backend


def test_resting_state_varlen_matches_separate_calls():
    gen = torch.Generator().manual_seed(3)
    H, K, V = 2, 8, 8
    lens = [5, 17, 9]
    T = sum(lens)
    inputs = make_inputs(1, T, H, K, V, init=False)
    M = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 5, 22, 31])
    o, S, E = plastic_rule(**inputs, resting_state=M, cu_seqlens=cu, backend="torch_chunk")
    for n, (lo, hi) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        part = {key: (x[:, lo:hi] if (x is not None and x.dim() == 3 and x.shape[1] == T) or
                      (x is not None and x.dim() == 4 and x.shape[1] == T) else x)
                for key, x in inputs.items()}
        ref = naive_plastic_rule(**part, resting_state=M[n:n + 1])
        assert rel_err(o[:, lo:hi], ref[0]) < 1e-10
        assert rel_err(S[n:n + 1], ref[1]) < 1e-10
        assert rel_err(E[n:n + 1], ref[2]) < 1e-10


@pytest.mark.parametrize("bad,msg", [
    (torch.zeros(3, 8, 8, dtype=torch.float64), "resting_state has shape"),
    (torch.full((2, 8, 8), float("nan"), dtype=torch.float64), "resting_state contains NaN"),
    (torch.zeros(2, 8, 8, dtype=torch.int64), "resting_state must be a floating-point"),
])
def test_bad_resting_state_is_named(bad, msg):
    inputs = make_inputs(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match=msg):
        plastic_rule(**inputs, resting_state=bad)
