"""A continuous batch: one token at a time for a changing set of sessions, their states kept in one decoder.

A server decodes every active completion one token per step, rows joining and leaving at token boundaries
(``cl_arch.serve.engine``). ``Session.batch_generate(..., max_new_tokens=1)`` per step reads and writes each
session's whole :class:`~cl_arch.state.ModelState` every token (the forward path). :class:`BatchStream` instead
loads the sessions' states into a cached :class:`~cl_arch.decode.Decoder` of the batch's size once and leaves
them there between steps, so a step is one :meth:`Decoder.step`. When the set of sessions changes (a completion
joins, with its prompt read by the forward, or leaves) only the rows that change move: a leaving session's row is
taken back (:meth:`Decoder.row_state`), a joining one loaded into a free row (:meth:`Decoder.load_row`), the
others stay where they are; the whole batch is loaded again only when the decoder's size must change. States are
taken back when anything reads a session's ``state`` (each session's ``_live`` is a row handle whose ``state()``
takes every row back), when the decoder is needed by another holder, or on :meth:`BatchStream.release`.

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

    swap_rows = True  # False: every change of the batch reloads all of it (as before load_row; benchmarks compare)

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
        return self._give_back(dump=True, row=i)[i]

    def _give_back(self, dump: bool, row: int | None = None):
        """Every row still live goes back to its session; the rows' states by row (None when nothing was
        dumped: no decoder, or no live row and ``dump`` False), ``row`` among them (the row of the session
        asking, which has already let go of its handle)."""
        dec, sessions, rows = self.dec, self.sessions, self.rows
        self.dec, self.sessions, self.rows, self.marks, self.fed = None, [], [], [], []
        held = [(s, r) for s, r in zip(sessions, rows) if s._live is r]
        if dec is None or not (held or dump):
            return None
        dec.check_overflow()
        wanted = {r.i for _, r in held} | ({row} if row is not None else set())
        states = {i: dec.row_state(i) for i in sorted(wanted)}  # the held rows only: spare rows are never read
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
        pre = None  # the sessions before this call's prompts, where it reads any (None: a row that stays)
        swap = False
        if not same:
            if len({id(s) for s in sessions}) != len(sessions):
                raise ValueError("step: a session appears twice")
            for i, (s, p) in enumerate(zip(sessions, parsed)):
                if p.shape[1] == 0 and s._next_logits is None:
                    raise ValueError(f"prompts[{i}] is empty and session {i} has no tokens to continue from")
            stay = self._staying(sessions, parsed, max(n_left))
            swap = stay is not None
            if swap:
                self._let_go([s for s, r in self._held() if id(s) not in stay])
            else:
                self.release()
            pre = [None if id(s) in (stay or {}) else s._mark() for s in sessions]
        try:
            if swap:
                self._swap(sessions, parsed, stay)
            elif not same and not self._load(sessions, parsed, max(n_left)):
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
                if m is not None:
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

    # ------------------------------------------------------------------ rows that join and leave
    def _held(self) -> list:
        """``(session, row)`` of every session whose newest state is still a row of the decoder."""
        return [(s, r) for s, r in zip(self.sessions, self.rows) if s._live is r]

    def _staying(self, sessions: list, parsed: list, n_left: int) -> dict | None:
        """The held sessions that keep their rows this step (``id -> index in self.sessions``), or None when
        the batch must be loaded again: no decoder held, weights changed, a decoder whose rows share a
        position, the batch's size outside the decoder's (:meth:`_capacity`), no session staying, or a KV buffer
        too short."""
        dec = self.dec
        if not self.swap_rows or dec is None or not dec.rows_own_positions or \
                not decoding.still_current(sessions[0].model, dec):
            return None
        if self._capacity(len(sessions)) != self.capacity or len({s.decoder for s in sessions}) != 1:
            return None
        index = {id(s): j for j, (s, r) in enumerate(zip(self.sessions, self.rows)) if s._live is r}
        stay = {id(s): index[id(s)] for s, p in zip(sessions, parsed) if id(s) in index and p.shape[1] == 0}
        if not stay:  # nothing to keep; and the sessions of a step share their settings with the rows that stay,
            return None  # so with none staying the decoder held may not be the one these sessions ask for
        if dec.max_len is not None:
            # a held session's position is its row's (reading its state would take every row back)
            ends = [(dec.positions[self.rows[index[id(s)]].i] if id(s) in index else s.state.position) + p.shape[1]
                    for s, p in zip(sessions, parsed)]
            if max(ends) + n_left > dec.max_len:
                return None
        return stay

    def _let_go(self, leaving: list) -> None:
        """Each of ``leaving`` (held sessions) takes its row's state back; the row becomes free."""
        if leaving:
            self.dec.check_overflow()
        for s in leaving:
            s._state, s._live = self.dec.row_state(s._live.i), None

    def _swap(self, sessions: list, parsed: list, stay: dict) -> None:
        """This step's batch in the decoder held: staying rows untouched, the others' prompts read and their
        states loaded into free rows, those that sessions left first (a left row no session takes gets a fresh
        state: nothing it decodes is read, but a stale key could overflow the step)."""
        dec, model = self.dec, sessions[0].model
        old_rows, old_marks, old_fed = self.rows, self.marks, self.fed
        joining = [(s, p) for s, p in zip(sessions, parsed) if id(s) not in stay]
        batching.read_prompts([s for s, _ in joining], [p for _, p in joining])
        taken = {old_rows[j].i for j in stay.values()}
        left = {r.i for r in old_rows} - taken  # rows whose sessions left: their stale states go
        free = sorted(left) + [i for i in range(dec.B) if i not in taken and i not in left]
        place = {id(s): free[k] for k, (s, _) in enumerate(joining)}
        for s, _ in joining:  # every row written before any session is handed a row
            dec.load_row(place[id(s)], s.state)
        pad = model.init_state(1)
        for i in free[len(joining):]:
            if i in left:  # spare rows that never held a session hold a fresh state already
                dec.load_row(i, pad)
        rows, marks, fed = [], [], []
        for s in sessions:
            if id(s) in stay:
                j = stay[id(s)]
                rows.append(old_rows[j])
                marks.append(old_marks[j])
                fed.append(old_fed[j])
            else:
                rows.append(_Row(self, place[id(s)]))
                marks.append(s._mark())
                fed.append([])
        self.sessions, self.rows, self.marks, self.fed = sessions, rows, marks, fed
        for s, r in zip(sessions, rows):
            s._live = r

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
        at = torch.tensor([r.i for r in self.rows], dtype=torch.long)  # each session's row
        toks = [_sample(s._next_logits, temperature, top_k, top_p, None, s._rng) for s in sessions]
        t = torch.zeros(dec.B, dtype=torch.long)  # free rows decode token 0, never read
        t[at] = torch.tensor(toks, dtype=torch.long)
        verdict = [s for s in dec.slots if isinstance(s, VerdictSlot)]
        if verdict:
            mine = torch.stack([s._policy_logits(None) for s in sessions])
            policy = mine.new_zeros(dec.B, mine.shape[1])
            policy[at] = mine
            decoding._trace_step(verdict, t, policy)
        logits = decoding._step(sessions[0].model, dec, t).index_select(0, at)  # a copy: the buffer is reused
        _check_logits(logits)
        if dec.overflowed():
            raise decoding._Redo("a key fired more features than the decoder keeps")
        for i, s in enumerate(sessions):
            s._record(torch.tensor([toks[i]]), logits[i:i + 1])
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
