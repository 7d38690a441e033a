"""Chunkwise-parallel plastic rule in PyTorch (training and prefill): the ``torch_chunk`` backend.

Within a chunk of C tokens with cumulative log-decay ``G_i = sum_{j<=i} g_j``,
the write of token i is ``D_i = k_i w_i^T`` with ``w_i = beta_i * u_i``. For the
delta rule ``u_i = v_i - S'_i^T k_i`` depends on the writes before it in the
chunk, which gives a unit lower-triangular system (the WY/UT form of
flash-linear-attention's gated delta rule)::

    (I + A) W = beta*V - diag(beta * exp(G)) K S0,   A_ij = beta_i e^{G_i-G_j} k_i.k_j  (j < i)

so ``W = U - Wk S0`` with ``U = (I+A)^{-1} beta V`` and
``Wk = (I+A)^{-1} diag(beta e^G) K``, both computed for all chunks at once.
Only the hand-off of S between chunks is sequential::

    O    = diag(e^G) Q S0 + (mask_{i>=j} * e^{G_i-G_j} * Q K^T) W
    S_C  = e^{G_C} S0 + (K * e^{G_C - G})^T W

The trace never feeds back into S, so it is one masked matmul over the whole
sequence once W is known: ``E_T = lam^T E0 + sum_t lam^{T-t} k_t w_t^T``.
Gradients of ``chunk_plastic_rule`` come from autograd through these batched
operations. This file holds the PyTorch chunked path (``torch_chunk``) only; the
Triton one (``triton_chunk``, with its own chunkwise backward) is ``chunk_triton.py``.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


def _to_chunks(x: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """``[B, T, H, *D]`` -> ``[B, H, N, C, *D]`` with zero padding at the end of T."""
    x = x.movedim(1, 2)
    if pad:
        widths = [0, 0] * (x.dim() - 3) + [0, pad]
        x = F.pad(x, widths)
    B, H, Tp = x.shape[:3]
    return x.reshape(B, H, Tp // chunk, chunk, *x.shape[3:])


def chunk_plastic_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    rule: str = "delta",
    lam: Optional[Union[float, torch.Tensor]] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    initial_trace: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Chunkwise plastic rule; same contract as :func:`naive_plastic_rule`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta, g: ``[B, T, H]``.
        lam: None, float or ``[H]`` tensor; states ``[B, H, K, V]``.
        chunk_size: tokens per chunk (the sequence is zero-padded to a multiple;
            padded tokens write nothing and do not decay).

    Returns:
        o ``[B, T, H, V]`` (q's dtype), S_T and E_T ``[B, H, K, V]`` (fp32 or fp64).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = K ** -0.5 if scale is None else scale
    C = min(chunk_size, T)
    pad = (-T) % C

    qc = _to_chunks(q.to(dtype) * scale, pad, C)  # [B, H, N, C, K]
    kc = _to_chunks(k.to(dtype), pad, C)
    vc = _to_chunks(v.to(dtype), pad, C)  # [B, H, N, C, V]
    bc = _to_chunks(beta.to(dtype), pad, C)  # [B, H, N, C]
    if g is None:
        G = torch.zeros_like(bc)
    else:
        G = _to_chunks(g.to(dtype), pad, C).cumsum(-1)
    N = qc.shape[2]

    idx = torch.arange(C, device=q.device)
    incl = idx[:, None] >= idx[None, :]
    # Masking the exponent (not the product) keeps exp() of future positions
    # from overflowing and poisoning the backward pass with inf * 0.
    diff = G[..., :, None] - G[..., None, :]
    decay_incl = diff.masked_fill(~incl, float("-inf")).exp()  # [B, H, N, C, C]

    if rule == "delta":
        strict = idx[:, None] > idx[None, :]
        decay_strict = decay_incl.masked_fill(~strict, 0.0)
        A = (bc[..., None] * kc) @ kc.transpose(-1, -2) * decay_strict
        eye = torch.eye(C, dtype=dtype, device=q.device)
        rhs = torch.cat([bc[..., None] * vc, (bc * G.exp())[..., None] * kc], dim=-1)
        X = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        U, Wk = X[..., :V], X[..., V:]
    else:
        U, Wk = bc[..., None] * vc, None

    qk = (qc @ kc.transpose(-1, -2)) * decay_incl  # [B, H, N, C, C]
    q_in = qc * G.exp()[..., None]  # reads S0 decayed up to each token
    G_end = G[..., -1]  # [B, H, N]
    k_out = kc * (G_end[..., None] - G).exp()[..., None]  # write decayed to chunk end

    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outs, writes = [], []
    for n in range(N):
        W_n = U[:, :, n] if Wk is None else U[:, :, n] - Wk[:, :, n] @ S
        outs.append(q_in[:, :, n] @ S + qk[:, :, n] @ W_n)
        S = S * G_end[:, :, n, None, None].exp() + k_out[:, :, n].transpose(-1, -2) @ W_n
        writes.append(W_n)

    o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T].movedim(1, 2).to(out_dtype)
    if not output_final_state:
        return o, None, None

    E = None
    if lam is not None:
        W = torch.stack(writes, dim=2).reshape(B, H, N * C, V)[:, :, :T]
        kf = kc.reshape(B, H, N * C, K)[:, :, :T]
        lam_h = torch.as_tensor(lam, dtype=dtype, device=q.device).expand(H)
        age = torch.arange(T - 1, -1, -1, device=q.device, dtype=dtype)  # T - t for t = 1..T
        # torch.pow's gradient is masked at exponent 0, so lam = 0 stays finite.
        weight = torch.pow(lam_h[:, None], age[None, :])  # [H, T]
        E = (kf * weight[None, :, :, None]).transpose(-1, -2) @ W
        if initial_trace is not None:
            E = E + torch.pow(lam_h, float(T))[None, :, None, None] * initial_trace.to(dtype)
    return o, S, E
