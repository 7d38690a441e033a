"""``cl-arch train-episodic``: add an episodic memory to a trained model and learn its settings.

    cl-arch train-episodic --output-dir runs/episodic                 # the shipped default model
    cl-arch train-episodic --init-from runs/pretrain/final --features 4096 --steps 120

Every other weight stays as it is; only the memory's key threshold, span, write strength and read
scale are trained, on spans of the training corpus (cl_arch.train.episodic). Writes the model
(``save_pretrained``) and ``episodic.json`` (the loss history and the learned settings).
"""
import argparse
import json
import os

from .common import add_in_place_arg, check_writable_folder, load_model, model_dir, refuse_overwrite


def add_parser(sub):
    p = sub.add_parser("train-episodic", help="add an episodic memory to a trained model and learn its settings",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", default=None, help="model folder (default: the shipped default model)")
    p.add_argument("--output-dir", default="runs/episodic", help="where the model and episodic.json go")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--features", type=int, default=2048, help="key width F (a new memory only)")
    p.add_argument("--heads", type=int, default=1, help="heads (a new memory only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-spans", type=int, default=48, help="training spans (hidden states computed once each)")
    p.add_argument("--span-bytes", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=2048, help="window per step, bytes")
    p.add_argument("--carry", default="fresh,own,foreign",
                   help="situations the steps cycle through (cl_arch.train.episodic): fresh, own, foreign")
    p.add_argument("--no-progress", action="store_true")
    add_in_place_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from cl_arch.io import write_json
    from cl_arch.train.episodic import EpisodicTrainConfig, train_episodic

    # The model is saved into --output-dir: one that is (or holds) the input folder would lose it.
    refuse_overwrite([("--output-dir", args.output_dir)], [("--init-from", model_dir(args.init_from))],
                     args.in_place, contain=True)
    check_writable_folder("--output-dir", args.output_dir)
    model = load_model(args.init_from, log=print, flag="--init-from")
    cfg = EpisodicTrainConfig(steps=args.steps, seed=args.seed, n_spans=args.n_spans, span_bytes=args.span_bytes,
                              seq_len=args.seq_len, carry=tuple(c.strip() for c in args.carry.split(",") if c.strip()),
                              episodic={"heads": args.heads, "features": args.features})
    model, record = train_episodic(model, cfg, progress=not args.no_progress)
    record["command"] = "cl-arch train-episodic " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("init_from", "steps", "features", "heads", "seed", "n_spans", "span_bytes", "seq_len", "carry")
        and v is not None)
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    write_json(os.path.join(args.output_dir, "episodic.json"), record)
    print(json.dumps(record["learned"]))
    return 0
