"""How a memory commits at an episode's end: strategy objects, one per kind of commit
(docs/design.md, "The commit").

Every memory commits through :meth:`~cl_arch.memory.base.PlasticMemory.commit`, the three-factor
formula ``P <- gamma P + (eta_s + eta_r (r - b)) clip(E)``. What differs between memories is where
the rates come from and what the trace means; a strategy says that, so a memory holds a strategy
instead of branching on its kind:

* :class:`TraceCommit`: the memory's own learned ``gamma, eta_s, eta_r`` and clip, an eligibility
  trace with its own decay ``lam`` (the in-block fast layers, the reward memory);
* :class:`StateCommit`: the trace decays with the memory itself, so ``E_T = S_T - M`` is exactly what
  the episode changed, and the commit keeps it on the heads slow enough to be worth keeping
  (``gamma 1, eta_s 1, eta_r 0, no clip``): the next session starts where this one ended (the
  readout and episodic memories).

A new memory kind picks one of these or brings its own object with the same four members.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass(frozen=True)
class TraceCommit:
    """The three-factor commit with the memory's own learned rates (docs/design.md, "The commit")."""

    #: a per-call trace-decay override (a session's ``lam``) applies
    trace_follows_state = False

    def trace_decay(self, memory) -> Optional[torch.Tensor]:
        """``lam [H]`` (None: no trace)."""
        return None if memory.lam_logit is None else torch.sigmoid(memory.lam_logit)

    def rates(self, memory) -> Dict[str, torch.Tensor]:
        """``gamma, eta_s, eta_r [H]``, differentiable in the memory's parameters."""
        return {"gamma": torch.sigmoid(memory.gamma_logit), "eta_s": memory.eta_s, "eta_r": memory.eta_r}

    def clip(self, memory) -> Optional[float]:
        return memory.rule_clip

    def trainable(self, memory) -> Dict[str, torch.nn.Parameter]:
        """The learnable settings the commit reads, by name (what ``finetune(trainable="plasticity")``
        trains and pretraining freezes)."""
        names = ("lam_logit", "gamma_logit", "eta_s", "eta_r")
        return {n: getattr(memory, n) for n in names if getattr(memory, n, None) is not None}


@dataclass(frozen=True)
class StateCommit:
    """Keep what the slow heads hold: ``P_new = S_T - W0`` on heads whose memory span ``1 / -g``
    (learned through ``A_log``) reaches ``span`` tokens; faster heads commit nothing (their content is
    stale a few hundred tokens later, and made permanent it only adds noise: measured on the held-out
    asyncio package). Rewards act on the writes (``beta`` times the modulation), not here."""

    span: float = 4096.0
    trace_follows_state = True

    def trace_decay(self, memory) -> torch.Tensor:
        """The memory's own per-token retention ``exp(-exp(A_log)) [H]``: the trace then sums exactly
        what the episode changed (constant gate, ``S_0 = M``)."""
        return torch.exp(-memory.A_log.exp())

    def rates(self, memory) -> Dict[str, torch.Tensor]:
        keep = (1.0 / memory.A_log.exp() >= self.span).to(memory.eta_s.dtype)
        return {"gamma": torch.ones_like(memory.eta_s), "eta_s": keep, "eta_r": torch.zeros_like(memory.eta_r)}

    def clip(self, memory) -> None:
        return None

    def trainable(self, memory) -> Dict[str, torch.nn.Parameter]:
        """None: the rates are fixed by construction; which heads commit is decided by their span,
        trained with the network."""
        return {}


__all__ = ["TraceCommit", "StateCommit"]
