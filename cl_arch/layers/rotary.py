"""Rotary position embedding (GPT-NeoX "rotate half" layout) at absolute positions."""
import torch
import torch.nn as nn


def rotary_cos_sin(position: int, length: int, dim: int, theta: float,
                   device: torch.device, dtype: torch.dtype):
    """cos, sin ``[length, dim]`` for absolute positions ``[position, position + length)``.

    Angles are computed in at least float32: positions grow large in a long session and bf16
    angles would lose whole radians.
    """
    cdtype = torch.promote_types(dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=cdtype) / dim)  # [dim/2]
    pos = torch.arange(position, position + length, device=device, dtype=cdtype)
    angles = torch.outer(pos, inv_freq)  # [length, dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [length, dim]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, dim]`` by ``cos, sin [T, dim]``; returns x's dtype."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to ``q, k [B, n_heads, T, head_dim]`` starting at ``position``.

    Holds no buffers (the frequencies are a function of the config), so nothing about it enters
    the checkpoint or the fingerprint.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, q: torch.Tensor, k: torch.Tensor, position: int = 0):
        cos, sin = rotary_cos_sin(position, q.shape[-2], self.head_dim, self.theta, q.device, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
