"""Crash-safe file writes shared by checkpoints, session states and reports."""
import json
import os
import shutil
import tempfile
from typing import Any, Callable, List, Optional, Sequence, Tuple


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
        _sync_dir(directory)


def _sync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the data itself is already synced


def _temp_name(path: str, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix="." + os.path.basename(path) + ".", suffix=suffix)
    os.close(fd)
    return tmp


def _backup(path: str) -> str:
    """A second name for ``path``'s current content (a hard link, or a copy where links fail)."""
    bak = _temp_name(path, ".bak")
    os.remove(bak)
    try:
        os.link(path, bak)
    except OSError:
        shutil.copy2(path, bak)
    return bak


def atomic_write_many(writes: Sequence[Tuple[str, Callable[[str], None]]], sync_dir: bool = False) -> None:
    """Create or replace several files, all or none: on any error every path is as it was.

    Each ``(path, write)`` fills a temporary file next to its path, as in :func:`atomic_write`.
    Only once every temporary file is written are they moved into place, in the order given
    (so a reader that trusts the last file, e.g. a report's JSON, finds the others complete).
    If a move fails, the files already moved are put back from backups of their old content
    (hard links, so large files cost no copy) or removed if they did not exist. Readers may
    see some files new and others old while the moves run, or during that repair.
    """
    paths = [os.path.abspath(os.fspath(p)) for p, _ in writes]
    if len(set(paths)) != len(paths):
        raise ValueError(f"atomic_write_many: a path appears twice in {paths}")
    staged: List[Tuple[str, str]] = []
    moved: List[Tuple[str, Optional[str]]] = []  # (path, backup of its old content or None)
    pending_backup: Optional[str] = None
    try:
        for path, (_, write) in zip(paths, writes):
            tmp = _temp_name(path, ".tmp")
            staged.append((path, tmp))
            write(tmp)
        for path, tmp in staged:
            pending_backup = _backup(path) if os.path.exists(path) else None
            os.replace(tmp, path)
            moved.append((path, pending_backup))
            pending_backup = None
    except BaseException:
        if pending_backup is not None:  # its move failed: the path still holds the old content
            os.remove(pending_backup)
        for path, bak in reversed(moved):
            if bak is None:
                os.remove(path)
            else:
                os.replace(bak, path)
        for _, tmp in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for _, bak in moved:
        if bak is not None:
            os.remove(bak)
    if sync_dir:
        for directory in sorted({os.path.dirname(p) for p in paths}):
            _sync_dir(directory)


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
