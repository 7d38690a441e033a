"""Forward+backward time of the plastic rule's PyTorch backends on CPU, and of the error-driven write's.

    python benchmarks/bench_rule.py [--T 2048 --H 4 --K 64 --threads 1 --repeats 5]

Prints a table (median ms, speed-up over naive) and writes JSON to
``benchmarks/out/bench_rule.json``. When flash-linear-attention's CPU reference
(``fla.ops.gated_delta_rule.naive``) is importable, its chunked version is timed
in the same process as a third column of reference.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from cl_arch.io import write_json
from cl_arch.kernels.error_write import error_write
from cl_arch.kernels.plastic import plastic_rule


def make(B, T, H, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(B, T, H, K, generator=gen),
        k=F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        v=torch.randn(B, T, H, V, generator=gen),
        beta=torch.rand(B, T, H, generator=gen),
        g=-0.1 * torch.rand(B, T, H, generator=gen),
    )


def time_fwd_bwd(fn, inputs, repeats, warmup=1):
    """Median seconds of forward + backward over ``repeats`` runs."""
    times = []
    for i in range(warmup + repeats):
        leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
        t0 = time.perf_counter()
        out = fn(leaves)
        sum(t.float().sum() for t in out if t is not None).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--V", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--naive-repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_rule.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    x = make(a.B, a.T, a.H, a.K, a.V)
    lam = torch.full((a.H,), 0.5)
    M = 0.1 * torch.randn(a.B, a.H, a.K, a.V, generator=torch.Generator().manual_seed(1))
    rest = dict(x, resting_state=M)

    runs = {
        "naive (trace on)": (lambda t: plastic_rule(**t, lam=lam, backend="naive"), a.naive_repeats),
        "torch_recurrent (trace on)": (lambda t: plastic_rule(**t, lam=lam, backend="torch_recurrent"), a.naive_repeats),
        "torch_chunk (trace on)": (lambda t: plastic_rule(**t, lam=lam, backend="torch_chunk"), a.repeats),
        "torch_chunk (no trace)": (lambda t: plastic_rule(**t, backend="torch_chunk"), a.repeats),
    }
    rest_runs = {"torch_chunk (trace on, resting state)":
                 (lambda t: plastic_rule(**t, lam=lam, backend="torch_chunk"), a.repeats)}
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

        def fla_chunk(t):
            return naive_chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True)

        runs["fla naive_chunk_gated_delta_rule"] = (fla_chunk, a.repeats)
    except Exception as exc:  # not installed, or its import needs a GPU
        print(f"[flash-linear-attention reference not timed: {type(exc).__name__}: {exc}]")

    # the error-driven write (issue 24) at the same shapes: V is the vocabulary it writes over
    gen = torch.Generator().manual_seed(2)
    targets = torch.randint(0, a.V, (a.B, a.T), generator=gen)
    err = dict(q=F.normalize(torch.randn(a.B, a.T, a.H, a.K, generator=gen), dim=-1), k=x["k"],
               base=torch.randn(a.B, a.T, a.V, generator=gen), eta=x["beta"], g=x["g"], scale=torch.ones(a.H),
               initial_state=torch.zeros(a.B, a.H, a.K, a.V), resting_state=M)
    err_runs = {
        f"error write torch_chunk (C={c})": (lambda t, c=c: error_write(targets=targets, **t, backend="torch_chunk",
                                                                        chunk_size=c), a.repeats)
        for c in (16, 64)}
    err_runs["error write naive (exact)"] = (lambda t: error_write(targets=targets, **t, backend="naive"),
                                             a.naive_repeats)

    results = {}
    for name, (fn, reps) in runs.items():
        results[name] = time_fwd_bwd(fn, x, reps)
    for name, (fn, reps) in rest_runs.items():  # M gets a gradient too
        results[name] = time_fwd_bwd(fn, rest, reps)
    for name, (fn, reps) in err_runs.items():
        results[name] = time_fwd_bwd(fn, err, reps)
    base = results["naive (trace on)"]
    chunk = results["torch_chunk (trace on)"]
    print(f"plastic rule fwd+bwd, B={a.B} T={a.T} H={a.H} K={a.K} V={a.V}, float32, CPU, {a.threads} thread(s)")
    print(f"{'backend':36s} {'median ms':>10s} {'vs naive':>9s} {'torch_chunk speed-up':>21s}")
    for name, sec in results.items():
        print(f"{name:36s} {sec * 1e3:10.1f} {base / sec:8.1f}x {sec / chunk:20.2f}x")
    report = {
        "benchmark": "bench_rule",
        "config": vars(a) | {"dtype": "float32", "device": "cpu", "torch": torch.__version__},
        "median_ms": {n: s * 1e3 for n, s in results.items()},
        "speedup_chunk_vs_naive": base / chunk,
        "resting_state_overhead_chunk": results["torch_chunk (trace on, resting state)"] / chunk,
        "error_write_chunk64_vs_torch_chunk": results["error write torch_chunk (C=64)"] / chunk,
    }
    print(f"chunked error write (C=64) fwd+bwd {report['error_write_chunk64_vs_torch_chunk']:.2f}x torch_chunk "
          "with trace (issue 24 target <= 1.3x)")
    print(f"resting state costs torch_chunk fwd+bwd {report['resting_state_overhead_chunk']:.2f}x (target <= 1.2x)")
    if "fla naive_chunk_gated_delta_rule" in results:
        report["speedup_chunk_vs_fla_naive_chunk"] = results["fla naive_chunk_gated_delta_rule"] / chunk
    write_json(a.out, report)
    print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
