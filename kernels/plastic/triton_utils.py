"""Helpers shared by the Triton backends (``chunk_triton.py``, ``fused_recurrent.py``) and the reward commit.

Nothing here imports triton: it stays optional (``HAS_TRITON``) and is imported on the first
Triton call (:func:`import_triton`). The module holds:

* ``HAS_TRITON``, :func:`import_triton` and :func:`triton_available_for`: whether and where
  Triton kernels can run;
* :func:`jit_for_env`: kernels are plain functions jitted at launch, compiled or interpreted as
  ``TRITON_INTERPRET`` says then, optionally autotuned; ``RECORDER`` is the hook through which
  ``kernels.compile_check`` records launches instead of running them;
* ``BV_CAP``: the widest V-block of the sequential (state-carrying) kernels;
* the packed layout (:class:`Layout`, :func:`packed_layout`, :func:`pack`) and the argument
  handling common to both plastic-rule wrappers (:func:`prepare_triton_args`);
* :func:`lam_grad`: the trace decay's closed-form gradient, from per-token terms both backwards
  produce.
"""
import importlib.util as _importlib_util
import os
from typing import NamedTuple, Optional

import torch

from ..checks import check_cu_seqlens

# Triton is optional and imported lazily, on the first Triton call: its standard
# library is built as interpreted or compiled depending on TRITON_INTERPRET at the
# moment `import triton` runs, so importing it at module level would fix that choice
# for every later user of cl_arch.kernels (tests switch the interpreter on late).
HAS_TRITON = _importlib_util.find_spec("triton") is not None


def import_triton(namespace: dict) -> None:
    """Import triton and bind ``triton``, ``tl`` and ``constexpr`` in a kernel module's globals.

    A kernel module starts with ``triton = tl = None`` and ``constexpr = "tl.constexpr"``:
    its kernel parameters are annotated ``constexpr``, a placeholder string until triton is
    imported, then ``tl.constexpr`` itself (the interpreter re-evaluates annotations from the
    source when it rewrites a kernel, so the name must resolve to the object). Each wrapper
    calls this on its own module's ``globals()`` before its first launch.
    """
    import triton as _triton
    import triton.language as _tl

    namespace["triton"] = _triton
    namespace["tl"] = _tl
    namespace["constexpr"] = _tl.constexpr


# Widest V-block of one program of the sequential kernels (the recurrent kernels, the chunk
# state and dstate kernels): [K, BV] fp32 tiles of S, dS and dE_T must fit in registers
# (K = 128, BV = 32: 12 KiB per tile). Read at every launch; tests lower it to exercise NV > 1.
BV_CAP = 32


_JIT_CACHE = {}
# Set by kernels.compile_check.record_launches: wraps each jitted kernel so its
# launches are recorded (for compiling them for a GPU that is not here), not run.
RECORDER = None


def jit_for_env(fn, configs=None, key=None, restore_value=None):
    """``triton.jit(fn)``, compiled or interpreted as ``TRITON_INTERPRET`` says *now*.

    ``@triton.jit`` reads TRITON_INTERPRET when the module is imported, so a test
    file that sets it after another test imported cl_arch.kernels would get
    compiled kernels on a machine without a GPU. Wrapping at launch time instead
    lets the interpreter be switched on at any point before the first call.

    ``configs`` (a list of ``dict(num_warps=, num_stages=)``) makes the compiled
    kernel a ``triton.autotune`` over them, keyed by the constexpr names in ``key``;
    ``restore_value`` names the arguments a kernel updates in place, which the
    autotuner must restore between trial runs. ``CL_ARCH_TRITON_AUTOTUNE=0`` runs
    the first config instead (GPU tests: one compile per kernel variant, not one per
    config). The interpreter ignores configs.
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if configs and not interpret and RECORDER is None and os.environ.get("CL_ARCH_TRITON_AUTOTUNE", "1") == "0":
        return _FixedConfig(jit_for_env(fn), configs[0])
    tuned = bool(configs) and not interpret and RECORDER is None
    cache_key = (fn, interpret, tuned)
    if cache_key not in _JIT_CACHE:
        import triton as _triton
        import triton.language as _tl

        # Kernel signatures spell constexpr as the string "tl.constexpr" (triton is
        # not imported when they are defined); the interpreter wants the object.
        fn.__annotations__ = {n: (_tl.constexpr if a == "tl.constexpr" else a) for n, a in fn.__annotations__.items()}
        jitted = _JIT_CACHE.get((fn, interpret, False)) or _triton.jit(fn)
        _JIT_CACHE[(fn, interpret, False)] = jitted
        if tuned:
            jitted = _triton.autotune(configs=[_triton.Config({}, **c) for c in configs], key=list(key or []),
                                      restore_value=list(restore_value or []))(jitted)
        _JIT_CACHE[cache_key] = jitted
    if RECORDER is not None:
        return RECORDER(_JIT_CACHE[cache_key], configs)
    return _JIT_CACHE[cache_key]


class _FixedConfig:
    """A jitted kernel launched with one fixed ``num_warps``/``num_stages`` config."""

    def __init__(self, kernel, config: dict):
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.kernel[grid](*args, **kwargs, **self.config)

        return launch


class Layout(NamedTuple):
    """Where the sequences of a packed batch and their chunks (or checkpoint segments) lie."""

    cu: torch.Tensor  # [N+1] int64 token offsets of the sequences
    seg_off: torch.Tensor  # [N+1] int64: index of each sequence's first chunk
    n_seg: int  # number of chunks over all sequences
    chunk_idx: torch.Tensor  # [n_seg, 2] int64: (sequence, chunk within it) of every chunk
    N: int  # number of sequences
    max_len: int  # tokens in the longest sequence


_LAYOUT_CACHE = {}


def packed_layout(T: int, B: int, cu_seqlens: Optional[torch.Tensor], chunk: int, device) -> Layout:
    """The :class:`Layout` of B sequences of length T, or of the packed ``cu_seqlens``.

    The B x T layout is cached per (B, T, chunk, device): a decode step or a training
    step then builds no index tensors and reads nothing back from the device. A varlen
    batch reads its offsets to the host once.
    """
    if cu_seqlens is None:
        key = (B, T, chunk, str(device))
        hit = _LAYOUT_CACHE.get(key)
        if hit is None:
            nc = -(-T // chunk)
            seqs = torch.arange(B + 1, dtype=torch.int64)
            idx = torch.stack([torch.arange(B).repeat_interleave(nc), torch.arange(nc).repeat(B)], 1)
            hit = Layout((seqs * T).to(device), (seqs * nc).to(device), B * nc, idx.to(device), B, T)
            if len(_LAYOUT_CACHE) >= 256:
                _LAYOUT_CACHE.clear()
            _LAYOUT_CACHE[key] = hit
        return hit
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens = (cu[1:] - cu[:-1]).tolist()
    segs = [(n + chunk - 1) // chunk for n in lens]
    offs = [0]
    for c in segs:
        offs.append(offs[-1] + c)
    idx = torch.tensor([(n, j) for n, c in enumerate(segs) for j in range(c)], dtype=torch.int64).reshape(-1, 2)
    return Layout(cu, torch.tensor(offs, dtype=torch.int64, device=device), offs[-1], idx.to(device), len(lens),
                  max(lens))


def triton_available_for(x: torch.Tensor) -> Optional[str]:
    """None when Triton kernels can run on x's device, else the reason they cannot."""
    if not HAS_TRITON:
        return "triton is not installed"
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" or RECORDER is not None:
        return None
    return f"tensors are on {x.device}, Triton kernels need CUDA (or TRITON_INTERPRET=1 for the CPU interpreter)"


def lam_grad(c: torch.Tensor, dET: Optional[torch.Tensor], E0: Optional[torch.Tensor], lam_h: torch.Tensor,
             cu: torch.Tensor, H: int) -> torch.Tensor:
    """dL/dlam ``[H]`` from the per-token ``c_t = <dE_T, k_t w_t^T>`` ``[NTOK, H]``.

    ``E_T = lam^T E_0 + sum_t lam^(T-1-t) k_t w_t^T`` per sequence, so
    ``dlam = T lam^(T-1) <dE_T, E_0> + sum_t (T-1-t) lam^(T-2-t) c_t``.
    """
    lens = cu[1:] - cu[:-1]  # [N]
    N = lens.numel()
    seq = torch.repeat_interleave(torch.arange(N, device=c.device), lens)
    pos = torch.arange(c.shape[0], device=c.device) - cu[:-1][seq]
    Tn = lens[seq].to(c.dtype)  # [NTOK]
    coef = (Tn - 1 - pos.to(c.dtype))[:, None]  # (T-1-t), 0 for the last token
    expo = (Tn - 2 - pos.to(c.dtype)).clamp_min(0)[:, None]
    lam = lam_h.to(c.dtype)[None, :]
    dlam = torch.where(coef > 0, coef * torch.pow(lam, expo), torch.zeros_like(c)) * c
    dlam = dlam.sum(0)
    if dET is not None and E0 is not None:
        inner = (dET.to(c.dtype) * E0.to(c.dtype)).sum((-2, -1))  # [N, H]
        Tf = lens.to(c.dtype)[:, None]
        dlam = dlam + (Tf * torch.pow(lam, Tf - 1) * inner).sum(0)
    return dlam


def pack(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[B, T, H, *]`` -> contiguous ``[1, B*T, H, *]`` (the packed layout)."""
    if x is None:
        return None
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


_LAM_CACHE = {}


def prepare_triton_args(q, k, v, beta, g, lam, scale, initial_state, initial_trace, cu_seqlens, chunk):
    """Shared argument handling of the Triton backends: layout, lam as ``[H]``, scale, states.

    The caller imports triton first (:func:`import_triton`) into its kernel module.
    """
    B, T, H, K = q.shape
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    why = triton_available_for(q)
    if why is not None:
        raise ValueError(f"Triton backend cannot run: {why}")
    layout = packed_layout(T, B, cu_seqlens, chunk, q.device)
    N = layout.N
    acc = torch.promote_types(q.dtype, torch.float32)
    lam_h = None
    if isinstance(lam, (int, float)):
        # A float lam becomes a device tensor once, not at every decode step.
        key = (float(lam), H, acc, str(q.device))
        if key not in _LAM_CACHE:
            if len(_LAM_CACHE) >= 256:
                _LAM_CACHE.clear()
            _LAM_CACHE[key] = torch.full((H,), float(lam), dtype=acc, device=q.device)
        lam_h = _LAM_CACHE[key]
    elif lam is not None:
        lam_h = torch.as_tensor(lam, dtype=acc, device=q.device).expand(H).contiguous()
    scale = K ** -0.5 if scale is None else float(scale)
    for name, st in (("initial_state", initial_state), ("initial_trace", initial_trace)):
        if st is not None and tuple(st.shape) != (N, q.shape[2], K, v.shape[-1]):
            raise ValueError(f"{name} has shape {tuple(st.shape)}, expected {(N, H, K, v.shape[-1])}")
    s0 = initial_state.to(acc).contiguous() if initial_state is not None else None
    e0 = initial_trace.to(acc).contiguous() if initial_trace is not None else None
    if lam is None:
        e0 = None
    return layout, lam_h, scale, s0, e0

