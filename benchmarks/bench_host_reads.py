"""Host reads (device syncs) and time of one training step, input value checks on vs off.

Issue 17: value checks that read tensors back to the host belong where a user's input arrives,
never on every training step. A read is any ``Tensor.item/tolist/__bool__/__int__/__float__/
__index__`` call (on a GPU each one waits for the device). The model's own layers never check
their activations (``plastic_rule(check_values=False)``); ``model.check_inputs`` (True by default,
False while ``pretrain``/``finetune``/``meta-train`` run) guards ids and modulation. Prints a
table and writes ``benchmarks/out/bench_host_reads.json``.

    python benchmarks/bench_host_reads.py [--threads 1] [--repeats 7] [--batch 8] [--seq 256]
"""
import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.io import write_json

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class CountReads:
    """Counts host reads while active (wraps the Tensor methods that copy a value to the host)."""

    def __enter__(self):
        self.n, self.real = 0, {m: getattr(torch.Tensor, m) for m in READS}

        def wrap(real):
            def f(t, *a, **k):
                self.n += 1
                return real(t, *a, **k)
            return f
        for m, real in self.real.items():
            setattr(torch.Tensor, m, wrap(real))
        return self

    def __exit__(self, *exc):
        for m, real in self.real.items():
            setattr(torch.Tensor, m, real)


def step(model, ids, mod):
    model.zero_grad(set_to_none=True)
    logits, _ = model(ids[:, :-1], modulation=mod, return_state=False)
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_host_reads.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PlasticTransformer(PlasticConfig.from_name("demo")).train()
    ids = torch.randint(0, 256, (args.batch, args.seq + 1))
    mod = torch.rand(args.batch, args.seq)
    rows = []
    for checks in (False, True):
        model.check_inputs = checks
        step(model, ids, mod)  # warm-up
        with CountReads() as c:
            step(model, ids, mod)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step(model, ids, mod)
            times.append(time.perf_counter() - t0)
        rows.append({"check_inputs": checks, "host_reads_per_step": c.n, "step_ms_median": 1e3 * statistics.median(times),
                     "tokens_per_s": args.batch * args.seq / statistics.median(times)})
    base = rows[0]["step_ms_median"]
    print(f"training step of the demo preset, batch {args.batch} x {args.seq} bytes, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| model.check_inputs | host reads / step | step ms | tokens/s | vs off |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check_inputs']} | {r['host_reads_per_step']} | {r['step_ms_median']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['step_ms_median'] / base:.3f}x |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, {"rows": rows, "batch": args.batch, "seq": args.seq, "threads": args.threads,
                          "repeats": args.repeats, "torch": torch.__version__, "machine": platform.processor()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
