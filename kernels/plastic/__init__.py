"""The plastic rule: one entry point, several backends (see docs/design.md, "The rule").

Backends:
    naive             fp32 per-token loop, the ground truth (``naive.py``)
    torch_chunk       chunkwise-parallel PyTorch, training and prefill (``chunk.py``)
    torch_recurrent   per-token PyTorch for decoding (``fused_recurrent.py``)
    triton_chunk      chunkwise-parallel Triton kernels with their own backward (``chunk_triton.py``)
    triton_recurrent  per-token Triton kernel, state in registers, for decoding (``fused_recurrent.py``)
The Triton backends share ``triton_utils.py``; they are registered in ``BACKENDS`` only
when triton is installed (it is imported lazily, at their first call).
"""
import os
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ..checks import (VALUE_CHECKS, check_cu_seqlens, check_device, check_finite, check_per_head, check_range,
                      check_tensor)
from .chunk import chunk_plastic_rule
from .fused_recurrent import recurrent_plastic_rule
from .naive import naive_plastic_rule
from .triton_utils import HAS_TRITON, triton_available_for

BACKENDS: Dict[str, Callable] = {
    "naive": naive_plastic_rule,
    "torch_chunk": chunk_plastic_rule,
    "torch_recurrent": recurrent_plastic_rule,
}
# Backends that need a CUDA device (or TRITON_INTERPRET=1): registered only when triton imports.
GPU_BACKENDS = set()
TRITON_BACKENDS = ("triton_chunk", "triton_recurrent")
if HAS_TRITON:
    from .chunk_triton import triton_chunk_plastic_rule
    from .fused_recurrent import triton_recurrent_plastic_rule

    BACKENDS["triton_recurrent"] = triton_recurrent_plastic_rule
    BACKENDS["triton_chunk"] = triton_chunk_plastic_rule
    GPU_BACKENDS.update(TRITON_BACKENDS)
RULES = ("delta", "hebb")
# Below this many tokens the per-token loop beats the chunk set-up cost.
RECURRENT_MAX_T = 16


def resolve_backend(mode: str, device: Union[str, torch.device]) -> str:
    """Backend name for a layer's ``mode`` ("chunk" or "recurrent") on ``device``.

    ``CL_ARCH_BACKEND`` (a backend name) overrides the choice everywhere.
    """
    if mode not in ("chunk", "recurrent"):
        raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")
    forced = os.environ.get("CL_ARCH_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"CL_ARCH_BACKEND={forced!r} is not a backend; choose from {sorted(BACKENDS)}")
        return forced
    on_cuda = torch.device(device).type == "cuda"
    triton_name = "triton_" + mode
    if on_cuda and triton_name in BACKENDS:
        return triton_name
    return "torch_" + mode


def _validate(q, k, v, beta, g, rule, lam, scale, initial_state, initial_trace, backend, cu_seqlens=None,
              resting_state=None, values: bool = True):
    """Shape, dtype and device checks always; checks that read tensor values back to the host
    (finite, ranges, the delta rule's step bound) only when ``values`` (and CL_ARCH_VALUE_CHECKS)."""
    values = values and VALUE_CHECKS
    check_tensor("q", q, ndim=4)
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    n_states = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    check_tensor("k", k, shape=(B, T, H, K))
    check_tensor("v", v, shape=(B, T, H, None))
    V = v.shape[-1]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_tensor("beta", beta, shape=(B, T, H))
    if g is not None:
        check_tensor("g", g, shape=(B, T, H))
    for name, x in (("beta", beta), ("g", g)):
        if x is not None:
            check_device(name, x, q)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if lam is not None:
        check_per_head("lam", lam, H, 0.0, 1.0, values)
    if scale is not None and (not isinstance(scale, (int, float)) or not scale > 0 or scale != scale):
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    for name, st in (("initial_state", initial_state), ("initial_trace", initial_trace)):
        if st is not None:
            check_tensor(name, st, shape=(n_states, H, K, V))
            check_device(name, st, q)
            if values:
                check_finite(name, st)
    if resting_state is not None:
        check_tensor("resting_state", resting_state)
        if tuple(resting_state.shape) not in ((n_states, H, K, V), (H, K, V)):
            raise ValueError(f"resting_state has shape {tuple(resting_state.shape)}, expected "
                             f"{(n_states, H, K, V)} or {(H, K, V)}")
        check_device("resting_state", resting_state, q)
        if values:
            check_finite("resting_state", resting_state)
    if backend in TRITON_BACKENDS and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} cannot run: triton is not installed")
    if backend != "auto" and backend not in BACKENDS:
        known = sorted(set(BACKENDS) | set(TRITON_BACKENDS))
        raise ValueError(f"backend must be 'auto' or one of {known}, got {backend!r}")
    if not values:
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x)
    check_range("beta", beta, 0.0, 1.0)
    if g is not None:
        check_range("g", g, None, 0.0)
    if rule == "delta":
        # The delta step multiplies S by (I - beta k k^T), whose eigenvalue 1 - beta |k|^2 leaves [-1, 1]
        # once beta |k|^2 > 2: the state then grows geometrically (docs/design.md, "The rule": the
        # model's k is unit-norm). The 1% slack lets bf16-rounded unit keys through.
        step = (beta.detach().float() * k.detach().float().pow(2).sum(-1)).max()
        if not bool(step <= 2.02):
            raise ValueError(f"k is too long for the delta rule: beta * |k|^2 reaches {float(step):.4g} > 2, "
                             f"so the state diverges (normalise k to unit length)")


def plastic_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    rule: str = "delta",
    lam: Optional[Union[float, torch.Tensor]] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    initial_trace: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    backend: str = "auto",
    chunk_size: int = 64,
    cu_seqlens: Optional[torch.Tensor] = None,
    resting_state: Optional[torch.Tensor] = None,
    check_values: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run the fast-weight rule (docs/design.md, "The rule") over a sequence.

    Per token, with ``M`` the resting state: ``S' = M + exp(g) (S - M)``;
    ``u = v - S'^T k`` (delta) or ``v`` (hebb); ``D = beta k u^T``; ``S = S' + D``;
    ``o = S^T (scale q)``; ``E = lam E + D``.

    Args:
        q, k: ``[B, T, H, K]`` (k unit-norm in the model); v: ``[B, T, H, V]``.
        beta: ``[B, T, H]`` write strength in [0, 1].
        g: ``[B, T, H]`` log-decay, <= 0, or None (no decay).
        rule: "delta" or "hebb".
        lam: trace decay, float or ``[H]`` tensor in [0, 1]; None keeps no trace.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or None: the episode starts at rest (``M``).
        initial_trace: ``[B, H, K, V]`` or None (zeros).
        resting_state: ``M = W0 + P``, ``[B, H, K, V]`` or ``[H, K, V]`` (shared by every
            row), or None: zeros, the plain gated delta rule. The naive backend applies the
            rule as written; the others run on ``S - M`` with values ``v - M^T k`` (delta)
            and add the read ``M^T (scale q)``, which is exact (docs/design.md, "The rule").
        output_final_state: return S_T and E_T (else both None).
        backend: "auto" or a name from ``BACKENDS``.
        chunk_size: tokens per chunk for the chunked backends (ignored by the others).
        cu_seqlens: ``[N+1]`` offsets of N sequences packed along T (B must be 1);
            each starts from its own ``initial_state[n]`` and returns its own final
            states, so states are ``[N, H, K, V]``. Triton backends do it in one
            launch; the PyTorch backends loop over the sequences.
        check_values: False skips the checks that read tensor values back to the host (NaN/inf,
            beta/g/lam ranges, the delta rule's step bound: one device sync each). The model's own
            layers pass False, since their inputs are computed by the network, not given by a
            user; shapes, dtypes and devices are always checked. ``CL_ARCH_VALUE_CHECKS=0``
            turns them off everywhere.

    Returns:
        ``(o [B, T, H, V] in q's dtype, S_T [B, H, K, V], E_T [B, H, K, V] or None)``;
        states are float32 (float64 for float64 inputs). Differentiable in q, k, v,
        beta, g, lam, initial_state, initial_trace and resting_state.

    Raises:
        ValueError: naming the argument, for a wrong shape, dtype, NaN/inf,
            beta outside [0, 1], g > 0, lam outside [0, 1], an unknown rule or backend.
    """
    _validate(q, k, v, beta, g, rule, lam, scale, initial_state, initial_trace, backend, cu_seqlens,
              resting_state, values=check_values)
    if backend == "auto":
        mode = "recurrent" if q.shape[1] <= RECURRENT_MAX_T else "chunk"
        backend = resolve_backend(mode, q.device)
    if backend in GPU_BACKENDS:
        why = triton_available_for(q)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot run: {why}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    extra = {"chunk_size": chunk_size} if backend.endswith("chunk") else {}
    fn = BACKENDS[backend]
    kw = dict(rule=rule, lam=lam, scale=scale, initial_state=initial_state, initial_trace=initial_trace,
              output_final_state=output_final_state, **extra)
    if resting_state is None:
        return _run(fn, backend, q, k, v, beta, g, cu_seqlens, **kw)
    if backend == "naive":
        return _run(fn, backend, q, k, v, beta, g, cu_seqlens, resting_state=resting_state, **kw)
    return _around_rest(fn, backend, q, k, v, beta, g, resting_state, cu_seqlens, **kw)


def _run(fn, backend, q, k, v, beta, g, cu_seqlens, **kw):
    """One backend call; packed sequences loop for backends without varlen support."""
    if cu_seqlens is not None and backend in GPU_BACKENDS:
        return fn(q, k, v, beta, g, cu_seqlens=cu_seqlens, **kw)
    if cu_seqlens is not None:
        return _varlen_loop(fn, q, k, v, beta, g, cu_seqlens, **kw)
    return fn(q, k, v, beta, g, **kw)


def _around_rest(fn, backend, q, k, v, beta, g, M, cu_seqlens, rule, scale, initial_state, **kw):
    """A backend without a resting state, run on the deviation ``S~ = S - M`` (docs/design.md, "The rule").

    ``S' = M + a (S - M)`` is ``S~' = a S~``; the delta error ``v - S'^T k`` is
    ``(v - M^T k) - S~'^T k``; the read ``S^T q`` is ``M^T q + S~^T q``; the writes, hence
    the trace, are unchanged. Autograd carries the gradient to ``M`` through the three terms.
    """
    B, T, H, K = q.shape
    cdt = torch.promote_types(q.dtype, torch.float32)
    n_states = B if cu_seqlens is None else cu_seqlens.numel() - 1
    M = M.to(cdt)
    if M.dim() == 3:
        M = M.unsqueeze(0).expand(n_states, H, K, M.shape[-1])
    if cu_seqlens is None:
        M_tok = M  # [B, H, K, V], the same for every token of a row
        read = lambda x: torch.einsum("bthk,bhkv->bthv", x.to(cdt), M_tok)  # noqa: E731
    else:  # packed rows: token t belongs to sequence seq[t]
        seq = torch.repeat_interleave(torch.arange(n_states, device=q.device), cu_seqlens.diff())
        read = lambda x: torch.einsum("bthk,thkv->bthv", x.to(cdt), M[seq])  # noqa: E731
    sc = K ** -0.5 if scale is None else scale
    v_dev = v if rule == "hebb" else (v.to(cdt) - read(k)).to(v.dtype)
    S0_dev = None if initial_state is None else initial_state.to(cdt) - M
    o_dev, S_dev, E_T = _run(fn, backend, q, k, v_dev, beta, g, cu_seqlens, rule=rule, scale=scale,
                             initial_state=S0_dev, **kw)
    o = (o_dev.to(cdt) + read(q) * sc).to(q.dtype)
    S_T = None if S_dev is None else S_dev + M.to(S_dev.dtype)
    return o, S_T, E_T


def _varlen_loop(fn, q, k, v, beta, g, cu_seqlens, initial_state, initial_trace, output_final_state,
                 resting_state=None, **kw):
    """Packed sequences through a backend without varlen support, one sequence at a time."""
    cu = cu_seqlens.tolist()
    outs, finals, traces = [], [], []
    for n, (lo, hi) in enumerate(zip(cu, cu[1:])):
        rest = {}
        if resting_state is not None:
            rest["resting_state"] = resting_state if resting_state.dim() == 3 else resting_state[n:n + 1]
        o, S, E = fn(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], beta[:, lo:hi], None if g is None else g[:, lo:hi],
                     initial_state=None if initial_state is None else initial_state[n:n + 1],
                     initial_trace=None if initial_trace is None else initial_trace[n:n + 1],
                     output_final_state=output_final_state, **rest, **kw)
        outs.append(o)
        finals.append(S)
        traces.append(E)
    o = torch.cat(outs, dim=1)
    if not output_final_state:
        return o, None, None
    E_T = None if traces[0] is None else torch.cat(traces, dim=0)
    return o, torch.cat(finals, dim=0), E_T


__all__ = [
    "plastic_rule", "resolve_backend", "BACKENDS", "naive_plastic_rule",
    "chunk_plastic_rule", "recurrent_plastic_rule",
]
