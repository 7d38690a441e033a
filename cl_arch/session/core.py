"""Sessions: inference with adaptation on, reward commits, persistence (DESIGN.md).

A :class:`Session` is one user's (or task's) running copy of a model's fast memory:

* ``P`` per fast layer, ``[1, H, K, V]`` in the layer's state dtype (float32, or float64 for a
  double model): the persistent fast weight, kept across episodes and saved to disk;
* ``b``: the running reward baseline;
* the current episode's :class:`~cl_arch.state.ModelState` (``S`` starts at ``W0 + P``, ``E`` at
  0, caches empty), updated by every token the session reads or writes;
* counts and a bounded replay buffer of recent episodes (token ids, reward, surprise) that
  consolidation (``cl_arch.consolidate.distill``) uses as its default replay data.

The model's weights are never modified: several sessions can share one model and never see each
other's memories. A reward ends the episode with the three-factor commit::

    P <- gamma * P + (eta_s + eta_r * (r - b)) * clip(E_T)        # per fast layer and head
    b <- b + rho * (r - b)

State files are one safetensors file whose header metadata holds the JSON description (schema,
model fingerprint, rule settings, counts, baseline, replay, a sha256 of the tensors, and a sha256
of the rest of the description in its canonical JSON form), so no part of the file can change
unnoticed: a file whose tensors or description (a rule setting, a count, a replay record) were
edited or damaged is refused. (One metadata entry only: safetensors writes its metadata map in no
fixed order, and a saved state must be the same bytes every time.)
Files of schema 1 (written before the description checksum) still load, with only their tensors
checksummed; every file's description is also checked for sense (types, counts, token ids inside
the model's vocabulary). The file is written to a temporary name in the same folder, fsynced and
renamed, so a crash leaves either the old or the new file whole.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import struct
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from .io import atomic_write
from .state import FastLayerState, ModelState

SCHEMA = "cl_arch.session/2"
LEGACY_SCHEMAS = ("cl_arch.session/1",)  # no description checksum; still read
METADATA_KEY = "cl_arch_session"
CHECKSUM_FIELD = "description_sha256"  # sha256 of the canonical JSON of every other field
REPLAY_FIELDS = ("ids", "reward", "advantage", "surprise", "episode")
RULE_KEYS = ("lam", "gamma", "eta_s", "eta_r", "clip", "rho")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_WRITE_CHUNK = 1 << 20  # bytes per write() call while saving


# ---------------------------------------------------------------------- input checks
def _as_ids(ids: Any, vocab_size: int, what: str = "ids", allow_empty: bool = False) -> torch.Tensor:
    """Token ids as a ``[1, T]`` long tensor; ValueError naming the problem otherwise.

    Accepts a sequence of ints, ``bytes``, or an integer tensor ``[T]`` / ``[1, T]``.
    """
    if isinstance(ids, str):
        raise ValueError(f"{what} must be token ids, got a str (encode it first, e.g. text.encode())")
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{what} must have an integer dtype, got {ids.dtype}")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"{what} must be 1-D [T] (or [1, T]), got shape {tuple(ids.shape)}")
        t = ids.detach().to("cpu", torch.long)
    elif isinstance(ids, (bytes, bytearray)):
        t = torch.tensor(list(ids), dtype=torch.long)
    elif isinstance(ids, Sequence):
        for x in ids:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise ValueError(f"{what} must hold integers, got {type(x).__name__} {x!r}")
        t = torch.tensor([int(x) for x in ids], dtype=torch.long)
    else:
        raise ValueError(f"{what} must be a list of ints, bytes or an integer tensor, got {type(ids).__name__}")
    if t.numel() == 0 and not allow_empty:
        raise ValueError(f"{what} is empty")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"{what} out of vocabulary: values must lie in [0, {vocab_size}), got "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t.reshape(1, -1)


# The advantage r - b multiplies the clipped eligibility trace in float32, so a reward near the
# float32 range (3.4e38) turns P into inf even though the float is finite. Rewards are meant to be
# O(1) (DESIGN: standardised by the running baseline); anything beyond this bound is a scale bug.
MAX_ABS_REWARD = 1e6


def _as_reward(r: Any) -> float:
    """A finite Python float with ``|r| <= MAX_ABS_REWARD``, or ValueError (NaN, inf, too large,
    bool, non-numeric, non-scalar tensor)."""
    if isinstance(r, torch.Tensor):
        if r.numel() != 1 or r.dtype == torch.bool or r.dtype.is_complex:
            raise ValueError(f"reward must be a finite real number, got a tensor of shape "
                             f"{tuple(r.shape)} and dtype {r.dtype}")
        r = r.item()
    if isinstance(r, bool) or not isinstance(r, numbers.Real):
        raise ValueError(f"reward must be a finite real number, got {type(r).__name__} {r!r}")
    r = float(r)
    if not math.isfinite(r):
        raise ValueError(f"reward must be finite, got {r}")
    if abs(r) > MAX_ABS_REWARD:
        raise ValueError(f"reward {r:g} is out of range: |reward| must be <= {MAX_ABS_REWARD:g} (the advantage "
                         f"multiplies the fast-weight trace in float32; rescale rewards to about [-1, 1])")
    return r


def _check_rule(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"rule setting {name} must be a finite float, got {v!r}")
    v = float(v)
    ok = {"lam": 0.0 <= v <= 1.0, "gamma": 0.0 < v <= 1.0, "clip": v > 0.0, "rho": 0.0 <= v <= 1.0}.get(name, True)
    if not ok:
        rng = {"lam": "[0, 1]", "gamma": "(0, 1]", "clip": "(0, inf)", "rho": "[0, 1]"}[name]
        raise ValueError(f"rule setting {name} must be in {rng}, got {v}")
    return v


def _check_logits(logits: torch.Tensor) -> None:
    """NaN/inf logits would sample the last token (every comparison with NaN is False) and score
    as "no prediction": refuse them before the session takes anything from the forward."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(f"the model produced non-finite logits ({bad} NaN/inf of {logits.numel()} entries): its "
                         "weights or this session's memory hold NaN/inf or overflow; the session is unchanged")


# ---------------------------------------------------------------------- sampling
def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            allowed: Optional[torch.Tensor], generator: torch.Generator) -> int:
    """Draw one token from ``logits [V]``; deterministic given the generator state.

    Inverse-CDF sampling with one ``torch.rand`` draw per token, in float64, so the draw for a
    session does not depend on which other sessions share its batch.
    """
    x = logits.detach().to("cpu", torch.float64).clone()
    _check_logits(x)  # on the host copy: no extra device sync per decoded token
    if allowed is not None:
        mask = torch.full_like(x, float("-inf"))
        mask[allowed] = 0.0
        x = x + mask
    if temperature == 0.0:
        return int(torch.argmax(x))
    x = x / temperature
    if top_k is not None and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sp, 0) - sp) < top_p  # smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    cdf = torch.cumsum(probs, 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    idx = int(torch.searchsorted(cdf, u.reshape(1), right=True))
    idx = min(idx, x.numel() - 1)
    while probs[idx] == 0 and idx > 0:  # u landed on the right edge of a zero-mass run
        idx -= 1
    return idx


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")


# ---------------------------------------------------------------------- records
@dataclass(frozen=True)
class ReplayRecord:
    """One finished episode kept for replay.

    Attributes:
        ids: every token the episode read or wrote, in order.
        reward: the reward it got (None: ended by :meth:`Session.end_episode`).
        advantage: ``r - b`` at commit time (None without reward).
        surprise: mean negative log-likelihood (nats/token) of the episode's tokens under the
            session's model as they arrived (NaN if no token had a prediction).
        episode: index of the episode in the session's history.
    """

    ids: List[int]
    reward: Optional[float]
    advantage: Optional[float]
    surprise: float
    episode: int

    @property
    def score(self) -> float:
        """How informative the episode is: ``|r - b| + surprise / ln(256)``; the buffer drops
        the lowest score first (oldest among ties). Both terms are O(1) for byte models."""
        s = 0.0 if math.isnan(self.surprise) else self.surprise / math.log(256)
        return abs(self.advantage or 0.0) + s

    def __getitem__(self, key: str):  # record["ids"] as well as record.ids
        return getattr(self, key)


class SessionSnapshot:
    """Opaque copy of a session's full state (P, baseline, counts, replay, episode, RNG)."""

    def __init__(self, owner: str, data: Dict[str, Any]):
        self._owner = owner
        self._data = data


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode and no autograd for the duration; the model's previous mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


# ---------------------------------------------------------------------- session
class Session:
    """One user's adaptive copy of a model's fast memory.

    Args:
        model: a :class:`~cl_arch.model.PlasticTransformer` with at least one fast layer. It is
            only read: its weights are never changed by the session.
        adapt: False freezes ``P`` (at zero) and resets the state every episode, so outputs equal
            the frozen model's exactly (the "state reset" control of the Sutton test).
        seed: seeds the session's sampling generator (None: from torch's global RNG).
        replay_size: episodes kept in :attr:`replay` (0 disables replay).
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
                 **rule_overrides: Optional[float]):
        from .model import PlasticTransformer  # local: model imports nothing from here

        if not isinstance(model, PlasticTransformer):
            raise ValueError(f"model must be a PlasticTransformer, got {type(model).__name__}")
        if not model.fast_layers():
            raise ValueError("model has no fast-weight layer: a session has nothing to adapt")
        if not isinstance(adapt, bool):
            raise ValueError(f"adapt must be a bool, got {adapt!r}")
        if isinstance(replay_size, bool) or not isinstance(replay_size, int) or replay_size < 0:
            raise ValueError(f"replay_size must be an integer >= 0, got {replay_size!r}")
        unknown = sorted(set(rule_overrides) - set(RULE_KEYS))
        if unknown:
            raise ValueError(f"unknown rule settings {unknown}; known: {list(RULE_KEYS)}")
        self.model = model
        self.adapt = adapt
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

    # ------------------------------------------------------------------ episode bookkeeping
    def _new_episode(self) -> None:
        """S back to W0 + P, E = 0, caches cleared, position 0."""
        self.state = self.model.init_state(1, self.P if self.adapt else None)
        self._episode_ids: List[int] = []
        self._episode_nll: List[float] = []
        self._next_logits: Optional[torch.Tensor] = None  # [V]: prediction of the next token

    @property
    def episode_length(self) -> int:
        """Tokens read or written in the current episode."""
        return len(self._episode_ids)

    def _feed(self, ids: torch.Tensor, modulation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run ``ids [1, T]`` through the model from the current state; returns NLL ``[T]``."""
        m = self.model
        ids = ids.to(m.embed.weight.device)
        with _eval_mode(m):
            logits, state = m(ids, state=self.state, modulation=modulation, lam=self._lam_arg())
        _check_logits(logits)  # before anything is absorbed: the session stays as it was
        self._absorb(ids[0], logits[0], state)
        return self._last_nll

    def _mark(self) -> tuple:
        """Cheap restore point within an episode: forwards return new states and never write into
        the one they are given, and the episode's lists only grow, so references and lengths do."""
        return (self.state, len(self._episode_ids), len(self._episode_nll), self._next_logits,
                getattr(self, "_last_nll", None), self._rng.get_state())

    def _back_to(self, mark: tuple) -> None:
        state, n_ids, n_nll, next_logits, last_nll, rng = mark
        self.state = state
        del self._episode_ids[n_ids:]
        del self._episode_nll[n_nll:]
        self._next_logits, self._last_nll = next_logits, last_nll
        self._rng.set_state(rng)

    def _absorb(self, ids: torch.Tensor, logits: torch.Tensor, state: ModelState) -> None:
        """Bookkeeping after a forward of ``ids [T]`` that produced ``logits [T, V]``."""
        nll = torch.full((ids.numel(),), float("nan"), dtype=torch.float64)
        if self._next_logits is not None:
            nll[0] = -torch.log_softmax(self._next_logits.double(), -1)[ids[0]]
        if ids.numel() > 1:  # a decode step (one token) has nothing to score inside the call
            lp = torch.log_softmax(logits[:-1].double(), -1)
            nll[1:] = -lp.gather(1, ids[1:, None].long()).squeeze(1)
        self.state = state
        self._next_logits = logits[-1].detach()
        self._episode_ids.extend(int(x) for x in ids.tolist())
        self._episode_nll.extend(float(x) for x in nll.tolist())
        self._last_nll = nll

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
            mod = mod.reshape(1, -1).to(self.model.embed.weight.device)
        return self._feed(x, mod)

    def generate(self, prompt_ids, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 stream: bool = False, allowed_tokens: Optional[Sequence[int]] = None
                 ) -> Union[List[int], Iterator[int]]:
        """Read the prompt, then sample ``max_new_tokens`` tokens, writing each one back.

        The prompt is read in one call (the model takes its chunked path for long prompts); each
        sampled token is then fed back one at a time (recurrent path), so S and E record the
        answer, the last token included, before the call returns (or before a streamed token is
        yielded).

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
                mark_tok = self._mark()
                try:
                    self._feed(torch.tensor([[tok]]))
                except BaseException:
                    self._back_to(mark_tok)  # the draw too: a retry samples the same token
                    raise
                yield tok

        try:
            if prompt.shape[1]:
                self._feed(prompt)
            return tokens() if stream else list(tokens())
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
        layers = self.model.fast_layers()
        if self.adapt:
            fast_states = [s for s in self.state.layers if isinstance(s, FastLayerState)]
            rule = self.rule
            new_P = []
            for i, (m, s) in enumerate(zip(layers, fast_states)):
                E = s.E if s.E is not None else torch.zeros_like(self.P[i])
                # overrides given to the Session apply to every memory; None keeps each memory's own
                P_i, b_i = m.commit(self.P[i], E, r, self.baseline, gamma=rule["gamma"], eta_s=rule["eta_s"],
                                    eta_r=rule["eta_r"], clip="own" if rule["clip"] is None else rule["clip"],
                                    rho=rule["rho"])
                new_P.append(P_i.detach())
            b_new = float(b_i[0]) if r is not None else self.baseline
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
            "rng": self._rng.get_state(),
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

    # ------------------------------------------------------------------ batching
    @staticmethod
    def batch_generate(sessions: Sequence["Session"], prompts: Sequence[Any], max_new_tokens: int = 32,
                       temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                       seeds: Optional[Sequence[Optional[int]]] = None,
                       allowed_tokens: Optional[Sequence[int]] = None) -> List[List[int]]:
        """:meth:`generate` for several sessions at once, decoding in batched forwards.

        Prompts (of any lengths) are read session by session; then every decode step runs one
        forward over all sessions with their states (and so their P) stacked along the batch.
        Each session samples from its own generator, so the result equals calling
        ``s.generate(p, ...)`` on each session in turn (to float rounding of batched matmuls).

        Sessions must share one model object and their ``lam`` setting; with attention layers,
        sessions at different positions decode in separate groups.

        Returns:
            One list of new token ids per session.

        Raises:
            ValueError: bad arguments, or non-finite logits from the model; every session is
                then as it was before the call.
        """
        sessions = list(sessions)
        if not sessions:
            raise ValueError("batch_generate: no sessions")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("batch_generate: a session appears twice")
        if len(prompts) != len(sessions):
            raise ValueError(f"batch_generate: {len(sessions)} sessions but {len(prompts)} prompts")
        model = sessions[0].model
        if any(s.model is not model for s in sessions):
            raise ValueError("batch_generate: sessions must share one model object")
        if len({json.dumps(s._lam_arg()) for s in sessions}) > 1:
            raise ValueError("batch_generate: sessions have different lam settings")
        if seeds is not None and len(seeds) != len(sessions):
            raise ValueError(f"batch_generate: {len(sessions)} sessions but {len(seeds)} seeds")
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        parsed = [_as_ids(p, model.config.vocab_size, f"prompts[{i}]", allow_empty=True)
                  for i, p in enumerate(prompts)]
        for i, (s, p) in enumerate(zip(sessions, parsed)):
            if p.shape[1] == 0 and s._next_logits is None:
                raise ValueError(f"prompts[{i}] is empty and session {i} has no tokens to continue from")
        allowed = None
        if allowed_tokens is not None:
            allowed = _as_ids(list(allowed_tokens), model.config.vocab_size, "allowed_tokens")[0]
        gens = [s._rng if (seeds is None or seeds[i] is None) else torch.Generator().manual_seed(int(seeds[i]))
                for i, s in enumerate(sessions)]
        marks = [s._mark() for s in sessions]
        try:
            for s, p in zip(sessions, parsed):
                if p.shape[1]:
                    s._feed(p)

            has_attn = any(t == "attn" for t in model.config.layer_types)
            out: List[List[int]] = [[] for _ in sessions]
            for _ in range(max_new_tokens):
                toks = [_sample(s._next_logits, float(temperature), top_k, top_p, allowed, g)
                        for s, g in zip(sessions, gens)]
                # Fast layers ignore the position, so an all-fast model batches every session at
                # once; attention needs one position (and cache length) per batch.
                groups: Dict[int, List[int]] = {}
                for i, s in enumerate(sessions):
                    groups.setdefault(s.state.position if has_attn else 0, []).append(i)
                for idx in groups.values():
                    Session._step_batch([sessions[i] for i in idx], [toks[i] for i in idx])
                for i, t in enumerate(toks):
                    out[i].append(t)
        except BaseException:
            for s, mark in zip(sessions, marks):
                s._back_to(mark)
            raise
        return out

    @staticmethod
    def _step_batch(sessions: List["Session"], toks: List[int]) -> None:
        """One batched forward of one token per session; each session's state advances."""
        model = sessions[0].model
        if len(sessions) == 1:
            sessions[0]._feed(torch.tensor([[toks[0]]]))
            return
        positions = [s.state.position for s in sessions]
        states = []
        for s in sessions:
            st = model.materialize_state(s.state, 1)
            states.append(ModelState(st.layers, positions[0]))
        big = ModelState.stack(states)
        ids = torch.tensor(toks, dtype=torch.long).reshape(-1, 1).to(model.embed.weight.device)
        with _eval_mode(model):
            logits, new = model(ids, state=big, lam=sessions[0]._lam_arg())
        _check_logits(logits)
        for i, s in enumerate(sessions):
            row = new.select(i).clone()  # own storage: no session holds a view of another's rows
            s._absorb(ids[i], logits[i], ModelState(row.layers, positions[i] + 1))

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> Dict[str, Any]:
        from . import __version__

        return {
            "schema": SCHEMA, "cl_arch_version": __version__,
            "fingerprint": self.model.fingerprint(),
            "adapt": self.adapt, "rule": dict(self.rule), "replay_size": self.replay_size,
            "baseline": self.baseline, "episodes": self.episodes, "rewards": self.rewards,
            "reward_sum": self.reward_sum, "n_fast_layers": len(self.P),
            "replay": [asdict(r) for r in self.replay],
        }

    def to_bytes(self) -> bytes:
        """The state file's contents (see :meth:`save`)."""
        from safetensors.torch import save

        tensors = {f"P.{i}": p[0].detach().cpu().contiguous() for i, p in enumerate(self.P)}
        tensors["baseline"] = torch.tensor([self.baseline], dtype=torch.float64)
        meta = self._meta()
        meta["tensors_sha256"] = _tensors_digest(tensors)
        meta[CHECKSUM_FIELD] = _description_digest(meta)
        return save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True, allow_nan=True)})

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the persistent state (P per layer, baseline, counts, rule settings, replay) to
        one safetensors file, atomically: temp file in the same folder, fsync, ``os.replace``.

        The current episode (S, E, caches) is not saved: a loaded session starts a new episode.
        """
        _atomic_write(os.fspath(path), self.to_bytes())

    @classmethod
    def load(cls, model, path: Union[str, os.PathLike], *, seed: Optional[int] = None,
             adapt: Optional[bool] = None, replay_size: Optional[int] = None,
             **rule_overrides: Optional[float]) -> "Session":
        """Load a state written by :meth:`save` for ``model``.

        ``adapt``, ``replay_size`` and the rule settings come from the file unless given here;
        a smaller ``replay_size`` drops the lowest-scoring replay records (as the buffer does).

        Raises:
            FileNotFoundError: no such file.
            ValueError: truncated or corrupt file, a description edited since it was saved
                (checksum mismatch), unknown schema, a description that makes no sense (e.g.
                replay token ids outside the model's vocabulary), or a state saved for a model
                with another fingerprint (other weights or config).
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_bytes(model, data, source=path, seed=seed, adapt=adapt, replay_size=replay_size,
                              **rule_overrides)

    @classmethod
    def from_bytes(cls, model, data: bytes, source: str = "<bytes>", *, seed: Optional[int] = None,
                   adapt: Optional[bool] = None, replay_size: Optional[int] = None,
                   **rule_overrides: Optional[float]) -> "Session":
        """Parse a state file's contents; see :meth:`load`."""
        from safetensors.torch import load

        meta = _read_metadata(data, source)
        schema = meta.get("schema")
        if schema != SCHEMA and schema not in LEGACY_SCHEMAS:
            raise ValueError(f"session state {source}: unknown schema {schema!r} "
                             f"(this version reads {[SCHEMA, *LEGACY_SCHEMAS]})")
        checksum = meta.get(CHECKSUM_FIELD)
        if schema == SCHEMA and checksum is None:
            raise ValueError(f"session state {source} is corrupt: its description lacks the checksum "
                             f"({CHECKSUM_FIELD}) that schema {SCHEMA!r} carries")
        if checksum is not None and checksum != _description_digest(meta):
            raise ValueError(f"session state {source} was edited or is corrupt: description checksum mismatch "
                             "(a rule setting, count, replay record or other field differs from what was saved); "
                             "refusing to load it")
        fp = model.fingerprint()
        if meta.get("fingerprint") != fp:
            raise ValueError(f"session state {source} belongs to another model: fingerprint "
                             f"{meta.get('fingerprint')!r}, this model's is {fp!r}")
        try:
            tensors = load(data)
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"session state {source} is truncated or corrupt: {e}") from e
        if _tensors_digest(tensors) != meta.get("tensors_sha256"):
            raise ValueError(f"session state {source} is corrupt: tensor checksum mismatch")
        _check_description(meta, model.config.vocab_size, source)
        try:
            fast = model.fast_layers()
            if meta["n_fast_layers"] != len(fast) or set(tensors) != {f"P.{i}" for i in range(len(fast))} | {"baseline"}:
                raise ValueError(f"session state {source} does not fit the model: tensors {sorted(tensors)}")
            rule = dict(meta["rule"])
            rule.update(rule_overrides)
            s = cls(model, adapt=meta["adapt"] if adapt is None else adapt, seed=seed,
                    replay_size=meta["replay_size"] if replay_size is None else replay_size, **rule)
            P = []
            for i, m in enumerate(fast):
                t = tensors[f"P.{i}"]
                want = (m.n_heads, m.head_k_dim, m.head_v_dim)
                if tuple(t.shape) != want:
                    raise ValueError(f"session state {source}: P.{i} has shape {tuple(t.shape)}, model needs {want}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"session state {source}: P.{i} holds NaN or inf")
                P.append(t.to(device=m.W0.device, dtype=m.state_dtype).unsqueeze(0))
            b = float(tensors["baseline"][0])
            if b != float(meta["baseline"]) or not math.isfinite(b):
                raise ValueError(f"session state {source}: baseline {b} disagrees with the description")
            s.P, s.baseline = P, b
            s.episodes, s.rewards, s.reward_sum = meta["episodes"], meta["rewards"], float(meta["reward_sum"])
            s.replay = [ReplayRecord(**{k: r[k] for k in REPLAY_FIELDS}) for r in meta["replay"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"session state {source} is corrupt: bad description ({e!r})") from e
        s._trim_replay()
        s._new_episode()
        return s

    def __repr__(self) -> str:
        return (f"Session(adapt={self.adapt}, episodes={self.episodes}, rewards={self.rewards}, "
                f"baseline={self.baseline:.4g}, |P|={[round(float(p.norm()), 4) for p in self.P]})")


# ---------------------------------------------------------------------- file helpers
def _description_digest(meta: Dict[str, Any]) -> str:
    """sha256 of every field but the checksum itself, as canonical JSON (sorted keys, the writer's
    own formatting): ``json.loads`` then ``json.dumps`` gives back the same text, floats included."""
    rest = {k: v for k, v in meta.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, allow_nan=True).encode("utf-8")).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_description(meta: Dict[str, Any], vocab_size: int, source: str) -> None:
    """Refuse a description that no session could have written (schema 1 files carry no
    description checksum, and a checksum cannot vouch for what a writer got wrong)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"session state {source} is corrupt: {what}")

    fields = {"adapt": bool, "rule": dict, "replay": list}
    for name, kind in fields.items():
        if not isinstance(meta.get(name), kind):
            raise bad(f"{name} must be a {kind.__name__}, got {meta.get(name)!r}")
    for name in ("replay_size", "episodes", "rewards", "n_fast_layers"):
        if not _is_int(meta.get(name)) or meta[name] < 0:
            raise bad(f"{name} must be an integer >= 0, got {meta.get(name)!r}")
    for name in ("baseline", "reward_sum"):
        if not _is_real(meta.get(name)) or not math.isfinite(meta[name]):
            raise bad(f"{name} must be a finite number, got {meta.get(name)!r}")
    if meta["rewards"] > meta["episodes"]:
        raise bad(f"{meta['rewards']} rewarded episodes out of {meta['episodes']}")
    for j, r in enumerate(meta["replay"]):
        if not isinstance(r, dict) or set(r) != set(REPLAY_FIELDS):
            raise bad(f"replay[{j}] must hold exactly {list(REPLAY_FIELDS)}, got {r!r}")
        ids = r["ids"]
        if not isinstance(ids, list) or not all(_is_int(x) for x in ids):
            raise bad(f"replay[{j}].ids must be a list of integers")
        out = [x for x in ids if not 0 <= x < vocab_size]
        if out:
            raise ValueError(f"session state {source}: replay[{j}].ids hold token {out[0]}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
        for name in ("reward", "advantage"):
            if r[name] is not None and not (_is_real(r[name]) and math.isfinite(r[name])):
                raise bad(f"replay[{j}].{name} must be None or a finite number, got {r[name]!r}")
        if not _is_real(r["surprise"]):
            raise bad(f"replay[{j}].surprise must be a number (NaN: no prediction), got {r['surprise']!r}")
        if not _is_int(r["episode"]) or r["episode"] < 0:
            raise bad(f"replay[{j}].episode must be an integer >= 0, got {r['episode']!r}")


def _tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_metadata(data: bytes, source: str) -> Dict[str, Any]:
    """The JSON description from a safetensors header, with clear errors for bad files."""
    if len(data) < 8:
        raise ValueError(f"session state {source} is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"session state {source} is truncated: header says {n} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"session state {source} is corrupt or not a cl_arch session file: {e!r}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"session state {source} is corrupt: description is not an object")
    # The header also records where each tensor ends: a file cut short inside the data fails here.
    ends = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if offsets is None:
            raise ValueError(f"session state {source} is corrupt: the safetensors header gives tensor {k!r} "
                             "no data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"session state {source} is corrupt: tensor {k!r} has invalid data_offsets {offsets!r}")
        ends.append(offsets[1])
    if ends and 8 + n + max(ends) != len(data):
        raise ValueError(f"session state {source} is truncated or has trailing bytes "
                         f"({len(data)} bytes, header implies {8 + n + max(ends)})")
    return meta


def _write_chunk(f, chunk: memoryview) -> None:
    """One write() while saving (a seam that tests slow down to kill a save half-way)."""
    f.write(chunk)


def _bytes_writer(data: bytes):
    """A ``write(tmp)`` for :func:`~cl_arch.io.atomic_write`: ``data`` in chunks, then fsync."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            view = memoryview(data)
            for off in range(0, len(data), _WRITE_CHUNK):
                _write_chunk(f, view[off:off + _WRITE_CHUNK])
            f.flush()
            os.fsync(f.fileno())
    return write


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"folder {directory} does not exist")
    atomic_write(path, _bytes_writer(data), sync_dir=True)


# ---------------------------------------------------------------------- store
class SessionStore:
    """One saved session per user or task id, as ``<root>/<id>.session.safetensors``.

    Ids must match ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`` and contain no ``..``: no separators, no
    absolute paths, nothing that resolves outside ``root``.
    """

    SUFFIX = ".session.safetensors"

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = os.path.realpath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)

    def path(self, uid: str) -> str:
        """File of ``uid``; ValueError for an invalid id."""
        if not isinstance(uid, str) or not _ID_RE.fullmatch(uid) or ".." in uid:
            raise ValueError(f"invalid session id {uid!r}: use 1-128 letters, digits, '_', '-', '.', "
                             "starting with a letter or digit, without '..'")
        p = os.path.realpath(os.path.join(self.root, uid + self.SUFFIX))
        if os.path.dirname(p) != self.root:
            raise ValueError(f"invalid session id {uid!r}: resolves outside {self.root}")
        return p

    def exists(self, uid: str) -> bool:
        return os.path.isfile(self.path(uid))

    def ids(self) -> List[str]:
        """Stored ids, sorted."""
        return sorted(f[:-len(self.SUFFIX)] for f in os.listdir(self.root)
                      if f.endswith(self.SUFFIX) and not f.startswith("."))

    def open(self, model, uid: str, **kwargs) -> Session:
        """The saved session of ``uid``, or a new one (``Session(model, **kwargs)``) if none.

        The same call opens a new or a returning user: whatever is given in ``kwargs``
        (``adapt``, ``replay_size``, ``seed``, rule settings) applies to a stored session too,
        overriding what it was saved with; what is not given keeps its stored value. A smaller
        ``replay_size`` drops the stored session's lowest-scoring replay records (the buffer's own
        rule), for good once the session is saved again. ``adapt=False`` keeps the stored P
        (saved again as it is) but does not use it.
        """
        p = self.path(uid)
        if os.path.isfile(p):
            return Session.load(model, p, **kwargs)
        return Session(model, **kwargs)

    def save(self, session: Session, uid: str) -> str:
        """Save atomically; returns the file path."""
        p = self.path(uid)
        session.save(p)
        return p

    def delete(self, uid: str) -> bool:
        p = self.path(uid)
        if os.path.isfile(p):
            os.remove(p)
            return True
        return False


__all__ = ["Session", "SessionStore", "SessionSnapshot", "ReplayRecord", "SCHEMA"]
