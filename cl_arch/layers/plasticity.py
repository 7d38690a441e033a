"""What every fast-weight memory shares: the base memory ``W0``, the resting state ``M = W0 + P``
and the per-head plasticity settings the commit reads (docs/design.md, "The rule", "The commit")."""
import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from cl_arch.kernels.commit import reward_commit
from cl_arch.kernels.plastic import plastic_rule, resolve_backend

from ..config import FastLayerConfig, PlasticConfig
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

    def _init_memory(self, config: Union[PlasticConfig, FastLayerConfig], H: int, K: int, V: int) -> None:
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

    # ------------------------------------------------------------------ the commit (docs/design.md)
    def plasticity_parameters(self) -> Dict[str, nn.Parameter]:
        """The learnable settings the commit reads (``lam_logit, gamma_logit, eta_s, eta_r``), by
        name: what pretraining freezes and ``finetune(trainable="plasticity")`` trains. The one
        place that lists them."""
        names = ("lam_logit", "gamma_logit", "eta_s", "eta_r")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    @property
    def trace_follows_state(self) -> bool:
        """True when the trace decay is tied to the memory's own decay (a per-call ``lam``
        override is then ignored): the readout memory's state commit."""
        return False

    def commit_rates(self) -> Dict[str, torch.Tensor]:
        """This memory's own per-head commit settings ``gamma, eta_s, eta_r`` (``[H]`` each),
        differentiable in the learnable parameters (meta-training reads them through here)."""
        return {"gamma": self.gamma, "eta_s": self.eta_s, "eta_r": self.eta_r}

    @property
    def commit_clip(self) -> Optional[float]:
        """Per-head Frobenius bound on the committed trace (None: unbounded)."""
        return self.config.commit_clip

    def commit(self, P: torch.Tensor, E: torch.Tensor, r=None, b=None, *, gamma=None, eta_s=None, eta_r=None,
               clip: Optional[float] = None, rho: Optional[float] = None,
               backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
        """One three-factor commit of this memory: ``P <- gamma P + (eta_s + eta_r (r - b)) clip(E)``.

        Every caller (sessions, the evaluation learners, fine-tuning) commits through here, so a
        memory with its own commit semantics (the readout's state commit) needs no special case.

        Args:
            P, E: ``[N, H, K, V]`` persistent memory and the episode's trace.
            r, b: reward and running baseline, floats or ``[N]``; ``r=None`` is retention only.
            gamma, eta_s, eta_r: floats or ``[H]`` overriding this memory's own (None: own).
            clip: a bound overriding :attr:`commit_clip` (``math.inf``: unbounded); None: own.
            rho: baseline step (None: ``config.baseline_rho``).
            backend: ``reward_commit``'s; ``"naive"`` keeps the autograd graph.

        Returns:
            ``(P_new [N, H, K, V], b_new [N])``.
        """
        own = self.commit_rates()

        def pick(name, v):
            return own[name].to(P.dtype) if v is None else v

        return reward_commit(P, E.to(P.dtype), r, b, gamma=pick("gamma", gamma), eta_s=pick("eta_s", eta_s),
                             eta_r=pick("eta_r", eta_r), clip=self.commit_clip if clip is None else clip,
                             rho=self.config.baseline_rho if rho is None else rho, backend=backend)

    def cache_shape(self, batch_size: int):
        """Shape of the input cache a stream carries (``FastLayerState.conv``), or None."""
        raise NotImplementedError

    def run_rule(self, q, k, v, beta, g, state: FastLayerState, lam, output_final_state: bool, rule: str = "delta",
                 scale=None, rest: bool = True):
        """:func:`plastic_rule` on this memory's state: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``,
        ``beta, g [B, T, H]`` -> ``(o [B, T, H, V], S_T, E_T)``.

        The memory relaxes toward its resting state ``M = W0 + P`` (docs/design.md, "The rule"), so
        what a commit put in P acts on every token. ``rest=False`` is the first design's rule: start at ``W0 + P`` and
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
            check_values=False,  # computed by the network: no host sync per layer and step
        )
