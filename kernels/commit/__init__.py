"""Reward commit: fold an episode's eligibility trace into persistent memory P."""
from typing import Optional, Tuple, Union

import torch

from .. import checks as _checks
from ..checks import check_finite, check_per_head, check_tensor
from ..plastic.triton_utils import triton_available_for
from .fused import HAS_TRITON, fused_reward_commit
from .naive import clip_per_head, naive_reward_commit
from .twopass import twopass_reward_commit

# naive: the differentiable reference; twopass: forward only, one allocation (what a session's commit runs)
COMMIT_BACKENDS = {"naive": naive_reward_commit, "twopass": twopass_reward_commit}
if HAS_TRITON:
    # Forward only, one launch, in place when asked; the naive path is the differentiable one.
    COMMIT_BACKENDS["triton"] = fused_reward_commit


def reward_commit(
    P: torch.Tensor,
    E: torch.Tensor,
    r: Optional[Union[float, torch.Tensor]] = None,
    b: Optional[Union[float, torch.Tensor]] = None,
    *,
    gamma: Union[float, torch.Tensor] = 0.98,
    eta_s: Union[float, torch.Tensor] = 0.0,
    eta_r: Union[float, torch.Tensor] = 1.0,
    clip: Optional[float] = 10.0,
    rho: float = 0.1,
    inplace: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Three-factor commit ``P <- gamma P + (eta_s + eta_r (r - b)) clip(E)``, ``b <- b + rho (r - b)``.

    Args:
        P, E: ``[N, H, K, V]`` (N sessions; a ``[H, K, V]`` pair is treated as N = 1).
        r: reward per session, float or ``[N]``; None commits with no advantage
            (retention only, ``eta_s``) and leaves the baseline alone.
        b: running baseline, float or ``[N]``; None means 0.
        gamma: forgetting of P, a float or ``[H]`` tensor, in (0, 1] either way;
            eta_s, eta_r: floats or ``[H]`` tensors.
        clip: per-head Frobenius bound on E (None disables: unbounded, see docs/design.md, "The commit").
        rho: baseline step in [0, 1].
        inplace: write the result into P (and b if it is a tensor) and return them.

    Returns:
        ``(P_new [N, H, K, V], b_new [N])`` (unbatched in, unbatched P out).

    Raises:
        ValueError: naming the argument for wrong shapes, NaN/inf (reward included)
            or out-of-range coefficients. Nothing is modified when it raises.
    """
    squeeze = isinstance(P, torch.Tensor) and P.dim() == 3
    check_tensor("P", P, ndim=3 if squeeze else 4)
    Pb = P.unsqueeze(0) if squeeze else P
    N, H = Pb.shape[:2]
    check_tensor("E", E, shape=tuple(P.shape))
    Eb = E.unsqueeze(0) if squeeze else E
    check_finite("P", P)
    check_finite("E", E)

    def as_vec(name, x, default):
        if x is None:
            x = default
        if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
            raise ValueError(f"{name} must be a number or a tensor, got {type(x).__name__}")
        t = torch.as_tensor(x, dtype=Pb.dtype, device=Pb.device)
        if t.dim() == 0:
            t = t.expand(N)
        if t.shape != (N,):
            raise ValueError(f"{name} must be a number or a [{N}] tensor, got shape {tuple(t.shape)}")
        check_finite(name, t)
        return t

    r_t = None if r is None else as_vec("r", r, None)
    b_t = as_vec("b", b, 0.0)
    check_per_head("gamma", gamma, H, 0.0, 1.0)
    # (0, 1] for floats and tensors alike (docs/design.md, "The commit"): gamma = 0 would erase P at
    # every commit.
    # Tensors skip value checks under CL_ARCH_VALUE_CHECKS=0, as every other tensor argument does.
    if (_checks.VALUE_CHECKS or not isinstance(gamma, torch.Tensor)) and bool((torch.as_tensor(gamma) <= 0).any()):
        got = f"min {float(gamma.min()):.6g}" if isinstance(gamma, torch.Tensor) else gamma
        raise ValueError(f"gamma must be in (0, 1], got {got}")
    check_per_head("eta_s", eta_s, H, None, None)
    check_per_head("eta_r", eta_r, H, None, None)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip must be a positive float or None, got {clip!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a float in [0, 1], got {rho!r}")
    if backend == "triton" and "triton" not in COMMIT_BACKENDS:
        raise ValueError("commit backend 'triton' cannot run: triton is not installed")
    if backend != "auto" and backend not in COMMIT_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(COMMIT_BACKENDS)}, got {backend!r}")
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (P, E, r, b, gamma, eta_s, eta_r))
    if backend == "auto":
        # The Triton commit and the two-pass one have no backward: anything that needs gradients takes the
        # reference; so does a trace of another dtype than P (the reference promotes, an in-place add cannot).
        if needs_grad or E.dtype != P.dtype:
            backend = "naive"
        else:
            backend = "triton" if (Pb.is_cuda and "triton" in COMMIT_BACKENDS) else "twopass"
    if backend == "twopass" and needs_grad:
        raise ValueError("commit backend 'twopass' is forward only; use backend='naive' to differentiate")
    extra = {}
    if backend == "twopass" and inplace and Pb.is_contiguous() and E.dtype == P.dtype:
        extra = {"out": Pb}
    if backend == "triton":
        if needs_grad:
            raise ValueError("commit backend 'triton' is forward only; use backend='naive' to differentiate")
        why = triton_available_for(Pb)
        if why is not None:
            raise ValueError(f"commit backend 'triton' cannot run: {why}")
        if inplace and Pb.is_contiguous():
            # Write straight into P: one launch, no copy of P afterwards. b is not aliased:
            # every head's program of a session reads b while head 0 writes the new one.
            extra = {"out": Pb}

    P_new, b_new = COMMIT_BACKENDS[backend](Pb, Eb, r_t, b_t, gamma=gamma, eta_s=eta_s, eta_r=eta_r,
                                            clip=clip, rho=rho, **extra)
    if squeeze:
        P_new = P_new.squeeze(0)
    if inplace:
        with torch.no_grad():
            if P_new.data_ptr() != P.data_ptr():
                P.copy_(P_new)
            if isinstance(b, torch.Tensor) and b.shape == b_new.shape and b_new.data_ptr() != b.data_ptr():
                b.copy_(b_new)
        return P, (b if isinstance(b, torch.Tensor) and b.shape == b_new.shape else b_new)
    return P_new, b_new


__all__ = ["reward_commit", "naive_reward_commit", "twopass_reward_commit", "clip_per_head", "COMMIT_BACKENDS"]
