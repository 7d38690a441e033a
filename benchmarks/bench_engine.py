"""The server's decode loop in process (issue 26, "the future server"): generated tokens/s of
:class:`cl_arch.serve.Engine` with the shipped model for each ``ServeConfig.decoder`` setting, rows interleaved in
one process.

Each run: a fresh engine on a fresh SQLite store; ``--users`` threads each send ``--rounds`` completions
(``--tokens`` tokens, temperature 1, one of three code prompts) and reward each (+1 or -1 by user), waiting for
every answer, as ``benchmarks/bench_serve.py load`` does over HTTP but without the HTTP server, so the figure is the
engine's. ``none``: every step one ``Session.batch_generate(..., max_new_tokens=1)`` (each session's state read
and written every token); ``auto``: each sampling group's states kept in one eager decoder between steps
(:class:`cl_arch.session.stream.BatchStream`), loaded again when a completion joins or leaves; ``compile``: the
same decoder compiled (each new batch size compiles first: the figure includes it); ``auto-reload``: ``auto`` with
every change of the batch reloading all its rows (``BatchStream.swap_rows = False``, the loop before
``Decoder.load_row``), against which ``auto`` moves only the rows that join or leave.

    python benchmarks/bench_engine.py --users 8 --rounds 2 --tokens 32 --repeats 3 [--decoders none,auto,auto-reload]

Prints tokens/s (all completion tokens over the wall time, rewards included), decode steps and the time spent
loading states, and writes ``benchmarks/out/bench_engine.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

import cl_arch
from cl_arch.io import write_json
from cl_arch.serve import Engine, ServeConfig, open_store
from cl_arch.session.stream import BatchStream

PROMPTS = [b"def add(a, b):\n    return", b"import os\n\nfor name in os.listdir(", b"class Stack:\n    def push(self,"]


def run_load(model, decoder, users: int, rounds: int, tokens: int) -> dict:
    """One load against a fresh engine; its tokens/s and decode steps."""
    BatchStream.swap_rows = decoder != "auto-reload"
    if decoder == "auto-reload":
        decoder = "auto"
    try:
        return _run_load(model, decoder, users, rounds, tokens)
    finally:
        BatchStream.swap_rows = True


def _run_load(model, decoder, users: int, rounds: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(model, open_store(os.path.join(d, "s.db")), ServeConfig(decoder=decoder)).start()
        done, errors = [], []

        def user(u: int) -> None:
            try:
                for r in range(rounds):
                    out = engine.call("complete", f"u{u}", timeout=3600, prompt=list(PROMPTS[(u + r) % 3]),
                                      max_tokens=tokens, temperature=1.0)
                    done.append(out["completion_tokens"])
                    engine.call("reward", f"u{u}", timeout=3600, reward=1.0 if u % 2 else -1.0)
            except Exception as e:  # noqa: BLE001 - reported, the load goes on
                errors.append(repr(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        engine.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} users failed: {errors[:3]}")
    return {"tokens_per_s": sum(done) / wall, "wall_s": wall, "tokens": sum(done),
            "steps": engine.metrics.forwards_total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoders", default="none,auto", help="comma-separated ServeConfig.decoder settings")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "bench_engine.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = cl_arch.load_default()
    modes = [None if m == "none" else m for m in args.decoders.split(",")]
    runs: dict = {str(m).lower(): [] for m in modes}
    for rep in range(args.repeats):  # interleaved: load changes on a shared machine hit every row alike
        for m in modes:
            r = run_load(model, m, args.users, args.rounds, args.tokens)
            runs[str(m).lower()].append(r)
            print(f"repeat {rep + 1}/{args.repeats} decoder={str(m).lower():8s} {r['tokens_per_s']:8.1f} tokens/s "
                  f"({r['tokens']} tokens, {r['steps']} decode steps, {r['wall_s']:.1f} s)", flush=True)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    base = med.get("none")
    print(f"\n{args.users} users x {args.rounds} rounds x {args.tokens} tokens, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"{'decoder':10s} {'tokens/s':>10s} {'vs none':>8s}")
    for k, v in med.items():
        print(f"{k:10s} {v:10.1f} {'' if base is None else f'{v / base:7.2f}x':>8s}")
    write_json(args.out, {"args": vars(args), "runs": runs, "median_tokens_per_s": med, "torch": torch.__version__})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
