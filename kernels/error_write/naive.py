"""Ground truth for the error-driven write: one token at a time, in at least float32, differentiable.

The output memory as online gradient descent on an additive logit correction (docs/design.md,
"Error-driven writes"). Per token t, with ``M`` the resting state, per head h::

    S_h   <- M_h + exp(g_t,h) (S_h - M_h)                      # forget back toward M
    S_h   <- S_h + eta_t,h * k_t,h (e(x_t) - p_{t-1})^T         # write the previous prediction's error
    z_t    = base_t + sum_h a_h S_h^T q_t,h                     # read after write
    p_t    = softmax(z_t)

``k_t`` is the key of position t-1 (what predicted ``x_t``) and ``p_{t-1}`` that position's full
prediction, so the write is ``-eta * dCE/dS`` of the previous step. The error couples the heads and
every token to the last, so unlike the delta rule there is no chunked form: backends loop over
tokens and differ in how much of the state each step touches.
"""

import torch


def naive_error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor,
                      eta: torch.Tensor, g: torch.Tensor | None, scale: torch.Tensor,
                      initial_state: torch.Tensor, resting_state: torch.Tensor | None = None,
                      initial_probs: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loop of the error-driven write.

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
    for t in range(T):
        if g is not None:
            S = M + g[:, t].to(dtype).exp()[..., None, None] * (S - M)
        u = onehot[:, t] - p  # [B, V]
        S = S + eta[:, t][..., None, None] * torch.einsum("bhk,bv->bhkv", k[:, t], u)
        read = torch.einsum("bhkv,bhk,h->bv", S, q[:, t], a)
        p = torch.softmax(base_c[:, t] + read, dim=-1)
        reads.append(read)
    return torch.stack(reads, dim=1).to(base.dtype), S, p
