"""The decode loop of a server: every user's requests, one thread, continuous batching.

One engine thread owns the model and every in-memory :class:`~cl_arch.Session`. Requests (jobs)
wait in one queue per user and are served in the order they came; across users the oldest head
job goes first. A completion joins the decode batch at the next token boundary and leaves it the
step it finishes, without waiting for the others: each step is one
:meth:`BatchStream.step <cl_arch.session.stream.BatchStream.step>` per group of sampling settings, so every row
carries its own state and P, the group's states staying loaded in one decoder from step to step.
Observations, rewards, reads and deletions run between steps. A reward is acknowledged only after
the store has written the user's new state (:meth:`cl_arch.serve.store.Store.put`).

Idle sessions are evicted to make room (``ServeConfig.max_sessions``): first those between
episodes, which come back from the store bitwise; a session holding an uncommitted episode only
after ``idle_episode_s`` (the episode is dropped, as a crash would drop it).
"""
from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import torch

from ..session import Session
from ..session.stream import BatchStream
from .config import RequestError, ServeConfig
from .jobs import KINDS, Job, _Gen, check_completion, p_digest
from .metrics import Metrics
from .store import CorruptRow, Store, check_id
from .valkey_store import SessionHeld

log = logging.getLogger("cl_arch.serve")


class Engine:
    """The decode loop and the sessions it holds (see the module docstring).

    Args:
        model: a PlasticModel (e.g. ``cl_arch.load_default()``), shared by every session, never modified.
        store: where commits go (:class:`~cl_arch.serve.store.Store`).
        config: limits and ``adapt``.
    """

    def __init__(self, model, store: Store, config: ServeConfig | None = None):
        self.model = getattr(model, "plastic_model", model)
        self.store = store
        self.config = config or ServeConfig()
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Job]] = {}
        self._pending = 0
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._last_used: dict[str, float] = {}
        self._active: dict[str, _Gen] = {}
        self._streams: dict[tuple, BatchStream] = {}  # per sampling setting: its sessions' states in one decoder
        # commits being written by the writer thread: uid -> (job, snapshot, start time); the user
        # is busy (its next request waits) until the store has the row
        self._writing: dict[str, tuple] = {}
        self._to_write: queue.Queue = queue.Queue()
        self._written: deque = deque()
        self._stopping = False
        self._renewed = time.monotonic()
        self._writer: threading.Thread | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the caller's side
    def start(self) -> Engine:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._run, name="cl_arch-serve-engine", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="cl_arch-serve-writer", daemon=True)
        self._thread.start()
        self._writer.start()
        return self

    def stop(self) -> None:
        """Stop the thread after its current step; waiting requests fail with 503; leases are released."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            for stream in self._streams.values():
                stream.release()
            self._to_write.put(None)
            self._writer.join()  # commits already handed to the store finish (and are acknowledged)
            self._finish_writes()
        with self._cond:
            jobs = [j for q in self._queues.values() for j in q] + [g.job for g in self._active.values()]
            self._queues.clear()
            self._active.clear()
            held = list(self._sessions)
        for uid in held:  # on a shared store, other processes may take these users at once
            try:
                self.store.release(uid)
            except Exception:  # the store may be gone too; the leases then run out on their own
                log.warning("could not release the lease of %r", uid, exc_info=True)
        for j in jobs:
            j.fail(RequestError(503, "the server is shutting down", "shutdown"))

    def submit(self, job: Job) -> None:
        """Queue ``job``; RequestError (400 bad id or arguments, 429 queue limits) if refused."""
        if job.kind not in KINDS:
            raise ValueError(f"unknown job kind {job.kind!r}; known: {KINDS}")
        try:
            check_id(job.uid)
        except ValueError as e:
            raise RequestError(400, str(e), "invalid_session_id", "user") from None
        if job.kind == "complete":
            check_completion(job.args, self.model.config.vocab_size, self.config)
        with self._cond:
            if self._stopping:
                raise RequestError(503, "the server is shutting down", "shutdown")
            if self._pending >= self.config.max_queue:
                self._reject("max_queue", f"{self._pending} requests are waiting: the server's limit "
                             f"max_queue={self.config.max_queue} is reached; retry later")
            q = self._queues.setdefault(job.uid, deque())
            if len(q) >= self.config.max_user_queue:
                self._reject("max_user_queue", f"session {job.uid!r} has {len(q)} requests waiting: the "
                             f"server's limit max_user_queue={self.config.max_user_queue} is reached")
            q.append(job)
            self._pending += 1
            self.metrics.queue = self._pending
            self._cond.notify_all()

    def call(self, kind: str, uid: str, timeout: float | None = None,
             on_text: Callable[[str], None] | None = None, **args) -> dict[str, Any]:
        """Submit a job and wait for its result (raises its RequestError): the blocking interface."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def finish(r):
            box["r"] = r
            done.set()

        def fail(e):
            box["e"] = e
            done.set()

        self.submit(Job(kind, uid, args, finish, fail, on_text))
        if not done.wait(timeout):
            raise TimeoutError(f"{kind} for {uid!r} did not finish in {timeout} s")
        if "e" in box:
            raise box["e"]
        return box["r"]

    def _reject(self, limit: str, message: str) -> None:
        self.metrics.count("rejected", limit)
        raise RequestError(429, message, limit)

    def status(self) -> dict[str, Any]:
        """What the status page shows: counts, tokens/s and per-user reward curves."""
        with self._cond:
            in_memory = list(self._sessions)
        return {"sessions_in_memory": len(in_memory), "tokens_per_s": self.metrics.tokens_per_s(),
                "active": self.metrics.active, "queue": self.metrics.queue, "adapt": self.config.adapt,
                "tokens_total": self.metrics.tokens_total, "commits_total": self.metrics.commits_total,
                "users": [dict(u, in_memory=u["id"] in in_memory) for u in self.metrics.users()]}

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        torch.set_num_threads(self.config.threads)
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._written and not self._ready():
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    return
            self._finish_writes()
            self._renew()
            with self._cond:
                ready = self._ready()
            for uid in ready:
                self._serve_user(uid)
            if self._active:
                self._step()

    def _ready(self) -> list[str]:
        """Users with a job that can start now, oldest head job first (call under the lock)."""
        room = len(self._active) < self.config.max_batch
        ready = [(q[0].t, uid) for uid, q in self._queues.items()
                 if q and uid not in self._active and uid not in self._writing
                 and (room or q[0].kind != "complete")]
        return [uid for _, uid in sorted(ready)]

    def _serve_user(self, uid: str) -> None:
        """Run ``uid``'s waiting jobs in order until one is a completion (it joins the batch)."""
        while True:
            with self._cond:
                q = self._queues.get(uid)
                if not q:
                    self._queues.pop(uid, None)
                    return
                job = q[0]
                busy = uid in self._active or uid in self._writing
                if busy or (job.kind == "complete" and len(self._active) >= self.config.max_batch):
                    return
                q.popleft()
                self._pending -= 1
                self.metrics.queue = self._pending
            try:
                if job.kind == "complete":
                    self._begin(job)
                    continue
                result = getattr(self, "_do_" + job.kind)(job)
                if result is not None:  # None: a reward, answered once the store has it
                    job.finish(result)
            except RequestError as e:
                job.fail(e)
            except Exception as e:  # a bug or the model failing: the request fails, the server goes on
                log.exception("%s for %r failed", job.kind, uid)
                job.fail(RequestError(500, f"{job.kind} failed: {e}", "internal_error"))

    # ------------------------------------------------------------------ sessions in memory
    def _session(self, uid: str, create: bool = True) -> Session | None:
        """``uid``'s session: in memory, else from the store, else new (None if not ``create``)."""
        s = self._sessions.get(uid)
        if s is None:
            self._acquire(uid)
            try:
                try:
                    data = self.store.get(uid)
                except CorruptRow as e:
                    raise RequestError(500, str(e), "corrupt_row") from None
                if data is None and not create:
                    self.store.release(uid)
                    return None
                self._make_room()
                if data is None:
                    s = Session(self.model, adapt=self.config.adapt, decoder=self.config.decoder)
                else:
                    s = Session.from_bytes(self.model, data, source=f"store:{uid}", adapt=self.config.adapt,
                                           decoder=self.config.decoder)
            except BaseException:
                self.store.release(uid)
                raise
            with self._cond:
                self._sessions[uid] = s
            self.metrics.sessions = len(self._sessions)
        with self._cond:
            self._sessions.move_to_end(uid)
        self._last_used[uid] = time.monotonic()
        return s

    def _make_room(self) -> None:
        """Evict idle sessions until one more fits; 429 ``max_sessions`` if none may go."""
        while len(self._sessions) >= self.config.max_sessions:
            now = time.monotonic()
            with self._cond:
                idle = [u for u in self._sessions
                        if u not in self._active and u not in self._writing and not self._queues.get(u)]
            victim = next((u for u in idle if self._sessions[u].episode_length == 0), None)
            if victim is None:
                victim = next((u for u in idle if now - self._last_used[u] >= self.config.idle_episode_s), None)
                if victim is None:
                    self._reject("max_sessions", f"{len(self._sessions)} sessions are in memory, none idle "
                                 f"between episodes: the server's limit max_sessions={self.config.max_sessions} "
                                 f"is reached (an open episode is evicted after idle_episode_s="
                                 f"{self.config.idle_episode_s} s)")
                self.metrics.episodes_dropped_total += 1
            self._evict(victim)

    def _acquire(self, uid: str) -> None:
        """Hold ``uid`` in the store (a shared store lets one server process hold a user at a time)."""
        try:
            self.store.acquire(uid)
        except SessionHeld as e:
            raise RequestError(409, f"{e}; send its requests to that server, or retry once it lets the session go",
                               "session_elsewhere") from None

    def _renew(self) -> None:
        """Extend the store leases of the sessions in memory; one this process lost is evicted."""
        now = time.monotonic()
        if now - self._renewed < getattr(self.store, "lease_ms", 30000) / 3000:
            return
        self._renewed = now
        for uid in self.store.renew(list(self._sessions)):
            if uid not in self._active and uid not in self._writing:
                log.warning("lease of session %r lost: evicting it", uid)
                if self._sessions[uid].episode_length:
                    self.metrics.episodes_dropped_total += 1
                self._evict(uid)

    def _evict(self, uid: str) -> None:
        self.store.release(uid)
        with self._cond:
            self._sessions.pop(uid, None)
        self._last_used.pop(uid, None)
        self.metrics.evictions_total += 1
        self.metrics.sessions = len(self._sessions)

    # ------------------------------------------------------------------ completions
    def _begin(self, job: Job) -> None:
        s = self._session(job.uid)
        if not job.args["prompt"] and s.episode_length == 0:
            raise RequestError(400, "prompt is empty and the session's episode has no tokens to continue from",
                               "empty_prompt", "prompt")
        with self._cond:
            self._active[job.uid] = _Gen(job, s, list(job.args["prompt"]))
        self.metrics.active = len(self._active)

    def _step(self) -> None:
        """One token for every active completion, one batch per sampling setting: each group's sessions stay
        loaded in one decoder from step to step (:class:`~cl_arch.session.stream.BatchStream`), reloaded when a
        completion joins or leaves the group."""
        groups: dict[tuple, list[_Gen]] = {}
        for g in list(self._active.values()):
            a = g.job.args
            groups.setdefault((float(a["temperature"]), a.get("top_p")), []).append(g)
        for key in [k for k in self._streams if k not in groups]:
            self._streams.pop(key).release()
        for (temperature, top_p), gens in groups.items():
            stream = self._streams.setdefault((temperature, top_p), BatchStream())
            try:
                toks = stream.step([g.session for g in gens], [g.prompt for g in gens],
                                   [g.job.args["max_tokens"] - len(g.ids) for g in gens],
                                   temperature=temperature, top_p=top_p)
            except Exception as e:  # every session is as it was before the call
                log.exception("decode step failed")
                for g in gens:
                    self._end(g, RequestError(500, f"decoding failed: {e}", "internal_error"))
                continue
            self.metrics.prompt_tokens_total += sum(len(g.prompt) for g in gens)
            self.metrics.step(len(gens), 1 if stream.dec is not None else self._forwards(gens))
            for g, tok in zip(gens, toks):
                g.prompt = []
                self._advance(g, tok)

    def _forwards(self, gens: list[_Gen]) -> int:
        """Forwards a step on the forward path ran for ``gens`` (after their prompts): one per position
        with attention layers (their caches need one length per batch), else one."""
        if all(m is not None for m in self.model.memories()):
            return 1
        return len({g.session.state.position for g in gens})

    def _advance(self, g: _Gen, tok: int) -> None:
        """Record one token; finish on a stop string or at ``max_tokens``; stream what is safe."""
        a = g.job.args
        g.ids.append(tok)
        g.text += g.decoder.feed(tok)
        stops = a.get("stop") or []
        reason = None
        hits = [i for i in (g.text.find(s) for s in stops) if i >= 0]
        if hits:
            g.text, reason = g.text[:min(hits)], "stop"
        elif len(g.ids) >= a["max_tokens"]:
            g.text, reason = g.text + g.decoder.flush(), "length"
        # text that may still become the start of a stop string is held back
        safe = len(g.text) if reason else len(g.text) - max((len(s) - 1 for s in stops), default=0)
        if g.job.on_text is not None and safe > g.sent:
            g.job.on_text(g.text[g.sent:safe])
            g.sent = safe
        if reason:
            s = g.session
            self._end(g, {"id": g.job.uid, "text": g.text, "finish_reason": reason,
                          "prompt_tokens": len(g.job.args["prompt"]), "completion_tokens": len(g.ids),
                          "token_ids": list(g.ids), "episode_length": s.episode_length})

    def _end(self, g: _Gen, result) -> None:
        with self._cond:
            self._active.pop(g.job.uid, None)
            self._cond.notify_all()
        self.metrics.active = len(self._active)
        if isinstance(result, RequestError):
            g.job.fail(result)
        else:
            g.job.finish(result)

    # ------------------------------------------------------------------ other requests
    def _do_observe(self, job: Job) -> dict[str, Any]:
        ids = job.args["ids"]
        if not ids:
            raise RequestError(400, "text is empty: nothing to observe", "empty_text", "text")
        if len(ids) > self.config.max_prompt_tokens:
            raise RequestError(400, f"text of {len(ids)} tokens exceeds the server's limit max_prompt_tokens="
                               f"{self.config.max_prompt_tokens}", "max_prompt_tokens", "text")
        s = self._session(job.uid)
        nll = [x for x in s.observe(ids).tolist() if not math.isnan(x)]
        self.metrics.prompt_tokens_total += len(ids)
        return {"id": job.uid, "tokens": len(ids), "episode_length": s.episode_length,
                "bits_per_token": sum(nll) / len(nll) / math.log(2) if nll else None}

    def _do_reward(self, job: Job) -> None:
        """Commit, then hand the session to the writer thread; the answer comes once the store
        has it (:meth:`_finish_writes`), and the user's next request waits until then."""
        r = job.args.get("reward")
        s = self._session(job.uid, create=False)
        if s is None:
            raise RequestError(404, f"no session {job.uid!r}", "no_session", "id")
        if s.episode_length == 0:
            raise RequestError(400, f"session {job.uid!r} has no episode to reward (nothing observed or "
                               "generated since its last commit)", "no_episode", "reward")
        snap = s._snapshot_refs()  # the commit replaces what it changes; rollback restores copies
        t0 = time.perf_counter()
        try:
            if r is None:
                s.end_episode()
            else:
                s.reward(r)
        except ValueError as e:
            raise RequestError(400, str(e), "invalid_reward", "reward") from None
        with self._cond:
            self._writing[job.uid] = (job, snap, t0)
        self._to_write.put((job.uid, s))

    def _write_loop(self) -> None:
        """The writer thread: serialise and store each handed-over session, in order. Decoding
        goes on meanwhile (the file write and fsync release the GIL)."""
        while True:
            item = self._to_write.get()
            if item is None:
                return
            uid, s = item
            try:
                out = self.store.put(uid, s.to_bytes(), s.episodes)
            except Exception as e:  # answered as a 503 by the engine thread
                log.exception("store write for %r failed", uid)
                out = e
            with self._cond:
                self._written.append((uid, s, out))
                self._cond.notify_all()

    def _finish_writes(self) -> None:
        """Answer the rewards whose rows the writer stored (or roll back those it could not)."""
        while True:
            with self._cond:
                if not self._written:
                    return
                uid, s, out = self._written.popleft()
                job, snap, t0 = self._writing.pop(uid)
            if isinstance(out, Exception):
                s.rollback(snap)  # not stored, so not committed: the episode is still open
                job.fail(RequestError(503, f"the store could not write the commit ({out}); the episode is "
                                      "still open, retry the reward", "store_write"))
                continue
            self.metrics.commit(uid, time.perf_counter() - t0, job.args.get("reward"))
            job.finish(dict(self._describe(uid, s), committed=True, stored_sha256=out))

    def _do_get(self, job: Job) -> dict[str, Any]:
        s = self._sessions.get(job.uid)
        try:
            data = self.store.get(job.uid)
        except CorruptRow as e:
            raise RequestError(500, str(e), "corrupt_row") from None
        if s is None:
            if data is None:
                raise RequestError(404, f"no session {job.uid!r}", "no_session", "id")
            s = Session.from_bytes(self.model, data, source=f"store:{job.uid}", adapt=self.config.adapt,
                                           decoder=self.config.decoder)
        out = self._describe(job.uid, s)
        out["in_memory"] = job.uid in self._sessions
        out["stored_sha256"] = None if data is None else hashlib.sha256(data).hexdigest()
        return out

    def _do_delete(self, job: Job) -> dict[str, Any]:
        in_memory = job.uid in self._sessions
        if not in_memory:
            self._acquire(job.uid)
        try:
            stored = self.store.delete(job.uid)
        finally:
            if in_memory:
                self._evict(job.uid)
                self.metrics.evictions_total -= 1  # a deletion, not an eviction
            else:
                self.store.release(job.uid)
        self.metrics.forget(job.uid)
        return {"id": job.uid, "deleted": in_memory or stored}

    def _describe(self, uid: str, s: Session) -> dict[str, Any]:
        return {"id": uid, "adapt": s.adapt, "episodes": s.episodes, "rewards": s.rewards,
                "reward_sum": s.reward_sum, "baseline": s.baseline, "episode_length": s.episode_length,
                "p_sha256": p_digest(s)}
