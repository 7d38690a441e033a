"""The learners every benchmark compares, on the same streams.

* :class:`EpisodeLearner` runs ``B`` rows of one :class:`~cl_arch.PlasticTransformer` in one batch,
  each row with its own *policy* (a :class:`RowPolicy`): frozen; fast weights whose persistent
  memory ``P`` is committed at the end of every episode (retention, ``eta_s``, and/or reward,
  ``eta_r``); fast weights whose context memory ``S`` simply carries over episode boundaries with
  no ``P`` ("without persistence"). Batching the rows makes the paired comparison exact (same
  tokens, same weights, same arithmetic) and costs one forward pass for all of them.
* :class:`DynamicEval` is the strong classical baseline: Krause et al.'s dynamic evaluation, a
  gradient step on all weights (or, sparse, on the fast memories' ``W0`` only) after each scored
  chunk, with RMS-normalised updates whose denominator is guarded (the trap in docs/design.md,
  "Measuring learning"), calibrated at the step's own batch shape (:func:`calibration_batches`); its step size and decay are tuned
  on a package never reported (:mod:`cl_arch.eval.tune_dynamic`).

The commit is each memory's own (:meth:`~cl_arch.layers.plasticity.PlasticMemory.commit`: its
``gamma, eta_s, eta_r`` per head and its clip) unless a policy overrides the rates; this module
adds only the batching and the per-row choice of what happens at an episode boundary.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from cl_arch import PlasticTransformer
from cl_arch.state import FastLayerState, ModelState
from cl_arch.train.data import bytes_to_tensor, random_windows, read_bytes, split_files, stdlib_files


REWARD_SOURCES = ("acceptance", "surprise")


@dataclass
class RowPolicy:
    """What one row does at an episode boundary.

    Attributes:
        name: method name used in reports.
        persist: commit the episode's trace into ``P`` (three-factor rule) and start the next
            episode from ``S = W0 + P``.
        carry_context: keep the context memory ``S`` (and conv cache) across the boundary, with no
            ``P``: fast weights without persistence. Exclusive with ``persist``.
        use_reward: pass the episode's reward to the commit (else ``r = None``: retention only).
        eta_s, eta_r, gamma: override the layers' learned values (None: keep the model's).
        writes: False runs the row with every fast memory's writes switched off (modulation 0):
            the weights alone, no learning at inference at all, the control for in-episode
            adaptation.
        reward_from: what the reward of an episode is (with ``use_reward``): ``"acceptance"`` (the
            mean line acceptance under greedy tab completion) or ``"surprise"`` (the bits/byte this
            row's adaptation saved over the frozen row on the episode: a reward the text gives
            itself, so episodes that lowered the loss more than usual are committed more).
    """

    name: str
    persist: bool = False
    carry_context: bool = False
    use_reward: bool = False
    eta_s: Optional[float] = None
    eta_r: Optional[float] = None
    gamma: Optional[float] = None
    writes: bool = True
    reward_from: str = "acceptance"

    def __post_init__(self) -> None:
        if self.reward_from not in REWARD_SOURCES:
            raise ValueError(f"RowPolicy {self.name!r}: reward_from must be one of {REWARD_SOURCES}, "
                             f"got {self.reward_from!r}")
        if self.persist and self.carry_context:
            raise ValueError(f"RowPolicy {self.name!r}: persist and carry_context are exclusive")
        if self.use_reward and not self.persist:
            raise ValueError(f"RowPolicy {self.name!r}: use_reward needs persist=True")
        if not self.writes and (self.persist or self.carry_context):
            raise ValueError(f"RowPolicy {self.name!r}: a row without writes has nothing to persist or carry")


FROZEN = RowPolicy("frozen")


class EpisodeLearner:
    """``B`` rows of one model, each with a :class:`RowPolicy`, reading episodes in lock step.

    ``logits = learner.step(ids [B, T], modulation [B, T] or None)`` reads (and, in the fast
    layers, writes) the next tokens of the current episode; ``learner.end_episode(rewards [B])``
    closes it: persisting rows commit ``E_T`` into ``P``, context-carrying rows keep ``S``, every
    other row (and every attention cache) starts afresh. The model's weights are never changed.
    """

    def __init__(self, model: PlasticTransformer, policies: Sequence[RowPolicy], lam: Optional[float] = None):
        if not model.fast_layers():
            raise ValueError("EpisodeLearner needs a model with at least one fast-weight layer")
        self.model = model
        self.policies = list(policies)
        self.B = len(self.policies)
        self.layers = model.fast_layers()
        # trace decay override (as Session(lam=...)): it shapes only E, i.e. what a commit stores;
        # outputs within an episode do not depend on it, so the frozen row is unaffected
        self.lam = None if lam is None else [float(lam)] * len(self.layers)
        dev = self.layers[0].W0.device
        self.P: List[torch.Tensor] = [torch.zeros(self.B, m.n_heads, m.head_k_dim, m.head_v_dim,
                                                  device=dev, dtype=m.state_dtype) for m in self.layers]
        self.baseline = torch.zeros(self.B, device=dev, dtype=self.P[0].dtype)
        self.episodes = 0
        self.state: Optional[ModelState] = None
        self._carry: Optional[List[Optional[FastLayerState]]] = None
        self.new_episode()

    # ------------------------------------------------------------------ episodes
    def new_episode(self) -> None:
        """Fresh episode state: ``S = W0 + P`` per row (or the carried ``S``), empty caches."""
        state = self.model.materialize_state(self.model.init_state(self.B, self.P), self.B)
        if self._carry is not None:
            rows = [i for i, p in enumerate(self.policies) if p.carry_context]
            fi = 0
            for s in state.layers:
                if isinstance(s, FastLayerState):
                    c = self._carry[fi]
                    for i in rows:
                        s.S[i] = c.S[i]
                        if s.conv is not None and c.conv is not None:
                            s.conv[i] = c.conv[i]
                    fi += 1
        self.state = state

    @torch.no_grad()
    def step(self, ids: torch.Tensor, modulation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Read ``ids [B, T]`` (the same or different tokens per row); returns ``logits [B, T, V]``."""
        if not all(p.writes for p in self.policies):
            gate = torch.tensor([1.0 if p.writes else 0.0 for p in self.policies], device=ids.device)[:, None]
            modulation = gate.expand(ids.shape) if modulation is None else modulation * gate
        logits, self.state = self.model(ids, state=self.state, modulation=modulation, lam=self.lam)
        return logits

    def traces(self) -> List[torch.Tensor]:
        """A copy of the current episode's eligibility traces, one ``[B, H, K, V]`` per fast layer
        (to commit later, when a delayed reward for this episode arrives)."""
        return [s.E.clone() for s in self.state.fast()]

    @torch.no_grad()
    def end_episode(self, rewards: Optional[Sequence[Optional[float]]] = None,
                    traces: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Close the episode; ``rewards[i]`` (float or None) is used by rows with ``use_reward``.

        ``traces``: commit these (from :meth:`traces` of an earlier episode, one per fast layer)
        instead of this episode's own: a delayed reward credits the episode that earned it.
        """
        fast_states = self.state.fast()
        if traces is not None and len(traces) != len(fast_states):
            raise ValueError(f"traces must hold one tensor per fast layer ({len(fast_states)}), got {len(traces)}")
        E = self.state.traces() if traces is None else list(traces)
        for i, pol in enumerate(self.policies):
            if not pol.persist:
                continue
            r = None
            if pol.use_reward and rewards is not None and rewards[i] is not None:
                r = torch.tensor([float(rewards[i])], dtype=self.P[0].dtype)
            rows = [None if e is None else e[i:i + 1] for e in E]
            P_new, b_new = self.model.commit(rows, [p[i:i + 1] for p in self.P], r, self.baseline[i:i + 1],
                                             gamma=pol.gamma, eta_s=pol.eta_s, eta_r=pol.eta_r)
            for li, p in enumerate(P_new):
                self.P[li][i] = p[0]
            if b_new is not None:
                self.baseline[i] = b_new[0]
        self._carry = [FastLayerState(S=s.S.clone(), conv=None if s.conv is None else s.conv.clone())
                       for s in fast_states]
        self.episodes += 1
        self.new_episode()

    def new_session(self) -> None:
        """A new session of the same user: what an episode carried in ``S`` is dropped (every row
        starts at its resting state ``W0 + P``), what was committed into ``P`` is kept, as when a
        saved session file is loaded."""
        self._carry = None
        self.new_episode()

    def reset_rows(self, rows: Iterable[int]) -> None:
        """Forget everything rows have learned (``P``, baseline, carried ``S``); next episode fresh."""
        rows = list(rows)
        for P in self.P:
            P[rows] = 0
        self.baseline[rows] = 0
        if self._carry is not None:
            for c, m in zip(self._carry, self.layers):
                c.S[rows] = m.initial_state(len(rows)).to(c.S.dtype)
                if c.conv is not None:
                    c.conv[rows] = 0
        self.new_episode()

    def row_state(self, i: int) -> ModelState:
        """The state row ``i`` would start its next episode with, batch size 1 (for side probes)."""
        return self.state.select(i).clone()

    def persistent_norm(self) -> List[float]:
        """``||P||_F`` per row, summed over layers (how much each row has stored)."""
        return [float(sum(torch.linalg.vector_norm(P[i]) for P in self.P)) for i in range(self.B)]


# ---------------------------------------------------------------------------- dynamic evaluation
DYN_PARAMS = ("all", "fast_W0")


def calibration_batches(n: int = 32, chunk: int = 256, seed: int = 0) -> Iterator[torch.Tensor]:
    """``n`` random windows ``[1, chunk + 1]`` (long; inputs and the last target) of the standard
    library's *training* split, for :meth:`DynamicEval.calibrate`.

    Batch 1 and ``chunk`` bytes, the shape of :meth:`DynamicEval.step`'s updates: a byte-level
    gradient is dominated by noise, so the mean squared gradient of a mean over ``8 x 256`` targets
    (the shape this used to be measured at) is 8.0x smaller than that of a mean over 256 (measured
    on the shipped default model; ``sqrt(MS)`` 2.83x), and every RMS step was too large by up to
    that factor. The corpus is the codebase benchmark's calibration corpus (the first 2 MB of
    :func:`~cl_arch.train.data.split_files`' training files): never a held-out package, never the
    validation files.

    How many (shipped default model, chunk 256, seeds 0 / 1): the mean MS over all weights moves by
    12% / 2% between n = 16 and 32, 5% / 4% between 32 and 64 and 3% / 3% between 64 and 128; per
    weight (median of ``|MS_2n - MS_n| / MS_2n``) 18% / 19% between 32 and 64, shrinking like
    ``1/sqrt(n)``. For ``params="fast_W0"`` the mean moves 6% / 5% (32 -> 64) but per weight 56% /
    65%: most ``W0`` entries (the readout's, for bytes rarely seen) have ``sqrt(MS)`` around 1e-7,
    far below ``eps``, so their steps are set by ``eps`` and their MS's noise does not matter.
    The default 32 (about 4 s of forward/backward on one CPU thread) keeps the global scale
    within ~5%.
    """
    if n < 1 or chunk < 1:
        raise ValueError(f"calibration_batches needs n >= 1 and chunk >= 1, got n={n}, chunk={chunk}")
    data = _train_bytes()
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = random_windows(data, 1, chunk, g)
        yield torch.cat([x, y[:, -1:]], dim=1)


def _train_bytes() -> torch.Tensor:
    train_files, _ = split_files(stdlib_files("train"))
    return bytes_to_tensor(read_bytes(train_files, 2_000_000))


class DynamicEval:
    """Krause et al. (2018) dynamic evaluation on a private copy of the model.

    After each chunk is scored, one step on its loss updates the adapted weights ``theta``:

    * ``rule="rms"``: ``theta <- theta - lr * g / (sqrt(MS) + eps) + decay * (theta_0 - theta)``,
      where ``MS`` is the mean squared gradient measured on the pretraining corpus
      (:meth:`calibrate`, with :func:`calibration_batches`: the step's own batch shape). Parameters
      the corpus never moved (embeddings of bytes that never occur) have ``MS = 0`` exactly, so an
      unguarded ``1 / sqrt(MS)`` diverges at the first such byte: ``eps`` (default 1e-3) bounds the
      step to ``lr * g / eps``. It is not only a guard: on the shipped model the median
      ``sqrt(MS)`` over all weights is 1.6e-3, so ``eps`` also shortens typical steps by about
      40% (the tuned ``lr`` absorbs that), and over ``W0`` alone it is ~1e-7, so most ``W0``
      steps are ``lr * g / eps``.
    * ``rule="sgd"``: ``theta <- theta - lr * g + decay * (theta_0 - theta)``.

    ``params`` chooses ``theta``: ``"all"`` every weight (Krause's dynamic evaluation), or
    ``"fast_W0"`` only the base memories ``W0`` of the fast memories (``[m.W0 for m in
    model.fast_layers()]``, the readout memory's included): a sparse dynamic evaluation in the spirit
    of Krause et al.'s (who adapt a small added set of weights, not a subset of the network's), and
    the gradient-based counterpart of the model's own fast-weight adaptation. Weights outside
    ``theta`` have ``requires_grad`` off on the private copy (the backward pass skips their
    gradients) and never change; ``decay``, the ``eps`` guard, ``max_grad_norm`` and
    :meth:`drift_from_start` act on ``theta`` alone.

    ``decay`` pulls the weights back toward the pretrained ``theta_0`` (Krause's global prior).
    The caller's model is not modified.
    """

    def __init__(self, model: PlasticTransformer, lr: float = 1e-5, rule: str = "rms", eps: float = 1e-3,
                 decay: float = 0.0, max_grad_norm: Optional[float] = None, params: str = "all"):
        if rule not in ("rms", "sgd"):
            raise ValueError(f"DynamicEval.rule must be 'rms' or 'sgd', got {rule!r}")
        if params not in DYN_PARAMS:
            raise ValueError(f"DynamicEval.params must be one of {DYN_PARAMS}, got {params!r}")
        if not lr > 0 or not eps > 0 or not decay >= 0:
            raise ValueError(f"DynamicEval needs lr > 0, eps > 0, decay >= 0 (got {lr}, {eps}, {decay})")
        if not decay < 1:
            raise ValueError(f"DynamicEval.decay must be < 1 (1 resets the weights every step), got {decay}")
        self.model = copy.deepcopy(model)
        self.model.eval()  # no dropout: the prequential score must be the model's best guess
        self.lr, self.rule, self.eps, self.decay, self.max_grad_norm = lr, rule, eps, decay, max_grad_norm
        self.param_mode = params
        if params == "all":
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            self.params = [m.W0 for m in self.model.fast_layers()]
            if not self.params:
                raise ValueError("DynamicEval(params='fast_W0') needs a model with fast memories")
            keep = {id(p) for p in self.params}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in keep)
        self.theta0 = [p.detach().clone() for p in self.params]
        self.ms: Optional[List[torch.Tensor]] = None
        self.state: Optional[ModelState] = None
        self.updates = 0

    def calibrate(self, batches: Iterable[torch.Tensor]) -> Dict[str, float]:
        """Mean squared gradient of every adapted weight over batches ``[B, T+1]`` of bytes (use
        :func:`calibration_batches`: ``B = 1, T = chunk``, the shape :meth:`step` learns from).

        Returns ``ms_zero_fraction`` (weights whose MS is exactly zero: the ones the guard
        protects), ``rms_median`` (median ``sqrt(MS)``, to compare with ``eps``) and ``batches``.
        """
        sums = [torch.zeros_like(p) for p in self.params]
        n = 0
        for batch in batches:
            self.model.zero_grad(set_to_none=True)
            logits, _ = self.model(batch[:, :-1], return_state=False)
            F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
            for s, p in zip(sums, self.params):
                if p.grad is not None:
                    s += p.grad.detach() ** 2
            n += 1
        if n == 0:
            raise ValueError("DynamicEval.calibrate: no batches")
        self.load_calibration([s / n for s in sums])
        self.model.zero_grad(set_to_none=True)
        return {"batches": n, **self._calibration_info()}

    def load_calibration(self, ms: Sequence[torch.Tensor]) -> None:
        """Use mean squared gradients measured elsewhere (another :class:`DynamicEval` of the same
        model and ``params``: its :attr:`ms`, one tensor per adapted weight, same shapes)."""
        ms = list(ms)
        if len(ms) != len(self.params) or any(m.shape != p.shape for m, p in zip(ms, self.params)):
            raise ValueError("DynamicEval.load_calibration: the statistics do not match the adapted weights "
                             f"({len(ms)} tensors for {len(self.params)} weights of params={self.param_mode!r})")
        self.ms = [m.detach().to(device=p.device, dtype=p.dtype) for m, p in zip(ms, self.params)]

    def _calibration_info(self) -> Dict[str, float]:
        flat = torch.cat([m.flatten().float() for m in self.ms])
        return {"ms_zero_fraction": float((flat == 0).float().mean()),
                "rms_median": float(flat.sqrt().median())}

    def new_episode(self) -> None:
        """Start a new episode (fresh recurrent state; the adapted weights stay)."""
        self.state = None

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Score ``ids [1, T]`` against ``targets [1, T]`` *then* learn from them.

        Returns the logits ``[1, T, V]`` computed before the update (prequential).
        """
        if self.rule == "rms" and self.ms is None:
            raise RuntimeError("DynamicEval(rule='rms') needs calibrate() first")
        self.model.zero_grad(set_to_none=True)
        logits, state = self.model(ids, state=self.state)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        self.state = state.detach()  # truncated BPTT: the next chunk does not reach back
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            if self.max_grad_norm is not None:
                norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
                scale = min(1.0, self.max_grad_norm / (float(norm) + 1e-12))
                grads = [g * scale for g in grads]
            for i, (p, g) in enumerate(zip(self.params, grads)):
                step = g / (self.ms[i].sqrt() + self.eps) if self.rule == "rms" else g
                p -= self.lr * step
                if self.decay:
                    p += self.decay * (self.theta0[i] - p)
        self.model.zero_grad(set_to_none=True)
        self.updates += 1
        return logits.detach()

    @torch.no_grad()
    def drift_from_start(self) -> float:
        """``||theta - theta_0|| / ||theta_0||`` over the adapted weights."""
        num = sum(float(((p - t0) ** 2).sum()) for p, t0 in zip(self.params, self.theta0))
        den = sum(float((t0 ** 2).sum()) for t0 in self.theta0)
        return math.sqrt(num / max(den, 1e-30))


__all__ = ["RowPolicy", "FROZEN", "EpisodeLearner", "DynamicEval", "DYN_PARAMS", "calibration_batches"]
