"""Compile the Triton kernels for a GPU that is not here, and read their resource use.

The CPU interpreter checks what a kernel computes, not whether it compiles for a
GPU or fits one: a kernel whose tiles need more shared memory than an SM has
passes every interpreter test and fails at its first launch on a real card
(``OutOfResources``). This module closes that gap without a GPU:

1. :func:`record_launches` runs a public entry point (``plastic_rule``,
   ``reward_commit``) on small CPU tensors with the launches intercepted, so it
   sees every kernel launch the wrapper makes, with its real constexprs and
   argument dtypes (these, not T or B, decide the compiled code).
2. :func:`compile_launch` specializes each launch exactly as ``JITFunction.run``
   would on a CUDA device (Triton's own binder, pointer alignment included) and
   compiles it to a cubin for the requested architecture with the ``ptxas``
   that ships in the Triton wheel.
3. ``cuobjdump --dump-resource-usage`` reads registers per thread, local-memory
   stack (spills) and static shared memory; Triton's metadata gives the dynamic
   shared memory. :data:`SHARED_LIMIT` is the per-block ceiling of each arch.

Run ``python -m cl_arch.kernels.compile_check`` for the table at the
flash-linear-attention head size (D=128). It must run without
``TRITON_INTERPRET=1`` (the interpreter replaces the compiler).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

# Largest dynamic shared memory one block may opt into (bytes): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
# A kernel that spills more than this many bytes of stack per thread is flagged: a few
# hundred bytes are register-allocator noise, tens of KiB mean a tile lives in local memory.
STACK_BUDGET = 1024


@dataclass
class Launch:
    """One intercepted kernel launch: the kernel, its grid and its arguments."""

    kernel: Any  # triton JITFunction
    grid: tuple
    args: tuple
    kwargs: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class Resources:
    """What one compiled kernel needs per block on the target arch."""

    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int
    shared_bytes: int
    constexprs: Dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT[self.arch] and self.stack_bytes <= STACK_BUDGET

    def row(self) -> dict:
        d = asdict(self)
        d["shared_limit"] = SHARED_LIMIT[self.arch]
        d["fits"] = self.fits
        return d


class _Recording:
    def __init__(self, kernel, configs, sink: List[Launch]):
        self.kernel, self.configs, self.sink = kernel, configs, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # An autotuned kernel may run any of its configs: each one is a launch to check.
            for cfg in self.configs or [{}]:
                self.sink.append(Launch(self.kernel, tuple(grid), args, {**kwargs, **cfg}))

        return launch


@contextlib.contextmanager
def record_launches():
    """Intercept every Triton launch of cl_arch's kernels; yields the list they fill.

    Inside the block the wrappers accept CPU tensors (nothing runs on them: the
    outputs of a recorded forward are uninitialised), so a backward can be
    recorded too by calling ``.backward`` on the recorded forward's outputs.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile checks need the Triton compiler: unset TRITON_INTERPRET")
    from .plastic import triton_utils

    sink: List[Launch] = []
    triton_utils.RECORDER = lambda jitted, configs=None: _Recording(jitted, configs, sink)
    try:
        yield sink
    finally:
        triton_utils.RECORDER = None


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _parse_usage(text: str) -> Dict[str, int]:
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{text}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "static_shared": int(m.group(3))}


def compile_launch(launch: Launch, arch: int = 90, cache_dir: Optional[str] = None) -> Resources:
    """Compile one recorded launch for ``sm_{arch}`` and return its resource use.

    The launch's own ``num_warps``/``num_stages`` keywords (or Triton's defaults)
    are the options, so the figures are those of the kernel the wrapper would run.
    """
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, launch.kwargs, bound, specialization, options)
    kernel = compile(ASTSource(jit, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                     options=options.__dict__)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    use = _parse_usage(out)
    names = list(jit.arg_names)
    shown = {names[p[0]]: (str(v) if not isinstance(v, (bool, int, float, type(None))) else v)
             for p, v in constexprs.items() if len(p) == 1 and v is not None}
    return Resources(
        kernel=launch.name, arch=arch, num_warps=options.num_warps, num_stages=options.num_stages,
        registers=use["registers"], stack_bytes=use["stack_bytes"],
        shared_bytes=max(int(kernel.metadata.shared), use["static_shared"]), constexprs=shown,
    )


def plastic_rule_launches(K: int = 128, V: int = 128, H: int = 2, T: int = 80, backend: str = "triton_chunk",
                          dtype: str = "bfloat16", rule: str = "delta", gate: bool = True, trace: bool = True,
                          backward: bool = True, chunk_size: int = 64, B: int = 1) -> List[Launch]:
    """Launches of ``plastic_rule`` (forward, and backward when asked) at one head size."""
    import torch

    from .plastic import plastic_rule

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=gen).to(dt).requires_grad_(backward)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dt).requires_grad_(backward)
    v = torch.randn(B, T, H, V, generator=gen).to(dt).requires_grad_(backward)
    beta = torch.rand(B, T, H, generator=gen).to(dt).requires_grad_(backward)
    g = (-torch.rand(B, T, H, generator=gen)).to(dt).requires_grad_(backward) if gate else None
    kw = dict(chunk_size=chunk_size) if backend == "triton_chunk" else {}
    with record_launches() as sink:
        o, S, E = plastic_rule(q, k, v, beta, g, rule=rule, lam=0.9 if trace else None, backend=backend,
                               output_final_state=True, **kw)
        if backward:
            loss = o.float().sum() + S.sum() + (E.sum() if E is not None else 0)
            loss.backward()
    return sink


def commit_launches(K: int = 128, V: int = 128, H: int = 4, N: int = 8) -> List[Launch]:
    """Launches of the fused reward commit at one head size."""
    import torch

    from .commit import reward_commit

    P = torch.zeros(N, H, K, V)
    E = torch.randn(N, H, K, V)
    with record_launches() as sink:
        reward_commit(P, E, torch.ones(N), torch.zeros(N), gamma=0.99, eta_s=0.1, eta_r=0.1, clip=1.0,
                      backend="triton")
    return sink


def default_suite(K: int = 128, V: int = 128, dtype: str = "bfloat16") -> List[Launch]:
    """Every distinct kernel launch (kernel x autotune config) cl_arch makes on a GPU for inputs of ``dtype``."""
    launches: List[Launch] = []
    for backend in ("triton_chunk", "triton_recurrent"):
        launches += plastic_rule_launches(K=K, V=V, backend=backend, dtype=dtype)
    launches += commit_launches(K=K, V=V)
    seen, unique = set(), []
    for la in launches:
        tag = (la.name, la.kwargs.get("num_warps"), la.kwargs.get("num_stages"))
        if tag not in seen:
            seen.add(tag)
            unique.append(la)
    return unique


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], help="input dtypes of q, k, v")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(f"{'kernel':<28}{'dtype':>10}{'arch':>5}{'warps':>6}{'stages':>7}{'regs':>6}{'stack B':>9}{'shared B':>10}"
          f"{'limit':>8}{'fits':>6}{'compile s':>10}")
    for dtype in args.dtype:
        for la, arch in [(la, arch) for la in default_suite(args.K, args.V, dtype) for arch in args.arch]:
            t0 = time.perf_counter()
            r = compile_launch(la, arch)
            dt = time.perf_counter() - t0
            rows.append({**r.row(), "dtype": dtype, "compile_s": round(dt, 2)})
            print(f"{r.kernel:<28}{dtype:>10}{arch:>5}{r.num_warps:>6}{r.num_stages:>7}{r.registers:>6}{r.stack_bytes:>9}"
                  f"{r.shared_bytes:>10}{SHARED_LIMIT[arch]:>8}{str(r.fits):>6}{dt:>10.1f}", flush=True)
    if args.json:
        from ..io import write_json

        write_json(args.json, {"K": args.K, "V": args.V, "rows": rows})
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
