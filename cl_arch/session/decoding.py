"""Generation through a :class:`~cl_arch.decode.Decoder` (``Session(decoder=...)``; docs/design.md, "Decoding").

The prompt is read by the model's chunked forward as before; the sampled tokens then run
:meth:`Decoder.step` on buffers that hold the session's state (loaded once per call), instead of one
``model(ids[:, t:t+1], state)`` per token that returns a new ``ModelState``. The bookkeeping per token is
``Session._record`` (the same ids, NLL and next-token logits as ``_absorb``), the verdict trace's steps
(the memory's own ``policy_gradient``, as ``_policy_gradients`` / ``_add_traces`` take them) are queued on the
decoder's slot and added in one product when the session's ``state`` is taken back with ``Decoder.state()``
(the same sum in another order: equal to float rounding).

While a stream is between tokens the decoder's buffers are the session's newest state (``Session._live``):
reading ``session.state`` takes it back then (so a stream the caller stops iterating leaves the session
consistent), and another session that needs the same cached decoder makes this one take it back first.
Anything the decoder cannot do exactly (a key firing more features than it keeps, an error in a step) is
redone on the forward path from the call's start: the tokens already produced are fed again one by one and
the rest of the call decodes as before.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..decode import Decoder
from ..decode.cache import cached_decoder, decoder_unsupported, still_current
from ..decode.slots import VerdictSlot
from .inputs import _check_logits
from .sampling import _sample

DECODER_MODES = ("auto", "eager", "compile", None)
# Loading a session's state into a decoder and taking it back cost about two forward steps of the shipped
# model (benchmarks/bench_session.py's figures): a one-token call stays on the forward path.
MIN_NEW_TOKENS = 2


def check_mode(mode: Any) -> str | None:
    """``mode`` if it is one of :data:`DECODER_MODES`, else ValueError."""
    if not (mode is None or (isinstance(mode, str) and mode in DECODER_MODES)):
        raise ValueError(f"decoder must be one of {list(DECODER_MODES)}, got {mode!r}")
    return mode


class _Redo(Exception):
    """The decoder's step was not exact (a key fired more features than it keeps)."""


def _max_len(model, position: int, n_new: int) -> int | None:
    """The KV buffer an attention layer without a window needs (a power of two, so calls share decoders);
    a model without ``blocks`` (a retrofit's base) is taken to attend without a window."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None and all(getattr(b.mixer, "window", 1) is not None for b in blocks):
        return None
    need = position + n_new + 1
    return max(256, 1 << (need - 1).bit_length())


def acquire(session, batch_size: int, n_new: int, position: int, holder=None) -> Decoder | None:
    """The cached decoder ``session``'s settings ask for (held by ``holder``, default the session), or None
    for the forward path (``decoder=None``, or ``"auto"`` on a model the decoder does not cover).

    Raises:
        ValueError: ``decoder="eager"`` or ``"compile"`` on a model the decoder cannot decode.
    """
    mode = session.decoder
    if mode is None:
        return None
    model = session.model
    why = decoder_unsupported(model)
    if why is None:
        try:
            return cached_decoder(model, batch_size, session if holder is None else holder,
                                  lam=session._lam_arg(), compile=False if mode in ("auto", "eager") else "auto",
                                  max_len=_max_len(model, position, n_new))
        except ValueError as e:
            why = str(e)
    if mode == "auto":
        return None
    raise ValueError(f"Session(decoder={mode!r}): {why} (decoder='auto' falls back to the forward path)")


def _hold(session, dec: Decoder | None, n_left: int) -> Decoder:
    """A decoder whose buffers hold ``session``'s current state: ``dec`` if still so, else a (re)loaded one."""
    if dec is not None and session._live is dec and still_current(session.model, dec):
        return dec
    state = session.state  # takes the state back from a decoder first, if one holds it
    dec = acquire(session, 1, n_left, state.position)
    if dec is None:
        raise _Redo("the decoder no longer applies")
    dec.load_state(state)
    session._live = dec
    return dec


def _reinforce(session, dec: Decoder, tok: torch.Tensor, allowed: torch.Tensor | None) -> None:
    """The verdict traces' step for ``tok [1]`` drawn from ``session._next_logits``: ``_policy_gradients``
    then ``_add_traces``, on the decoder's trace buffers (the key is the last position read's)."""
    slots = [s for s in dec.slots if isinstance(s, VerdictSlot)]
    if not slots:
        return
    _trace_step(slots, tok, session._policy_logits(allowed)[None])


def _trace_step(slots: list, tok: torch.Tensor, logits: torch.Tensor) -> None:
    """``E += phi (e(tok) - softmax(logits))^T`` on each verdict slot's trace, every row at once (``tok [B]``,
    ``logits [B, V]`` the policy the draw followed, not overwritten later; a row's key is its own): queued
    (:meth:`VerdictSlot.defer`) and added when the decoder's state is taken back."""
    for slot in slots:
        slot.defer(tok, logits)


def _step(model, dec: Decoder, tok: torch.Tensor) -> torch.Tensor:
    if not model.training:
        return dec.step(tok)
    model.eval()  # the decoder calls the model's modules: no dropout (batching._eval_mode, which imports this)
    try:
        return dec.step(tok)
    finally:
        model.train(True)


def _redo(session, base: tuple, fed: list[int], allowed: torch.Tensor | None) -> None:
    """Back to ``base`` (a ``_mark`` after the prompt), then feed ``fed`` on the forward path; the generator
    keeps its current state (those tokens were drawn already)."""
    rng = session._rng.get_state()
    session._back_to(base)
    session._rng.set_state(rng)
    session._own_trace()
    for t in fed:
        session._feed_generated(t, allowed)


def generate_tokens(session, max_new_tokens: int, temperature: float, top_k, top_p,
                    allowed: torch.Tensor | None, gen: torch.Generator, stream: bool) -> Iterator[int]:
    """The sampled tokens of :meth:`Session.generate` after its prompt, decoded with the session's cached
    decoder (:func:`acquire` returned one); falls back to the forward path for the rest of the call where the
    decoder cannot go on exactly."""
    base = session._mark()
    dec: Decoder | None = None
    fed: list[int] = []
    check = True  # whether user code may have run (weights changed, state read) since the last token
    forward = False
    for i in range(max_new_tokens):
        tok = _sample(session._next_logits, temperature, top_k, top_p, allowed, gen)
        if not forward:
            try:
                if check:
                    dec = _hold(session, dec, max_new_tokens - i)
                t = torch.tensor([tok])
                _reinforce(session, dec, t, allowed)
                logits = _step(session.model, dec, t)
                _check_logits(logits)
                if dec.overflowed():
                    raise _Redo("a key fired more features than the decoder keeps")
                session._record(t, logits.clone())
            except BaseException as e:
                session._live = None
                _redo(session, base, fed, allowed)
                if not isinstance(e, Exception):
                    raise
                forward = True
        if forward:
            session._feed_generated(tok, allowed)
        fed.append(tok)
        if stream:
            yield tok
            check = True
        else:
            check = False
            yield tok
    if session._live is not None:
        session._sync()


class _BatchHolder:
    """Holds a batch decoder for one :func:`batch_tokens` call (which takes every row back before returning)."""

    def _decoder_evicted(self, decoder: Decoder) -> None:
        pass


def batch_decoder(sessions: list, n_new: int) -> Decoder | None:
    """A decoder for ``sessions`` decoding together (:meth:`Session.batch_generate` after the prompts), or None
    for the forward path: settings differ, a model the decoder does not cover under ``"auto"``, or one token
    (loading and taking back cost more). Sessions at different positions share it: each row keeps its own
    (:meth:`Decoder.load_rows`)."""
    modes = {s.decoder for s in sessions}
    if n_new < MIN_NEW_TOKENS or len(modes) != 1 or None in modes:
        return None
    positions = {s.state.position for s in sessions}
    dec = acquire(sessions[0], len(sessions), n_new, max(positions), holder=_BatchHolder())
    if dec is not None and len(positions) > 1 and not dec.rows_own_positions:
        return None  # a decoder whose rows share one position (a retrofit's StaticCache)
    return dec


def batch_tokens(sessions: list, dec: Decoder, max_new_tokens: int, temperature: float, top_k, top_p,
                 allowed: torch.Tensor | None, gens: list) -> list[list[int]]:
    """The sampled tokens of :meth:`Session.batch_generate` after the prompts, every row decoded by ``dec``
    (batch size ``len(sessions)``); each session's state is taken back at the end.

    Raises:
        _Redo: a key fired more features than the decoder keeps; the caller returns every session (and
            generator) to where it was after its prompt and decodes on the forward path.
    """
    model = sessions[0].model
    dec.load_rows([s.state for s in sessions])
    verdict = [s for s in dec.slots if isinstance(s, VerdictSlot)]
    out: list[list[int]] = [[] for _ in sessions]
    for _ in range(max_new_tokens):
        toks = [_sample(s._next_logits, temperature, top_k, top_p, allowed, g) for s, g in zip(sessions, gens)]
        t = torch.tensor(toks, dtype=torch.long)
        if verdict:  # _policy_gradients then _add_traces
            _trace_step(verdict, t, torch.stack([s._policy_logits(allowed) for s in sessions]))
        logits = _step(model, dec, t)
        _check_logits(logits)
        if dec.overflowed():
            raise _Redo("a key fired more features than the decoder keeps")
        for i, s in enumerate(sessions):
            s._record(t[i:i + 1], logits[i:i + 1].clone())
            out[i].append(toks[i])
    for s, row in zip(sessions, dec.row_states()):  # new tensors per row: no session holds a view of another's
        s.state = row
    return out


__all__ = ["DECODER_MODES", "MIN_NEW_TOKENS", "acquire", "batch_decoder", "batch_tokens", "check_mode", "generate_tokens"]
