"""Where a server keeps its users' sessions: the :class:`Store` interface and :class:`SQLiteStore`.

A store holds, per session id, the bytes of :meth:`cl_arch.Session.to_bytes` (the state file's
contents: P per fast layer, baseline, counts, replay) and their sha256, written in one row by one
transaction. The server writes a user's row after every commit and acknowledges the commit only
once :meth:`Store.put` has returned, so a killed server loses at most the episodes nobody had
committed. Ids are untrusted input (docs/security.md): every method checks them with the rule of
:class:`cl_arch.SessionStore` before it touches anything.
"""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time

# The rule of cl_arch.session.store (SessionStore.path), kept identical here so that an id valid
# for the server is valid as a file name too (tests/test_serve_store.py compares them).
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_id(uid) -> str:
    """``uid`` if it is a valid session id; ValueError naming the rule otherwise."""
    if not isinstance(uid, str) or not _ID_RE.fullmatch(uid) or ".." in uid:
        raise ValueError(f"invalid session id {uid!r}: use 1-128 letters, digits, '_', '-', '.', "
                         "starting with a letter or digit, without '..'")
    return uid


def digest(data: bytes) -> str:
    """sha256 hex of ``data`` (what a row stores beside its bytes)."""
    return hashlib.sha256(data).hexdigest()


class CorruptRow(ValueError):
    """A stored row whose bytes do not match the checksum stored with them."""


class Store:
    """Session bytes by id. Subclasses implement the five methods; all are thread-safe."""

    def get(self, uid: str) -> bytes | None:
        """The stored bytes of ``uid``, or None; :class:`CorruptRow` if they fail their checksum."""
        raise NotImplementedError

    def put(self, uid: str, data: bytes, commits: int) -> str:
        """Store ``data`` for ``uid`` durably (returns after the write is on disk); returns its sha256.

        ``commits`` is the session's committed-episode count, kept beside the bytes so that
        operators (and the fault tests) can read it without parsing them."""
        raise NotImplementedError

    def delete(self, uid: str) -> bool:
        """Remove ``uid``'s row; False if there was none."""
        raise NotImplementedError

    def ids(self) -> list[str]:
        """Stored ids, sorted."""
        raise NotImplementedError

    def rows(self) -> dict[str, dict]:
        """Every row's ``{"commits", "sha256", "ok"}`` (``ok``: bytes match the checksum)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the store's resources."""

    # Leases, for stores several server processes share (ValkeyStore); a store one process owns
    # (SQLite, one server per file) needs none.
    def acquire(self, uid: str) -> None:
        """Hold ``uid`` for this process before loading it; raises if another process holds it."""

    def release(self, uid: str) -> None:
        """Let other processes take ``uid`` (it left this process's memory)."""

    def renew(self, uids) -> list:
        """Extend the leases of ``uids``; returns those this process no longer holds."""
        return []


class SQLiteStore(Store):
    """One SQLite file, WAL journal, ``synchronous=FULL``: a returned :meth:`put` survives a kill
    of the process (and, with FULL, a power cut). Each put is its own transaction; the bytes and
    their checksum are one row, so a row is never seen with one but not the other.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"store folder {folder} does not exist")
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, data BLOB NOT NULL, "
                         "sha256 TEXT NOT NULL, commits INTEGER NOT NULL, updated REAL NOT NULL)")

    def get(self, uid: str) -> bytes | None:
        check_id(uid)
        with self._lock:
            row = self._db.execute("SELECT data, sha256 FROM sessions WHERE id = ?", (uid,)).fetchone()
        if row is None:
            return None
        data = bytes(row[0])
        if digest(data) != row[1]:
            raise CorruptRow(f"stored session {uid!r} in {self.path} fails its checksum "
                             f"(sha256 {digest(data)[:16]}..., recorded {row[1][:16]}...)")
        return data

    def put(self, uid: str, data: bytes, commits: int) -> str:
        check_id(uid)
        sha = digest(data)
        with self._lock:
            # one statement in its own transaction: the row is replaced whole or not at all
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO sessions (id, data, sha256, commits, updated) "
                                 "VALUES (?, ?, ?, ?, ?)", (uid, sqlite3.Binary(data), sha, int(commits), time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return sha

    def delete(self, uid: str) -> bool:
        check_id(uid)
        with self._lock:
            cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (uid,))
        return cur.rowcount > 0

    def ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM sessions ORDER BY id")]

    def rows(self) -> dict[str, dict]:
        with self._lock:
            rows = self._db.execute("SELECT id, data, sha256, commits FROM sessions").fetchall()
        return {uid: {"commits": c, "sha256": sha, "ok": digest(bytes(d)) == sha} for uid, d, sha, c in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
