"""What the sub-commands share: the shipped model as the default ``--model``, and the checks that
refuse an output which would overwrite an input (unless ``--in-place``) or could not be written.

Every check raises ValueError (or an OSError) with a one-line message; ``cl-arch`` prints it as
``cl-arch <sub>: error: <message>`` with exit status 2 (see cli.py).
"""
import os
import sys
import tempfile
from typing import Iterable, Optional, Sequence, Tuple

# The explicit spelling of "the shipped model" wherever --model is an input.
DEFAULT_MODEL = "default"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (thread counts, window counts), refused as a usage error otherwise."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def default_model_dir() -> str:
    """Folder of the shipped model (``cl_arch/assets/default_model``), as cl_arch.eval.lib.models reads it."""
    import cl_arch

    return os.path.join(os.path.dirname(os.path.abspath(cl_arch.__file__)), "assets", "default_model")


def add_model_arg(p, what: str = "checkpoint folder (save_pretrained)") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{what}; default, or 'default': the shipped model (cl_arch/assets/default_model)")


def add_in_place_arg(p) -> None:
    p.add_argument("--in-place", action="store_true",
                   help="allow an output path that is an input (the input is overwritten)")


def is_default(model: Optional[str]) -> bool:
    return model is None or model == DEFAULT_MODEL


def model_dir(model: Optional[str]) -> str:
    """The folder a ``--model`` value names (the shipped model's for None/'default')."""
    return default_model_dir() if is_default(model) else model


def load_model(model: Optional[str], log=None, flag: str = "--model"):
    """``--model`` -> a PlasticTransformer; the shipped one (in eval mode) for None/'default'.

    ``log`` receives the shipped model's one-line provenance (default: stderr, so a command whose
    stdout is its product, like ``adapt``, keeps it clean).
    """
    if is_default(model):
        from cl_arch.eval.lib.models import default_model

        return default_model(log=log or (lambda s: print(s, file=sys.stderr)))
    from cl_arch import PlasticTransformer

    # The library's message names config.json inside the folder; the user typed the folder.
    if not os.path.exists(model):
        raise FileNotFoundError(f"{flag} {model}: no such folder")
    if not os.path.isdir(model):
        raise NotADirectoryError(f"{flag} {model} is a file, not a model folder (save_pretrained)")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{flag} {model} is not a model folder (no config.json; save_pretrained writes one)")
    return PlasticTransformer.from_pretrained(model)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overwrite(outputs: Iterable[Tuple[str, str]], inputs: Iterable[Tuple[str, Optional[str]]],
                     in_place: bool, contain: bool = False) -> None:
    """ValueError when an output path (``(flag, path)``) resolves to an input path (real paths, so a
    symlink or ``./x`` vs ``x`` does not slip through); with ``contain`` also when an input lies
    inside an output folder (a run folder whose contents the run replaces or prunes).
    Inputs that are None are skipped; nothing is checked with ``in_place``."""
    if in_place:
        return
    inputs = [(f, p) for f, p in inputs if p]
    for oflag, out in outputs:
        ro = _real(out)
        for iflag, inp in inputs:
            ri = _real(inp)
            if ri == ro:
                raise ValueError(f"{oflag} {out} is the input {iflag} {inp}: it would be overwritten "
                                 f"(pass --in-place to allow it)")
            if contain and _inside(ri, ro):
                raise ValueError(f"{oflag} {out} holds the input {iflag} {inp}: the run writes there "
                                 f"(pass --in-place to allow it)")


def check_writable_file(flag: str, path: str) -> None:
    """Fail before any work if ``path`` could not be written later: a folder, a missing folder, or a
    folder this process cannot create files in (probed with a temporary file, which also catches
    read-only mounts and ACLs that ``os.access`` does not see)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {path}: folder {folder} does not exist")
    _probe(flag, path, folder)


def check_writable_folder(flag: str, path: str) -> None:
    """Fail before any work if the folder ``path`` could not be created or written later: an existing
    file, or a nearest existing ancestor that is a file or not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} is a file, not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"{flag} {path}: {probe} is a file, not a folder")
    _probe(flag, path, probe)


def _probe(flag: str, path: str, folder: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cl-arch-probe-", dir=folder)
    except OSError as e:
        raise PermissionError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(tmp)


def refuse_duplicates(flag: str, paths: Sequence[str]) -> None:
    """ValueError naming two arguments that are one file (same real path, or hard links)."""
    seen = {}
    for p in paths:
        key = _real(p)
        try:
            st = os.stat(p)
            key = (st.st_dev, st.st_ino)
        except OSError:
            pass  # a missing file is reported by whoever opens it
        if key in seen:
            raise ValueError(f"{flag}: {seen[key]} and {p} are the same file")
        seen[key] = p


def check_input_files(inputs: Iterable[Tuple[str, Optional[str]]]) -> None:
    """Name the flag of an input file that is missing or a folder (None skipped), before any work."""
    for flag, path in inputs:
        if path is None:
            continue
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{flag} {path} is a folder, not a file")
