"""``cl-arch demo``: does the model get better at a codebase it has never seen, because it reads it?

1. Trains a small plastic transformer on the Python standard library minus its held-out packages
   (about 2.5 minutes on 2 CPU cores), or loads it from ``--cache-dir`` if it was trained before.
2. Reads an unseen package (default: the held-out stdlib package ``json``) file by file, scoring
   every byte before anything learns from it, with three learners on the same stream:
   the frozen model, the model whose fast weights consolidate into a persistent memory after
   every episode (``adapt``), and dynamic evaluation (online gradient steps on all weights).
3. Prints the table (bits/byte, gain over frozen, tab-completion acceptance, cost per token,
   drift on held-out stdlib) and writes ``<out>/demo.json`` and ``<out>/demo.png``.
"""
import argparse
import time

import torch


def add_parser(sub):
    p = sub.add_parser("demo", help="pretrain (or load) a small model, adapt it on an unseen package, "
                       "print frozen vs adapted vs dynamic evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache-dir", default="runs/stdlib-model", help="trained model cache (reused when present)")
    p.add_argument("--pretrain-seconds", type=float, default=150.0, help="pretraining budget when not cached")
    p.add_argument("--package", default="json", help="held-out stdlib package to adapt on (or use --source)")
    p.add_argument("--source", default=None, help="any folder of .py files instead of --package")
    p.add_argument("--max-bytes", type=int, default=16_000, help="bytes of the unseen package to read")
    p.add_argument("--episode-bytes", type=int, default=2048)
    p.add_argument("--eta-s", type=float, default=1.0, help="retention commit rate")
    p.add_argument("--dyn-lr", type=float, default=1e-4, help="dynamic evaluation step size")
    p.add_argument("--out", default="runs/demo", help="folder for demo.json and demo.png")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args):
    from cl_arch.eval import codebase

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = codebase.stdlib_model(args.cache_dir, seconds=args.pretrain_seconds, seed=args.seed)
    source = args.source or codebase.held_out_package(args.package)
    print(f"reading {args.max_bytes} bytes of {source} (never seen in pretraining)")
    rep = codebase.run(source=source, model=model, max_bytes=args.max_bytes, episode_bytes=args.episode_bytes,
                       eta_s=args.eta_s, dyn_lr=args.dyn_lr, methods=("frozen", "adapt"), calib_batches=2,
                       drift_windows=4, out_dir=args.out, name="demo", seed=args.seed)
    print()
    print(rep["table"])
    print(f"\nJSON: {rep['json']}\nPNG:  {rep['plot']}\ntotal {time.perf_counter() - start:.0f}s")
    return 0
