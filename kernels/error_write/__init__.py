"""The error-driven write of an output memory (docs/design.md, "Error-driven writes"): one entry
point, two backends.

Backends:
    naive             per-token loop over the whole state, differentiable: the ground truth (``naive.py``)
    torch_recurrent   per-token loop over the rows whose key features fire, no autograd (``fused_recurrent.py``)
``"auto"`` takes the sparse loop unless a gradient is needed.
"""
import torch

from ..checks import check_tensor
from .fused_recurrent import recurrent_error_write
from .naive import naive_error_write

BACKENDS = {"naive": naive_error_write, "torch_recurrent": recurrent_error_write}


def error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor, eta: torch.Tensor,
                g: torch.Tensor | None, scale: torch.Tensor, initial_state: torch.Tensor,
                resting_state: torch.Tensor | None = None, initial_probs: torch.Tensor | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the error-driven write over a sequence (shapes: :func:`naive_error_write`).

    Returns ``read [B, T, V]``, final ``S [B, H, K, V]``, final ``p [B, V]``.

    Raises:
        ValueError: a shape that does not fit, targets out of range, an unknown backend.
    """
    check_tensor("q", q, ndim=4)
    B, T, H, K = q.shape
    check_tensor("k", k, shape=(B, T, H, K))
    check_tensor("targets", targets, shape=(B, T), floating=False)
    check_tensor("base", base, ndim=3, shape=(B, T, None))
    V = base.shape[-1]
    check_tensor("eta", eta, shape=(B, T, H))
    if g is not None:
        check_tensor("g", g, shape=(B, T, H))
    check_tensor("scale", scale, shape=(H,))
    check_tensor("initial_state", initial_state, shape=(B, H, K, V))
    if initial_probs is not None:
        check_tensor("initial_probs", initial_probs, shape=(B, V))
    if T and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets must be token ids in [0, {V}), got range [{int(targets.min())}, {int(targets.max())}]")
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, base, eta, g, scale, initial_state, resting_state,
                                                        initial_probs))
        backend = "naive" if needs_grad else "torch_recurrent"
    if backend not in BACKENDS:
        raise ValueError(f"unknown error_write backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[backend](q, k, targets, base, eta, g, scale, initial_state, resting_state, initial_probs)


__all__ = ["BACKENDS", "error_write", "naive_error_write", "recurrent_error_write"]
