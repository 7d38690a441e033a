"""``cl-arch``: one console script, one sub-command per module in this folder.

Each sub-command module exposes ``add_parser(subparsers)`` which registers its
arguments and sets ``func`` (called with the parsed namespace, returns an exit code).

Errors, the same for every sub-command: a user error (a missing or unreadable path, a file that
is not a model/session/config, a refused load, an output that would overwrite an input: the
library's ValueError and OSError) is one line on stderr, ``cl-arch <sub>: error: <message>``,
and exit status 2, as argparse reports a bad flag; ``cl-arch --debug <sub> ...`` shows the
traceback instead. Ctrl-C exits 130. Anything else is a bug and keeps its traceback.

Called in-process, :func:`main` returns that 2, except for errors in the command line itself
(argparse's, and a run config's settings), which raise ``SystemExit(2)`` as argparse does.
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

# OSError covers FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
# FileExistsError and a full or read-only disk: all about the user's paths, none a bug here.
# KeyError is left out: config parsing reports unknown keys as ConfigError (a ValueError), so a
# KeyError that gets here is a bug.
USER_ERRORS = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cl-arch", description="Continual-learning transformers with fast weights")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f"cl_arch.scripts.{module}").add_parser(sub)
    return parser


def error_message(e: BaseException) -> str:
    """One line: an OSError from the OS as ``path: reason`` (without ``[Errno 2]``), others as raised."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            text += f" (-> {e.filename2})"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Every sub-command runs training or inference steps on the CPU at some point; without this
    # glibc unmaps and re-faults each step's activations (5-15x slower steps on VMs).
    from cl_arch.train.runtime import keep_freed_memory

    keep_freed_memory()
    if args.debug:
        return int(args.func(args) or 0)
    from cl_arch.train.config import ConfigError

    prog = f"cl-arch {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
        if isinstance(e, ConfigError):
            raise SystemExit(2)  # a bad setting is a bad command line: exit as argparse does
        return 2


if __name__ == "__main__":
    sys.exit(main())
