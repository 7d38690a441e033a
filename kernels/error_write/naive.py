"""Ground truth for the error-driven write: one token at a time, in at least float32, differentiable.

The output memory as online gradient descent on an additive logit correction (docs/design.md,
"Error-driven writes"). Per token t, with ``M`` the resting state, per head h::

    S_h   <- M_h + exp(g_t,h) (S_h - M_h)                      # forget back toward M
    S_h   <- S_h + eta_t,h * k_t,h (e(x_t) - p_{t-1})^T         # write the previous prediction's error
    z_t    = base_t + sum_h a_h S_h^T q_t,h                     # read after write
    p_t    = softmax(z_t)

``k_t`` is the key of position t-1 (what predicted ``x_t``) and ``p_{t-1}`` that position's full
prediction, so the write is ``-eta * dCE/dS`` of the previous step. The error couples the heads and
every token to the last, so the exact rule has no chunked form.

The chunked rule (``chunk_size = C > 1``, LaCT's large-chunk updates applied to this write): the call's
tokens are cut into chunks of C, and inside a chunk the errors are taken against *stale* predictions,
``p^_{t-1} = softmax(base_{t-1} + a (M + decay (S_start - M))^T q_{t-1})`` read from the state at the
chunk's start, so every error of a chunk is known before its writes and the chunk becomes matrix
products (``chunk.py``). The reads stay exact given those errors (read after write, intra-chunk writes
included), the first error of a chunk uses the exact ``p`` carried from the previous chunk, and ``p``
at a chunk's end is the exact one. ``C = 1`` is the exact rule. Chunks start at the call's first
token, so a stream split over calls equals one call only where the split falls on a chunk boundary.
"""

import torch


def naive_error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor,
                      eta: torch.Tensor, g: torch.Tensor | None, scale: torch.Tensor,
                      initial_state: torch.Tensor, resting_state: torch.Tensor | None = None,
                      initial_probs: torch.Tensor | None = None, chunk_size: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loop of the error-driven write (exact, or chunked with ``chunk_size > 1``).

    Args:
        q, k: ``[B, T, H, K]`` read keys (position t) and write keys (position t-1; zero rows write nothing).
        targets: ``[B, T]`` int64, ``x_t`` (the token the write key's position should have predicted).
        base: ``[B, T, V]`` the logits before this memory's read.
        eta, g: ``[B, T, H]`` write step (times any modulation) and log-decay (None: no decay).
        scale: ``[H]`` read scale ``a``.
        initial_state: ``[B, H, K, V]`` the state before the call.
        resting_state: ``[B, H, K, V]`` or ``[H, K, V]``; None means zeros.
        initial_probs: ``[B, V]`` ``p`` of the position before the call (None: zeros, i.e. the first
            write is ``e(x_0)``, as when nothing was predicted yet).
        chunk_size: ``C``; 1 is the exact rule, larger takes each chunk's errors against the
            predictions read from the state at the chunk's start (the module docstring).

    Returns:
        ``read [B, T, V]`` (``z - base``, in base's dtype), final ``S [B, H, K, V]`` and final
        ``p [B, V]`` (compute dtype).
    """
    B, T, H, K = q.shape
    V = base.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, eta, base_c = q.to(dtype), k.to(dtype), eta.to(dtype), base.to(dtype)
    a = scale.to(dtype)
    S = initial_state.to(dtype)
    M = q.new_zeros(B, H, K, V) if resting_state is None else resting_state.to(dtype).expand(B, H, K, V)
    p = q.new_zeros(B, V) if initial_probs is None else initial_probs.to(dtype)
    onehot = torch.nn.functional.one_hot(targets, V).to(dtype)
    reads = []
    for c0 in range(0, T, chunk_size):
        stale = _stale_predictions(S, M, q, base_c, g, a, c0, min(c0 + chunk_size, T), dtype)
        for t in range(c0, min(c0 + chunk_size, T)):
            if g is not None:
                S = M + g[:, t].to(dtype).exp()[..., None, None] * (S - M)
            u = onehot[:, t] - (p if t == c0 else stale[t - 1])  # [B, V]
            S = S + eta[:, t][..., None, None] * torch.einsum("bhk,bv->bhkv", k[:, t], u)
            read = torch.einsum("bhkv,bhk,h->bv", S, q[:, t], a)
            reads.append(read)
        p = torch.softmax(base_c[:, t] + read, dim=-1)  # exact at the chunk's end
    return torch.stack(reads, dim=1).to(base.dtype), S, p


def _stale_predictions(S, M, q, base, g, a, start: int, end: int, dtype) -> dict:
    """``{t: softmax(base_t + a (M + decay_{start..t} (S - M))^T q_t)}`` for ``start <= t < end - 1``:
    the chunk's predictions read from the state at its start (the last one is never used)."""
    out, logdecay = {}, 0.0
    for t in range(start, end - 1):
        if g is not None:
            logdecay = logdecay + g[:, t].to(dtype)
        decay = torch.exp(torch.as_tensor(logdecay, dtype=dtype))
        D = (S - M) * (decay[..., None, None] if decay.dim() else decay)
        out[t] = torch.softmax(base[:, t] + torch.einsum("bhkv,bhk,h->bv", M + D, q[:, t], a), dim=-1)
    return out
