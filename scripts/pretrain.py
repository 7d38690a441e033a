"""``cl-arch pretrain``: next-byte pretraining on the standard library (or any local text/code).

    cl-arch pretrain                                   # the default 5-minute CPU run
    cl-arch pretrain --config configs/pretrain.yaml --max-minutes 30 --set model.d_model=256
    accelerate launch --multi_gpu --num_processes 2 -m cl_arch.scripts.cli pretrain --config ...
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m cl_arch.scripts.cli pretrain --config ...

Settings come from the dataclass defaults, then ``--config`` (YAML or JSON), then the flags
below, then ``--set section.key=value`` (any field; value read as YAML). A bad setting stops the
run before any work with a message naming the field.
"""
import argparse
import json
import os
from typing import Dict, List

from .common import add_in_place_arg, check_writable_folder, refuse_overwrite

# Shortcut flags -> dotted config keys (shared by pretrain, finetune and meta-train).
COMMON_FLAGS: Dict[str, str] = {
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "max_minutes": "train.max_minutes",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "seed": "train.seed",
    "resume": "train.resume",
    "init_from": "train.init_from",
    "mixed_precision": "train.mixed_precision",
}
DATA_FLAGS: Dict[str, str] = {"sources": "data.sources", "seq_len": "data.seq_len", "streaming": "data.streaming"}


def add_common_args(p: argparse.ArgumentParser, data: bool = True) -> None:
    """``--config``, ``--set`` and the shortcut flags of :data:`COMMON_FLAGS` (and data flags)."""
    p.add_argument("--config", help="YAML or JSON file of settings (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set model.d_model=256 (repeatable)")
    p.add_argument("--output-dir", help="run folder: checkpoints, final model, metrics, results.json")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget; the lr schedule follows it")
    p.add_argument("--batch-size", type=int, help="global batch (sequences per micro-step, all processes)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="checkpoint folder, or 'auto' for the newest in the output dir")
    p.add_argument("--init-from", help="start from these save_pretrained weights")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_in_place_arg(p)
    if data:
        p.add_argument("--sources", nargs="+", help="'stdlib', folders, files or globs of text/code")
        p.add_argument("--seq-len", type=int, help="bytes per training sequence")
        p.add_argument("--streaming", action="store_true", default=None,
                       help="pack while reading (corpora larger than memory)")


def overrides_from_args(args: argparse.Namespace, flags: Dict[str, str]) -> List:
    """Parsed flags -> ``[(path, value)]`` overrides, then the ``--set`` strings."""
    out: List = []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            if attr == "sources" and len(value) == 1:
                value = value[0]
            out.append((key.split("."), value))
    if getattr(args, "no_progress", False):
        out.append((["train", "progress"], False))
    out.extend(args.overrides)
    return out


def config_from_args(cls, args: argparse.Namespace, flags: Dict[str, str]):
    """Load and validate the run config (ConfigError naming a bad setting; cli.py prints it as one
    line and exits 2), then refuse a run folder that holds its own ``--init-from`` model: the run
    writes ``final/`` and prunes ``checkpoints/`` there, so the input could be overwritten."""
    from cl_arch.train.config import load_config

    cfg = load_config(cls, args.config, overrides_from_args(args, flags))
    refuse_overwrite([("--output-dir", cfg.train.output_dir)], [("--init-from", cfg.train.init_from)],
                     getattr(args, "in_place", False), contain=True)
    if not getattr(args, "print_config", False):
        check_writable_folder("--output-dir", cfg.train.output_dir)  # not after the first epoch
    return cfg


def add_parser(sub):
    p = sub.add_parser("pretrain", help="next-byte pretraining on accelerate (default: 5 CPU minutes on the stdlib)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for a hub
    from cl_arch.train.config import PretrainRunConfig, config_to_dict
    from cl_arch.train.pretrain import pretrain

    cfg = config_from_args(PretrainRunConfig, args, {**COMMON_FLAGS, **DATA_FLAGS})
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    pretrain(cfg)
    return 0
