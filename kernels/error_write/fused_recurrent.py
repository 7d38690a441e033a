"""The error-driven write for inference: the same per-token loop as ``naive.py``, touching only the
rows of the state whose key features fire.

The episodic memory's keys ``phi(h)`` are sparse (about 2-7% of 2048 features), so a read is a gather
of those rows and a write an update of them; the decay toward ``M`` is kept lazily (``S - M = c U`` with
one scalar ``c`` per row and head, folded back when it gets small), so a token costs O(active features
x V) instead of O(F x V). The loop is :func:`cl_arch.kernels.episodic.sparse.sparse_error_write` (the
episodic memory's in-place step); a call converts the state from and back to the dense layout once.
Not differentiable: the memory routes calls that need gradients to the naive loop.
"""
from __future__ import annotations

import torch

from ..episodic.sparse import sparse_error_write


def recurrent_error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor,
                          eta: torch.Tensor, g: torch.Tensor | None, scale: torch.Tensor,
                          initial_state: torch.Tensor, resting_state: torch.Tensor | None = None,
                          initial_probs: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~cl_arch.kernels.error_write.naive.naive_error_write`'s arguments and results (dense keys
    work too, at the dense cost)."""
    B, T, H, _ = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    if g is None:
        g = q.new_zeros(B, T, H, dtype=dtype)
    S0 = initial_state.to(dtype).expand(B, H, *initial_state.shape[-2:])
    read, S, p, _ = sparse_error_write(q, k, targets, base, eta, g, scale, S0, resting_state, initial_probs)
    return read, S, p
