"""``cl-arch demo``: does the model get better at a codebase it has never seen, because it reads it?

1. Loads the shipped default model (``cl_arch/assets/default_model``, trained by
   ``cl-arch pretrain --config configs/default_model.yaml`` on the Python standard library minus
   its held-out packages). With ``--pretrain-seconds`` it pretrains one for that wall time
   instead, or loads it from the cache (``~/.cache/cl_arch/demo-<hash of the recipe>``, or
   ``--cache-dir``) if it was trained before.
2. Reads an unseen package (default: the held-out stdlib package ``json``) file by file, scoring
   every byte before anything learns from it, with these learners on the same stream: the
   weights alone with every fast-memory write off (``static``), the model as it is, learning
   within each 2 KB episode and starting the next one afresh (``frozen``), the model whose fast
   memories commit into a persistent memory after every episode with their own commit (the
   readout memory keeps what its slow head holds: ``adapt``), fast weights whose context memory
   simply carries over (``no_persist``), the frozen model with a 4 KB attention window over
   everything read so far (``full_context``), and dynamic evaluation: online gradient steps on
   the fast memories' ``W0`` only (``sparse_dynamic_eval``) and on all weights (``dynamic_eval``),
   with the step sizes ``cl-arch eval tune-dynamic`` chose on the held-out package asyncio.
3. Prints the table (bits/byte, gain over frozen with 95% intervals, tab-completion acceptance,
   cost per token of each row alone, drift on held-out stdlib) and writes ``<out>/demo.json``
   and ``<out>/demo.png``.

With the shipped model no pretraining runs: a few minutes on 2 CPU cores (measured in docs/results/reading.md).
"""
import argparse
import time

import torch

from .common import positive_int


def add_parser(sub):
    p = sub.add_parser("demo", help="pretrain (or load) a small model, adapt it on an unseen package, "
                       "print frozen vs adapted vs dynamic evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache-dir", default=None, help="trained model cache, reused when present (default: "
                   "~/.cache/cl_arch/demo-<hash of the pretraining recipe>, or $CL_ARCH_CACHE/demo-<hash>)")
    p.add_argument("--pretrain-seconds", type=float, default=None, help="pretrain a model for this many seconds "
                   "(cached by recipe) instead of loading the shipped default model")
    p.add_argument("--package", default="json", help="held-out stdlib package to adapt on (or use --source)")
    p.add_argument("--source", default=None, help="any folder of .py files instead of --package")
    p.add_argument("--max-bytes", type=int, default=50_000, help="bytes of the unseen package to read "
                   "(json: 48 KB, all of it)")
    p.add_argument("--episode-bytes", type=int, default=2048)
    p.add_argument("--eta-s", type=float, default=None, help="retention commit rate of the adapt row for every "
                   "memory (default: each memory's own commit)")
    p.add_argument("--dyn-lr", type=float, default=3e-4, help="dynamic evaluation step size (tune-dynamic's best "
                   "on asyncio for the shipped model)")
    p.add_argument("--dyn-decay", type=float, default=1e-3, help="dynamic evaluation's pull toward the "
                   "pretrained weights per step")
    p.add_argument("--out", default="runs/demo", help="folder for demo.json and demo.png")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args):
    from cl_arch.eval import codebase
    from cl_arch.eval.lib.models import stdlib_model
    from cl_arch.eval.lib.streams import held_out_package
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = stdlib_model(args.cache_dir, seconds=args.pretrain_seconds, seed=args.seed, log=print)
    t_model = time.perf_counter() - start
    source = args.source or held_out_package(args.package)
    print(f"reading {args.max_bytes} bytes of {source} (never seen in pretraining)")
    cfg = codebase.CodebaseConfig(source=source, max_bytes=args.max_bytes, episode_bytes=args.episode_bytes,
                                  eta_s=args.eta_s, dyn_lr=args.dyn_lr, dyn_decay=args.dyn_decay,
                                  methods=("static", "frozen", "adapt", "no_persist", "full_context",
                                           "sparse_dynamic_eval", "dynamic_eval"),
                                  drift_windows=4, timing_episodes=2, timing_repeats=1, out_dir=args.out,
                                  name="demo", seed=args.seed)
    rep = codebase.run(cfg, model)
    print()
    print(rep["table"])
    s = {m: v["summary"] for m, v in rep["methods"].items()}
    if "static" in s:
        d = s["static"]["bpb"] - s["frozen"]["bpb"]
        print(f"learning while reading (fast memories on, reset every episode): {s['frozen']['bpb']:.3f} bits/byte "
              f"vs {s['static']['bpb']:.3f} with every write off ({'better' if d > 0 else 'worse'} by {abs(d):.3f})")
    for m in ("adapt", "sparse_dynamic_eval", "dynamic_eval"):
        if m in s:
            d = s["frozen"]["bpb"] - s[m]["bpb"]
            print(f"{m}: {s[m]['bpb']:.3f} bits/byte vs frozen {s['frozen']['bpb']:.3f} "
                  f"({'better' if d > 0 else 'worse'} by {abs(d):.3f}), {s[m]['sec_per_token'] * 1e3:.2f} ms/token")
    print(f"\nJSON: {rep['json']}\nPNG:  {rep['plot']}\n"
          f"total {time.perf_counter() - start:.0f}s (model {t_model:.0f}s, stream {time.perf_counter() - start - t_model:.0f}s)")
    return 0
