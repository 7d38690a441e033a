"""What the Decoder's verdict-slot shortcuts buy: the read skipped while ``W0 + P`` is zero and the key
computed from the episodic slot's ``hn R^T`` (cl_arch/decode/slots.py), against the same decoder with both
turned off (the read of a zero ``Q`` and a second ``[B, d] x [d, F]`` product, as before), interleaved in one
process. Shipped model, eager, one thread, medians of repeats; prints a table, writes JSON.

    python benchmarks/bench_decode_verdict.py --batches 1,64 --tokens 40 --repeats 5
"""
import argparse
import json
import os
import statistics
import time

import torch

import cl_arch
from cl_arch.decode import Decoder
from cl_arch.decode.slots import VerdictSlot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/out/bench_decode_verdict.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = cl_arch.load_default()
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        dec = Decoder(model, B, compile=False)
        v = next(s for s in dec.slots if isinstance(s, VerdictSlot))
        epi = v.projection

        def run(shortcuts: bool, n: int) -> float:
            v.projection, v.zero = (epi, True) if shortcuts else (None, False)
            if epi is not None:
                epi.shares_projection = shortcuts
            ids = torch.full((B,), 65, dtype=torch.long)
            t = time.perf_counter()
            for _ in range(n):
                dec.step(ids)
            return B * n / (time.perf_counter() - t)

        run(True, 5), run(False, 5)  # warm-up
        got = {True: [], False: []}
        for _ in range(args.repeats):
            for s in (True, False):
                got[s].append(run(s, args.tokens))
        on, off = statistics.median(got[True]), statistics.median(got[False])
        rows.append({"batch": B, "tokens_per_s_shortcuts": on, "tokens_per_s_without": off, "ratio": on / off})
    print("| batch | tokens/s, shortcuts | tokens/s, without | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['tokens_per_s_shortcuts']:.0f} | {r['tokens_per_s_without']:.0f} | {r['ratio']:.2f}x |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows, "args": vars(args), "torch": torch.__version__}, fh, indent=1)


if __name__ == "__main__":
    main()
