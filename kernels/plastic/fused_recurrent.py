"""Token-by-token plastic rule for decoding (one or a few tokens per call).

The PyTorch version keeps the fast weights of every (batch, head) pair as one
``[B*H, K, V]`` stack and updates it with batched matmuls, so a decode step is
a handful of kernel launches whatever the batch. Prefill should use the
chunked path (``chunk.py``); this one is linear in T with a Python loop.
"""
from typing import Optional, Tuple, Union

import torch


def recurrent_plastic_rule(
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
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Recurrent plastic rule; same contract as :func:`naive_plastic_rule`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta, g: ``[B, T, H]``;
        states ``[B, H, K, V]``; lam None, float or ``[H]``.

    Returns:
        o ``[B, T, H, V]`` (q's dtype), S_T and E_T ``[B, H, K, V]`` (fp32 or fp64).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BH = B * H
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = K ** -0.5 if scale is None else scale

    # Row layout [B*H, T, 1, K] lets each step be a batched outer/inner product.
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).movedim(1, 2).reshape(BH, T, 1, x.shape[-1])

    qr, kr, vr = rows(q * scale), rows(k), rows(v)
    br = beta.to(dtype).movedim(1, 2).reshape(BH, T, 1, 1)
    ar = None if g is None else g.to(dtype).exp().movedim(1, 2).reshape(BH, T, 1, 1)
    S = q.new_zeros(BH, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype).reshape(BH, K, V)
    if lam is not None:
        lam_r = torch.as_tensor(lam, dtype=dtype, device=q.device).expand(H).repeat(B).reshape(BH, 1, 1)
        E = q.new_zeros(BH, K, V, dtype=dtype) if initial_trace is None else initial_trace.to(dtype).reshape(BH, K, V)

    outs = []
    for t in range(T):
        if ar is not None:
            S = S * ar[:, t]
        k_col = kr[:, t].transpose(-1, -2)  # [BH, K, 1]
        u = vr[:, t] - torch.bmm(kr[:, t], S) if rule == "delta" else vr[:, t]  # [BH, 1, V]
        D = torch.bmm(k_col * br[:, t], u)  # [BH, K, V]
        S = S + D
        outs.append(torch.bmm(qr[:, t], S))  # [BH, 1, V]
        if lam is not None:
            E = torch.addcmul(D, lam_r, E)

    o = torch.cat(outs, dim=1).reshape(B, H, T, V).movedim(1, 2).to(out_dtype)
    if not output_final_state:
        return o, None, None
    E_T = E.reshape(B, H, K, V) if lam is not None else None
    return o, S.reshape(B, H, K, V), E_T
