"""``cl-arch train-through``: train a model on its loss after its fast weights adapted over long streams.

    cl-arch train-through --output-dir runs/through                        # the shipped model, 16 KB streams
    cl-arch train-through --target next --max-minutes 55 --output-dir runs/through-next
    cl-arch train-through --output-dir runs/through-next                   # resumes from its newest checkpoint

Reads 16 KB windows of the training corpus as a session reads under ``adapt`` (2 KB episodes, each
closed by the model's commit) and trains every weight on the loss along the whole stream, gradients
through the writes and commits of ``--tbptt`` episodes (cl_arch.train.through). ``--target next``
first switches the in-block fast layers to next-token writes (``k_{t-1} -> v_t``). Writes
checkpoints, ``metrics.jsonl``, ``results.json`` (validation bits/byte per episode before and after,
on the tuning package) and the model (``final/``).
"""
import argparse

from .common import check_writable_folder, load_model, model_dir, refuse_overwrite


def add_parser(sub):
    p = sub.add_parser("train-through", help="train through adaptation: the loss after the fast weights read a long stream",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", default=None, help="model folder (default: the shipped default model)")
    p.add_argument("--output-dir", default="runs/through")
    p.add_argument("--target", choices=["same", "next"], default=None, help="in-block fast layers' write target")
    p.add_argument("--context-bytes", type=int, default=16384)
    p.add_argument("--episode-bytes", type=int, default=2048)
    p.add_argument("--tbptt", type=int, default=2, help="episodes per backward window")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-memories", action="store_true",
                   help="keep the episodic memory on while training (3x slower per step on a CPU)")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from cl_arch.train.through import ThroughConfig, train_through

    refuse_overwrite([("--output-dir", args.output_dir)], [("--init-from", model_dir(args.init_from))], False,
                     contain=True)
    check_writable_folder("--output-dir", args.output_dir)
    model = load_model(args.init_from, log=print, flag="--init-from")
    cfg = ThroughConfig(context_bytes=args.context_bytes, episode_bytes=args.episode_bytes, tbptt=args.tbptt,
                        batch_size=args.batch_size, steps=args.steps, max_minutes=args.max_minutes, lr=args.lr,
                        seed=args.seed, target=args.target, save_every=args.save_every,
                        skip_memories=() if args.train_memories else ("episodic",))
    res = train_through(model, cfg, args.output_dir, progress=not args.no_progress)
    print(f"{res['steps']} steps ({res['stopped']}); validation bits/byte per episode "
          f"after: {' '.join(f'{b:.3f}' for b in res['val_after'])}")
    return 0
