"""Building blocks of :class:`cl_arch.PlasticTransformer`."""
from .attention import CausalSelfAttention
from .episodic import EpisodicMemory
from .fast_weight import FastWeightLayer, ShortConv
from .mlp import SwiGLU
from .norm import GatedRMSNorm, RMSNorm, rms_norm
from .plasticity import PlasticMemory
from .readout import ReadoutMemory
from .rotary import RotaryEmbedding, apply_rotary, rotary_cos_sin

__all__ = [
    "CausalSelfAttention", "EpisodicMemory", "FastWeightLayer", "ShortConv", "SwiGLU", "GatedRMSNorm", "RMSNorm",
    "rms_norm", "PlasticMemory", "ReadoutMemory", "RotaryEmbedding", "apply_rotary", "rotary_cos_sin",
]
