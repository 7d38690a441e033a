"""Triton kernels against the naive reference, under TRITON_INTERPRET=1 on CPU.

The interpreter runs every program in Python, so shapes are small (T <= 70,
K, V in {16, 32}) and cases are chosen to cover the paths (multiple checkpoint
segments with a partial last one, several V-blocks, varlen, both rules, with
and without decay, trace and initial states) rather than a full product.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere in this process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU",
                allow_module_level=True)

from cl_arch.kernels.plastic import plastic_rule  # noqa: E402
from cl_arch.kernels.plastic import chunk_triton as chunk  # noqa: E402
from cl_arch.kernels.plastic import fused_recurrent, naive_plastic_rule, triton_utils  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-sized shape: needs CUDA")
# On a GPU the chunk kernels multiply fp32 inputs in tf32 (chunk.FP32_DOT_CHOICES: ~3.5e-4 relative
# error measured with tf32 emulated); the interpreter multiplies in full fp32.
CHUNK_FP32_TOL = 5e-3 if DEVICE == "cuda" else 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, dtype=torch.float64, with_g=True, init=False, trace=True, seed=0):
    """Inputs as float64 on DEVICE, cast to ``dtype`` (states and lam stay >= fp32)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    sdt = torch.promote_types(dtype, torch.float32)
    x = dict(
        q=rnd(B, T, H, K).to(dtype),
        k=F.normalize(rnd(B, T, H, K), dim=-1).to(dtype),
        v=rnd(B, T, H, V).to(dtype),
        beta=torch.rand(B, T, H, generator=gen, dtype=torch.float64).to(dtype),
        g=(-0.3 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)).to(dtype) if with_g else None,
        lam=torch.rand(H, generator=gen, dtype=torch.float64).to(sdt) if trace else None,
        initial_state=rnd(B, H, K, V).to(sdt) if init else None,
        initial_trace=rnd(B, H, K, V).to(sdt) if init and trace else None,
    )
    return {n: (t.to(DEVICE) if t is not None else None) for n, t in x.items()}


def run_with_grads(fn, inputs, rule, seed=1, **kw):
    """Forward, then backward of a fixed random projection of (o, S_T, E_T)."""
    leaves = {n: (x.detach().clone().requires_grad_() if x is not None else None) for n, x in inputs.items()}
    out = fn(**leaves, rule=rule, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for t in out:
        if t is not None:
            loss = loss + (t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum()
    loss.backward()
    return out, {n: x.grad for n, x in leaves.items() if x is not None}


def assert_close(out, grads, ref_out, ref_grads, tol, what=""):
    for name, a, b in zip(("o", "S_T", "E_T"), out, ref_out):
        assert (a is None) == (b is None), (what, name)
        if b is not None:
            assert torch.isfinite(a).all(), (what, name)
            assert rel_err(a, b) < tol, (what, name, rel_err(a, b))
    assert grads.keys() == ref_grads.keys(), what
    for name in ref_grads:
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), (what, "d" + name)
        assert rel_err(grads[name], ref_grads[name]) < tol, (what, "d" + name, rel_err(grads[name], ref_grads[name]))


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty / empty_like returns NaN-filled memory: an output element a kernel
    forgets to write shows up as NaN instead of as stale zeros."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


# (B, T, H, K, V, rule, with_g, init, trace, checkpoint_every)
REC_CASES = [
    (2, 70, 2, 16, 32, "delta", True, True, True, 16),   # 5 segments, partial last one
    (2, 37, 2, 32, 16, "hebb", False, False, True, 64),
    (2, 1, 2, 16, 16, "delta", True, True, True, 64),
    (1, 33, 2, 16, 32, "delta", False, True, False, 8),  # no trace
    (2, 29, 2, 16, 16, "hebb", True, True, True, 7),     # checkpoint_every not dividing T
]


def case_id(B, T, H, K, V, rule, g, init, trace, C):
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-{rule}-{'g' if g else 'nog'}-{'init' if init else 'zero'}-{'lam' if trace else 'notrace'}-C{C}"


@pytest.mark.parametrize("B,T,H,K,V,rule,with_g,init,trace,C", REC_CASES, ids=[case_id(*c) for c in REC_CASES])
def test_triton_recurrent_matches_naive_float64(B, T, H, K, V, rule, with_g, init, trace, C, poison_empty):
    x = make_inputs(B, T, H, K, V, with_g=with_g, init=init, trace=trace)
    ref = run_with_grads(naive_plastic_rule, x, rule)
    out = run_with_grads(fused_recurrent.triton_recurrent_plastic_rule, x, rule, checkpoint_every=C)
    assert_close(*out, *ref, tol=1e-10)


def test_triton_recurrent_several_v_blocks(monkeypatch):
    # BV_CAP = 16 splits V = 32 into 2 programs whose dq/dk/dbeta/dg/lam partials are summed.
    monkeypatch.setattr(triton_utils, "BV_CAP", 16)
    x = make_inputs(1, 13, 2, 16, 32, init=True)
    ref = run_with_grads(naive_plastic_rule, x, "delta")
    out = run_with_grads(fused_recurrent.triton_recurrent_plastic_rule, x, "delta", checkpoint_every=8)
    assert_close(*out, *ref, tol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_triton_recurrent_low_precision(dtype, tol):
    x64 = make_inputs(1, 30, 2, 16, 16, init=True)
    ref = run_with_grads(naive_plastic_rule, x64, "delta")
    x = {n: (t.to(dtype) if n in ("q", "k", "v", "beta", "g") and t is not None else t) for n, t in x64.items()}
    x["initial_state"], x["initial_trace"], x["lam"] = (x64[n].float() for n in ("initial_state", "initial_trace", "lam"))
    out, grads = run_with_grads(plastic_rule, x, "delta", backend="triton_recurrent")
    assert out[0].dtype == dtype and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    assert all(grads[n].dtype == x[n].dtype for n in grads)
    assert_close(out, grads, *ref, tol=tol)


def test_triton_recurrent_varlen_equals_per_sequence_loop(poison_empty):
    lens = [5, 40, 1, 24]
    H, K, V = 2, 16, 16
    x = make_inputs(1, sum(lens), H, K, V, init=False)
    gen = torch.Generator().manual_seed(3)
    s0 = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64).to(DEVICE)
    e0 = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64).to(DEVICE)
    x.update(initial_state=s0, initial_trace=e0)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=DEVICE)
    out, grads = run_with_grads(fused_recurrent.triton_recurrent_plastic_rule, x, "delta", cu_seqlens=cu,
                                checkpoint_every=16)
    pieces, ref_grads = [], {}
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {m: (t[:, lo:hi] if m in ("q", "k", "v", "beta", "g") else t) for m, t in x.items()}
        part["initial_state"], part["initial_trace"] = s0[n:n + 1], e0[n:n + 1]
        pieces.append(naive_plastic_rule(**part))
    o_ref = torch.cat([p[0] for p in pieces], 1)
    assert rel_err(out[0], o_ref) < 1e-10
    assert rel_err(out[1], torch.cat([p[1] for p in pieces])) < 1e-10
    assert rel_err(out[2], torch.cat([p[2] for p in pieces])) < 1e-10
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name


# ----------------------------------------------------------------------------- chunk
# (B, T, H, K, V, rule, with_g, init, trace, chunk_size)
CHUNK_CASES = [
    (2, 70, 2, 16, 32, "delta", True, True, True, 32),   # 3 chunks, partial last one
    (2, 37, 2, 32, 16, "hebb", True, False, True, 16),
    (2, 1, 2, 16, 16, "delta", False, True, True, 16),
    (1, 21, 2, 16, 32, "delta", True, False, False, 16),  # no trace
]


@pytest.mark.parametrize("B,T,H,K,V,rule,with_g,init,trace,C", CHUNK_CASES, ids=[case_id(*c) for c in CHUNK_CASES])
def test_triton_chunk_matches_naive_float64(B, T, H, K, V, rule, with_g, init, trace, C, poison_empty):
    x = make_inputs(B, T, H, K, V, with_g=with_g, init=init, trace=trace)
    ref = run_with_grads(naive_plastic_rule, x, rule)
    out = run_with_grads(plastic_rule, x, rule, backend="triton_chunk", chunk_size=C)
    assert_close(*out, *ref, tol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, CHUNK_FP32_TOL), (torch.bfloat16, 2e-2),
                                       (torch.float16, 5e-3)], ids=["fp32", "bf16", "fp16"])
def test_triton_chunk_low_precision(dtype, tol):
    x64 = make_inputs(1, 40, 2, 16, 16, init=True)
    ref = run_with_grads(naive_plastic_rule, x64, "delta")
    x = {n: (t.to(dtype) if n in ("q", "k", "v", "beta", "g") and t is not None else t) for n, t in x64.items()}
    x["initial_state"], x["initial_trace"], x["lam"] = (x64[n].float() for n in ("initial_state", "initial_trace", "lam"))
    out, grads = run_with_grads(plastic_rule, x, "delta", backend="triton_chunk", chunk_size=16)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert_close(out, grads, *ref, tol=tol)


def test_triton_chunk_varlen_equals_per_sequence_loop(poison_empty):
    lens = [5, 40, 1, 17]
    H, K, V = 2, 16, 16
    x = make_inputs(1, sum(lens), H, K, V)
    gen = torch.Generator().manual_seed(3)
    s0 = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64).to(DEVICE)
    e0 = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64).to(DEVICE)
    x.update(initial_state=s0, initial_trace=e0)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=DEVICE)
    out, grads = run_with_grads(chunk.triton_chunk_plastic_rule, x, "delta", cu_seqlens=cu, chunk_size=16)
    # Reference: each sequence alone through naive, gradients through one joint loss.
    leaves = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    pieces = []
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {m: (t[:, lo:hi] if m in ("q", "k", "v", "beta", "g") else t) for m, t in leaves.items()}
        part["initial_state"], part["initial_trace"] = leaves["initial_state"][n:n + 1], leaves["initial_trace"][n:n + 1]
        pieces.append(naive_plastic_rule(**part))
    ref = (torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces]), torch.cat([p[2] for p in pieces]))
    gen = torch.Generator().manual_seed(1)
    sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in ref).backward()
    assert_close(out, grads, ref, {n: t.grad for n, t in leaves.items() if t is not None}, tol=1e-10)


# The chunkwise backward: the paths the forward cases above leave out.
CHUNK_BWD_CASES = [
    (2, 50, 2, 16, 16, "hebb", False, True, True, 16),   # hebb without decay, initial states
    (1, 64, 2, 32, 16, "delta", False, True, False, 32),  # exact multiple of the chunk, no trace
    (1, 70, 1, 16, 16, "delta", True, True, True, 64),   # one full chunk and a partial one
    (1, 150, 1, 16, 16, "delta", True, True, True, 128),  # 8 blocks of 16 in the blockwise inverse, 6 of them padding
]


@pytest.mark.parametrize("B,T,H,K,V,rule,with_g,init,trace,C", CHUNK_BWD_CASES,
                         ids=[case_id(*c) for c in CHUNK_BWD_CASES])
def test_triton_chunk_backward_matches_naive_float64(B, T, H, K, V, rule, with_g, init, trace, C, poison_empty):
    x = make_inputs(B, T, H, K, V, with_g=with_g, init=init, trace=trace, seed=5)
    ref = run_with_grads(naive_plastic_rule, x, rule)
    out = run_with_grads(chunk.triton_chunk_plastic_rule, x, rule, chunk_size=C)
    assert_close(*out, *ref, tol=1e-10)


@pytest.mark.parametrize("rule", ["delta", "hebb"])
def test_triton_chunk_backward_several_v_blocks(monkeypatch, rule):
    # BV_CAP = 16 splits V = 32 into 2 blocks: 2 dS programs, and the per-chunk program loops over both.
    monkeypatch.setattr(triton_utils, "BV_CAP", 16)
    x = make_inputs(1, 40, 2, 16, 32, init=True, seed=6)
    ref = run_with_grads(naive_plastic_rule, x, rule)
    out = run_with_grads(chunk.triton_chunk_plastic_rule, x, rule, chunk_size=16)
    assert_close(*out, *ref, tol=1e-10)


def test_triton_chunk_backward_output_only_and_float_lam():
    # Only o feeds the loss (dS_T, dE_T arrive as zeros); lam as a float has no gradient.
    x = make_inputs(2, 30, 2, 16, 16, init=True, seed=7)
    x.pop("lam")
    x["initial_trace"] = None  # unused without the final states: naive leaves it without a gradient
    ref = run_with_grads(naive_plastic_rule, x, "delta", lam=0.9, output_final_state=False)
    out = run_with_grads(chunk.triton_chunk_plastic_rule, x, "delta", lam=0.9, output_final_state=False, chunk_size=16)
    assert_close(*out, *ref, tol=1e-10)


@pytest.mark.parametrize("rule", ["delta", "hebb"])
def test_triton_chunk_backward_varlen_fp32(rule):
    # fp32 inputs, packed sequences (one shorter than a chunk, one spanning three), against
    # naive in float64 on each sequence alone.
    lens = [3, 45, 16]
    H, K, V = 2, 16, 16
    x64 = make_inputs(1, sum(lens), H, K, V, init=False, seed=8)
    gen = torch.Generator().manual_seed(9)
    x64["initial_state"] = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64).to(DEVICE)
    x64["initial_trace"] = torch.randn(len(lens), H, K, V, generator=gen, dtype=torch.float64).to(DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=DEVICE)
    x = {n: (t.float() if t is not None else None) for n, t in x64.items()}
    out, grads = run_with_grads(chunk.triton_chunk_plastic_rule, x, rule, cu_seqlens=cu, chunk_size=16)
    assert all(grads[n].dtype == torch.float32 for n in grads)
    leaves = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in x64.items()}
    pieces = []
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {m: (t[:, lo:hi] if m in ("q", "k", "v", "beta", "g") else t) for m, t in leaves.items()}
        part["initial_state"], part["initial_trace"] = leaves["initial_state"][n:n + 1], leaves["initial_trace"][n:n + 1]
        pieces.append(naive_plastic_rule(**part, rule=rule))
    ref = (torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces]), torch.cat([p[2] for p in pieces]))
    gen = torch.Generator().manual_seed(1)
    sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in ref).backward()
    assert_close(out, grads, ref, {n: t.grad for n, t in leaves.items() if t is not None}, tol=CHUNK_FP32_TOL)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(0) = -inf, by design
@pytest.mark.parametrize("backend", ["triton_chunk", "triton_recurrent"])
def test_triton_trace_at_lam_zero_and_one(backend):
    x = make_inputs(1, 20, 1, 16, 16, with_g=False)
    x.pop("lam")
    _, S, E = plastic_rule(**x, lam=1.0, backend=backend, chunk_size=16)
    assert rel_err(E, S) < 1e-10  # lam = 1, S_0 = 0, no decay: the trace is the sum of all writes = S
    lam0 = torch.zeros(1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    _, _, E0 = plastic_rule(**x, lam=lam0, backend=backend, chunk_size=16)
    _, _, E_ref = naive_plastic_rule(**x, lam=0.0)
    assert rel_err(E0, E_ref) < 1e-10
    E0.sum().backward()
    assert torch.isfinite(lam0.grad).all()


def test_triton_chunk_rejects_bad_chunk_size_and_cu_seqlens():
    x = make_inputs(1, 10, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        plastic_rule(**x, backend="triton_chunk", chunk_size=48)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk.triton_chunk_plastic_rule(**x, cu_seqlens=torch.tensor([0, 4, 3, 10]))


@needs_cuda
@pytest.mark.parametrize("backend", ["triton_chunk", "triton_recurrent"])
def test_triton_gpu_shape_against_torch_chunk(backend):
    x = make_inputs(2, 2048, 4, 128, 128, dtype=torch.bfloat16, init=True)
    ref = run_with_grads(plastic_rule, x, "delta", backend="torch_chunk")
    out = run_with_grads(plastic_rule, x, "delta", backend=backend)
    assert_close(*out, *ref, tol=2e-2)


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = make_inputs(1, 4, 1, 16, 16, dtype=torch.float32)
    if DEVICE == "cuda":
        x = {n: (t.cpu() if t is not None else None) for n, t in x.items()}
    with pytest.raises(ValueError, match="cannot run.*CUDA"):
        plastic_rule(**x, backend="triton_recurrent")


def test_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    from cl_arch.kernels import plastic as mod
    monkeypatch.delitem(mod.BACKENDS, "triton_recurrent")
    x = make_inputs(1, 4, 1, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="triton is not installed"):
        plastic_rule(**x, backend="triton_recurrent")


# ----------------------------------------------------------------------------- reward commit
from cl_arch.kernels.commit import reward_commit  # noqa: E402
from cl_arch.kernels.commit import naive_reward_commit  # noqa: E402
from cl_arch.kernels.commit.fused import fused_reward_commit  # noqa: E402

COMMIT_CASES = [("reward", 3.0), ("reward", None), ("retention", 3.0), ("reward-perhead", 0.5)]


@pytest.mark.parametrize("kind,clip", COMMIT_CASES, ids=[f"N3-H2-K16-V32-{k}-clip{c}" for k, c in COMMIT_CASES])
def test_triton_commit_matches_naive(kind, clip, poison_empty):
    gen = torch.Generator().manual_seed(0)
    N, H, K, V = 3, 2, 16, 32
    P = torch.randn(N, H, K, V, generator=gen).to(DEVICE)
    E = (3 * torch.randn(N, H, K, V, generator=gen)).to(DEVICE)
    E[1, 0] *= 1e-3  # one head under the clip, the others over it
    r = None if kind == "retention" else torch.tensor([1.0, -0.5, 0.25], device=DEVICE)
    b = torch.tensor([0.1, 0.2, -0.3], device=DEVICE)
    coef = dict(gamma=0.97, eta_s=0.3, eta_r=1.5)
    if kind == "reward-perhead":
        coef = dict(gamma=torch.tensor([0.9, 1.0], device=DEVICE), eta_s=torch.tensor([0.0, 0.2], device=DEVICE),
                    eta_r=torch.tensor([2.0, -1.0], device=DEVICE))
    P_ref, b_ref = naive_reward_commit(P, E, r, b, clip=clip, rho=0.1, **coef)
    P_new, b_new = fused_reward_commit(P, E, r, b, clip=clip, rho=0.1, **coef)
    assert rel_err(P_new, P_ref) < 1e-6 and rel_err(b_new, b_ref) < 1e-6
    # In place through the public entry: P and b are overwritten, one launch.
    P2, b2 = P.clone(), b.clone()
    P_out, b_out = reward_commit(P2, E, r, b2, clip=clip, rho=0.1, inplace=True, backend="triton", **coef)
    assert P_out is P2 and rel_err(P2, P_ref) < 1e-6
    assert rel_err(b_out, b_ref) < 1e-6 and (r is None or rel_err(b2, b_ref) < 1e-6)


def test_triton_commit_float_and_strided_rewards(poison_empty):
    # A float reward reaches the kernel as a stride-0 expand, a column slice as stride 2:
    # both must be read as dense [N] (review found the kernel reading past r otherwise).
    gen = torch.Generator().manual_seed(1)
    N, H, K, V = 4, 2, 16, 16
    P = torch.randn(N, H, K, V, generator=gen).to(DEVICE)
    E = torch.randn(N, H, K, V, generator=gen).to(DEVICE)
    b = torch.randn(N, generator=gen).to(DEVICE)
    for r in (1.0, torch.randn(N, 2, generator=gen).to(DEVICE)[:, 0]):
        P_ref, b_ref = reward_commit(P, E, r, b, clip=2.0, backend="naive")
        P_new, b_new = reward_commit(P, E, r, b, clip=2.0, backend="triton")
        assert rel_err(P_new, P_ref) < 1e-6 and rel_err(b_new, b_ref) < 1e-6
    with pytest.raises(ValueError, match="must not alias b"):
        fused_reward_commit(P, E, torch.ones(N, device=DEVICE), b, b_out=b)


def test_triton_commit_is_forward_only():
    P = torch.zeros(1, 1, 16, 16, device=DEVICE)
    E = torch.ones(1, 1, 16, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="forward only"):
        reward_commit(P, E, 1.0, backend="triton")
    # auto falls back to the differentiable PyTorch path when gradients are needed.
    P_new, _ = reward_commit(P, E, 1.0)
    assert P_new.requires_grad


@pytest.mark.parametrize("backend", ["triton_chunk", "triton_recurrent"])
def test_public_entry_routes_cu_seqlens_to_triton(backend):
    lengths = [7, 1, 30]
    cu = torch.tensor([0, 7, 8, 38], device=DEVICE)
    x = make_inputs(1, sum(lengths), 2, 16, 16)
    gen = torch.Generator().manual_seed(4)
    x["initial_state"] = torch.randn(3, 2, 16, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    o, S, E = plastic_rule(**x, cu_seqlens=cu, backend=backend, chunk_size=16)
    o_ref, S_ref, E_ref = plastic_rule(**x, cu_seqlens=cu, backend="naive")
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10 and rel_err(E, E_ref) < 1e-10
