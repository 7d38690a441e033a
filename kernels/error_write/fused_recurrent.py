"""The error-driven write for inference: the same per-token loop as ``naive.py``, touching only the
rows of the state whose key features fire.

The episodic memory's keys ``phi(h)`` are sparse (about 7% of 2048 features at theta 1.5), so a read
is a gather of those rows and a write an index-add into them; the decay toward ``M`` is applied lazily
(``S - M = c * U`` with one scalar ``c`` per row and head, folded back when it gets small), so a token
costs O(active features x V) instead of O(F x V). Not differentiable: the memory routes calls that
need gradients to the naive loop.
"""
from typing import Optional, Tuple

import torch

# below this the lazily kept scale c is folded into U, so U's entries stay O(1) in float32
_MIN_SCALE = 1e-4


def _active(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(idx, val) [B, T, H, n]``: the ``n`` entries of ``x [B, T, H, K]`` largest in magnitude along
    K, ``n`` the most non-zeros of any row (padding entries carry value 0: they read and write nothing)."""
    n = max(int((x != 0).sum(-1).max()), 1) if x.numel() else 1
    idx = x.abs().topk(n, dim=-1).indices
    return idx, x.gather(-1, idx)


def recurrent_error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor,
                          eta: torch.Tensor, g: Optional[torch.Tensor], scale: torch.Tensor,
                          initial_state: torch.Tensor, resting_state: Optional[torch.Tensor] = None,
                          initial_probs: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~cl_arch.kernels.error_write.naive.naive_error_write`'s arguments and results (dense keys
    work too, at the dense cost)."""
    B, T, H, K = q.shape
    V = base.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        a = scale.to(dtype)
        M = q.new_zeros(1, 1, 1, 1, dtype=dtype) if resting_state is None else \
            resting_state.to(dtype).expand(B, H, K, V)
        U = (initial_state.to(dtype) - M).expand(B, H, K, V).contiguous()
        c = torch.ones(B, H, 1, dtype=dtype, device=q.device)
        qi, qv = _active(q.to(dtype))
        ki, kv = _active(k.to(dtype))
        # M's read for every position at once: a dense matmul per call, not per token
        if resting_state is None:
            m_read = base.new_zeros(B, T, V, dtype=dtype)
        else:
            m_read = torch.einsum("bthk,bhkv,h->btv", q.to(dtype), M, a)
        base_c = base.to(dtype)
        p = q.new_zeros(B, V, dtype=dtype) if initial_probs is None else initial_probs.to(dtype)
        decay = None if g is None else g.to(dtype).exp()
        eta_c = eta.to(dtype)
        flat = U.view(B * H, K, V)
        row = (torch.arange(B * H, device=q.device) * K)[:, None]
        reads = torch.full((B, T, V), float("nan"), dtype=dtype, device=q.device)  # a slot never written shows
        for t in range(T):
            if decay is not None:
                c = c * decay[:, t, :, None]
                if bool((c < _MIN_SCALE).any()):
                    U.mul_(c[..., None])
                    c = torch.ones_like(c)
            u = -p
            u[torch.arange(B), targets[:, t]] += 1.0
            w = (eta_c[:, t, :, None] / c) * kv[:, t]  # [B, H, n]: the write, in U's units
            rows = (row + ki[:, t].reshape(B * H, -1)).reshape(-1)
            upd = (w.reshape(B * H, -1, 1) * u.repeat_interleave(H, 0)[:, None, :]).reshape(-1, V)
            flat.view(B * H * K, V).index_add_(0, rows, upd)
            got = flat.view(B * H * K, V)[(row + qi[:, t].reshape(B * H, -1)).reshape(-1)]  # [B*H*n, V]
            got = (got.view(B, H, -1, V) * qv[:, t, ..., None]).sum(2)  # [B, H, V]
            read = m_read[:, t] + torch.einsum("bhv,bh,h->bv", got, c[..., 0], a)
            reads[:, t] = read
            p = torch.softmax(base_c[:, t] + read, dim=-1)
        S = M + c[..., None] * U
    return reads.to(base.dtype), S, p
