"""Crash-safe file writes shared by checkpoints, session states and reports."""
import json
import os
import shutil
import tempfile
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union


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


def text_writer(text: str) -> Callable[[str], None]:
    """A ``write(tmp)`` for :func:`atomic_write` / :func:`atomic_write_many` that writes ``text``."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return write


def fsync_file(path: str) -> None:
    """Flush ``path``'s data to disk (before a commit names it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- journaled commits
# A write made of several renames (a checkpoint's two files, a report and its undo weights, a
# checkpoint folder replacing an older one) is made atomic as a whole by a journal: the new content
# is first written completely under hidden temporary names, then a small JSON journal listing the
# renames is written atomically (the commit point), then the renames run and the journal is removed.
# A crash before the journal exists leaves the old version (plus hidden temp files); a crash after
# it is finished by :func:`recover` on the next read or write, which redoes the renames not yet
# done. Readers of such a path call ``recover`` first, so they see the old or the new version whole.

def journal_path(path: str) -> str:
    """The journal of a commit whose last (trusted) file or folder is ``path``: ``.<name>.journal``."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".journal")


def _remove_tree_or_file(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _run_journal(journal: str, moves: Sequence[Tuple[str, str]], discard: Sequence[str]) -> None:
    """Redo the moves of ``journal`` that have not happened yet, then delete ``discard`` and the journal.

    A move removes its source, so the moves done are exactly those up to the last one whose
    source is gone (a later move may recreate an earlier source's name: a folder moved aside and
    its replacement moved into the same name)."""
    base = os.path.dirname(journal)
    moves = [(os.path.join(base, a), os.path.join(base, b)) for a, b in moves]
    done = 0
    for i, (src, _) in enumerate(moves):
        if not os.path.lexists(src):
            done = i + 1
    for src, dst in moves[done:]:
        if os.path.isdir(dst) and not os.path.islink(dst) and os.path.isdir(src):
            raise OSError(f"journal {journal}: cannot move {src} onto the existing folder {dst}")
        os.replace(src, dst)
    _sync_dir(base)
    for name in discard:
        _remove_tree_or_file(os.path.join(base, name))
    os.remove(journal)
    _sync_dir(base)


def recover(path: Union[str, os.PathLike]) -> bool:
    """Finish a journaled commit of ``path`` that a crash interrupted; True if there was one.

    Readers of multi-file formats (``from_pretrained``, ``load_report``, ``load_checkpoint``) call
    this before reading, and writers before writing, so an interrupted commit is completed (the new
    version becomes whole) instead of leaving files of two versions side by side.

    Raises:
        ValueError: the journal is not one this module wrote (its content is named).
    """
    journal = journal_path(os.fspath(path))
    if not os.path.exists(journal):
        return False
    try:
        with open(journal) as f:
            entry = json.load(f)
        moves = [(str(a), str(b)) for a, b in entry["moves"]]
        discard = [str(d) for d in entry.get("discard", [])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable commit journal {journal}: {e}") from e
    _run_journal(journal, moves, discard)
    return True


def commit_moves(path: Union[str, os.PathLike], moves: Sequence[Tuple[str, str]],
                 discard: Sequence[str] = ()) -> None:
    """Run ``moves`` (``(src, dst)`` paths in ``path``'s folder) as one commit of ``path``.

    The sources must be complete and synced. The journal is written (and synced) first, so a
    crash at any later point is finished by :func:`recover`; ``discard`` (names moved aside, old
    backups) is deleted once every move is done."""
    path = os.path.abspath(os.fspath(path))
    base = os.path.dirname(path)
    rel = [(os.path.relpath(os.path.abspath(a), base), os.path.relpath(os.path.abspath(b), base)) for a, b in moves]
    drop = [os.path.relpath(os.path.abspath(d), base) for d in discard]
    journal = journal_path(path)
    write_json(journal, {"commit_of": os.path.basename(path), "moves": rel, "discard": drop}, fsync=True)
    _sync_dir(base)
    _run_journal(journal, rel, drop)


def atomic_write_many(writes: Sequence[Tuple[str, Callable[[str], None]]], sync_dir: bool = False) -> None:
    """Create or replace several files, all or none, also across a crash.

    Each ``(path, write)`` fills a temporary file next to its path, as in :func:`atomic_write`;
    the temporary files are synced, then moved into place in the order given under a journal
    named after the last path (:func:`commit_moves`). A kill -9 at any moment leaves the old files
    or, once :func:`recover` has run on the last path (its readers and writers call it), the new
    ones, never a mix. If a write or a move raises, every path is put back as it was (from hard-link
    backups of the old content). ``sync_dir`` is kept for callers; the journal syncs the folders.
    """
    paths = [os.path.abspath(os.fspath(p)) for p, _ in writes]
    if len(set(paths)) != len(paths):
        raise ValueError(f"atomic_write_many: a path appears twice in {paths}")
    if not paths:
        return
    recover(paths[-1])
    staged: List[Tuple[str, str]] = []
    backups: List[Optional[str]] = []
    try:
        for path, (_, write) in zip(paths, writes):
            tmp = _temp_name(path, ".tmp")
            staged.append((tmp, path))
            write(tmp)
            fsync_file(tmp)
        backups = [_backup(p) if os.path.exists(p) else None for p in paths]
        commit_moves(paths[-1], staged, discard=[b for b in backups if b is not None])
    except BaseException:
        # An error (not a crash): undo whatever moves ran, so every path holds its old content.
        for i, (tmp, path) in enumerate(staged):
            bak = backups[i] if i < len(backups) else None
            moved = bool(backups) and not os.path.exists(tmp)  # only a started commit moves files
            if moved and bak is not None:
                os.replace(bak, path)
            elif moved and os.path.exists(path):
                os.remove(path)  # it did not exist before this call
            elif bak is not None:
                os.remove(bak)
            if os.path.exists(tmp):
                os.remove(tmp)
        if os.path.exists(journal_path(paths[-1])):
            os.remove(journal_path(paths[-1]))
        raise
    if sync_dir:  # the journal synced the last path's folder; the others' renames too
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
