"""A decode loop's episodic memory: its keys, its sparse step and its state in buffers that live as long as
the loop (a prototype of issue 26's allocation-free decode step; the model's forward does not call it).

The memory's own one-token call (``cl_arch/memory/write.py``) must return a new dense state per token,
because a session keeps every step's state as a value; a loop that owns its state (a server's batch, a
future ``Session`` decode mode that snapshots by undo log) can instead update a
:class:`~cl_arch.kernels.episodic.sparse.SparseEpisodicState` in place. Per token this costs the key
``phi(h)`` (one ``[B, d] x [d, F]`` product into a kept buffer), the active features (one host read for
their count) and the sparse step: nothing proportional to the ``[F, V]`` state is read, written or
allocated. The write key of a token is the read key of the token before (``k_t = phi(h_{t-1})``), so its
active set is carried over instead of recomputed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse import SparseEpisodicState, active, sparse_delta_step, sparse_error_step


class EpisodicDecoder:
    """One-token steps of an episodic memory with one-hot values, in place.

    Args:
        R: ``[F, d]`` the fixed projection; theta: the key threshold (a 0-dim tensor; used clamped at 0).
        beta, g, scale: ``[H]`` write strength (``sigmoid(beta_logit)``), log-decay (``-exp(A_log)``) and
            read scale.
        state: the memory's state (e.g. ``SparseEpisodicState.from_dense(S, (W0, P), E, p)``); ``state.p``
            is needed for ``write="error"``.
        key: ``[B, d]`` ``unit(h)`` of the last position read (the memory's cache), or None (zeros: nothing
            written yet).
        write: ``"delta"`` or ``"error"`` (:mod:`cl_arch.memory.write`).
    """

    def __init__(self, R: torch.Tensor, theta: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                 scale: torch.Tensor, state: SparseEpisodicState, key: torch.Tensor | None = None,
                 write: str = "delta") -> None:
        B, H, Fdim, V = state.shape
        if write not in ("delta", "error"):
            raise ValueError(f"write must be 'delta' or 'error', got {write!r}")
        if write == "error" and state.p is None:
            raise ValueError("write='error' needs a state with a p buffer (from_dense(..., p=...))")
        if R.shape[0] != Fdim:
            raise ValueError(f"R has {R.shape[0]} rows, the state {Fdim} features")
        dt = state.UM.dtype
        self.state, self.write, self.H = state, write, H
        self.Rt = R.detach().to(dt).t().contiguous()  # [d, F]
        self.theta = theta.detach().to(dt).clamp(min=0)
        self.beta = beta.detach().to(dt).expand(B, H).contiguous()
        self.g = g.detach().to(dt).expand(B, H).contiguous()
        self.scale = scale.detach().to(dt)
        self._z = torch.empty(B, Fdim, dtype=dt, device=state.UM.device)
        self._v = torch.zeros(B, H, V, dtype=dt, device=state.UM.device)
        self._o = torch.empty(B, H, V, dtype=dt, device=state.UM.device)
        self._read = torch.empty(B, V, dtype=dt, device=state.UM.device)
        self.key = torch.zeros(B, R.shape[1], dtype=dt, device=state.UM.device) if key is None else key.to(dt).clone()
        self._ka = self._keys(self.key)

    def _keys(self, hn: torch.Tensor):
        """Active entries ``[B, H, n]`` of ``phi(hn) = unit(relu(R hn - theta))`` for unit ``hn [B, d]``."""
        torch.mm(hn, self.Rt, out=self._z)
        phi = F.normalize(self._z.sub_(self.theta).relu_(), p=2, dim=-1)
        return active(phi.unsqueeze(1).expand(-1, self.H, -1), nonneg=True)

    @torch.no_grad()
    def step(self, h: torch.Tensor, ids: torch.Tensor, base: torch.Tensor | None = None,
             modulation: torch.Tensor | None = None) -> torch.Tensor:
        """One token.

        Args:
            h: ``[B, d]`` the final hidden state of this position; ids: ``[B]`` its token ``x_t``.
            base: ``[B, V]`` the logits before this memory's read (``write="error"``).
            modulation: ``[B]`` in [0, 1] times the write strength, or None.

        Returns:
            ``[B, V]`` the memory's read (a buffer the next step overwrites).
        """
        hn = F.normalize(h.to(self.key.dtype), p=2, dim=-1)
        qa = self._keys(hn)
        beta = self.beta if modulation is None else self.beta * modulation.to(self.beta.dtype).unsqueeze(-1)
        if self.write == "delta":
            self._v.zero_().scatter_(-1, ids.view(-1, 1, 1).expand(-1, self.H, 1), 1.0)
            sparse_delta_step(self.state, qa, self._ka, self._v, beta, self.g, out=self._o)
            torch.matmul(self.scale, self._o, out=self._read)
        else:
            if base is None:
                raise ValueError("write='error' needs base, the logits before the memory's read")
            sparse_error_step(self.state, qa, self._ka, ids, base, beta, self.g, self.scale, out=self._read)
        self._ka = qa
        self.key.copy_(hn)
        return self._read


__all__ = ["EpisodicDecoder"]
