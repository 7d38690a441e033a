"""Reward commit as one Triton launch over N sessions x H heads (forward only).

``P <- gamma P + (eta_s + eta_r (r - b)) clip(E)``, ``b <- b + rho (r - b)``
with the per-head Frobenius clip of :func:`naive.clip_per_head`. One program
owns one ``[K, V]`` head of one session and makes two passes over it: the
first sums E^2 for the clip factor, the second writes P. P is read and written
element by element by the same program, so the output may alias P (in place).

This path is forward only: its results carry no autograd graph. Meta-training,
which differentiates through the commit, uses the PyTorch path (``naive``),
which :func:`cl_arch.kernels.reward_commit` picks when any input requires grad.
"""
from typing import Optional, Tuple, Union

import torch

from ..plastic.triton_utils import HAS_TRITON, import_triton, jit_for_env, triton_available_for

triton = None
tl = None
constexpr = "tl.constexpr"  # becomes tl.constexpr on the first call (see plastic.triton_utils.import_triton)

PerHead = Union[float, torch.Tensor]


def _reward_commit_kernel(
    P, E, r, b, gamma, eta_s, eta_r, P_out, b_out, clip, rho, eps,
    H: constexpr, KV: constexpr, BLOCK: constexpr, HAS_R: constexpr, HAS_CLIP: constexpr, DT: constexpr,
):
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    base = i_nh.to(tl.int64) * KV
    offs = tl.arange(0, BLOCK)

    factor = tl.full([], 1.0, DT)
    if HAS_CLIP:
        # Pass 1: Frobenius norm of this head's trace.
        acc = tl.zeros([BLOCK], dtype=DT)
        for start in range(0, KV, BLOCK):
            m = start + offs < KV
            e = tl.load(E + base + start + offs, mask=m, other=0).to(DT)
            acc += e * e
        norm = tl.sqrt(tl.sum(acc, 0))
        factor = tl.minimum(clip / (norm + eps), 1.0)

    coeff = tl.load(eta_s + i_h).to(DT)
    if HAS_R:
        adv = tl.load(r + i_n).to(DT) - tl.load(b + i_n).to(DT)
        coeff += tl.load(eta_r + i_h).to(DT) * adv
        if i_h == 0:  # one program per session moves its baseline
            tl.store(b_out + i_n, (tl.load(b + i_n).to(DT) + rho * adv).to(b_out.dtype.element_ty))
    scale = coeff * factor
    g = tl.load(gamma + i_h).to(DT)
    # Pass 2: the commit itself; each element is read before it is written, so P_out may be P.
    for start in range(0, KV, BLOCK):
        m = start + offs < KV
        p = tl.load(P + base + start + offs, mask=m, other=0).to(DT)
        e = tl.load(E + base + start + offs, mask=m, other=0).to(DT)
        tl.store(P_out + base + start + offs, (g * p + scale * e).to(P_out.dtype.element_ty), mask=m)


def fused_reward_commit(
    P: torch.Tensor,
    E: torch.Tensor,
    r: Optional[torch.Tensor],
    b: torch.Tensor,
    gamma: PerHead = 0.98,
    eta_s: PerHead = 0.0,
    eta_r: PerHead = 1.0,
    clip: Optional[float] = 10.0,
    rho: float = 0.1,
    out: Optional[torch.Tensor] = None,
    b_out: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton commit; same contract as :func:`naive_reward_commit`, without gradients.

    Args:
        P, E: ``[N, H, K, V]``; r: ``[N]`` or None (retention only, b unchanged);
        b: ``[N]``; gamma, eta_s, eta_r: floats or ``[H]`` tensors.
        out: ``[N, H, K, V]`` buffer for the new P (may be P itself: in place); None allocates.
        b_out: ``[N]`` buffer for the new baseline; must not alias b (all heads of a
            session read b while head 0 writes); None allocates.

    Returns:
        ``(P_new [N, H, K, V], b_new [N])`` (``out`` and ``b_out`` when given).

    Raises:
        ValueError: when Triton cannot run on these tensors.
    """
    why = triton_available_for(P)
    if why is not None:
        raise ValueError(f"commit backend 'triton' cannot run: {why}")
    import_triton(globals())
    N, H, K, V = P.shape
    P_c, E_c = P.contiguous(), E.contiguous()
    acc = torch.promote_types(P.dtype, torch.float32)

    def per_head(x):
        return torch.as_tensor(x, dtype=acc, device=P.device).expand(H).contiguous()

    if out is None:
        out = torch.empty_like(P_c)
    if out.shape != P.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(P.shape)} tensor")
    # The kernel indexes r, b and b_out as dense [N]: a float reward arrives as a
    # stride-0 expand of one element, which must be materialised first.
    b_c = b.contiguous()
    r_c = r.contiguous() if r is not None else None
    if r is not None and b_out is None:
        b_out = torch.empty_like(b_c)
    if b_out is not None:
        if tuple(b_out.shape) != (N,) or not b_out.is_contiguous():
            raise ValueError(f"b_out must be a contiguous [{N}] tensor, got shape {tuple(b_out.shape)}")
        if b_out.data_ptr() == b_c.data_ptr():
            raise ValueError("b_out must not alias b: every head of a session reads b while head 0 writes b_out")
    KV = K * V
    BLOCK = min(triton.next_power_of_2(KV), 2048)
    jit_for_env(_reward_commit_kernel)[(N * H,)](
        P_c, E_c, r_c, b_c, per_head(gamma), per_head(eta_s), per_head(eta_r), out, b_out,
        float(clip) if clip is not None else 0.0, float(rho), eps,
        H=H, KV=KV, BLOCK=BLOCK, HAS_R=r is not None, HAS_CLIP=clip is not None,
        DT=tl.float64 if acc == torch.float64 else tl.float32,
    )
    return out, (b if r is None else b_out)


__all__ = ["fused_reward_commit", "HAS_TRITON"]
