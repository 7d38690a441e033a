"""Crash-safe file writes shared by checkpoints, session states and reports, and the file locks
that serialise their writers and readers."""
import errno
import json
import logging
import os
import secrets
import shutil
import stat
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt
    import time
else:
    import fcntl

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- locks
# Writers and readers of one path serialise through an OS lock on a hidden sibling,
# ``.<name>.lock``: a writer holds it exclusively from before it looks for an interrupted commit
# until its own commit is done, a reader holds it shared while it reads. So a journal that a
# process sees while holding the lock exclusively belongs to a writer that died: finishing it
# never races a live writer. Locks are flock(2) locks (msvcrt byte locks on Windows, exclusive
# only): the kernel drops them when their holder dies, so a kill leaves nothing to clean up.
#
# The lock file is deleted by the last holder (one that can take it exclusively), so folders do
# not fill with them. A deleted lock file excludes nobody, so a process that obtains the lock
# checks that the file it locked is still the one at the lock's name, and starts again if not.
# A folder where the lock file cannot be created (read-only, e.g. the shipped model inside
# site-packages) is read without a lock and without recovery: nobody can write there.

logger = logging.getLogger(__name__)
_MAX_ROUNDS = 100  # bounded retries; each round needs another process to change the folder meanwhile

_local = threading.local()


def _held() -> Dict[str, List[Any]]:
    """This thread's locks: lock path -> [fd, exclusive, count] (re-entrant within a thread)."""
    held = getattr(_local, "held", None)
    if held is None:
        held = _local.held = {}
    return held


def _forget_locks_after_fork() -> None:
    # A forked child shares its parent's lock descriptors: unlocking them would release the
    # parent's locks, so the child forgets them (leaving the descriptors open) and locks anew.
    _local.held = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_after_fork)


def lock_path(path: PathLike) -> str:
    """The lock of ``path``: ``.<name>.lock`` in the same folder."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".lock")


def _open_lock(lp: str) -> Optional[int]:
    """A descriptor of the lock file ``lp`` (created if needed), or None where it cannot be created."""
    flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lp, flags, 0o666)
    except OSError as e:
        if os.path.islink(lp):  # O_NOFOLLOW: never open (or create) whatever a planted link names
            raise ValueError(f"lock file {lp} is a symbolic link (to {os.readlink(lp)!r}); refusing to use it") \
                from e
        if e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
            return None  # no folder, or one nobody can write to
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"lock file {lp} is not a regular file; refusing to use it")
    return fd


def _lock_fd(fd: int, exclusive: bool) -> None:
    if os.name == "nt":  # pragma: no cover
        while True:  # msvcrt has no shared locks and no blocking wait without a retry limit
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError:
                time.sleep(0.01)
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


def _same_file(fd: int, lp: str) -> bool:
    if os.name == "nt":  # pragma: no cover - lock files are never deleted there
        return True
    try:
        cur = os.stat(lp, follow_symlinks=False)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino)


def _acquire(path: str, exclusive: bool) -> bool:
    """Lock ``path`` for this thread; False where its lock file cannot be created."""
    lp = lock_path(path)
    held = _held()
    if lp in held:
        if exclusive and not held[lp][1]:
            raise RuntimeError(f"{lp}: this thread holds the lock shared and asks for it exclusive "
                               "(finish reading before writing)")
        held[lp][2] += 1
        return True
    for _ in range(_MAX_ROUNDS):
        fd = _open_lock(lp)
        if fd is None:
            return False
        try:
            _lock_fd(fd, exclusive)
            ok = _same_file(fd, lp)
        except BaseException:
            os.close(fd)
            raise
        if ok:
            held[lp] = [fd, exclusive, 1]
            return True
        os.close(fd)  # the holder before us deleted this file: lock the new one
    raise RuntimeError(f"could not lock {lp}: its lock file kept being replaced")


def _release(path: str) -> None:
    lp = lock_path(path)
    held = _held()
    entry = held[lp]
    entry[2] -= 1
    if entry[2] > 0:
        return
    del held[lp]
    fd, exclusive = entry[0], entry[1]
    try:
        if os.name == "nt":  # pragma: no cover
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            return
        try:
            # Delete the lock file if nobody else holds it. A shared holder converts to exclusive
            # (without waiting) to find out; it is done reading, so losing the shared lock is fine.
            if not exclusive:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, lp):
                os.unlink(lp)
        except OSError:
            pass  # another holder (or a folder that refuses the delete): the file stays, harmlessly
    finally:
        os.close(fd)


@contextmanager
def _hold(paths: Iterable[str], exclusive: bool) -> Iterator[bool]:
    """Lock every path (sorted, so two processes never wait on each other in a cycle); yields
    whether all of them could be locked."""
    order = sorted({os.path.abspath(p) for p in paths}, key=lock_path)
    got: List[str] = []
    all_locked = True
    try:
        for p in order:
            if _acquire(p, exclusive):
                got.append(p)
            else:
                all_locked = False
        yield all_locked
    finally:
        for p in reversed(got):
            _release(p)


@contextmanager
def reading(path: PathLike) -> Iterator[None]:
    """Hold ``path``'s lock shared while the body reads it, after finishing any commit of it that a
    dead writer left (:func:`recover`). Readers of one path run side by side; a writer waits for
    them, and they for it, so the body sees one whole version. Where the lock file cannot be
    created (a read-only folder) the body runs without a lock.

    Raises:
        ValueError: a journal or lock file that this module did not write (see :func:`recover`).
    """
    path = os.path.abspath(os.fspath(path))
    for _ in range(_MAX_ROUNDS):
        with _hold([path], exclusive=False) as locked:
            # Under the shared lock no writer is half-way: a journal here is a dead writer's.
            if not locked or not os.path.lexists(journal_path(path)) or not _writable(path):
                yield
                return
        recover(path)
    raise RuntimeError(f"{path}: a commit journal reappeared {_MAX_ROUNDS} times while reading")


@contextmanager
def writing(paths: Sequence[PathLike]) -> Iterator[None]:
    """Hold the locks of ``paths`` exclusively while the body replaces them, after finishing any
    commit of them that a dead writer left, so that no stale journal can later replay an older
    version over what the body writes."""
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    with _hold(paths, exclusive=True):
        for p in paths:
            recover(p)
        yield


def _writable(path: str) -> bool:
    return os.access(os.path.dirname(path), os.W_OK)


# ----------------------------------------------------------------------------- single files
def _new_temp(path: str, suffix: str = ".tmp") -> Tuple[str, int]:
    """Create an empty hidden file next to ``path``; returns its name and the mode it got.

    It is created as ``open(path, "w")`` would create a file (0o666 less the umask, and any
    default ACL of the folder), unlike ``mkstemp``'s 0o600."""
    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_MAX_ROUNDS):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"no free temporary name next to {path}")


def _match_mode(tmp: str, path: str, created_mode: int) -> None:
    """Give ``tmp`` the mode of the file it replaces, or the umask's for a new file (the writer
    may have recreated it)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = created_mode
    os.chmod(tmp, mode)


def atomic_write(path: str, write: Callable[[str], None], sync_dir: bool = False, lock: bool = False) -> None:
    """Create or replace ``path`` so that readers see the old file or the new one, never a mix.

    ``write(tmp)`` fills a temporary file in the same folder (same filesystem, so the final
    ``os.replace`` is atomic); on any error the temporary file is removed and ``path`` is untouched.
    The new file has the replaced file's mode, or the one ``open(path, "w")`` would give.
    The folder must exist. ``sync_dir`` also fsyncs the folder so the rename survives a power loss
    (``write`` is responsible for fsyncing the data it writes). ``lock`` (for a path that
    journaled commits also write, e.g. a session file) replaces it under the path's lock, after
    finishing a commit of it that a dead writer left (:func:`writing`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp, created_mode = _new_temp(path)
    try:
        write(tmp)
        if lock:
            with writing([path]):
                _match_mode(tmp, path, created_mode)
                os.replace(tmp, path)
        else:
            _match_mode(tmp, path, created_mode)
            os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
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


def _backup(path: str) -> str:
    """A second name for ``path``'s current content (a hard link, or a copy where links fail)."""
    bak, _ = _new_temp(path, ".bak")
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
#
# A journal names its renames and deletions by plain names inside its own folder, never a path:
# a folder from elsewhere (a downloaded model) may carry a journal, and reading it must not move
# or delete anything outside that folder. A commit of several files is named after its last file
# (the "primary"); each other file gets a pointer journal (``{"primary": name, "id": ...}``),
# written before the primary's, so a reader of any one of the files finds the commit. A pointer
# whose primary journal is absent or has another id is left from a commit that never reached
# its commit point, and is dropped.

_MAX_JOURNAL_BYTES = 1 << 20  # ours hold a few names; anything larger is not one of ours


def journal_path(path: str) -> str:
    """The journal of a commit whose last (trusted) file or folder is ``path``: ``.<name>.journal``."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".journal")


@dataclass
class _Journal:
    primary: Optional[str] = None  # set for a pointer journal
    id: Optional[str] = None  # None in journals written before pointers existed
    moves: List[Tuple[str, str]] = field(default_factory=list)
    discard: List[str] = field(default_factory=list)
    parts: List[str] = field(default_factory=list)


def _read_journal(journal: str) -> Optional[_Journal]:
    """The parsed journal at ``journal`` (None if there is none); its names are not checked yet."""
    try:
        st = os.lstat(journal)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"commit journal {journal} is not a regular file (a link, folder, FIFO or device); "
                         "refusing it: nothing was moved or deleted")
    if st.st_size > _MAX_JOURNAL_BYTES:
        raise ValueError(f"commit journal {journal} is {st.st_size} bytes, not one this library wrote; "
                         "refusing it: nothing was moved or deleted")

    def strings(x: Any, what: str) -> List[str]:
        if not isinstance(x, list) or not all(isinstance(s, str) for s in x):
            raise TypeError(f"{what} must be a list of names, got {x!r}")
        return list(x)

    try:
        with open(journal, "rb") as f:
            entry = json.loads(f.read(_MAX_JOURNAL_BYTES + 1))
        if not isinstance(entry, dict):
            raise TypeError(f"a journal is a JSON object, got {type(entry).__name__}")
        cid = entry.get("id")
        if cid is not None and not isinstance(cid, str):
            raise TypeError(f"id must be a string, got {cid!r}")
        if "primary" in entry:
            if not isinstance(entry["primary"], str) or cid is None:
                raise TypeError(f"a pointer journal names its primary and id, got {entry!r}")
            return _Journal(primary=entry["primary"], id=cid)
        moves = entry["moves"]
        if not isinstance(moves, list) or not all(isinstance(m, list) and len(m) == 2 for m in moves):
            raise TypeError(f"moves must be a list of [source, destination] pairs, got {moves!r}")
        return _Journal(id=cid, moves=[(a, b) for a, b in (strings(m, "a move") for m in moves)],
                        discard=strings(entry.get("discard", []), "discard"),
                        parts=strings(entry.get("parts", []), "parts"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable commit journal {journal}: {e}") from e


def _name_problem(base: str, name: str) -> Optional[str]:
    """Why ``name`` is not a plain name of an entry inside ``base`` (None if it is one)."""
    seps = {s for s in (os.sep, os.altsep, "/", "\\") if s}
    if name in ("", ".", ".."):
        return "is not a file name"
    if "\0" in name:
        return "contains a NUL byte"
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return "is an absolute path"
    if any(s in name for s in seps):
        return "contains a path separator"
    full = os.path.join(base, name)
    if os.path.islink(full):
        real_base, target = os.path.realpath(base), os.path.realpath(full)
        try:
            inside = os.path.commonpath([real_base, target]) == real_base
        except ValueError:  # another drive
            inside = False
        if not inside:
            return f"is a symbolic link to {target}, outside the folder"
    return None


def _check_names(journal: str, entry: _Journal) -> None:
    """Refuse the whole journal, before anything is moved or deleted, if any entry is not a plain
    name inside its folder."""
    base = os.path.dirname(journal)
    named = [("move", n) for m in entry.moves for n in m] + [("discard", n) for n in entry.discard] \
        + [("part", n) for n in entry.parts] + ([("primary", entry.primary)] if entry.primary is not None else [])
    for role, name in named:
        problem = _name_problem(base, name)
        if problem is not None:
            raise ValueError(f"commit journal {journal}: {role} entry {name!r} {problem}; a journal may only "
                             f"name files inside its folder {base}. Refusing it: nothing was moved or deleted")


def _peek(journal: str) -> Optional[_Journal]:
    try:
        return _read_journal(journal)
    except ValueError:
        return None  # reported by the recovery itself, under the lock


def _covered(path: str) -> Set[str]:
    """The paths that the interrupted commit at ``path`` (if any) writes, whose locks its recovery
    needs. Names that are not plain are left out (never lock, or create, anything outside)."""
    base = os.path.dirname(path)
    entry = _peek(journal_path(path))
    out: Set[str] = set()
    if entry is not None and entry.primary is not None:
        if _name_problem(base, entry.primary) is not None:
            return out
        primary = os.path.join(base, entry.primary)
        out.add(primary)
        entry = _peek(journal_path(primary))
        if entry is None or entry.primary is not None:
            return out
    for name in entry.parts if entry is not None else []:
        if _name_problem(base, name) is None:
            out.add(os.path.join(base, name))
    return out


def _remove_tree_or_file(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _run_journal(journal: str, entry: _Journal) -> None:
    """Redo the moves of ``journal`` that have not happened yet, then delete ``discard``, the
    commit's pointer journals and the journal. The caller holds the locks and checked the names.

    A move removes its source, so the moves done are exactly those up to the last one whose
    source is gone (a later move may recreate an earlier source's name: a folder moved aside and
    its replacement moved into the same name)."""
    base = os.path.dirname(journal)
    moves = [(os.path.join(base, a), os.path.join(base, b)) for a, b in entry.moves]
    done = 0
    for i, (src, _) in enumerate(moves):
        if not os.path.lexists(src):
            done = i + 1
    for src, dst in moves[done:]:
        if os.path.isdir(dst) and not os.path.islink(dst) and os.path.isdir(src):
            raise OSError(f"journal {journal}: cannot move {src} onto the existing folder {dst}")
        os.replace(src, dst)
    _sync_dir(base)
    for name in entry.discard:
        _remove_tree_or_file(os.path.join(base, name))
    for name in entry.parts:
        pointer = journal_path(os.path.join(base, name))
        found = _peek(pointer)
        if found is not None and found.primary is not None and found.id == entry.id:
            os.remove(pointer)
    os.remove(journal)
    _sync_dir(base)


def _recover_held(path: str) -> bool:
    """:func:`recover`'s work, with the locks of every path the commit writes already held."""
    journal = journal_path(path)
    entry = _read_journal(journal)
    if entry is None or not _writable(path):
        return False
    _check_names(journal, entry)
    if entry.primary is None:
        _run_journal(journal, entry)
        logger.warning(f"{path}: finished a write that was interrupted (journal {journal})")
        return True
    primary_journal = journal_path(os.path.join(os.path.dirname(path), entry.primary))
    primary = _read_journal(primary_journal)
    if primary is not None and primary.primary is None and primary.id == entry.id:
        _check_names(primary_journal, primary)
        _run_journal(primary_journal, primary)
        if os.path.lexists(journal):  # a primary that does not list this part
            os.remove(journal)
        logger.warning(f"{path}: finished a write that was interrupted (journal {primary_journal})")
        return True
    os.remove(journal)  # its commit never reached the commit point: the old version stands
    _sync_dir(os.path.dirname(path))
    logger.warning(f"{path}: dropped a write interrupted before its commit point; the previous version stands")
    return False


def recover(path: PathLike) -> bool:
    """Finish a journaled commit of ``path`` that a crash interrupted; True if there was one.

    Readers of multi-file formats (``from_pretrained``, ``load_report``, ``load_checkpoint``,
    session files) call this before reading, and writers before writing, so an interrupted commit is
    completed (the new version becomes whole) instead of leaving files of two versions side by
    side. It runs holding the locks of every path the commit writes, exclusively, so it never
    finishes a live writer's commit (the writer holds them until it is done). Where the lock file
    cannot be created or the folder cannot be written (e.g. a read-only installed model), it does
    nothing and returns False.

    Raises:
        ValueError: the journal is not one this module wrote: unreadable, not a regular file, or
            naming anything but a plain name inside its folder (an absolute path, ``..``, a path
            separator, a symbolic link leading outside); the journal and the entry are named, and
            nothing has been moved or deleted.
    """
    path = os.path.abspath(os.fspath(path))
    needed = {path}
    for _ in range(_MAX_ROUNDS):
        with _hold(needed, exclusive=True) as locked:
            if not locked:
                return False
            more = _covered(path) - needed
            if not more:
                return _recover_held(path)
        needed |= more  # lock those too, all in one sorted order, and look again
    raise RuntimeError(f"{path}: the commit to recover kept changing")


def _name_in(base: str, path: PathLike, commit_of: str) -> str:
    full = os.path.abspath(os.fspath(path))
    if os.path.dirname(full) != base:
        raise ValueError(f"commit of {commit_of}: {full} is not in its folder {base} "
                         "(a journaled commit renames names within one folder)")
    return os.path.basename(full)


def commit_moves(path: PathLike, moves: Sequence[Tuple[PathLike, PathLike]],
                 discard: Sequence[PathLike] = (), parts: Sequence[PathLike] = ()) -> None:
    """Run ``moves`` (``(src, dst)`` paths in ``path``'s folder) as one commit of ``path``.

    The sources must be complete and synced. The journal is written (and synced) first, so a
    crash at any later point is finished by :func:`recover`; ``discard`` (names moved aside, old
    backups) is deleted once every move is done. ``parts`` are the other files the commit
    replaces: each gets a pointer journal, so that a reader of any of them finishes the commit.
    Runs holding the locks of ``path`` and ``parts``, after finishing a dead writer's commit.

    Raises:
        ValueError: a move, discard or part is not directly inside ``path``'s folder.
    """
    path = os.path.abspath(os.fspath(path))
    base, name = os.path.split(path)
    rel = [(_name_in(base, a, path), _name_in(base, b, path)) for a, b in moves]
    drop = [_name_in(base, d, path) for d in discard]
    others = [_name_in(base, p, path) for p in parts]
    with writing([path] + [os.path.join(base, p) for p in others]):
        cid = uuid.uuid4().hex
        for p in others:
            write_json(journal_path(os.path.join(base, p)), {"commit_of": p, "primary": name, "id": cid}, fsync=True)
        journal = journal_path(path)
        write_json(journal, {"commit_of": name, "id": cid, "moves": rel, "discard": drop, "parts": others},
                   fsync=True)
        _sync_dir(base)  # the commit point
        _run_journal(journal, _Journal(id=cid, moves=rel, discard=drop, parts=others))


def _drop_journals(primary: str, parts: Sequence[str]) -> None:
    for p in [primary, *parts]:
        if os.path.lexists(journal_path(p)):
            os.remove(journal_path(p))


def _commit_staged(paths: List[str], staged: List[Tuple[str, str]], modes: List[int],
                   order: List[List[int]]) -> None:
    """The moves of :func:`atomic_write_many`, run holding every path's lock."""
    backups: List[Optional[str]] = []
    single = len(order) == 1
    try:
        for (tmp, path), mode in zip(staged, modes):
            _match_mode(tmp, path, mode)
        backups = [_backup(p) if os.path.exists(p) else None for p in paths]
        for idx in order:
            # One folder: the journal deletes the backups. Several: they are kept until every
            # folder is done, so that an error in a later folder can put the earlier ones back.
            commit_moves(paths[idx[-1]], [staged[i] for i in idx],
                         discard=[backups[i] for i in idx if backups[i] is not None] if single else (),
                         parts=[paths[i] for i in idx[:-1]])
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
        for idx in order:
            _drop_journals(paths[idx[-1]], [paths[i] for i in idx[:-1]])
        raise
    if not single:
        for b in backups:
            if b is not None and os.path.lexists(b):
                os.remove(b)


def atomic_write_many(writes: Sequence[Tuple[str, Callable[[str], None]]], sync_dir: bool = False) -> None:
    """Create or replace several files, all or none, also across a crash.

    Each ``(path, write)`` fills a temporary file next to its path, as in :func:`atomic_write`
    (new files get the umask's mode, replaced ones keep theirs); the temporary files are synced,
    then, holding every path's lock, moved into place in the order given under a journal named
    after the last path of their folder (:func:`commit_moves`). A kill -9 at any moment leaves the
    old files or, once :func:`recover` has run on any of the paths (their readers and writers call
    it), the new ones, never a mix. Paths in different folders are committed folder by folder
    (a journal only names files in its own folder), so a kill between two folders' commits leaves
    each folder's files whole, the earlier folders new and the later ones old. If a write or a
    move raises, every path is put back as it was (from hard-link backups of the old content).
    ``sync_dir`` is kept for callers; the journals sync the folders.
    """
    paths = [os.path.abspath(os.fspath(p)) for p, _ in writes]
    if len(set(paths)) != len(paths):
        raise ValueError(f"atomic_write_many: a path appears twice in {paths}")
    if not paths:
        return
    groups: Dict[str, List[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(os.path.dirname(p), []).append(i)
    # Commit the folders in the order of their last path, so that the overall last path commits last.
    order = sorted(groups.values(), key=lambda idx: idx[-1])
    staged: List[Tuple[str, str]] = []
    modes: List[int] = []
    try:
        # The content is written before taking the locks: temporary names collide with no reader.
        for path, (_, write) in zip(paths, writes):
            tmp, mode = _new_temp(path)
            staged.append((tmp, path))
            modes.append(mode)
            write(tmp)
            fsync_file(tmp)
    except BaseException:
        for tmp, _ in staged:
            if os.path.lexists(tmp):
                os.remove(tmp)
        raise
    with writing(paths):
        _commit_staged(paths, staged, modes, order)
    if sync_dir:  # the journals synced the folders of the last paths; the others' renames too
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
