"""Ground truth for the plastic rule: one token at a time, in at least float32.

This is the rule of docs/design.md ("The rule") written as literally as possible. Every faster backend
(`chunk.py`, `fused_recurrent.py`, the Triton kernels) is tested against it.
"""
from typing import Optional, Tuple, Union

import torch


def naive_plastic_rule(
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
    resting_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-token loop of the fast-weight rule with an eligibility trace.

    For each token t (per batch row and head), with ``M`` the resting state::

        S' = M + exp(g_t) * (S - M)            # forget back toward M
        u  = v_t - S'^T k_t   (delta)  |  v_t  (hebb)
        D  = beta_t * k_t u^T                  # the write
        S  = S' + D ;  o_t = S^T (scale * q_t) # read after write
        E  = lam * E + D                       # eligibility trace

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta, g: ``[B, T, H]``.
        lam: None (no trace), a float, or a ``[H]`` tensor.
        initial_state: ``[B, H, K, V]`` or None (the resting state ``M``).
        initial_trace: ``[B, H, K, V]`` or None (zeros).
        resting_state: ``M``, ``[B, H, K, V]`` or ``[H, K, V]``; None means zeros.

    Returns:
        o ``[B, T, H, V]`` in q's dtype, final S and final E ``[B, H, K, V]``
        in the compute dtype (E is None when lam is None; both None when
        ``output_final_state`` is False).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    if scale is None:
        scale = K ** -0.5
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    if resting_state is None:
        M = q.new_zeros(B, H, K, V)
    else:
        M = resting_state.to(dtype).expand(B, H, K, V)
    S = M if initial_state is None else initial_state.to(dtype)
    keep_trace = lam is not None
    if keep_trace:
        E = q.new_zeros(B, H, K, V) if initial_trace is None else initial_trace.to(dtype)
        lam_h = torch.as_tensor(lam, dtype=dtype, device=q.device).expand(H)[None, :, None, None]
    outputs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # [B, H, K|V]
        if g is not None:
            S = M + g[:, t].to(dtype).exp()[..., None, None] * (S - M)
        if rule == "delta":
            u_t = v_t - torch.einsum("bhkv,bhk->bhv", S, k_t)
        else:
            u_t = v_t
        D = beta[:, t][..., None, None] * torch.einsum("bhk,bhv->bhkv", k_t, u_t)
        S = S + D
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q_t * scale))
        if keep_trace:
            E = lam_h * E + D
    o = torch.stack(outputs, dim=1).to(out_dtype)
    if not output_final_state:
        return o, None, None
    return o, S, (E if keep_trace else None)
