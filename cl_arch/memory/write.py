"""How an output memory writes: strategy objects, one per write rule (docs/design.md, "The readout
memory", "Error-driven writes").

* :class:`DeltaWrite`: the delta rule on the observed token's value, ``S += beta k (v(x_t) - S^T k)^T``;
  the memory regresses the next token by squared error on its own read and never sees what the model
  already predicted (a cache).
* :class:`ErrorWrite`: the model's own prediction error, ``S += beta k (e(x_t) - softmax(z_{t-1}))^T``
  with ``z`` the full logits including this memory's read: ``-beta`` times the gradient of the
  previous token's cross-entropy with respect to ``S``, so the memory is online gradient descent on
  an additive logit correction (Clark et al.'s fast weight layers, without their training). Only
  ``beta * read_scale`` matters. The state's ``conv`` slot carries the write key's cache followed by
  ``p`` of the last position (``[B, 1, K_cache + vocab]``), so a stream split over calls, or decoded
  token by token, writes exactly what one call over the whole stream writes.

A memory holds one of these (its config's ``write`` field) instead of branching on the rule.
"""
from __future__ import annotations

import torch

from cl_arch.kernels.episodic import active
from cl_arch.kernels.episodic.step import dense_delta_step, dense_error_step
from cl_arch.kernels.error_write import error_write

from ..state import FastLayerState

WRITES = ("delta", "error")


class DeltaWrite:
    """The delta rule on the token's value (one-hot or unit embedding)."""

    name = "delta"

    def cache_extra(self, memory) -> int:
        return 0

    def forward(self, memory, out, state: FastLayerState, ctx) -> tuple[torch.Tensor, FastLayerState | None]:
        if decodes_sparsely(memory, out.h, ctx):
            return self._decode(memory, out, state, ctx)
        h, ids = out.h, out.ids
        B, T, _ = h.shape
        cdt = torch.promote_types(h.dtype, torch.float32)
        q, k, _, cache = memory.project_qkv(h, state.conv, ids=ids)
        v = memory.values(ids, out.embed, cdt)
        beta = torch.sigmoid(memory.beta_logit.to(cdt)).expand(B, T, memory.n_heads)
        if ctx.modulation is not None:
            beta = beta * ctx.modulation.to(cdt).unsqueeze(-1)
        g = (-memory.A_log.to(cdt).exp()).expand(B, T, memory.n_heads)
        # under the state commit the trace must follow the memory's own decay (E_T = S_T - M): no override
        lam = None if memory.trace_follows_state else ctx.lam
        o, S_T, E_T = memory.run_rule(q, k, v, beta, g, state, lam, ctx.need_state, scale=1.0)
        read = torch.einsum("bthv,h->btv", o.to(cdt), memory.read_scale.to(cdt))
        if memory.value_kind != "onehot":
            read = out.head(read.to(h.dtype))
        read = read.to(h.dtype)
        if not ctx.need_state:
            return read, None
        return read, FastLayerState(S=S_T, E=E_T, P=state.P, conv=cache)

    def _decode(self, memory, out, state: FastLayerState, ctx) -> tuple[torch.Tensor, FastLayerState]:
        """One token on the rows the keys fire (:func:`~cl_arch.kernels.episodic.step.dense_delta_step`)."""
        h, ids = out.h, out.ids
        cdt = memory.state_dtype
        q, k, _, cache = memory.project_qkv(h, state.conv, ids=ids)
        beta, g = _step_rates(memory, h.shape[0], ctx, cdt)
        S0 = memory.initial_state(h.shape[0], state.P) if state.S is None else state.S.to(cdt)
        qa, ka = active(q[:, 0], nonneg=True), active(k[:, 0], nonneg=True)  # phi >= 0
        o, S_T, E_T = dense_delta_step(S0, state.E, memory.decode_resting_state(state.P), qa, ka,
                                       memory.values(ids, out.embed, cdt)[:, 0], beta, g)
        read = torch.einsum("bhv,h->bv", o, memory.read_scale.to(cdt))[:, None]
        if memory.value_kind != "onehot":
            read = out.head(read.to(h.dtype))
        return read.to(h.dtype), FastLayerState(S=S_T, E=E_T, P=state.P, conv=cache)


class ErrorWrite:
    """The previous prediction's error, ``e(x_t) - softmax(z_{t-1})``, as the value (one-hot values,
    state commit). Needs ``out.logits`` (the logits before this memory's read)."""

    name = "error"

    def cache_extra(self, memory) -> int:
        return memory.head_v_dim  # p of the last position

    def forward(self, memory, out, state: FastLayerState, ctx) -> tuple[torch.Tensor, FastLayerState | None]:
        if out.logits is None:
            raise ValueError(f"{type(memory).__name__} with write='error' needs OutputContext.logits (the logits "
                             "before its read); the model's forward passes them")
        if decodes_sparsely(memory, out.h, ctx):
            return self._decode(memory, out, state, ctx)
        h, ids = out.h, out.ids
        B, T, _ = h.shape
        V = memory.head_v_dim
        cdt = memory.state_dtype
        key_cache, p_prev = (None, None) if state.conv is None else (state.conv[..., :-V], state.conv[:, 0, -V:])
        q, k, _, cache = memory.project_qkv(h, key_cache, ids=ids)
        eta = torch.sigmoid(memory.beta_logit.to(cdt)).expand(B, T, memory.n_heads)
        if ctx.modulation is not None:
            eta = eta * ctx.modulation.to(cdt).unsqueeze(-1)
        g = (-memory.A_log.to(cdt).exp()).expand(B, T, memory.n_heads)
        M = memory.resting_state(B, state.P)
        S0 = memory.initial_state(B, state.P) if state.S is None else state.S.to(cdt)
        read, S_T, p = error_write(q, k, ids, out.logits, eta, g, memory.read_scale.to(cdt), S0, M, p_prev,
                                   chunk_size=getattr(memory.config, "write_chunk", 1))
        read = read.to(h.dtype)
        if not ctx.need_state:
            return read, None
        carry = torch.exp(g.sum(1))[..., None, None]  # [B, H, 1, 1]
        E_T = _trace_from_state(S_T, S0, M.expand_as(S0), None if state.E is None else state.E.to(cdt), carry)
        conv = torch.cat([cache.to(cdt), p[:, None].to(cdt)], dim=-1)
        return read, FastLayerState(S=S_T, E=E_T, P=state.P, conv=conv)

    def _decode(self, memory, out, state: FastLayerState, ctx) -> tuple[torch.Tensor, FastLayerState]:
        """One token on the rows the keys fire (:func:`~cl_arch.kernels.episodic.step.dense_error_step`)."""
        h, ids = out.h, out.ids
        B, V, cdt = h.shape[0], memory.head_v_dim, memory.state_dtype
        key_cache, p_prev = (None, None) if state.conv is None else (state.conv[..., :-V], state.conv[:, 0, -V:])
        q, k, _, cache = memory.project_qkv(h, key_cache, ids=ids)
        eta, g = _step_rates(memory, B, ctx, cdt)
        S0 = memory.initial_state(B, state.P) if state.S is None else state.S.to(cdt)
        qa, ka = active(q[:, 0], nonneg=True), active(k[:, 0], nonneg=True)  # phi >= 0
        read, S_T, E_T, p = dense_error_step(S0, state.E, memory.decode_resting_state(state.P), qa, ka, ids[:, 0],
                                             out.logits[:, 0], eta, g, memory.read_scale.to(cdt), p_prev)
        conv = torch.cat([cache.to(cdt), p[:, None]], dim=-1)
        return read[:, None].to(h.dtype), FastLayerState(S=S_T, E=E_T, P=state.P, conv=conv)


def _trace_from_state(S_T: torch.Tensor, S0: torch.Tensor, M: torch.Tensor, E0: torch.Tensor | None,
                      carry: torch.Tensor) -> torch.Tensor:
    """The trace at a call's end when it follows the state's own recurrence (the state commit):
    ``E_T = (S_T - M) + carry (E_0 - (S_0 - M))``, ``carry [B, H, 1, 1]`` the call's product of decays, every state
    ``[B, H, K, V]`` (``E_0`` None: zeros). Without autograd one new array and in-place adds: the states are 2 MB
    each at the shipped episodic size, and the five temporaries of the formula cost a reading call about 3 ms."""
    if torch.is_grad_enabled() or not (S_T.dtype == S0.dtype == M.dtype == carry.dtype):
        E0 = torch.zeros_like(S0) if E0 is None else E0
        return (S_T - M) + carry * (E0 - (S0 - M))
    E_T = torch.sub(S_T, M)
    if E0 is not None:
        E_T.addcmul_(E0.expand_as(E_T), carry)
    E_T.addcmul_(S0.expand_as(E_T), carry, value=-1.0)
    return E_T.addcmul_(M, carry)


def decodes_sparsely(memory, h: torch.Tensor, ctx) -> bool:
    """Whether a call takes the one-token sparse step: one token on the CPU, no autograd, eval mode, a
    memory whose keys are sparse (``memory.sparse_decode``, the episodic memory's) and whose trace follows
    its state (the state commit: ``E`` decays with ``S``), and the new state wanted. Such a memory defines
    ``decode_resting_state(P)`` (``M``, or None when zero). Not on a GPU: finding the active features reads
    their count back to the host (a sync per call), and no GPU has measured whether the step pays there."""
    return (h.shape[1] == 1 and h.device.type == "cpu" and bool(getattr(memory, "sparse_decode", False))
            and not torch.is_grad_enabled() and not memory.training and ctx.need_state and memory.trace_follows_state)


def _step_rates(memory, B: int, ctx, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta [B, H], g [B, H])`` of a one-token call: write strength times the modulation, log-decay."""
    beta = torch.sigmoid(memory.beta_logit.to(dtype)).expand(B, memory.n_heads)
    if ctx.modulation is not None:
        beta = beta * ctx.modulation[:, :1].to(dtype)
    return beta, (-memory.A_log.to(dtype).exp()).expand(B, memory.n_heads)


def check_write(owner: str, write: str, values: str) -> None:
    """``write`` is a known rule, and error writes go with one-hot values (the error lives over the vocabulary)."""
    if write not in WRITES:
        raise ValueError(f"{owner}.write: must be one of {WRITES}, got {write!r}")
    if write == "error" and values != "onehot":
        raise ValueError(f"{owner}.write: 'error' writes the prediction error over the vocabulary and needs "
                         f"values='onehot', got values={values!r}")


def make_write(name: str):
    """The write strategy called ``name`` (:data:`WRITES`)."""
    return {"delta": DeltaWrite, "error": ErrorWrite}[name]()


__all__ = ["WRITES", "DeltaWrite", "ErrorWrite", "check_write", "decodes_sparsely", "make_write"]
