"""The two-pass reward commit (``kernels/commit/twopass.py``, what ``backend="auto"`` runs on the CPU without
gradients) against the naive reference: P and b, per-head and float coefficients, with and without the clip,
a retention-only commit, in place into P, float32 and float64 tolerances; errors and fallbacks."""
import pytest
import torch

from cl_arch.kernels.commit import reward_commit, twopass_reward_commit

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(N, H, K, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(N, H, K, V, generator=g, dtype=dtype)
    E = 3.0 * torch.randn(N, H, K, V, generator=g, dtype=dtype)  # norms above the clip on some heads
    return P, E, torch.randn(N, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 1, 2048, 256), (2, 4, 32, 32), (3, 2, 7, 5)],
                         ids=lambda s: "N{}-H{}-K{}-V{}".format(*s))
@pytest.mark.parametrize("case", ["per_head", "floats", "no_clip", "retention"])
def test_twopass_equals_naive(shape, dtype, case):
    N, H, K, V = shape
    P, E, r, b = _inputs(N, H, K, V, dtype)
    kw = dict(gamma=torch.linspace(0.9, 1.0, H, dtype=dtype), eta_s=torch.linspace(0.0, 0.1, H, dtype=dtype),
              eta_r=torch.linspace(0.5, 1.5, H, dtype=dtype), clip=5.0 * K ** 0.5)
    if case == "floats":
        kw = dict(gamma=0.97, eta_s=0.05, eta_r=0.8, clip=2.0)
    if case == "no_clip":
        kw["clip"] = None
    if case == "retention":
        r = None
    P_ref, b_ref = reward_commit(P, E, r, b, backend="naive", **kw)
    P_new, b_new = reward_commit(P, E, r, b, backend="twopass", **kw)
    assert rel_err(P_new, P_ref) < TOL[dtype] and rel_err(b_new, b_ref) < TOL[dtype]
    assert not torch.isnan(P_new).any()
    auto, _ = reward_commit(P, E, r, b, **kw)  # the CPU without gradients: the two-pass path
    assert torch.equal(auto, P_new)
    P_in = P.clone()
    out, _ = reward_commit(P_in, E, r, b, inplace=True, **kw)
    assert out is P_in and torch.equal(P_in, P_new)


def test_out_may_alias_p_and_leaves_inputs_otherwise():
    P, E, r, b = _inputs(2, 2, 8, 8, torch.float64, seed=1)
    keep_P, keep_E = P.clone(), E.clone()
    P_new, _ = twopass_reward_commit(P, E, r, b)
    assert torch.equal(P, keep_P) and torch.equal(E, keep_E)
    out = torch.full_like(P, float("nan"))  # NaN-poisoned: every element must be written
    got, _ = twopass_reward_commit(P, E, r, b, out=out)
    assert got is out and torch.equal(out, P_new)


def test_gradients_take_the_reference_and_twopass_refuses_them():
    P, E, r, b = _inputs(1, 2, 4, 4, torch.float64, seed=2)
    E.requires_grad_(True)
    P_new, _ = reward_commit(P, E, r, b)  # auto: the differentiable reference
    assert P_new.requires_grad
    with pytest.raises(ValueError, match="forward only"):
        reward_commit(P, E, r, b, backend="twopass")


def test_a_trace_of_another_dtype_takes_the_reference():
    P, E, r, b = _inputs(1, 2, 4, 4, torch.float32, seed=3)
    P_new, _ = reward_commit(P, E.double(), r, b)
    ref, _ = reward_commit(P, E.double(), r, b, backend="naive")
    assert P_new.dtype == ref.dtype and torch.equal(P_new, ref)
