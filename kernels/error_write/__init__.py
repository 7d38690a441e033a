"""The error-driven write of an output memory (docs/design.md, "Error-driven writes"): one entry
point, three backends, two rules (exact, ``chunk_size = 1``; chunked, ``chunk_size > 1``: ``naive.py``).

Backends:
    naive             per-token loop over the whole state, differentiable, either rule: the ground truth
    torch_recurrent   per-token loop over the rows whose key features fire, no autograd, exact rule only
                      (``fused_recurrent.py``)
    torch_chunk       chunks of ``chunk_size`` tokens as matrix products, differentiable (``chunk.py``)
``"auto"``: the chunked rule takes ``torch_chunk``; the exact rule the sparse loop, or the naive loop
when a gradient is needed.
"""
import torch

from ..checks import check_tensor
from .chunk import chunk_error_write
from .fused_recurrent import recurrent_error_write
from .naive import naive_error_write

BACKENDS = {"naive": naive_error_write, "torch_recurrent": recurrent_error_write, "torch_chunk": chunk_error_write}


def error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor, eta: torch.Tensor,
                g: torch.Tensor | None, scale: torch.Tensor, initial_state: torch.Tensor,
                resting_state: torch.Tensor | None = None, initial_probs: torch.Tensor | None = None,
                backend: str = "auto", chunk_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the error-driven write over a sequence (shapes: :func:`naive_error_write`).

    ``chunk_size``: 1 is the exact rule; ``C > 1`` takes each chunk's errors against the predictions of
    the state at the chunk's start (``naive.py``), which ``torch_chunk`` computes in matrix products.

    Returns ``read [B, T, V]``, final ``S [B, H, K, V]``, final ``p [B, V]``.

    Raises:
        ValueError: a shape that does not fit, targets out of range, an unknown backend, a chunk size
            the backend cannot run.
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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if backend == "auto" and chunk_size > 1:
        backend = "torch_chunk"
    elif backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, base, eta, g, scale, initial_state, resting_state,
                                                        initial_probs))
        backend = "naive" if needs_grad else "torch_recurrent"
    if backend not in BACKENDS:
        raise ValueError(f"unknown error_write backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'")
    if backend == "torch_recurrent":
        if chunk_size != 1:
            raise ValueError(f"the torch_recurrent backend runs the exact rule only (chunk_size 1), got {chunk_size}")
        return recurrent_error_write(q, k, targets, base, eta, g, scale, initial_state, resting_state, initial_probs)
    return BACKENDS[backend](q, k, targets, base, eta, g, scale, initial_state, resting_state, initial_probs,
                             chunk_size=chunk_size)


__all__ = ["BACKENDS", "chunk_error_write", "error_write", "naive_error_write", "recurrent_error_write"]
