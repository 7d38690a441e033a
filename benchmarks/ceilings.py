"""Measure the card's two ceilings once: device-memory bandwidth and bf16 matmul rate.

    python benchmarks/ceilings.py --out benchmarks/out/ceilings.json

Bandwidth is a large device-to-device copy counting bytes read plus bytes
written; the matmul rate is an 8192^3 bf16 product on random data (never zeros:
they run faster than real data). Both are medians of ``triton.testing.do_bench``.
``bench_kernels.py --ceilings FILE`` uses them for its roofline instead of the
datasheet figures. Prints a table; writes JSON. Needs CUDA.
"""
import argparse
import os

import torch

from cl_arch.io import write_json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copy-gib", type=float, default=2.0, help="bytes copied per run (GiB)")
    p.add_argument("--n", type=int, default=8192, help="matmul size n x n x n")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "ceilings.json"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ceilings.py needs a CUDA device")
    import triton.testing

    numel = int(a.copy_gib * 2**30) // 4
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    ms_copy = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    hbm = 2 * numel * 4 / (ms_copy * 1e-3)
    src = dst = None  # frees the copy buffers before the matmul
    x = torch.randn(a.n, a.n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(a.n, a.n, device="cuda", dtype=torch.bfloat16)
    ms_mm = triton.testing.do_bench(lambda: x @ y, return_mode="median")
    flops = 2 * a.n ** 3 / (ms_mm * 1e-3)
    row = dict(device=torch.cuda.get_device_name(), hbm_bytes_per_s=hbm, bf16_flops_per_s=flops,
               copy_ms=ms_copy, matmul_ms=ms_mm, copy_gib=a.copy_gib, matmul_n=a.n,
               torch=torch.__version__, triton=triton.__version__)
    print(f"{'device':<28}{'copy TB/s':>12}{'bf16 TFLOP/s':>14}")
    print(f"{row['device']:<28}{hbm / 1e12:>12.2f}{flops / 1e12:>14.0f}")
    write_json(a.out, row)
    return row


if __name__ == "__main__":
    main()
