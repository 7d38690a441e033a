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

Output: the library reports progress through ``logging`` (logger ``cl_arch``); while a command
runs, :func:`console_logging` shows those lines as the commands always printed them (the message
alone: progress on stdout, warnings and errors on stderr, kept clear of a progress bar). A level
set on ``logging.getLogger("cl_arch")`` beforehand is kept, so an in-process caller can silence it.
"""
import argparse
import contextlib
import importlib
import logging
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
    "serve": "serve",
    "train-through": "train_through",
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


class ConsoleHandler(logging.Handler):
    """A library record as the command line printed it: the message alone, INFO on stdout and
    WARNING and above on stderr, through ``tqdm.write`` so an open progress bar is redrawn below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(self.format(record), file=stream)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def console_logging():
    """The library's ``logging`` output on the console for one command (INFO and up unless the
    ``cl_arch`` logger already has a level); handler and level are restored afterwards."""
    lib = logging.getLogger("cl_arch")
    handler, level = ConsoleHandler(), lib.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    lib.addHandler(handler)
    if level == logging.NOTSET:
        lib.setLevel(logging.INFO)
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(level)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with console_logging():
        return _run(args)


def _run(args) -> int:
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
