"""``cl-arch``: one console script, one sub-command per module in this folder.

Each sub-command module exposes ``add_parser(subparsers)`` which registers its
arguments and sets ``func`` (called with the parsed namespace, returns an exit code).
"""
import argparse
import importlib
import sys
from typing import List, Optional

# Sub-command name -> module in cl_arch.scripts.
COMMANDS = {
    "adapt": "adapt",
    "consolidate": "consolidate",
    "demo": "demo",
    "eval": "eval",
    "pretrain": "pretrain",
    "meta-train": "meta_train",
    "finetune": "finetune",
    "train-episodic": "train_episodic",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cl-arch", description="Continual-learning transformers with fast weights")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f"cl_arch.scripts.{module}").add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Every sub-command runs training or inference steps on the CPU at some point; without this
    # glibc unmaps and re-faults each step's activations (5-15x slower steps on VMs).
    from cl_arch.train.runtime import keep_freed_memory

    keep_freed_memory()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
