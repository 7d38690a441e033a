"""The episode-end commit of a whole model: every fast memory's three-factor (or state) commit.

One function that sessions, the evaluation learners, fine-tuning, meta-training and the memory
trainers all call (through ``model.commit``), so pairing the state's fast slots with
``model.fast_layers()``, a missing trace and the baseline are handled in one place. Each memory
still owns the formula (:meth:`~cl_arch.layers.plasticity.PlasticMemory.commit`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .state import ModelState


def commit_episode(model, state: Union[ModelState, Sequence[Optional[torch.Tensor]]],
                   P: Optional[Sequence[Optional[torch.Tensor]]] = None, reward=None, baseline=None, *,
                   advantage: Optional[torch.Tensor] = None, missing_trace: str = "raise", backend: str = "auto",
                   **overrides) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """The episode-end commit of every fast memory: ``P <- gamma P + (eta_s + eta_r (r - b)) clip(E)``
    (or a memory's own commit, e.g. the state commit), one call for sessions, evaluation learners,
    fine-tuning and meta-training.

    Args:
        model: a :class:`~cl_arch.protocols.PlasticModel`; its ``fast_layers()`` commit in state order.
        state: the state at the episode's end (its traces ``E`` are committed), or the traces
            themselves, one ``[B, H, K, V]`` (or None) per fast layer (a delayed reward commits
            the traces of the episode that earned it).
        P: the persistent memories to commit into, one ``[B, H, K, V]`` (or None: zeros) per fast
            layer; default the state's own ``P``.
        reward, baseline: floats or ``[B]``; the advantage is ``reward - baseline``. ``reward=None``
            is retention only (``eta_s``) and leaves the baseline alone.
        advantage: ``[B]``, given instead of reward and baseline (it may carry gradient).
        missing_trace: ``"raise"`` (a fast layer kept no trace: ``config.lam`` is None) or
            ``"zeros"`` (commit a zero trace: ``P`` only decays by ``gamma``; with no ``P`` either, the
            layer's new ``P`` is None).
        backend: :func:`~cl_arch.kernels.commit.reward_commit`'s; ``"naive"`` keeps the graph.
        overrides: ``gamma, eta_s, eta_r, clip, rho`` for every memory (None: each memory's own).

    Returns:
        ``(new P per fast layer [B, H, K, V], new baseline [B] or None when reward is None)``.
    """
    layers = model.fast_layers()
    traces = state.traces() if isinstance(state, ModelState) else list(state)
    if P is None:
        P = state.persistent() if isinstance(state, ModelState) else [None] * len(traces)
    if len(traces) != len(layers) or len(P) != len(layers):
        raise ValueError(f"commit: the model has {len(layers)} fast layers; got {len(traces)} traces and "
                         f"{len(P)} persistent memories")
    if missing_trace not in ("raise", "zeros"):
        raise ValueError(f"missing_trace must be 'raise' or 'zeros', got {missing_trace!r}")
    unknown = set(overrides) - {"gamma", "eta_s", "eta_r", "clip", "rho"}
    if unknown:
        raise ValueError(f"commit: unknown overrides {sorted(unknown)}; known: gamma, eta_s, eta_r, clip, rho")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if advantage is not None:
        # r - b = advantage with b = 0: the kernel's formula with the advantage precomputed
        reward, baseline = advantage, None
    new_P, b_new = [], None
    for j, (m, E, p) in enumerate(zip(layers, traces, P)):
        if E is None:
            if missing_trace == "raise":
                raise ValueError(f"commit: fast layer {j} holds no eligibility trace (config.lam is None, or "
                                 "the forward ran with return_state=False)")
            if p is None:  # no trace and no P yet (a verdict memory before any generation): nothing moves
                new_P.append(None)
                continue
            E = torch.zeros_like(p)
        p = torch.zeros_like(E, dtype=m.state_dtype) if p is None else p
        if isinstance(reward, torch.Tensor):
            reward = reward.to(p.dtype)
        p_new, b = m.commit(p, E, reward, baseline, backend=backend, **overrides)
        new_P.append(p_new)
        b_new = b
    return new_P, (None if reward is None or advantage is not None else b_new)


__all__ = ["commit_episode"]
