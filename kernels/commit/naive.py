"""Reference three-factor commit of an episode's trace into persistent memory.

docs/design.md, "The commit"::

    P <- gamma * P + (eta_s + eta_r * (r - b)) * clip(E)
    b <- b + rho * (r - b)

``clip`` rescales each head's trace to Frobenius norm at most ``clip``. The
clip is the step-size normaliser that keeps the rule bounded: a negative
advantage times a delta-rule trace contains ``+beta k k^T P`` terms that would
otherwise grow P along k without limit.
"""
from typing import Optional, Tuple, Union

import torch

PerHead = Union[float, torch.Tensor]


def clip_per_head(E: torch.Tensor, clip: Optional[float], eps: float = 1e-12) -> torch.Tensor:
    """Scale each ``[K, V]`` head of ``E [N, H, K, V]`` to Frobenius norm <= clip."""
    if clip is None:
        return E
    norm = torch.linalg.vector_norm(E, dim=(-2, -1), keepdim=True)
    return E * torch.clamp(clip / (norm + eps), max=1.0)


def _per_head(x: PerHead, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[H]`` tensor as ``[1, H, 1, 1]`` (or a scalar) in like's dtype."""
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return t.reshape(1, -1, 1, 1) if t.dim() == 1 else t


def naive_reward_commit(
    P: torch.Tensor,
    E: torch.Tensor,
    r: Optional[torch.Tensor],
    b: torch.Tensor,
    gamma: PerHead = 0.98,
    eta_s: PerHead = 0.0,
    eta_r: PerHead = 1.0,
    clip: Optional[float] = 10.0,
    rho: float = 0.1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place commit, differentiable in P, E, b and every coefficient.

    Args:
        P, E: ``[N, H, K, V]`` persistent memory and episode traces of N sessions.
        r: ``[N]`` rewards, or None for a retention-only commit (no advantage,
            baseline unchanged).
        b: ``[N]`` running reward baselines.
        gamma, eta_s, eta_r: floats or ``[H]`` tensors.

    Returns:
        ``(P_new [N, H, K, V], b_new [N])``.
    """
    Ec = clip_per_head(E, clip)
    if r is None:
        coeff = _per_head(eta_s, P) + torch.zeros_like(b)[:, None, None, None]
        b_new = b
    else:
        adv = (r - b)[:, None, None, None]
        coeff = _per_head(eta_s, P) + _per_head(eta_r, P) * adv
        b_new = b + rho * (r - b)
    return _per_head(gamma, P) * P + coeff * Ec, b_new
