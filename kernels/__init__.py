"""cl_arch.kernels: the per-token fast-weight rule and the reward commit.

Kernels know no model. Each op has a folder with ``naive.py`` (ground truth),
``chunk.py`` (training/prefill) and ``fused_recurrent.py`` (decode).
"""
from .commit import reward_commit
from .plastic import BACKENDS, plastic_rule, resolve_backend

__all__ = ["plastic_rule", "reward_commit", "resolve_backend", "BACKENDS"]
