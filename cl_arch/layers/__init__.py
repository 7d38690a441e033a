"""The backbone's building blocks of :class:`cl_arch.PlasticTransformer` (the memories are in :mod:`cl_arch.memory`)."""
from .attention import CausalSelfAttention
from .mlp import SwiGLU
from .norm import GatedRMSNorm, RMSNorm, rms_norm
from .rotary import RotaryEmbedding, apply_rotary, rotary_cos_sin

__all__ = ["CausalSelfAttention", "SwiGLU", "GatedRMSNorm", "RMSNorm", "rms_norm", "RotaryEmbedding", "apply_rotary",
           "rotary_cos_sin"]
