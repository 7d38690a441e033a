"""A session store from its URL (:func:`open_store`): SQLite or Redis/Valkey."""
from __future__ import annotations

from .store import SQLiteStore, Store
from .valkey_store import ValkeyStore


def open_store(url: str) -> Store:
    """A store from its URL: ``sqlite:///abs/path.db``, ``sqlite://rel/path.db`` or a plain path
    (SQLite); ``redis://host:port/db`` or ``valkey://...``, optionally ``?lease_ms=N``
    (:class:`~cl_arch.serve.valkey_store.ValkeyStore`). Other schemes are refused, naming the ones known."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"store URL must be a non-empty string, got {url!r}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return SQLiteStore(url)
    if scheme == "sqlite":
        if not rest:
            raise ValueError(f"store URL {url!r} names no file: use sqlite:///path/to/sessions.db")
        return SQLiteStore(rest)
    if scheme in ("redis", "valkey"):
        base, _, query = url.partition("?")
        lease = dict(p.partition("=")[::2] for p in query.split("&") if p)
        unknown = sorted(set(lease) - {"lease_ms"})
        if unknown:
            raise ValueError(f"unknown store URL options {unknown} in {url!r}: known: lease_ms")
        ms = lease.get("lease_ms", "30000")
        if not ms.isdigit():
            raise ValueError(f"lease_ms in {url!r} must be a whole number of milliseconds")
        return ValkeyStore(base, lease_ms=int(ms))
    raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r}: known: sqlite:// (or a plain path), "
                     "redis://, valkey://")
