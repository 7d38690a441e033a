"""Server settings (:class:`ServeConfig`), the errors a request can get (:class:`RequestError`),
and text <-> token ids for the byte vocabulary (the rules of ``cl_arch.hf.ClArchByteTokenizer``,
without importing transformers)."""
from __future__ import annotations

import codecs
from dataclasses import dataclass, fields

N_BYTES = 256


@dataclass
class ServeConfig:
    """Limits and behaviour of one server. Every limit refuses with a 4xx naming its field.

    Attributes:
        adapt: sessions adapt (False: the frozen control, P never changes).
        max_batch: most completions decoding at once; more wait in the queue.
        max_tokens: largest ``max_tokens`` a completion may ask for.
        max_prompt_tokens: longest prompt (and observed text), in tokens.
        max_request_bytes: largest request body.
        max_queue: most requests waiting in the engine (all users).
        max_user_queue: most requests of one user waiting.
        max_sessions: sessions held in memory; idle ones are evicted to make room.
        idle_episode_s: an idle session with an uncommitted episode may be evicted after this
            long (its episode is dropped, as a crash would); before, only sessions between
            episodes are evicted.
        threads: torch intra-op threads of the decode loop.
        decoder: how the sessions decode (``Session(decoder=...)``): ``"auto"`` (an eager decoder holding each
            sampling group's states between steps, the forward path where none applies), ``"compile"`` (the
            same decoder compiled: the first batch of each size compiles), ``"eager"``, or None (a forward per
            step, every state read and written each token).
    """
    adapt: bool = True
    max_batch: int = 64
    max_tokens: int = 256
    max_prompt_tokens: int = 8192
    max_request_bytes: int = 1 << 20
    max_queue: int = 1024
    max_user_queue: int = 16
    max_sessions: int = 4096
    idle_episode_s: float = 600.0
    threads: int = 1
    decoder: str | None = "auto"

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "decoder":
                if v not in ("auto", "eager", "compile", None):
                    raise ValueError(f"ServeConfig.decoder must be 'auto', 'eager', 'compile' or None, got {v!r}")
            elif f.name == "adapt":
                if not isinstance(v, bool):
                    raise ValueError(f"ServeConfig.adapt must be a bool, got {v!r}")
            elif f.name == "idle_episode_s":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                    raise ValueError(f"ServeConfig.idle_episode_s must be a number >= 0, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServeConfig.{f.name} must be an integer >= 1, got {v!r}")


class RequestError(Exception):
    """A refused request: HTTP ``status``, a message, and the ``code`` (the limit or rule broken,
    e.g. ``max_tokens``) and ``param`` (the request field) of an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def encode(text: str, vocab_size: int) -> list[int]:
    """UTF-8 bytes of ``text`` as ids ``[T]``. Prompts are plain text: ``<|extra_N|>`` is read as its
    characters, never as a special id (a user cannot inject one). RequestError if a byte is outside
    a vocabulary smaller than 256."""
    ids = list(text.encode("utf-8"))
    if vocab_size < N_BYTES and ids and max(ids) >= vocab_size:
        raise RequestError(400, f"the text holds byte {max(ids)}, outside the model's vocabulary of "
                           f"{vocab_size}", "vocabulary", "prompt")
    return ids


class Decoder:
    """Token ids -> text, incrementally: bytes as UTF-8 (a character split over tokens comes out
    whole once its last byte arrives; invalid bytes decode to U+FFFD) and ids >= 256 as
    ``<|extra_{id}|>``, as ``ClArchByteTokenizer.decode`` writes them."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tok: int) -> str:
        """Text completed by one more token (possibly empty)."""
        if tok < N_BYTES:
            return self._utf8.decode(bytes([tok]))
        return self._utf8.decode(b"", final=True) + f"<|extra_{tok}|>"

    def flush(self) -> str:
        """Whatever an unfinished character leaves (U+FFFD), at the end of a completion."""
        return self._utf8.decode(b"", final=True)
