"""Ground truth for the episodic memory's rule: the whole ``[F, V]`` state every token, in at least float32.

This is what :class:`~cl_arch.memory.episodic.EpisodicMemory` runs today through ``run_rule``
(docs/design.md, "The rule", "The episodic memory"): the delta rule with decay toward the resting
state ``M = W0 + P``, read after write, and a trace that decays with the state (the state commit), so
``E_t - (S_t - M)`` only shrinks by the decay and ``E_t = S_t - M`` for an episode that started at
rest with ``E_0 = 0``. Per token t, per batch row and head::

    S' = M + exp(g_t) (S - M)          # relax toward the resting state
    u  = v_t - S'^T k_t                # what the memory got wrong
    D  = beta_t k_t u^T                # the write (beta: the learned strength times any modulation)
    S  = S' + D ;  o_t = S^T q_t       # read after the write (the read scale is applied by the memory)
    E  = exp(g_t) E + D                # the trace follows the state's own decay

The sparse step (``sparse.py``) is tested against these two functions.
"""

import torch


def naive_episodic_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                        S: torch.Tensor, M: torch.Tensor | None = None, E: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of the rule on the dense state.

    Args:
        q, k: ``[B, H, F]`` read key (this position) and write key (the previous one; zeros write nothing).
        v: ``[B, H, V]`` the value written under ``k``; beta, g: ``[B, H]`` write strength and log-decay.
        S: ``[B, H, F, V]`` the state before the token. M: ``[B, H, F, V]``, ``[H, F, V]`` or None (zeros).
        E: ``[B, H, F, V]`` the trace before the token, or None (zeros).

    Returns:
        ``o [B, H, V]``, the new ``S`` and ``E`` ``[B, H, F, V]`` (new tensors, in the compute dtype).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, beta, g, S = (x.to(dtype) for x in (q, k, v, beta, g, S))
    M = torch.zeros_like(S) if M is None else M.to(dtype).expand_as(S)
    E = torch.zeros_like(S) if E is None else E.to(dtype)
    a = g.exp()[..., None, None]
    S = M + a * (S - M)
    u = v - torch.einsum("bhfv,bhf->bhv", S, k)
    D = beta[..., None, None] * torch.einsum("bhf,bhv->bhfv", k, u)
    S = S + D
    return torch.einsum("bhfv,bhf->bhv", S, q), S, a * E + D


def naive_episodic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                   initial_state: torch.Tensor | None = None, resting_state: torch.Tensor | None = None,
                   initial_trace: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T tokens of :func:`naive_episodic_step`.

    Args:
        q, k: ``[B, T, H, F]``; v: ``[B, T, H, V]``; beta, g: ``[B, T, H]``.
        initial_state: ``[B, H, F, V]`` or None (the episode starts at rest, ``S_0 = M``).
        resting_state: ``M``, ``[B, H, F, V]``, ``[H, F, V]`` or None (zeros).
        initial_trace: ``[B, H, F, V]`` or None (zeros).

    Returns:
        ``o [B, T, H, V]``, final ``S`` and ``E`` ``[B, H, F, V]`` (compute dtype: float32 or wider).
    """
    B, T, H, Fdim = q.shape
    V = v.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    if initial_state is not None:
        S = initial_state.to(dtype)
    elif resting_state is not None:
        S = resting_state.to(dtype).expand(B, H, Fdim, V)
    else:
        S = q.new_zeros(B, H, Fdim, V, dtype=dtype)
    E = initial_trace
    outs = []
    for t in range(T):
        o, S, E = naive_episodic_step(q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t], S, resting_state, E)
        outs.append(o)
    return torch.stack(outs, dim=1), S, E


__all__ = ["naive_episodic", "naive_episodic_step"]
