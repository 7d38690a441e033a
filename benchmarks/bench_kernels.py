"""Speed of the plastic-rule kernels: fwd and fwd+bwd medians, against a roofline floor.

    python benchmarks/bench_kernels.py                 # GPU: FLA's shapes; CPU: small shapes
    python benchmarks/bench_kernels.py --device cpu --shapes B1-T512-H2-D32
    python benchmarks/bench_kernels.py --no-trace      # lam = None (plain gated delta rule)

A second table times one decode step (T = 1, S and E carried in and out, no
grad) for B sessions: ``triton_recurrent`` against the HBM floor of moving S and
E once each way (and FLA's ``fused_recurrent_gated_delta_rule`` when importable).
Input value checks are off for every row but ``+value_checks`` (see checks.py).

On CUDA it times ``triton_chunk`` and ``triton_recurrent`` (and, when
flash-linear-attention is importable, ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``
in the same run) with ``triton.testing.do_bench`` (median ms) at
flash-linear-attention's shapes B1-T8192-H96-D128, B2-T16384-H16-D128,
B4-T2048-H16-D128, inputs in bf16. On CPU it times the PyTorch backends
(``torch_chunk``, ``torch_recurrent``) on small shapes with a wall-clock median.

Roofline floor (GPU only, from the card's peak HBM bandwidth and bf16 dense
FLOP/s in ``PEAKS``): ``max(bytes / BW, flops / FLOPS)`` with
    bytes = the unavoidable traffic: q, k, v, o (2 bytes each element), beta, g
            (4 bytes), initial and final S (and E) in fp32; fwd+bwd reads them
            again and writes dq, dk, dv, dbeta, dg (x 2 for the traffic).
    flops = the recurrent form's count, 8 K V per token and head for the delta
            rule (S^T k, k u^T, S^T q, decay), + 2 K V with the trace; x 3 for fwd+bwd.
The table prints achieved GB/s and TFLOP/s against those counts and the floor as
a fraction of the measured time ("% roof"). Prints a table; writes JSON (and a
PNG when matplotlib is importable) to ``benchmarks/out/``.
"""
import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from cl_arch.io import write_json
from cl_arch.kernels import checks, plastic_rule
from cl_arch.kernels.plastic import BACKENDS

GPU_SHAPES = ["B1-T8192-H96-D128", "B2-T16384-H16-D128", "B4-T2048-H16-D128"]
CPU_SHAPES = ["B1-T256-H2-D32", "B2-T512-H4-D64"]
# One decode step (T = 1) of B sessions, state and trace carried in and out: the
# adaptation-at-inference path, bound by reading and writing S and E.
GPU_DECODE = ["B64-T1-H16-D128", "B256-T1-H16-D128"]
CPU_DECODE = ["B8-T1-H4-D64"]
# Peak HBM bytes/s and dense bf16 FLOP/s of the cards this project is lent (vendor datasheets).
PEAKS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def parse_shape(s):
    parts = dict((p[0], int(p[1:])) for p in s.split("-"))
    return parts["B"], parts["T"], parts["H"], parts["D"]


def make(B, T, H, D, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(
        q=rnd(B, T, H, D), k=F.normalize(rnd(B, T, H, D).float(), dim=-1).to(dtype), v=rnd(B, T, H, D),
        beta=torch.rand(B, T, H, generator=gen).to(device=device, dtype=dtype),
        g=(-0.1 * torch.rand(B, T, H, generator=gen)).to(device=device, dtype=torch.float32),
    )


def traffic_and_flops(B, T, H, D, trace, bwd):
    elems = B * T * H * D
    state = B * H * D * D * 4 * (2 if trace else 1)
    bytes_ = 4 * elems * 2 + 2 * B * T * H * 4 + 2 * state
    flops = B * T * H * D * D * (8 + (2 if trace else 0))
    if bwd:
        bytes_ *= 2
        flops *= 3
    return bytes_, flops


def decode_traffic(B, H, D, trace):
    """Bytes one decode step must move: S (and E) in and out in fp32, q, k, v, o in bf16, beta, g."""
    state = B * H * D * D * 4 * (2 if trace else 1)
    return 2 * state + 4 * B * H * D * 2 + 2 * B * H * 4


def bench_decode(shapes, backends, device, dtype, lam, timer, peak):
    """Rows for one decode step per shape and backend (no grad)."""
    rows = []
    for shape in shapes:
        B, T, H, D = parse_shape(shape)
        x = make(B, 1, H, D, device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(1)
        S = (0.1 * torch.randn(B, H, D, D, generator=gen)).to(device)
        E = (0.1 * torch.randn(B, H, D, D, generator=gen)).to(device)
        for name, fn in backends.items():
            trace = lam is not None and not name.startswith("fla")

            def step():
                with torch.no_grad():
                    fn(x, S, E if trace else None)

            try:
                ms = timer(step)
            except (RuntimeError, ValueError) as e:
                rows.append(dict(shape=shape, backend=name, mode="decode", error=str(e)[:200]))
                continue
            nbytes = decode_traffic(B, H, D, trace)
            row = dict(shape=shape, backend=name, mode="decode", trace=trace, ms=ms, GBps=nbytes / ms / 1e6,
                       TFLOPs=B * H * D * D * (8 + 2 * trace) / ms / 1e9)
            if peak is not None:
                row.update(floor_ms=nbytes / peak[0] * 1e3, roof_frac=nbytes / peak[0] * 1e3 / ms)
            rows.append(row)
    return rows


def with_value_checks(fn, *args):
    """Run fn with cl_arch's input value checks on (the tables time the kernels with them off)."""
    saved, checks.VALUE_CHECKS = checks.VALUE_CHECKS, True
    try:
        return fn(*args)
    finally:
        checks.VALUE_CHECKS = saved


def cpu_median(fn, repeats, warmup=1):
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_one(name, fwd, x, bwd, timer):
    """Median ms of fwd (no grad) or fwd+bwd."""
    if not bwd:
        def run():
            with torch.no_grad():
                fwd(x)
    else:
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}

        def run():
            for t in leaves.values():
                t.grad = None
            out = fwd(leaves)
            sum(o.float().sum() for o in out if o is not None).backward()
    return timer(run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shapes", nargs="*", default=None, help="e.g. B2-T16384-H16-D128 (K = V = D)")
    p.add_argument("--decode", nargs="*", default=None, help="decode-step shapes, e.g. B256-T1-H16-D128")
    p.add_argument("--ceilings", default=None, help="JSON from benchmarks/ceilings.py (else datasheet PEAKS)")
    p.add_argument("--no-trace", action="store_true", help="lam = None instead of 0.5")
    p.add_argument("--repeats", type=int, default=5, help="CPU repeats (GPU: do_bench decides)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_kernels.json"))
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    on_gpu = device == "cuda"
    torch.set_num_threads(a.threads)
    shapes = a.shapes or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    lam = None if a.no_trace else 0.5
    # The value checks (finite inputs and states, beta and g ranges) read tensors back to
    # the host: for a decode step they read S and E a second time and synchronise. The
    # kernel rows run without them (CL_ARCH_VALUE_CHECKS=0, as hot loops should); one
    # decode row keeps them on to show their cost.
    checks.VALUE_CHECKS = False

    backends = {}
    if on_gpu:
        import triton.testing

        def timer(fn):
            return triton.testing.do_bench(fn, return_mode="median")

        for name in ("triton_chunk", "triton_recurrent"):
            if name in BACKENDS:
                backends[name] = lambda x, _n=name: plastic_rule(**x, lam=lam, backend=_n)
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            # FLA has no trace: it is the reference for the rule without E.
            backends["fla_chunk_gated_delta_rule"] = lambda x: chunk_gated_delta_rule(
                x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], output_final_state=True)
        except ImportError:
            pass
        decoders = {}
        if "triton_recurrent" in BACKENDS:
            decoders["triton_recurrent"] = lambda x, S, E: plastic_rule(
                **x, lam=lam if E is not None else None, initial_state=S, initial_trace=E, backend="triton_recurrent")
            decoders["triton_recurrent+value_checks"] = lambda x, S, E: with_value_checks(
                decoders["triton_recurrent"], x, S, E)
        try:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            decoders["fla_fused_recurrent_gated_delta_rule"] = lambda x, S, E: fused_recurrent_gated_delta_rule(
                x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=S, output_final_state=True)
        except ImportError:
            pass
        card = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAKS.items() if k in card), None)
        if a.ceilings:  # measured by benchmarks/ceilings.py on this card: preferred to the datasheet
            with open(a.ceilings) as f:
                c = json.load(f)
            peak = (c["hbm_bytes_per_s"], c["bf16_flops_per_s"])
        dtype = torch.bfloat16
    else:
        def timer(fn):
            return cpu_median(fn, a.repeats)

        for name in ("torch_chunk", "torch_recurrent"):
            backends[name] = lambda x, _n=name: plastic_rule(**x, lam=lam, backend=_n)
        card, peak, dtype = f"cpu ({a.threads} thread)", None, torch.float32
        decoders = {"torch_recurrent": lambda x, S, E: plastic_rule(
            **x, lam=lam if E is not None else None, initial_state=S, initial_trace=E, backend="torch_recurrent")}

    rows = []
    for shape in shapes:
        B, T, H, D = parse_shape(shape)
        x = make(B, T, H, D, device, dtype)
        for name, fn in backends.items():
            for bwd in (False, True):
                try:
                    ms = bench_one(name, fn, x, bwd, timer)
                except (RuntimeError, ValueError) as e:  # e.g. out of memory: record, keep going
                    rows.append(dict(shape=shape, backend=name, mode="fwd+bwd" if bwd else "fwd", error=str(e)[:200]))
                    continue
                trace = lam is not None and not name.startswith("fla")
                nbytes, flops = traffic_and_flops(B, T, H, D, trace, bwd)
                row = dict(shape=shape, backend=name, mode="fwd+bwd" if bwd else "fwd", trace=trace, ms=ms,
                           GBps=nbytes / ms / 1e6, TFLOPs=flops / ms / 1e9)
                if peak is not None:
                    floor_ms = max(nbytes / peak[0], flops / peak[1]) * 1e3
                    row.update(floor_ms=floor_ms, roof_frac=floor_ms / ms)
                rows.append(row)

    rows += bench_decode(a.decode if a.decode is not None else (GPU_DECODE if on_gpu else CPU_DECODE),
                         decoders, device, dtype, lam, timer, peak)

    print(f"device: {card}   dtype: {dtype}   lam: {lam}")
    print(f"{'shape':<22}{'backend':<30}{'mode':<9}{'ms':>10}{'GB/s':>10}{'TFLOP/s':>10}{'% roof':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<22}{r['backend']:<30}{r['mode']:<9}  error: {r['error'][:60]}")
            continue
        roof = f"{100 * r['roof_frac']:.0f}" if "roof_frac" in r else "-"
        print(f"{r['shape']:<22}{r['backend']:<30}{r['mode']:<9}{r['ms']:>10.3f}{r['GBps']:>10.2f}"
              f"{r['TFLOPs']:>10.3f}{roof:>8}")

    # The targets as ratios measured in this run: FLA time / ours (>= 1.0 means
    # at least as fast) and the decode step's fraction of the HBM floor.
    ms = {(r["shape"], r["backend"], r["mode"]): r["ms"] for r in rows if "ms" in r}
    for (shape, backend, mode), t in sorted(ms.items()):
        fla = ms.get((shape, "fla_chunk_gated_delta_rule", mode))
        if backend == "triton_chunk" and fla is not None:
            print(f"{shape} {mode}: triton_chunk (trace {'on' if lam is not None else 'off'}) at {fla / t:.2f}x FLA")
    meta = dict(device=card, dtype=str(dtype), lam=lam, date=datetime.date.today().isoformat(),
                torch=torch.__version__, threads=a.threads, peaks=peak, ceilings=a.ceilings)
    write_json(a.out, dict(meta=meta, rows=rows))
    print(f"wrote {a.out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if "ms" in r]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(ok) + 1))
        ax.barh([f"{r['shape']} {r['backend']} {r['mode']}" for r in ok], [r["ms"] for r in ok])
        ax.set_xlabel("median ms")
        ax.set_title(card)
        fig.tight_layout()
        fig.savefig(os.path.splitext(a.out)[0] + ".png", dpi=100)
    except ImportError:
        pass
    return rows


if __name__ == "__main__":
    main()
