"""``cl-arch finetune``: continue training a checkpoint, optionally only how it learns.

    cl-arch finetune --init-from runs/pretrain/final                       # plasticity only (default)
    cl-arch finetune --init-from runs/pretrain/final --trainable all --sources my_repo/
    cl-arch finetune --config configs/finetune.yaml --set finetune.episodes=8
    cl-arch finetune --hf-model my_llama/ --retrofit-layers 2 5 --max-minutes 10   # see finetune_hf.py

``--trainable plasticity`` freezes the base and trains lam, gamma, eta_s, eta_r; ``fast`` adds each
fast layer's W0 and write path; ``all`` trains everything (see cl_arch.train.finetune). With
``finetune.episodes > 1`` every sequence is played as consecutive episodes joined by the
persistent memory, so the commit rates get a gradient.
"""
import argparse
import json
import os

from .finetune_hf import add_hf_args, run_hf
from .pretrain import COMMON_FLAGS, DATA_FLAGS, add_common_args, config_from_args


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune a checkpoint (all weights, or only the plasticity)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--trainable", choices=["all", "plasticity", "fast"], help="what is trained")
    p.add_argument("--episodes", type=int, help="episodes per sequence (P carried between them)")
    add_hf_args(p)  # --hf-model: a transformers model with retrofitted memories (scripts/finetune_hf.py)
    p.set_defaults(func=run)


def run(args) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.hf_model:
        return run_hf(args)
    from cl_arch.train.config import FinetuneRunConfig, config_to_dict
    from cl_arch.train.finetune import finetune

    flags = {**COMMON_FLAGS, **DATA_FLAGS, "trainable": "finetune.trainable", "episodes": "finetune.episodes"}
    if not args.config and not args.output_dir:
        args.output_dir = "runs/finetune"
    cfg = config_from_args(FinetuneRunConfig, args, flags)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    finetune(cfg)
    return 0
