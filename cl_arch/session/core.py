"""The :class:`Session` class: one user's adaptive copy of a model's fast memory
(docs/design.md, "Public API").

Reading and generating (each token updates the episode's state), the three-factor reward
commit, snapshots and rollback. What it builds on lives beside it: argument checks in
``inputs.py``, token sampling in ``sampling.py``, replay records and snapshots in ``records.py``,
batched generation in ``batching.py``, decoding through a compiled step in ``decoding.py``, and
saving and loading (:class:`~cl_arch.session.persistence.SessionFiles`, a base of
:class:`Session`) in ``persistence.py`` over the state file's format in ``files.py``.
"""
from __future__ import annotations

import math
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..protocols import PlasticModel
from ..state import FastLayerState, ModelState
from . import batching, decoding
from .batching import _eval_mode
from .persistence import SessionFiles
from .inputs import RULE_KEYS, _as_ids, _as_reward, _check_logits, _check_rule, _check_sampling
from .records import ReplayRecord, SessionSnapshot
from .sampling import _sample


class Session(SessionFiles):
    """One user's adaptive copy of a model's fast memory.

    Args:
        model: a :class:`~cl_arch.protocols.PlasticModel` (e.g. a PlasticTransformer) with at least one fast layer, or
            the ``transformers`` wrapper ``cl_arch.hf.ClArchForCausalLM``, whose PlasticTransformer (``.plastic_model``)
            the session then holds as :attr:`model`. It is only read: its weights are never changed by the session.
        adapt: False freezes ``P`` (at zero) and resets the state every episode, so outputs equal
            the frozen model's exactly (the "state reset" control of the Sutton test).
        seed: seeds the session's sampling generator (None: from torch's global RNG).
        replay_size: episodes kept in :attr:`replay` (0 disables replay).
        drop_rejected: a suggestion (the tokens :meth:`generate` produced since the last
            :meth:`observe` or commit) whose reward is <= 0 is dropped from the reading memories (those
            with the state commit, e.g. readout and episodic) before the commit, so rejected text is not
            kept as if the user had written it; memories that learn from the reward (the verdict and
            reward memories, the fast layers' three-factor traces) keep it and learn from its advantage.
        decoder: how :meth:`generate` decodes the sampled tokens (the prompt is always read by the
            model's chunked forward): ``"auto"`` (default) through a cached eager
            :class:`~cl_arch.decode.Decoder` where it covers the model (on the CPU, every memory one it
            has a step for), otherwise the forward path; ``"eager"`` the same but an error where it does
            not cover the model; ``"compile"`` a ``torch.compile``d decoder (the first call compiles,
            30-60 s); None one ``model(token, state)`` forward per token. The tokens and states agree
            to float rounding. Not saved with the session (a setting of this process).
        lam, gamma, eta_s, eta_r, clip, rho: rule overrides as floats; None (default) takes each
            fast layer's learned per-head ``lam, gamma, eta_s, eta_r`` and the config's
            ``commit_clip`` and ``baseline_rho``.

    Attributes:
        P: list (one per fast layer) of ``[1, H, K, V]`` persistent memories.
        baseline: running reward baseline ``b``.
        episodes, rewards, reward_sum: committed episodes, rewarded episodes, sum of rewards.
        replay: list of :class:`ReplayRecord`, at most ``replay_size``.
        state: the current episode's :class:`ModelState`.
    """

    def __init__(self, model, adapt: bool = True, *, seed: Optional[int] = None, replay_size: int = 64,
                 drop_rejected: bool = True, decoder: Optional[str] = "auto", **rule_overrides: Optional[float]):
        if not isinstance(model, PlasticModel) and isinstance(getattr(model, "plastic_model", None), PlasticModel):
            # A wrapper that says what it wraps (cl_arch.hf.ClArchForCausalLM: .plastic_model is its
            # PlasticTransformer, the same weights): the session reads the model inside.
            model = model.plastic_model
        if not isinstance(model, PlasticModel):
            raise ValueError(f"model must be a PlasticModel (cl_arch.protocols; e.g. a PlasticTransformer, or "
                             f"a transformers ClArchForCausalLM, whose .plastic_model is one), "
                             f"got {type(model).__name__}")
        if not model.fast_layers():
            raise ValueError("model has no fast-weight layer: a session has nothing to adapt")
        if not isinstance(adapt, bool):
            raise ValueError(f"adapt must be a bool, got {adapt!r}")
        if not isinstance(drop_rejected, bool):
            raise ValueError(f"drop_rejected must be a bool, got {drop_rejected!r}")
        if isinstance(replay_size, bool) or not isinstance(replay_size, int) or replay_size < 0:
            raise ValueError(f"replay_size must be an integer >= 0, got {replay_size!r}")
        unknown = sorted(set(rule_overrides) - set(RULE_KEYS))
        if unknown:
            raise ValueError(f"unknown rule settings {unknown}; known: {list(RULE_KEYS)}")
        self.model = model
        self.adapt = adapt
        self.decoder = decoding.check_mode(decoder)
        self._live = None  # a Decoder whose buffers hold a newer state than self._state (a stream between tokens)
        self.drop_rejected = drop_rejected
        self.replay_size = replay_size
        self.rule: Dict[str, Optional[float]] = {k: None for k in RULE_KEYS}
        for k, v in rule_overrides.items():
            self.rule[k] = None if v is None else _check_rule(k, v)
        self._id = uuid.uuid4().hex
        self._rng = torch.Generator()
        self._rng.manual_seed(int(torch.randint(0, 2 ** 62, ()).item()) if seed is None else int(seed))
        self.P: List[torch.Tensor] = [
            torch.zeros(1, m.n_heads, m.head_k_dim, m.head_v_dim, dtype=m.state_dtype, device=m.W0.device)
            for m in model.fast_layers()]
        self.baseline = 0.0
        self.episodes = 0
        self.rewards = 0
        self.reward_sum = 0.0
        self.replay: List[ReplayRecord] = []
        self._new_episode()

    # ------------------------------------------------------------------ rule settings
    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _lam_arg(self) -> Optional[List[Optional[float]]]:
        """What the forward pass gets as ``lam``: the override, or 1.0 for a model without a
        trace (a session must have a trace to commit), or None (each layer's own)."""
        if self.rule["lam"] is not None:
            return [self.rule["lam"]] * len(self.P)
        lams = [None if m.lam is not None else 1.0 for m in self.model.fast_layers()]
        return None if all(v is None for v in lams) else lams

    def rule_settings(self) -> List[Dict[str, Any]]:
        """Effective settings per fast layer: per-head lists for lam/gamma/eta_s/eta_r, floats for
        clip and rho (what :meth:`reward` uses)."""
        out = []
        lam_arg = self._lam_arg()
        for i, m in enumerate(self.model.fast_layers()):
            def per_head(name, learned):
                v = self.rule[name]
                return [v] * m.n_heads if v is not None else [float(x) for x in learned.detach().cpu()]
            lam = lam_arg[i] if (lam_arg is not None and not m.trace_follows_state) else None
            own = m.commit_rates()
            clip = self.rule["clip"] if self.rule["clip"] is not None else m.commit_clip
            out.append({
                "lam": [lam] * m.n_heads if lam is not None else [float(x) for x in m.lam.detach().cpu()],
                "gamma": per_head("gamma", own["gamma"]),
                "eta_s": per_head("eta_s", own["eta_s"]),
                "eta_r": per_head("eta_r", own["eta_r"]),
                "clip": math.inf if clip is None else clip,
                "rho": self.rule["rho"] if self.rule["rho"] is not None else self.model.config.baseline_rho,
            })
        return out

    # ------------------------------------------------------------------ the state (maybe in a decoder)
    @property
    def state(self) -> ModelState:
        """The current episode's :class:`ModelState` (taken back from the decoder a stream left it in)."""
        if self._live is not None:
            self._sync()
        return self._state

    @state.setter
    def state(self, value: ModelState) -> None:
        self._live = None
        self._state = value

    def _sync(self) -> None:
        """Take the state back from the decoder that holds it (``Decoder.state()``: new tensors)."""
        dec, self._live = self._live, None
        self._state = dec.state()

    def _decoder_evicted(self, decoder) -> None:
        """Called by the decoder cache before another holder loads ``decoder``'s buffers."""
        if self._live is decoder:
            self._sync()

    # ------------------------------------------------------------------ episode bookkeeping
    def _new_episode(self) -> None:
        """S back to W0 + P, E = 0, caches cleared, position 0."""
        self.state = self.model.init_state(1, self.P if self.adapt else None)
        self._episode_ids: List[int] = []
        self._episode_nll: List[float] = []
        self._next_logits: Optional[torch.Tensor] = None  # [V]: prediction of the next token
        # (state, tokens in the episode, next-token logits) before the pending suggestion (None: none pending)
        self._pending: Optional[tuple] = None

    @property
    def episode_length(self) -> int:
        """Tokens read or written in the current episode."""
        return len(self._episode_ids)

    def _feed(self, ids: torch.Tensor, modulation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run ``ids [1, T]`` through the model from the current state; returns NLL ``[T]``."""
        m = self.model
        ids = ids.to(m.device)
        with _eval_mode(m):
            logits, state = m(ids, state=self.state, modulation=modulation, lam=self._lam_arg())
        _check_logits(logits)  # before anything is absorbed: the session stays as it was
        self._absorb(ids[0], logits[0], state)
        return self._last_nll

    def _mark(self) -> tuple:
        """Cheap restore point within an episode: forwards return new states and never write into
        the one they are given, and the episode's lists only grow, so references and lengths do."""
        return (self.state, len(self._episode_ids), len(self._episode_nll), self._next_logits,
                getattr(self, "_last_nll", None), self._rng.get_state(), self._pending)

    def _back_to(self, mark: tuple) -> None:
        state, n_ids, n_nll, next_logits, last_nll, rng, pending = mark
        self.state, self._pending = state, pending
        del self._episode_ids[n_ids:]
        del self._episode_nll[n_nll:]
        self._next_logits, self._last_nll = next_logits, last_nll
        self._rng.set_state(rng)

    def _absorb(self, ids: torch.Tensor, logits: torch.Tensor, state: ModelState) -> None:
        """Bookkeeping after a forward of ``ids [T]`` that produced ``logits [T, V]`` and ``state``."""
        self._record(ids, logits)
        self.state = state

    def _record(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """:meth:`_absorb` but the state: episode ids, NLL ``[T]``, next-token logits (``logits [T, V]``
        is kept by reference: a caller whose buffer is reused passes a copy)."""
        nll = torch.full((ids.numel(),), float("nan"), dtype=torch.float64)
        if self._next_logits is not None:
            nll[0] = -torch.log_softmax(self._next_logits.double(), -1)[ids[0]]
        if ids.numel() > 1:  # a decode step (one token) has nothing to score inside the call
            lp = torch.log_softmax(logits[:-1].double(), -1)
            nll[1:] = -lp.gather(1, ids[1:, None].long()).squeeze(1)
        self._next_logits = logits[-1].detach()
        self._episode_ids.extend(int(x) for x in ids.tolist())
        self._episode_nll.extend(float(x) for x in nll.tolist())
        self._last_nll = nll

    # ------------------------------------------------------------------ suggestions and verdicts
    def _open_suggestion(self) -> None:
        """Mark where the suggestion about to be generated starts (kept across several generate calls)."""
        if self._pending is None:
            self._pending = (self.state, len(self._episode_ids), self._next_logits)

    def _verdict_slots(self) -> List[int]:
        """Indices in ``state.layers`` of the memories that learn from verdicts (a ``policy_gradient``
        method, e.g. the verdict memory); looked up once per model layout (every decode step asks)."""
        mems = self.model.memories()
        key = tuple(id(m) for m in mems)
        if getattr(self, "_verdict_key", None) != key:
            self._verdict_key = key
            self._verdict_idx = [i for i, m in enumerate(mems) if m is not None and hasattr(m, "policy_gradient")]
        return self._verdict_idx

    def _own_trace(self) -> None:
        """Give the current state its own copy of every verdict trace: the trace then grows in place
        token by token while the marks taken before keep the old one (all-or-nothing generate)."""
        slots = self._verdict_slots()
        if not slots or all(self.state.layers[i].E is None for i in slots):
            return
        layers = list(self.state.layers)
        for i in slots:
            s = layers[i]
            if s.E is not None:
                layers[i] = FastLayerState(S=s.S, E=s.E.clone(), P=s.P, conv=s.conv)
        self.state = ModelState(layers, self.state.position)

    def _policy_gradients(self, tok: int, allowed: Optional[torch.Tensor] = None) -> List[tuple]:
        """``(slot index, phi [1, F], e(tok) - pi [1, V])`` of each verdict memory for ``tok``, sampled
        from :attr:`_next_logits` (pi: the model's softmax, every memory read, over ``allowed`` ids when
        sampling was restricted to them)."""
        slots = self._verdict_slots()
        if not slots or self._next_logits is None:
            return []
        logits = self._policy_logits(allowed)
        out, mems = [], self.model.memories()
        for i in slots:
            s = self.state.layers[i]
            if s.conv is not None:
                out.append((i, *mems[i].policy_gradient(s, torch.tensor([tok]), logits[None])))
        return out

    def _policy_logits(self, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        """:attr:`_next_logits` ``[V]``, ``-inf`` outside ``allowed`` (the policy a restricted draw follows)."""
        logits = self._next_logits
        if allowed is not None:
            logits = torch.full_like(logits, -math.inf).index_copy(0, allowed.to(logits.device), logits[allowed])
        return logits

    def _feed_generated(self, tok: int, allowed: Optional[torch.Tensor]) -> None:
        """Feed a generated token on the forward path with its verdict traces; on error the session is as
        before the token (the draw is not undone)."""
        mark_tok = self._mark()
        try:
            grads = self._policy_gradients(tok, allowed)
            self._feed(torch.tensor([[tok]]))
            self._add_traces(grads)
        except BaseException:
            self._back_to(mark_tok)
            raise

    def _add_traces(self, grads: List[tuple]) -> None:
        """Add :meth:`_policy_gradients`' terms to the current state's traces (after the token was fed)."""
        if not grads:
            return
        layers = list(self.state.layers)
        mems = self.model.memories()
        for i, phi, g in grads:
            layers[i] = mems[i].add_trace(layers[i], phi, g)
        self.state = ModelState(layers, self.state.position)

    def _without_rejected(self, r: Optional[float]) -> ModelState:
        """The state to commit: with a pending suggestion rejected (``r <= 0``) and ``drop_rejected``,
        the reading memories' slots (state commit, no ``reinforce``) as they were before it."""
        if r is None or r > 0 or self._pending is None or not self.drop_rejected:
            return self.state
        layers = list(self.state.layers)
        for i, m in enumerate(self.model.memories()):
            if m is not None and m.trace_follows_state and not hasattr(m, "reinforce"):
                layers[i] = self._pending[0].layers[i]
        return ModelState(layers, self.state.position)

    # ------------------------------------------------------------------ reading and writing
    def observe(self, ids, modulation=None) -> torch.Tensor:
        """Read tokens without generating (e.g. the user's own continuation or correction).

        Args:
            ids: ``[T]`` token ids (list, bytes or integer tensor).
            modulation: optional ``[T]`` write strengths in [0, 1] for every fast layer.

        Returns:
            ``nll [T]`` float64: ``-log p(ids[t] | everything before)`` scored *before* the token
            was written (prequential); NaN for the first token of an episode.
        """
        x = _as_ids(ids, self.vocab_size)
        mod = None
        if modulation is not None:
            mod = torch.as_tensor(modulation, dtype=torch.float32)
            if mod.dim() == 2 and mod.shape[0] == 1:
                mod = mod[0]
            if mod.shape != (x.shape[1],):
                raise ValueError(f"modulation must have shape [T] = [{x.shape[1]}], got {tuple(mod.shape)}")
            mod = mod.reshape(1, -1).to(self.model.device)
        nll = self._feed(x, mod)
        self._pending = None  # text read after a suggestion settles it: it stays read
        return nll

    def generate(self, prompt_ids, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 stream: bool = False, allowed_tokens: Optional[Sequence[int]] = None
                 ) -> Union[List[int], Iterator[int]]:
        """Read the prompt, then sample ``max_new_tokens`` tokens, writing each one back.

        The prompt is read in one call (the model takes its chunked path for long prompts); each
        sampled token is then fed back one at a time (recurrent path), so S and E record the
        answer, the last token included, before the call returns (or before a streamed token is
        yielded). With the session's ``decoder`` setting (default ``"auto"``) and at least two new
        tokens, they are fed through a cached :class:`~cl_arch.decode.Decoder` (the same numbers to
        float rounding, 2-4x faster) and :attr:`state` is taken back when the call ends, or when it is
        read while a stream is paused.

        Args:
            prompt_ids: ``[T]`` ids; may be empty when the episode already has tokens.
            temperature: 0 means greedy. top_k, top_p: the usual truncations.
            seed: draw from a fresh generator with this seed (reproducible); None uses the
                session's own generator.
            stream: return an iterator that yields tokens as they are produced.
            allowed_tokens: restrict sampling to these ids (e.g. a game's answer set).

        Returns:
            The new token ids (a list), or an iterator of them when ``stream=True``.

        Raises:
            ValueError: bad arguments, or non-finite logits from the model. Without ``stream``
                the call is all or nothing: when it raises the session is as it was before the
                call (prompt unread, generator unmoved). A stream keeps the tokens it already
                yielded and raises at the token that cannot be produced.
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        prompt = _as_ids(prompt_ids, self.vocab_size, "prompt_ids", allow_empty=True)
        if prompt.shape[1] == 0 and self._next_logits is None:
            raise ValueError("prompt_ids is empty and the episode has no tokens to continue from")
        allowed = None
        if allowed_tokens is not None:
            allowed = _as_ids(list(allowed_tokens), self.vocab_size, "allowed_tokens")[0]
        gen = self._rng if seed is None else torch.Generator().manual_seed(int(seed))
        mark = self._mark()

        def tokens() -> Iterator[int]:
            for _ in range(max_new_tokens):
                tok = _sample(self._next_logits, float(temperature), top_k, top_p, allowed, gen)
                self._feed_generated(tok, allowed)
                yield tok

        try:
            if prompt.shape[1]:
                self._feed(prompt)
                self._pending = None
            self._open_suggestion()
            if max_new_tokens >= decoding.MIN_NEW_TOKENS and \
                    decoding.acquire(self, 1, max_new_tokens, self.state.position) is not None:
                it = decoding.generate_tokens(self, max_new_tokens, float(temperature), top_k, top_p, allowed,
                                              gen, stream)
            else:
                self._own_trace()
                it = tokens()
            return it if stream else list(it)
        except BaseException:
            self._back_to(mark)
            raise

    # ------------------------------------------------------------------ commits
    def _commit(self, r: Optional[float]) -> None:
        """Three-factor commit of the current episode (reward ``r`` or None), then a new episode.

        Every new tensor is computed before anything is assigned, so an error leaves the session
        as it was.
        """
        new_P = self.P
        b_new = self.baseline
        advantage = None if r is None else r - self.baseline
        if self.adapt:
            rule = self.rule
            # overrides given to the Session apply to every memory; None keeps each memory's own
            new_P, b = self.model.commit(self._without_rejected(r), self.P, r, self.baseline, missing_trace="zeros",
                                         gamma=rule["gamma"], eta_s=rule["eta_s"], eta_r=rule["eta_r"],
                                         clip=rule["clip"], rho=rule["rho"])
            new_P = [p.detach() for p in new_P]
            b_new = float(b[0]) if r is not None else self.baseline
        elif r is not None:
            rho = self.rule_settings()[0]["rho"]
            b_new = self.baseline + rho * (r - self.baseline)
        nll = [x for x in self._episode_nll if not math.isnan(x)]
        record = ReplayRecord(ids=list(self._episode_ids), reward=r, advantage=advantage,
                              surprise=sum(nll) / len(nll) if nll else float("nan"), episode=self.episodes)
        self.P = new_P
        self.baseline = b_new
        self.episodes += 1
        if r is not None:
            self.rewards += 1
            self.reward_sum += r
        self._remember(record)
        self._new_episode()

    def _remember(self, record: ReplayRecord) -> None:
        if self.replay_size == 0:
            return
        self.replay.append(record)
        self._trim_replay()

    def _trim_replay(self) -> None:
        """Drop the lowest-scoring records (oldest among ties) until ``replay_size`` remain."""
        while len(self.replay) > self.replay_size:
            drop = min(range(len(self.replay)), key=lambda j: (self.replay[j].score, self.replay[j].episode))
            del self.replay[drop]

    def reward(self, r, guard: Optional[Callable[["Session"], bool]] = None) -> bool:
        """Commit the current episode with reward ``r`` and start a new one.

        Args:
            r: finite real number.
            guard: called as ``guard(session)`` after the commit, on the new episode; returning
                False vetoes the commit: P, baseline, counts and replay are restored exactly and
                the episode is discarded. Whatever the guard itself does to the session (probing
                generations) is undone in both cases. If it raises, the session is restored to
                its state before this call and the exception propagates.

        Returns:
            True if the commit stands, False if the guard vetoed it.

        Raises:
            ValueError: non-numeric, NaN, infinite or out-of-range (``|r| > 1e6``) reward; no episode (nothing read or written
                since the last commit). The session is unchanged.
        """
        r = _as_reward(r)
        if not self._episode_ids:
            raise ValueError("reward: no episode to reward (nothing was observed or generated since "
                             "the last commit)")
        if guard is not None and not callable(guard):
            raise ValueError(f"guard must be callable, got {type(guard).__name__}")
        before = self.snapshot() if guard is not None else None
        self._commit(r)
        if guard is None:
            return True
        after = self.snapshot()
        try:
            ok = bool(guard(self))
        except BaseException:
            self.rollback(before)
            raise
        if ok:
            self.rollback(after)
            return True
        self.rollback(before)
        self._new_episode()
        return False

    def verdict(self, r, keep: Optional[bool] = None) -> None:
        """The user's verdict on the pending suggestion (what :meth:`generate` produced since the last
        :meth:`observe` or commit), without ending the episode: the completion product's accept/reject.

        Every memory that learns from verdicts (the verdict memory) commits its trace,
        ``Q <- Q + eta (r - b) E``, and starts a new one; the baseline moves ``b <- b + rho (r - b)``.
        The suggestion stays read when ``keep`` (default: ``r > 0``, an accept: it is now the user's
        text); otherwise the session returns to where it was before the suggestion (reading memories,
        attention caches, position), so rejected text is not read as if the user had written it.

        Args:
            r: finite real number (e.g. 1 accepted, 0 rejected).
            keep: keep the suggestion read (None: ``r > 0``). A product that then observes the
                user's buffer itself passes False.

        Raises:
            ValueError: bad reward, or no suggestion pending. The session is unchanged.
        """
        r = _as_reward(r)
        if keep is not None and not isinstance(keep, bool):
            raise ValueError(f"keep must be a bool or None, got {keep!r}")
        if self._pending is None:
            raise ValueError("verdict: no suggestion pending (generate one first; observe() settles it)")
        slots = self._verdict_slots()
        fast_index = {i: j for j, i in enumerate(k for k, m in enumerate(self.model.memories()) if m is not None)}
        rule = self.rule
        new_P = list(self.P)
        b_new = self.baseline + self.rule_settings()[0]["rho"] * (r - self.baseline)
        if self.adapt:
            for i in slots:
                m, E = self.model.memories()[i], self.state.layers[i].E
                if E is None:
                    continue
                j = fast_index[i]
                p, _ = m.commit(self.P[j], E, r, self.baseline, gamma=rule["gamma"], eta_s=rule["eta_s"],
                                eta_r=rule["eta_r"], clip=rule["clip"], rho=rule["rho"])
                new_P[j] = p.detach()
        kept = r > 0 if keep is None else keep
        base = self.state if kept else self._pending[0]
        layers = list(base.layers)
        for i in slots:
            s = layers[i]
            layers[i] = FastLayerState(S=s.S, E=None, P=new_P[fast_index[i]] if self.adapt else s.P, conv=s.conv)
        if not kept:
            _, n, self._next_logits = self._pending
            del self._episode_ids[n:]
            del self._episode_nll[n:]
        self.state = ModelState(layers, base.position)
        self.P, self.baseline = new_P, b_new
        self.rewards += 1
        self.reward_sum += r
        self._pending = None

    def end_episode(self) -> bool:
        """Commit with no reward (retention only: ``P <- gamma P + eta_s clip(E)``), new episode.

        Returns False (and does nothing) when the episode is empty.
        """
        if not self._episode_ids:
            return False
        self._commit(None)
        return True

    def reset(self, persistent: bool = True) -> None:
        """Discard the current episode; with ``persistent`` also forget P, baseline, counts, replay."""
        if persistent:
            self.P = [torch.zeros_like(p) for p in self.P]
            self.baseline = 0.0
            self.episodes = self.rewards = 0
            self.reward_sum = 0.0
            self.replay = []
        self._new_episode()

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> SessionSnapshot:
        """Copy of everything that changes (P, baseline, counts, replay, episode, RNG)."""
        return SessionSnapshot(self._id, {
            "P": [p.clone() for p in self.P],
            "baseline": self.baseline, "episodes": self.episodes, "rewards": self.rewards,
            "reward_sum": self.reward_sum, "replay": list(self.replay),  # records are frozen
            "state": self.state.clone(), "episode_ids": list(self._episode_ids),
            "episode_nll": list(self._episode_nll),
            "next_logits": None if self._next_logits is None else self._next_logits.clone(),
            "rng": self._rng.get_state(), "pending": self._pending,  # never written into: references suffice
        })

    def _snapshot_refs(self) -> SessionSnapshot:
        """:meth:`snapshot` holding the tensors themselves, not copies (the server's snapshot before a commit it
        may have to undo). Valid while nothing writes those tensors in place: a commit computes new ``P``
        tensors and the next episode a new state, and :meth:`rollback` restores copies. The shipped model's
        ``P`` and state are about 15 MB, so the copies cost a reward about as much as its commit."""
        return SessionSnapshot(self._id, {
            "P": list(self.P), "baseline": self.baseline, "episodes": self.episodes, "rewards": self.rewards,
            "reward_sum": self.reward_sum, "replay": list(self.replay), "state": self.state,
            "episode_ids": list(self._episode_ids), "episode_nll": list(self._episode_nll),
            "next_logits": self._next_logits, "rng": self._rng.get_state(), "pending": self._pending,
        })

    def rollback(self, snap: SessionSnapshot) -> None:
        """Restore a :meth:`snapshot` of this session (ValueError for another session's)."""
        if not isinstance(snap, SessionSnapshot) or snap._owner != self._id:
            raise ValueError("rollback: the snapshot was not taken from this session")
        d = snap._data
        self.P = [p.clone() for p in d["P"]]
        self.baseline, self.episodes, self.rewards, self.reward_sum = \
            d["baseline"], d["episodes"], d["rewards"], d["reward_sum"]
        self.replay = list(d["replay"])
        self.state = d["state"].clone()
        self._episode_ids, self._episode_nll = list(d["episode_ids"]), list(d["episode_nll"])
        self._next_logits = None if d["next_logits"] is None else d["next_logits"].clone()
        self._rng.set_state(d["rng"])
        self._pending = d["pending"]

    # ------------------------------------------------------------------ batching (batching.py)
    batch_generate = staticmethod(batching.batch_generate)
    _step_batch = staticmethod(batching._step_batch)

    def __repr__(self) -> str:
        return (f"Session(adapt={self.adapt}, episodes={self.episodes}, rewards={self.rewards}, "
                f"baseline={self.baseline:.4g}, |P|={[round(float(p.norm()), 4) for p in self.P]})")
