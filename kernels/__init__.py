"""cl_arch.kernels: the per-token fast-weight rule and the reward commit.

Kernels know no model. Each op has a folder with ``naive.py`` (ground truth) and its
fast paths: for the plastic rule ``chunk.py`` (PyTorch) and ``chunk_triton.py`` (Triton)
for training/prefill, ``fused_recurrent.py`` (PyTorch and Triton) for decode, and
``triton_utils.py``, the Triton helpers they and the commit's ``fused.py`` share.
"""
from .commit import reward_commit
from .plastic import BACKENDS, plastic_rule, resolve_backend

__all__ = ["plastic_rule", "reward_commit", "resolve_backend", "BACKENDS"]
