"""Reward commit in two passes over P and E and one allocation (forward only, any device).

``P <- gamma P + (eta_s + eta_r (r - b)) clip(E)`` as ``out = gamma * P`` then
``out += E * (coefficient * clip factor)``: the clip factor and the coefficient are per ``(session, head)``
scalars, so they are folded into one ``[N, H, 1, 1]`` tensor before E is touched. The reference
(:func:`.naive.naive_reward_commit`) materialises ``clip(E)``, ``gamma P``, ``coeff clip(E)`` and their sum,
four arrays as large as P; for the shipped model's 2048 x 256 memories (2 MB each) a session's commit was
mostly those allocations. Equal to the reference up to the order of two float multiplications.
"""
from typing import Optional, Tuple

import torch

from .naive import PerHead, _per_head


def twopass_reward_commit(
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The commit without autograd; ``out`` (may be ``P`` itself: in place) receives ``P_new``.

    Args:
        P, E: ``[N, H, K, V]``; r: ``[N]`` or None (retention only); b: ``[N]``.
        gamma, eta_s, eta_r: floats or ``[H]`` tensors.

    Returns:
        ``(P_new [N, H, K, V], b_new [N])``.
    """
    with torch.no_grad():
        if r is None:
            coeff = _per_head(eta_s, P) + torch.zeros_like(b)[:, None, None, None]
            b_new = b
        else:
            coeff = _per_head(eta_s, P) + _per_head(eta_r, P) * (r - b)[:, None, None, None]
            b_new = b + rho * (r - b)
        if clip is not None:
            norm = torch.linalg.vector_norm(E, dim=(-2, -1), keepdim=True)
            coeff = coeff * torch.clamp(clip / (norm + 1e-12), max=1.0)
        out = torch.mul(P, _per_head(gamma, P), out=out)
        out.addcmul_(E, coeff.expand(*P.shape[:2], 1, 1))
    return out, b_new


__all__ = ["twopass_reward_commit"]
