"""Crash-safe file writes shared by checkpoints, session states and reports."""
import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None], sync_dir: bool = False) -> None:
    """Create or replace ``path`` so that readers see the old file or the new one, never a mix.

    ``write(tmp)`` fills a temporary file in the same folder (same filesystem, so the final
    ``os.replace`` is atomic); on any error the temporary file is removed and ``path`` is untouched.
    The folder must exist. ``sync_dir`` also fsyncs the folder so the rename survives a power loss
    (``write`` is responsible for fsyncing the data it writes).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if sync_dir:
        try:
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass  # some filesystems refuse fsync on a folder; the data itself is already synced


def write_json(path: str, obj: Any, sort_keys: bool = False, fsync: bool = False) -> str:
    """Write ``obj`` as indented JSON at ``path`` atomically (folder created); returns ``path``.

    ``fsync`` flushes the data to disk before the rename (checkpoints need it; reports do not).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    atomic_write(path, write)
    return path
