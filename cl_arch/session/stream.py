"""A continuous batch: one token at a time for a changing set of sessions, their states kept in one decoder.

A server decodes every active completion one token per step, rows joining and leaving at token boundaries
(``cl_arch.serve.engine``). ``Session.batch_generate(..., max_new_tokens=1)`` per step reads and writes each
session's whole :class:`~cl_arch.state.ModelState` every token (the forward path). :class:`BatchStream` instead
loads the sessions' states into a cached :class:`~cl_arch.decode.Decoder` of the batch's size once and leaves
them there between steps, so a step is one :meth:`Decoder.step`; the states are loaded again only when the set
of sessions changes (a completion joins, with its prompt read by the forward, or leaves), and taken back when
anything reads a session's ``state`` (each session's ``_live`` is a row handle whose ``state()`` takes every
row back), when the decoder is needed by another holder, or on :meth:`BatchStream.release`.

A step that fails leaves every session as it was before the step: each row's tokens since its last load are
fed again on the forward path from the state it was loaded with. A key that fires more features than the
decoder keeps does the same, then runs the step on the forward path.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from ..decode.slots import VerdictSlot
from . import batching, decoding
from .inputs import _as_ids, _check_logits, _check_sampling
from .sampling import _sample


class _Row:
    """A session's ``_live``: its newest state is row ``i`` of the stream's decoder."""

    __slots__ = ("stream", "i")

    def __init__(self, stream: "BatchStream", i: int) -> None:
        self.stream, self.i = stream, i

    def state(self):
        return self.stream._take_back(self.i)


class BatchStream:
    """One token per step for the sessions given to each :meth:`step` (see the module docstring).

    The sessions of one step must share a model, ``lam`` and ``decoder`` setting; the stream falls back to
    ``Session.batch_generate(..., max_new_tokens=1)`` where no decoder applies (``decoder=None``, a model the
    decoder does not cover, retrofit rows at different positions).
    """

    def __init__(self) -> None:
        self.dec = None
        self.sessions: List[Any] = []
        self.rows: List[_Row] = []
        self.marks: List[tuple] = []  # each row's session mark when it was loaded
        self.fed: List[List[int]] = []  # each row's tokens since
        self.capacity = 0  # the decoder's rows (sessions first, then spare rows)

    # ------------------------------------------------------------------ holding the states
    def _decoder_evicted(self, decoder) -> None:
        """The decoder cache gives the decoder to another holder: take the rows back first."""
        if decoder is self.dec:
            self.release()

    def _live(self) -> bool:
        return self.dec is not None and all(s._live is r for s, r in zip(self.sessions, self.rows))

    def release(self) -> None:
        """Take every row's state back into its session (new tensors) and let the decoder go."""
        self._give_back(dump=False)

    def _take_back(self, i: int):
        """Row ``i``'s state, after every row went back to its session (a session read its ``state``)."""
        if self.dec is None:
            raise RuntimeError("this stream no longer holds a decoder")
        return self._give_back(dump=True)[i]

    def _give_back(self, dump: bool):
        """Every row still live goes back to its session; the rows' states (None when nothing was dumped:
        no decoder, or no live row and ``dump`` False)."""
        dec, sessions, rows = self.dec, self.sessions, self.rows
        self.dec, self.sessions, self.rows, self.marks, self.fed = None, [], [], [], []
        held = [(s, r) for s, r in zip(sessions, rows) if s._live is r]
        if dec is None or not (held or dump):
            return None
        states = dec.row_states()
        for s, r in held:
            s._live, s._state = None, states[r.i]
        return states

    # ------------------------------------------------------------------ one step
    def step(self, sessions: Sequence[Any], prompts: Sequence[Any], n_left: Sequence[int], temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None) -> List[int]:
        """One new token for each session, after its prompt (empty for a session continuing from the last step).

        Args:
            sessions: the batch, in any order (a session's row follows it).
            prompts: token ids per session, read before its token (list, 1-D tensor or empty).
            n_left: tokens each session may still ask for, this one included (sizes the KV buffer).
            temperature, top_k, top_p: sampling, as :meth:`Session.generate`.

        Returns:
            One token id per session.

        Raises:
            ValueError: bad arguments, or non-finite logits; every session is then as before the call.
        """
        sessions = list(sessions)
        if not sessions or len(prompts) != len(sessions) or len(n_left) != len(sessions):
            raise ValueError(f"step: {len(sessions)} sessions, {len(prompts)} prompts, {len(n_left)} n_left")
        _check_sampling(1, temperature, top_k, top_p)
        model = sessions[0].model
        parsed = [_as_ids(p, model.config.vocab_size, f"prompts[{i}]", allow_empty=True)
                  for i, p in enumerate(prompts)]
        same = self._live() and [id(s) for s in sessions] == [id(s) for s in self.sessions] and \
            all(p.shape[1] == 0 for p in parsed) and decoding.still_current(model, self.dec)
        pre = None  # the sessions before this call's prompts, where it reads any
        if not same:
            self.release()
            if len({id(s) for s in sessions}) != len(sessions):
                raise ValueError("step: a session appears twice")
            for i, (s, p) in enumerate(zip(sessions, parsed)):
                if p.shape[1] == 0 and s._next_logits is None:
                    raise ValueError(f"prompts[{i}] is empty and session {i} has no tokens to continue from")
            pre = [s._mark() for s in sessions]
        try:
            if not same and not self._load(sessions, parsed, max(n_left)):
                return self._forward_step(sessions, temperature, top_k, top_p)
            rngs = [s._rng.get_state() for s in self.sessions]
            try:
                return self._decode(float(temperature), top_k, top_p)
            except decoding._Redo:
                self._undo(rngs)
            except BaseException:
                self._undo(rngs)
                raise
            return self._forward_step(sessions, temperature, top_k, top_p)
        except BaseException:
            for s, m in zip(sessions, pre or []):
                s._back_to(m)
            raise

    @staticmethod
    def _forward_step(sessions: list, temperature: float, top_k, top_p) -> List[int]:
        """This step on the forward path (``Session.batch_generate`` of one token, the prompts already read)."""
        out = batching.batch_generate(sessions, [[]] * len(sessions), 1, temperature, top_k, top_p)
        return [row[0] for row in out]

    def _load(self, sessions: list, parsed: list, n_left: int) -> bool:
        """Read the prompts (the forward) and load every session into a decoder; False: no decoder applies
        (the prompts are read either way)."""
        batching.read_prompts(sessions, parsed)
        if len({s.decoder for s in sessions}) != 1 or sessions[0].decoder is None:
            return False
        positions = {s.state.position for s in sessions}
        n = len(sessions)
        cap = self._capacity(n)
        dec = decoding.acquire(sessions[0], cap, n_left, max(positions), holder=self)
        if dec is not None and not dec.rows_own_positions and cap > n:  # its rows share a position: no padding
            cap = n
            dec = decoding.acquire(sessions[0], cap, n_left, max(positions), holder=self)
        if dec is None or (len(positions) > 1 and not dec.rows_own_positions):
            return False
        pad = [sessions[0].model.init_state(1)] * (cap - n)
        dec.load_rows([s.state for s in sessions] + pad)
        self.capacity = cap
        self.dec, self.sessions = dec, sessions
        self.rows = [_Row(self, i) for i in range(len(sessions))]
        self.marks = [s._mark() for s in sessions]
        self.fed = [[] for _ in sessions]
        for s, r in zip(sessions, self.rows):
            s._live = r
        return True

    def _capacity(self, n: int) -> int:
        """The decoder's rows for ``n`` sessions: a power of two, kept while ``n`` stays above a quarter of the
        current one, so a batch that changes by a row or two reuses one decoder (and one compiled graph);
        the spare rows decode a fresh state, unread."""
        cap = getattr(self, "capacity", 0)
        if cap >= n and 4 * n > cap:
            return cap
        return 1 << max(n - 1, 0).bit_length()

    def _decode(self, temperature: float, top_k, top_p) -> List[int]:
        sessions, dec = self.sessions, self.dec
        n = len(sessions)
        toks = [_sample(s._next_logits, temperature, top_k, top_p, None, s._rng) for s in sessions]
        t = torch.tensor(toks + [0] * (dec.B - n), dtype=torch.long)
        verdict = [s for s in dec.slots if isinstance(s, VerdictSlot)]
        if verdict:
            policy = torch.stack([s._policy_logits(None) for s in sessions])
            if dec.B > n:
                policy = torch.cat([policy, policy.new_zeros(dec.B - n, policy.shape[1])])
            decoding._trace_step(verdict, t, policy)
        logits = decoding._step(sessions[0].model, dec, t)[:n]
        _check_logits(logits)
        if dec.overflowed():
            raise decoding._Redo("a key fired more features than the decoder keeps")
        for i, s in enumerate(sessions):
            s._record(t[i:i + 1], logits[i:i + 1].clone())
            self.fed[i].append(toks[i])
        return toks

    def _undo(self, rngs: list) -> None:
        """Every session back to before the failed step: its load-time mark, then its tokens since on the
        forward path; its generator as before the step's draw."""
        sessions, marks, fed = self.sessions, self.marks, self.fed
        for s in sessions:
            s._live = None
        self.dec, self.sessions, self.rows, self.marks, self.fed = None, [], [], [], []
        for s, m, f, g in zip(sessions, marks, fed, rngs):
            s._back_to(m)
            for tok in f:
                s._feed_generated(tok, None)
            s._rng.set_state(g)


__all__ = ["BatchStream"]
