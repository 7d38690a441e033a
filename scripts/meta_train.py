"""``cl-arch meta-train``: learn how the fast weights learn from reward (hidden-preference game).

    cl-arch meta-train                                  # recall-pretrained base, ~40 outer steps
    cl-arch meta-train --init-from runs/recall-model --max-steps 200 --objective reinforce

Prints the Sutton test before and after: the expected reward of attempt k+1 with the persistent
memory kept from attempt k minus with it reset (paired games, bootstrap 95% interval), and writes
``results.json`` and the meta-trained model (``final/``) to the output folder.
"""
import argparse
import json
import os

from .pretrain import COMMON_FLAGS, add_common_args, config_from_args


def add_parser(sub):
    p = sub.add_parser("meta-train", help="meta-train the plasticity on a reward game; Sutton test before/after",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, data=False)
    p.add_argument("--objective", choices=["expected", "reinforce"], help="exact expected reward or REINFORCE")
    p.add_argument("--episodes", type=int, help="episodes per game per outer step (P carried)")
    p.add_argument("--tbptt", type=int, help="episodes per backward window")
    p.add_argument("--trainable", choices=["all", "plasticity", "fast"])
    p.set_defaults(func=run)


def run(args) -> int:
    from cl_arch.train.config import config_to_dict
    from cl_arch.train.meta import MetaRunConfig, meta_train

    flags = {**COMMON_FLAGS, "objective": "meta.objective", "episodes": "meta.episodes", "tbptt": "meta.tbptt",
             "trainable": "meta.trainable"}
    cfg = config_from_args(MetaRunConfig, args, flags)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    r = meta_train(cfg)
    try:  # the evaluation suite's paired bootstrap, when present, for the figures quoted
        from cl_arch.eval.lib.metrics import sutton_delta

        for k in ("before", "after"):
            s = sutton_delta(r[k]["kept"], r[k]["reset"])
            print(f"{k}: Sutton delta {s['sutton_delta']:+.4f} 95% CI [{s['sutton_ci'][0]:+.4f}, "
                  f"{s['sutton_ci'][1]:+.4f}] over {s['n']} games")
    except ImportError:
        pass
    print(f"results: {os.path.join(cfg.train.output_dir, 'results.json')}")
    return 0
