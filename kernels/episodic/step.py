"""One decode token of the episodic memory on the dense layout a session holds (``S``, ``E``
``[B, H, F, V]``), returning new tensors and leaving the given ones untouched.

A session keeps every step's state as a value (``Session._mark`` restores an earlier one when a step
fails), so a forward may not update the state it is given in place; the lazily decayed state of
``sparse.py`` is for a decode loop that owns its buffers. Here the decay toward ``M`` is one dense
pass per tensor (``S' = M + a (S - M)``, ``E' = a E``: the copy a new state needs anyway), and the
delta rule's prediction, the write and the read touch only the rows the keys fire: the dense path
(``run_rule``) also makes the deviation ``S - M``, the key's and query's reads of ``M``, the outer
product ``k u^T`` and a full-state matvec per read, each ``O(F x V)``.
"""
from __future__ import annotations

import torch

from .sparse import Active


def _rows(idx: torch.Tensor, F: int) -> torch.Tensor:
    """``[B * H * n]`` rows of a ``[B, H, F, V]`` state viewed as ``[B * H * F, V]``."""
    B, H, _ = idx.shape
    return (torch.arange(B * H, device=idx.device).view(B, H, 1) * F + idx).reshape(-1)


def _apply(S: torch.Tensor, rows: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``S^T x [B, H, V]`` for the sparse ``x`` whose entries ``val [B, H, n]`` sit at ``rows``."""
    B, H, _, V = S.shape
    got = S.view(-1, V).index_select(0, rows).view(B, H, -1, V)
    return torch.matmul(val.to(S.dtype).unsqueeze(-2), got)[..., 0, :]


def _decayed(S: torch.Tensor, E: torch.Tensor | None, M: torch.Tensor | None, g: torch.Tensor):
    """New ``S' = M + exp(g) (S - M)`` and ``E' = exp(g) E`` (zeros for None), contiguous."""
    a = g.to(S.dtype).exp()[..., None, None]
    Sn = (S * a).contiguous() if M is None else torch.lerp(M.to(S.dtype).expand_as(S), S, a).contiguous()
    En = torch.zeros_like(Sn) if E is None else (E.to(S.dtype) * a).contiguous()
    return Sn, En


def _write(Sn: torch.Tensor, En: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> None:
    """``S += k u^T`` and ``E += k u^T`` in the key's rows (``w [B, H, n]``: the key times the step)."""
    V = Sn.shape[-1]
    upd = (w.unsqueeze(-1) * u.unsqueeze(-2)).reshape(-1, V)
    Sn.view(-1, V).index_add_(0, rows, upd)
    En.view(-1, V).index_add_(0, rows, upd)


def dense_delta_step(S: torch.Tensor, E: torch.Tensor | None, M: torch.Tensor | None, qa: Active, ka: Active,
                     v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of the delta rule (``naive.py``'s :func:`naive_episodic_step`).

    Args:
        S: ``[B, H, F, V]`` the state; E: the trace (None: zeros); M: ``[B, H, F, V]``, ``[H, F, V]``
            or None (zeros). None of them is written.
        qa, ka: ``(idx, val) [B, H, n]`` the read and write keys' active entries
            (:func:`~cl_arch.kernels.episodic.sparse.active`).
        v: ``[B, H, V]``; beta, g: ``[B, H]``.

    Returns:
        ``o [B, H, V]``, new ``S`` and ``E`` ``[B, H, F, V]`` (S's dtype).
    """
    with torch.no_grad():
        Sn, En = _decayed(S, E, M, g)
        Fdim = S.shape[2]
        rows_k = _rows(ka[0], Fdim)
        u = v.to(S.dtype) - _apply(Sn, rows_k, ka[1])
        _write(Sn, En, rows_k, ka[1].to(S.dtype) * beta.to(S.dtype).unsqueeze(-1), u)
        return _apply(Sn, _rows(qa[0], Fdim), qa[1]), Sn, En


def dense_error_step(S: torch.Tensor, E: torch.Tensor | None, M: torch.Tensor | None, qa: Active, ka: Active,
                     target: torch.Tensor, base: torch.Tensor, eta: torch.Tensor, g: torch.Tensor,
                     scale: torch.Tensor, p: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token of the error-driven write (:func:`~cl_arch.kernels.error_write.naive.naive_error_write`).

    Args:
        S, E, M, qa, ka: as :func:`dense_delta_step`.
        target: ``[B]`` int64 ``x_t``; base: ``[B, V]`` the logits before this memory's read.
        eta, g: ``[B, H]``; scale: ``[H]`` the read scale; p: ``[B, V]`` the previous position's
            prediction (None: zeros, nothing predicted yet).

    Returns:
        ``read [B, V]`` (``z - base``), new ``S`` and ``E``, and ``p = softmax(base + read) [B, V]``.
    """
    with torch.no_grad():
        B, H, Fdim, V = S.shape
        dt = S.dtype
        Sn, En = _decayed(S, E, M, g)
        u = torch.zeros(B, V, dtype=dt, device=S.device) if p is None else -p.to(dt)
        u.scatter_add_(1, target.view(B, 1), torch.ones(B, 1, dtype=dt, device=S.device))
        _write(Sn, En, _rows(ka[0], Fdim), ka[1].to(dt) * eta.to(dt).unsqueeze(-1), u.unsqueeze(1).expand(B, H, V))
        read = torch.einsum("bhv,h->bv", _apply(Sn, _rows(qa[0], Fdim), qa[1]), scale.to(dt))
        return read, Sn, En, torch.softmax(base.to(dt) + read, dim=-1)


__all__ = ["dense_delta_step", "dense_error_step"]
