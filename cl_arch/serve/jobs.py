"""What the engine queues and decodes: :class:`Job` (one request), the state of a completion being
decoded, the checks of completion arguments, and :func:`p_digest` (a session's P, bitwise)."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..session import Session
from .config import Decoder, RequestError, ServeConfig

KINDS = ("complete", "observe", "reward", "get", "delete")


@dataclass
class Job:
    """One request: ``kind`` (one of KINDS), the session id, its arguments, and callbacks the
    engine thread calls exactly once (``finish(result)`` or ``fail(RequestError)``); a streamed
    completion also gets ``on_text(piece)`` as text is produced."""
    kind: str
    uid: str
    args: dict[str, Any]
    finish: Callable[[dict[str, Any]], None]
    fail: Callable[[RequestError], None]
    on_text: Callable[[str], None] | None = None
    t: float = field(default_factory=time.monotonic)


@dataclass
class _Gen:
    """A completion being decoded."""
    job: Job
    session: Session
    prompt: list[int]
    decoder: Decoder = field(default_factory=Decoder)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0


def p_digest(session: Session) -> str:
    """sha256 over the raw bytes of every ``P`` (``[1, H, K, V]`` per fast layer): bitwise identity."""
    h = hashlib.sha256()
    for p in session.P:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_completion(args: dict[str, Any], vocab_size: int, config: ServeConfig) -> None:
    """RequestError (400, naming the field or limit) for completion arguments out of range."""
    prompt, n = args.get("prompt"), args.get("max_tokens")
    if not isinstance(prompt, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise RequestError(400, f"prompt must be token ids in [0, {vocab_size})", "prompt", "prompt")
    if len(prompt) > config.max_prompt_tokens:
        raise RequestError(400, f"prompt of {len(prompt)} tokens exceeds the server's limit "
                           f"max_prompt_tokens={config.max_prompt_tokens}", "max_prompt_tokens", "prompt")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(400, f"max_tokens must be an integer >= 1, got {n!r}", "max_tokens", "max_tokens")
    if n > config.max_tokens:
        raise RequestError(400, f"max_tokens={n} exceeds the server's limit max_tokens={config.max_tokens}",
                           "max_tokens", "max_tokens")
    t, p = args.get("temperature"), args.get("top_p")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not (0 <= t <= 100):
        raise RequestError(400, f"temperature must be a number in [0, 100], got {t!r}", "temperature", "temperature")
    if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not (0 < p <= 1)):
        raise RequestError(400, f"top_p must be in (0, 1], got {p!r}", "top_p", "top_p")
    stop = args.get("stop") or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
        raise RequestError(400, "stop must be at most 4 non-empty strings of at most 64 characters", "stop", "stop")
