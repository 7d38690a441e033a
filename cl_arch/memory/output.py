"""What the memories after the last block share: the one frozen context they read, and the forward
of a memory that writes ``key(h_{t-1}) -> value(x_t)`` and adds its read at ``key(h_t)`` to the
logits (docs/design.md, "The readout memory", "The episodic memory").

An output memory reads an :class:`OutputContext` (the final hidden states, the input ids, the
model's embedding and head), built once per forward call, instead of being handed the embedding
and head one argument at a time. A memory kind defines its keys (:meth:`OutputMemory.project_qkv`)
and, through its config, its values, sizes and commit; the rule, the read and the state handling
are here once.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..state import FastLayerState, StepContext
from .base import PlasticMemory
from .write import make_write

VALUE_KINDS = ("onehot", "embed")


@dataclass(frozen=True)
class OutputContext:
    """What every output memory reads in one forward call.

    Attributes:
        h: ``[B, T, d_model]`` final hidden states (after the last norm).
        ids: ``[B, T]`` the input tokens (``x_t`` is what ``h_{t-1}`` should have predicted).
        embed: the model's input embedding (``[vocab, d_model]``; values of ``"embed"`` memories).
        head: the model's output head (reads ``"embed"`` values back into logits).
        logits: ``[B, T, vocab]`` the logits before this memory's read (the head's and every earlier
            memory's); what an error-driven write's prediction is made of. None where no caller gave them.
    """

    h: torch.Tensor
    ids: torch.Tensor
    embed: nn.Module
    head: nn.Module
    logits: Optional[torch.Tensor] = None


class OutputMemory(PlasticMemory):
    """``forward(out: OutputContext, state, ctx) -> (logit delta [B, T, vocab], FastLayerState)``.

    Per head it learns a write strength ``beta = sigmoid(beta_logit)`` (times the per-token
    modulation, so a reward writes harder), a decay ``g = -exp(A_log)`` toward the resting state
    ``W0 + P``, and a read scale ``read_scale``; subclasses set them in ``__init__`` and define
    :meth:`project_qkv` and :meth:`cache_shape`. Values are one-hot tokens (``"onehot"``,
    ``V = vocab_size``) or unit token embeddings read back through the head (``"embed"``, ``V = d_model``).
    The state's ``conv`` slot carries ``unit(h)`` of the last position (the next call's first write key).
    How it writes is a strategy (:mod:`cl_arch.memory.write`): the delta rule on the token's value, or
    the model's own prediction error.
    """

    value_kind = "onehot"

    def __init__(self, rule, H: int, K: int, V: int, value_kind: str, commit, write: str = "delta") -> None:
        super().__init__(rule, H, K, V, commit=commit)
        self.value_kind = value_kind
        self.write = make_write(write)

    @property
    def decay(self) -> torch.Tensor:
        """Per-token retention ``exp(g)`` per head ``[H]``; the memory span is ``1 / -g`` tokens."""
        return torch.exp(-self.A_log.exp())

    def _no_weight_decay(self, *params: torch.Tensor) -> None:
        for p in params:
            p._no_weight_decay = True

    def values(self, ids: torch.Tensor, embed: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """``[B, T, H, V]`` values of the observed tokens ``ids [B, T]``."""
        if self.value_kind == "onehot":
            v = F.one_hot(ids, self.head_v_dim).to(dtype)
        else:
            v = F.normalize(embed(ids).to(dtype), p=2, dim=-1) * math.sqrt(self.head_v_dim)
        return v.unsqueeze(2).expand(*ids.shape, self.n_heads, self.head_v_dim)

    def project_qkv(self, h: torch.Tensor, cache: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None):
        """``q, k [B, T, H, K]`` (read keys of ``h_t``, write keys of ``h_{t-1}``), None (the values
        come from the tokens) and the new cache."""
        raise NotImplementedError

    def forward(self, out: OutputContext, state: Optional[FastLayerState] = None,
                ctx: Optional[StepContext] = None) -> Tuple[torch.Tensor, Optional[FastLayerState]]:
        """
        Args:
            out: the call's :class:`OutputContext` (``h [B, T, d_model]``, ``ids [B, T]``, embed, head,
                ``logits [B, T, vocab]`` before this memory).
            state, ctx: as :class:`~cl_arch.memory.fast_layer.FastWeightLayer`.

        Returns:
            ``[B, T, vocab_size]`` to add to the logits, and the new state (None when ``ctx.need_state`` is False).
        """
        ctx = ctx if ctx is not None else StepContext()
        state = state if state is not None else FastLayerState()
        return self.write.forward(self, out, state, ctx)


def shifted_keys(hn: torch.Tensor, cache: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T, D]`` keys of the previous positions: the cache (zeros: nothing before) then ``hn[:, :-1]``."""
    prev = hn.new_zeros(hn.shape[0], 1, hn.shape[-1]) if cache is None else cache.to(hn.dtype)
    return torch.cat([prev, hn[:, :-1]], dim=1)


__all__ = ["OutputContext", "OutputMemory", "VALUE_KINDS", "shifted_keys"]
