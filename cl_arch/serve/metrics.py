"""Counters of a running server, its per-user reward curves, and the Prometheus text format."""
from __future__ import annotations

import threading
import time
from collections import deque

# Commit latency histogram buckets (seconds): an fsynced SQLite write is ~1-20 ms on a disk.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_RATE_WINDOW_S = 10.0
_CURVE_LEN = 50


class Metrics:
    """What ``/metrics`` and the status page show. Written by the engine thread, read by the app."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.tokens_total = 0
        self.prompt_tokens_total = 0
        self.steps_total = 0
        self.forwards_total = 0
        self.batch_rows_total = 0
        self.last_batch = 0
        self.commits_total = 0
        self.commit_sum_s = 0.0
        self.commit_buckets = [0] * len(_BUCKETS)
        self.rejected: dict[str, int] = {}
        self.requests: dict[tuple[str, int], int] = {}
        self.evictions_total = 0
        self.episodes_dropped_total = 0
        self.queue = 0
        self.sessions = 0
        self.active = 0
        self._recent: deque[tuple[float, int]] = deque()
        # per user: deque of recent rewards (the acceptance curve) and running (EMA) reward
        self.curves: dict[str, deque[float]] = {}
        self.running: dict[str, float] = {}

    def step(self, rows: int, forwards: int) -> None:
        """One decode step of ``rows`` sessions (one token each) in ``forwards`` batched forwards."""
        now = time.time()
        with self._lock:
            self.steps_total += 1
            self.forwards_total += forwards
            self.batch_rows_total += rows
            self.last_batch = rows
            self.tokens_total += rows
            self._recent.append((now, rows))
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last 10 s."""
        now = time.time()
        with self._lock:
            n = sum(k for t, k in self._recent if t >= now - _RATE_WINDOW_S)
        return n / min(_RATE_WINDOW_S, max(now - self.started, 1e-9))

    def commit(self, uid: str, seconds: float, reward) -> None:
        """A commit stored in ``seconds``; ``reward`` (or None) joins the user's curve."""
        with self._lock:
            self.commits_total += 1
            self.commit_sum_s += seconds
            for i, b in enumerate(_BUCKETS):
                if seconds <= b:
                    self.commit_buckets[i] += 1
            if reward is not None:
                self.curves.setdefault(uid, deque(maxlen=_CURVE_LEN)).append(float(reward))
                prev = self.running.get(uid)
                self.running[uid] = float(reward) if prev is None else 0.9 * prev + 0.1 * float(reward)

    def forget(self, uid: str) -> None:
        """A deleted user's curve goes with it."""
        with self._lock:
            self.curves.pop(uid, None)
            self.running.pop(uid, None)

    def count(self, table: str, key) -> None:
        """+1 to ``rejected[limit]`` or ``requests[(endpoint, status)]``."""
        with self._lock:
            d = getattr(self, table)
            d[key] = d.get(key, 0) + 1

    def users(self) -> list[dict]:
        """Per user with a reward: running reward and recent rewards."""
        with self._lock:
            return [{"id": u, "running_reward": self.running[u], "rewards": list(c)}
                    for u, c in sorted(self.curves.items())]

    def prometheus(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        tps = self.tokens_per_s()
        with self._lock:
            lines = []

            def metric(name, kind, help_, samples):
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, v in samples:
                    lab = "{" + ",".join(f'{k}="{val}"' for k, val in labels) + "}" if labels else ""
                    lines.append(f"{name}{lab} {v}")

            metric("cl_arch_tokens_generated_total", "counter", "tokens generated", [((), self.tokens_total)])
            metric("cl_arch_prompt_tokens_total", "counter", "prompt and observed tokens read",
                   [((), self.prompt_tokens_total)])
            metric("cl_arch_tokens_per_second", "gauge", "tokens generated per second, last 10 s", [((), round(tps, 3))])
            metric("cl_arch_decode_steps_total", "counter", "batched decode steps", [((), self.steps_total)])
            metric("cl_arch_decode_forwards_total", "counter", "batched forwards (attention models decode sessions "
                   "at different positions in separate forwards)", [((), self.forwards_total)])
            metric("cl_arch_batch_rows_total", "counter", "rows over all decode steps (mean batch = this / steps)",
                   [((), self.batch_rows_total)])
            metric("cl_arch_batch_size", "gauge", "rows in the last decode step", [((), self.last_batch)])
            metric("cl_arch_queue_length", "gauge", "requests waiting in the engine", [((), self.queue)])
            metric("cl_arch_active_completions", "gauge", "completions decoding", [((), self.active)])
            metric("cl_arch_sessions_in_memory", "gauge", "sessions held in memory", [((), self.sessions)])
            metric("cl_arch_evictions_total", "counter", "sessions evicted from memory", [((), self.evictions_total)])
            metric("cl_arch_episodes_dropped_total", "counter", "uncommitted episodes dropped by eviction",
                   [((), self.episodes_dropped_total)])
            metric("cl_arch_commits_total", "counter", "commits stored", [((), self.commits_total)])
            lines += ["# HELP cl_arch_commit_latency_seconds commit + store write time",
                      "# TYPE cl_arch_commit_latency_seconds histogram"]
            lines += [f'cl_arch_commit_latency_seconds_bucket{{le="{b}"}} {c}'
                      for b, c in zip(_BUCKETS, self.commit_buckets)]
            lines.append(f'cl_arch_commit_latency_seconds_bucket{{le="+Inf"}} {self.commits_total}')
            lines.append(f"cl_arch_commit_latency_seconds_sum {self.commit_sum_s}")
            lines.append(f"cl_arch_commit_latency_seconds_count {self.commits_total}")
            metric("cl_arch_requests_rejected_total", "counter", "requests refused, by limit",
                   [((("limit", k),), v) for k, v in sorted(self.rejected.items())])
            metric("cl_arch_requests_total", "counter", "requests answered, by endpoint and status",
                   [((("endpoint", e), ("status", str(s))), v) for (e, s), v in sorted(self.requests.items())])
        return "\n".join(lines) + "\n"
