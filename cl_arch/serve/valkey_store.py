"""A session store on Redis or Valkey, for several server processes sharing users.

Each session is one hash ``cl_arch:session:<id>`` (``data``, ``sha256``, ``commits``, ``updated``),
written by one Lua script, so its bytes and checksum change together. A server holds a user with a
lease, ``cl_arch:lock:<id>`` = the process's owner id, set with ``NX`` and a time to live
(``lease_ms``) that the engine renews while the session is in memory; another process asking for
that user gets :class:`SessionHeld` (the server answers 409). Every write is fenced: the script
refuses it unless this process holds the lease and the stored commit count is the session's
previous one, so two servers never commit one user at once and a commit is never written over a
newer one, even after a lease ran out during a long pause. After the write, ``WAITAOF 1 0`` waits
until the server's append-only file has it on disk (the server must run with ``appendonly yes``),
so an acknowledged commit survives a crash of the store too.

Needs the ``valkey`` client (``pip install valkey``; a Redis server works the same).
"""
from __future__ import annotations

import time
import uuid

from .store import CorruptRow, Store, check_id, digest

_PUT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('LEASE this process does not hold the session') end
local cur = tonumber(redis.call('HGET', KEYS[1], 'commits') or '0')
if cur ~= tonumber(ARGV[4]) - 1 then
  return redis.error_reply('VERSION the store has ' .. cur .. ' commits, this session expected ' .. (tonumber(ARGV[4]) - 1))
end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'sha256', ARGV[3], 'commits', ARGV[4], 'updated', ARGV[5])
return 1
"""
_DELETE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('LEASE this process does not hold the session') end
return redis.call('DEL', KEYS[1])
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class SessionHeld(RuntimeError):
    """Another server process holds this session (its lease has not run out)."""


class ValkeyStore(Store):
    """Sessions in Redis/Valkey at ``url`` (``redis://host:port/db`` or ``valkey://...``), leases of
    ``lease_ms`` milliseconds. See the module docstring."""

    def __init__(self, url: str, lease_ms: int = 30000, prefix: str = "cl_arch"):
        try:
            import valkey
        except ImportError:
            raise ValueError("a redis:// or valkey:// store needs the valkey client: pip install valkey") from None
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms < 100:
            raise ValueError(f"lease_ms must be an integer >= 100, got {lease_ms!r}")
        self.url, self.lease_ms, self.prefix = url, lease_ms, prefix
        self.owner = uuid.uuid4().hex
        self._db = valkey.Valkey.from_url("redis://" + url.split("://", 1)[1])
        self._db.ping()
        self._put, self._delete = self._db.register_script(_PUT), self._db.register_script(_DELETE)
        self._release, self._renew = self._db.register_script(_RELEASE), self._db.register_script(_RENEW)
        self._error = valkey.ResponseError

    def _row(self, uid: str) -> str:
        return f"{self.prefix}:session:{check_id(uid)}"

    def _lock(self, uid: str) -> str:
        return f"{self.prefix}:lock:{check_id(uid)}"

    def acquire(self, uid: str) -> None:
        if self._db.set(self._lock(uid), self.owner, nx=True, px=self.lease_ms):
            return
        if self._db.get(self._lock(uid)) != self.owner.encode():
            raise SessionHeld(f"session {uid!r} is held by another server process (its lease runs out "
                              f"{self._db.pttl(self._lock(uid))} ms from now unless that server renews it)")

    def release(self, uid: str) -> None:
        self._release(keys=[self._lock(uid)], args=[self.owner])

    def renew(self, uids) -> list:
        pipe = self._db.pipeline(transaction=False)
        uids = list(uids)
        for u in uids:
            self._renew(keys=[self._lock(u)], args=[self.owner, self.lease_ms], client=pipe)
        return [u for u, ok in zip(uids, pipe.execute()) if not ok]

    def get(self, uid: str) -> bytes | None:
        data, sha = self._db.hmget(self._row(uid), ["data", "sha256"])
        if data is None:
            return None
        if sha is None or digest(data) != sha.decode():
            raise CorruptRow(f"stored session {uid!r} in {self.url} fails its checksum")
        return data

    def put(self, uid: str, data: bytes, commits: int) -> str:
        sha = digest(data)
        try:
            self._put(keys=[self._row(uid), self._lock(uid)],
                      args=[self.owner, data, sha, int(commits), repr(time.time())])
        except self._error as e:
            raise RuntimeError(f"store refused the commit of {uid!r}: {e}") from None
        # the write is acknowledged once the server's append-only file has it on disk
        if self._db.execute_command("WAITAOF", 1, 0, 10000)[0] < 1:
            raise RuntimeError(f"the store did not confirm the commit of {uid!r} on disk within 10 s")
        return sha

    def delete(self, uid: str) -> bool:
        try:
            return bool(self._delete(keys=[self._row(uid), self._lock(uid)], args=[self.owner]))
        except self._error as e:
            raise RuntimeError(f"store refused to delete {uid!r}: {e}") from None

    def ids(self) -> list[str]:
        n = len(f"{self.prefix}:session:")
        return sorted(k.decode()[n:] for k in self._db.scan_iter(match=f"{self.prefix}:session:*", count=1000))

    def rows(self) -> dict[str, dict]:
        out = {}
        for uid in self.ids():
            data, sha, commits = self._db.hmget(self._row(uid), ["data", "sha256", "commits"])
            if data is not None:
                out[uid] = {"commits": int(commits or 0), "sha256": (sha or b"").decode(),
                            "ok": sha is not None and digest(data) == sha.decode()}
        return out

    def close(self) -> None:
        self._db.close()
