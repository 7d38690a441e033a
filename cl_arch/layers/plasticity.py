"""What every fast-weight memory shares: the base memory ``W0``, the resting state ``M = W0 + P``
and the per-head plasticity settings the commit reads (DESIGN.md, "The rule")."""
import math
from typing import Optional

import torch
import torch.nn as nn

from cl_arch.kernels import plastic_rule, resolve_backend

from ..config import PlasticConfig
from ..state import FastLayerState


def logit(p: float) -> float:
    # lam = 1 or gamma = 1 are legal settings; keep the unconstrained parameter finite.
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


class PlasticMemory(nn.Module):
    """Base of :class:`FastWeightLayer` and :class:`ReadoutMemory`: ``n_heads`` memories ``[K, V]``.

    Parameters:
        W0 ``[H, K, V]``: base memory; with P the resting state ``M = W0 + P`` where every episode
            starts and toward which the memory decays; zeros at init.
        lam_logit, gamma_logit, eta_s, eta_r ``[H]``: plasticity settings, unconstrained;
            ``lam`` and ``gamma`` are their sigmoids. The commit reads them; the forward pass
            uses ``lam`` for the eligibility trace.
    """

    def _init_memory(self, config: PlasticConfig, H: int, K: int, V: int) -> None:
        self.n_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.W0 = nn.Parameter(torch.zeros(H, K, V))
        learn = config.learn_plasticity
        if config.lam is not None:
            self.lam_logit = nn.Parameter(torch.full((H,), logit(config.lam)), requires_grad=learn)
        else:
            self.lam_logit = None
        self.gamma_logit = nn.Parameter(torch.full((H,), logit(config.gamma)), requires_grad=learn)
        self.eta_s = nn.Parameter(torch.full((H,), float(config.eta_s)), requires_grad=learn)
        self.eta_r = nn.Parameter(torch.full((H,), float(config.eta_r)), requires_grad=learn)

    @property
    def lam(self) -> Optional[torch.Tensor]:
        """Trace decay per head ``[H]`` in (0, 1), or None when the trace is disabled."""
        return None if self.lam_logit is None else torch.sigmoid(self.lam_logit)

    @property
    def gamma(self) -> torch.Tensor:
        """Persistent-memory retention per head ``[H]`` in (0, 1)."""
        return torch.sigmoid(self.gamma_logit)

    @property
    def state_dtype(self) -> torch.dtype:
        """States are kept in float32 (float64 when the model is double)."""
        return torch.promote_types(self.W0.dtype, torch.float32)

    def resting_state(self, batch_size: int, P: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``M = W0 + P`` as ``[B, H, K, V]`` (``[H, K, V]`` when P is None) in :attr:`state_dtype`;
        differentiable in W0 and P. The episode starts at M and decays back toward it."""
        M = self.W0.to(self.state_dtype)
        if P is not None:
            M = M + P.to(self.state_dtype)
        return M

    def initial_state(self, batch_size: int, P: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``S0 = M = W0 + P`` as ``[B, H, K, V]`` in :attr:`state_dtype`; differentiable in W0."""
        M = self.resting_state(batch_size, P)
        return M.expand(batch_size, *self.W0.shape) if M.dim() == 3 else M

    def cache_shape(self, batch_size: int):
        """Shape of the input cache a stream carries (``FastLayerState.conv``), or None."""
        raise NotImplementedError

    def run_rule(self, q, k, v, beta, g, state: FastLayerState, lam, output_final_state: bool, rule: str = "delta",
                 scale=None, rest: bool = True):
        """:func:`plastic_rule` on this memory's state: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``,
        ``beta, g [B, T, H]`` -> ``(o [B, T, H, V], S_T, E_T)``.

        The memory relaxes toward its resting state ``M = W0 + P`` (DESIGN.md), so what a commit put
        in P acts on every token. ``rest=False`` is the first design's rule: start at ``W0 + P`` and
        decay toward zero. ``lam`` overrides the trace decay (float or ``[H]``; None: own).
        Decode steps take the per-token loop, training and prefill the chunked form (FLA's rule).
        """
        B, T = q.shape[:2]
        M = self.resting_state(B, state.P)
        S0 = None if state.S is None else state.S.to(self.state_dtype)
        if not rest:
            S0, M = (self.initial_state(B, state.P) if S0 is None else S0), None
        lam = self.lam if lam is None else torch.as_tensor(lam, device=q.device)
        mode = "recurrent" if (not self.training and T <= self.config.recurrent_threshold) else "chunk"
        return plastic_rule(
            q, k, v, beta, g, rule=rule, scale=scale,
            lam=None if lam is None else lam.to(self.state_dtype),
            resting_state=M,
            initial_state=S0,
            initial_trace=None if (lam is None or state.E is None) else state.E.to(self.state_dtype),
            output_final_state=output_final_state,
            backend=resolve_backend(mode, q.device),
            chunk_size=self.config.chunk_size,
        )
