"""Causal multi-head self-attention with a KV cache and an optional sliding window."""
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..state import AttnLayerState, StepContext
from .rotary import RotaryEmbedding

if TYPE_CHECKING:  # the config module builds the memories, which use this package's norms
    from ..config import PlasticConfig


class CausalSelfAttention(nn.Module):
    """Softmax attention over the cache plus the current tokens (SDPA).

    ``forward(x [B, T, d_model], state, position) -> (y [B, T, d_model], AttnLayerState)``.
    Query ``t`` sits at absolute position ``position + t`` and sees key positions ``p`` with
    ``p <= position + t`` and, with ``attn_window = W``, ``p > position + t - W``.
    """

    def __init__(self, config: "PlasticConfig", layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_attn_heads
        self.head_dim = config.attn_head_dim
        self.window = config.attn_window
        self.dropout = config.dropout
        self.qkv_proj = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        state: Optional[AttnLayerState] = None,
        ctx: Optional[StepContext] = None,
    ) -> Tuple[torch.Tensor, AttnLayerState]:
        position = ctx.position if ctx is not None else 0
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.rotary(q, k, position)

        past_k = state.k if state is not None else None
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([state.v, v], dim=2)
        L = k.shape[2]  # cached + new keys

        if L == T and self.window is None:
            # No cache, no window: the plain causal mask, which SDPA handles without a mask tensor.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            q_pos = torch.arange(position, position + T, device=x.device)[:, None]  # [T, 1]
            k_pos = torch.arange(position + T - L, position + T, device=x.device)[None, :]  # [1, L]
            allowed = k_pos <= q_pos
            if self.window is not None:
                allowed = allowed & (k_pos > q_pos - self.window)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)

        if self.window is not None:
            # The next query (position + T) needs only the last window - 1 keys.
            keep = self.window - 1
            k, v = k[:, :, L - min(keep, L):], v[:, :, L - min(keep, L):]
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o_proj(y), AttnLayerState(k, v)
