"""The chunked error-driven write: each chunk of ``C`` tokens as a few matrix products.

The rule is ``naive.py``'s with ``chunk_size = C`` (its module docstring): inside a chunk the errors are
taken against the predictions read from the chunk's starting state, so they are all known before any
write of the chunk, and the rest is linear attention with gated decay over the values ``u_t``.
With ``D = S - M`` the deviation from the resting state and ``G_t`` the chunk's cumulative log-decay
up to t, per head::

    stale_t = a q_t^T (M + exp(G_t) D_start)                          # [C, V]: one [C, K] x [K, V] product
    u_t     = e(x_t) - softmax(base_{t-1} + stale_{t-1})   (u_start uses the carried exact p)
    read_t  = stale_t + a sum_{s<=t} exp(G_t - G_s) eta_s (q_t . k_s) u_s
    D_end   = exp(G_end) D_start + sum_s exp(G_end - G_s) eta_s k_s u_s^T

A chunk costs about ``2 C K V + C^2 (K + V)`` multiply-adds per head in BLAS calls where the exact
rule pays a Python step per token; autograd runs through it, so training can take the loss after the
write (the exact rule's only differentiable backend is the naive loop).
"""
from __future__ import annotations

import torch


def chunk_error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor,
                      eta: torch.Tensor, g: torch.Tensor | None, scale: torch.Tensor,
                      initial_state: torch.Tensor, resting_state: torch.Tensor | None = None,
                      initial_probs: torch.Tensor | None = None, chunk_size: int = 64
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~cl_arch.kernels.error_write.naive.naive_error_write`'s arguments and results, the chunked
    rule with ``chunk_size`` tokens per chunk (``1`` is the exact rule, at a matrix product per token).

    Shapes: ``q, k [B, T, H, K]``, ``targets [B, T]``, ``base [B, T, V]``, ``eta, g [B, T, H]``,
    ``scale [H]``, ``initial_state [B, H, K, V]``, ``resting_state [H, K, V] | [B, H, K, V]``,
    ``initial_probs [B, V]``. Returns ``read [B, T, V]`` (base's dtype), ``S [B, H, K, V]``, ``p [B, V]``.
    """
    B, T, H, K = q.shape
    V = base.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, eta, base_c = q.to(dtype), k.to(dtype), eta.to(dtype), base.to(dtype)
    a = scale.to(dtype)
    g = q.new_zeros(B, T, H) if g is None else g.to(dtype)
    M = None if resting_state is None else resting_state.to(dtype).expand(B, H, K, V)
    D = initial_state.to(dtype).expand(B, H, K, V)
    if M is not None:
        D = D - M
    # without autograd the state is updated in place (a [K, V] state is 2 MB at the shipped size, and each
    # out-of-place decay and add over it cost as much as the chunk's update product): on a copy of our own
    in_place = not torch.is_grad_enabled()
    if in_place:
        D = D.contiguous() if M is not None else D.clone(memory_format=torch.contiguous_format)
    p = q.new_zeros(B, V) if initial_probs is None else initial_probs.to(dtype)
    onehot = torch.nn.functional.one_hot(targets, V).to(dtype)
    # the resting state's read is the same at every position: one product for the whole call
    read_M = None if M is None else torch.einsum("bthk,bhkv,h->btv", q, M, a)
    reads = []
    for c0 in range(0, T, chunk_size):
        c1 = min(c0 + chunk_size, T)
        read, D, p = _chunk(q[:, c0:c1], k[:, c0:c1], onehot[:, c0:c1], base_c[:, c0:c1], eta[:, c0:c1],
                            g[:, c0:c1], a, D, p, None if read_M is None else read_M[:, c0:c1], in_place)
        reads.append(read)
    S = D if M is None else (D.add_(M) if in_place else M + D)
    read = torch.cat(reads, dim=1) if reads else base_c.new_zeros(B, 0, V)
    return read.to(base.dtype), S, p


def _chunk(q, k, onehot, base, eta, g, a, D, p, read_M, in_place=False):
    """One chunk: ``q, k [B, C, H, K]``, ``onehot, base [B, C, V]``, ``eta, g [B, C, H]``, ``D [B, H, K, V]``
    the deviation at the chunk's start, ``p [B, V]`` the exact prediction before it. Returns the chunk's
    reads ``[B, C, V]``, the deviation and the exact prediction at its end (``in_place``: ``D`` itself,
    a contiguous tensor the caller owns, updated by one BLAS call with the decay as its ``beta``)."""
    C = q.shape[1]
    G = torch.cumsum(g, dim=1)  # [B, C, H]
    stale_h = torch.einsum("bchk,bhkv->bchv", q, D) * torch.exp(G)[..., None]  # [B, C, H, V]
    stale = torch.einsum("bchv,h->bcv", stale_h, a)
    if read_M is not None:
        stale = stale + read_M
    prev = torch.cat([p[:, None], torch.softmax(base[:, :-1] + stale[:, :-1], dim=-1)], dim=1)
    U = onehot - prev  # [B, C, V]: every error of the chunk, known before its writes
    # exp(G_t - G_s) eta_s for s <= t; the mask goes in before exp (G_t - G_s > 0 above the diagonal)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gap = (G.transpose(1, 2)[..., :, None] - G.transpose(1, 2)[..., None, :])  # [B, H, C(t), C(s)]
    weight = torch.exp(gap.masked_fill(~causal, float("-inf"))) * eta.transpose(1, 2)[..., None, :]
    attn = torch.einsum("bthk,bshk->bhts", q, k) * weight
    read = stale + torch.einsum("bhts,bsv,h->btv", attn, U, a)
    to_end = torch.exp(G[:, -1:] - G) * eta  # [B, C, H]
    if in_place:
        _decay_and_add_(D, torch.exp(G[:, -1]), (to_end[..., None] * k).permute(0, 2, 3, 1), U)
    else:
        D = torch.exp(G[:, -1])[..., None, None] * D + torch.einsum("bsh,bshk,bsv->bhkv", to_end, k, U)
    p_end = torch.softmax(base[:, -1] + read[:, -1], dim=-1)
    return read, D, p_end


def _decay_and_add_(D: torch.Tensor, decay: torch.Tensor, Wk: torch.Tensor, U: torch.Tensor) -> None:
    """``D <- decay D + Wk U`` in place: ``D [B, H, K, V]`` contiguous, ``decay [B, H]``, ``Wk [B, H, K, C]``
    (the keys weighted by their decay to the chunk's end and step), ``U [B, C, V]``. One head of one row
    (the shipped episodic memory) is one ``baddbmm`` with the decay as ``beta``; otherwise the decay is one
    in-place product first."""
    B, H, K, V = D.shape
    Dv = D.view(B * H, K, V)
    Ub = U[:, None].expand(B, H, *U.shape[1:]).reshape(B * H, *U.shape[1:])
    if B * H == 1:
        Dv.baddbmm_(Wk.reshape(1, K, -1), Ub, beta=float(decay.reshape(())))
    else:
        D.mul_(decay[..., None, None])
        Dv.baddbmm_(Wk.reshape(B * H, K, -1), Ub)
