"""What every fast-weight memory shares: the base memory ``W0``, the resting state ``M = W0 + P``,
the per-head plasticity settings the commit reads (docs/design.md, "The rule", "The commit"), and
what every memory's config shares (:class:`MemoryConfig`)."""
import dataclasses
import math
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn as nn

from cl_arch.kernels.commit import reward_commit
from cl_arch.kernels.plastic import plastic_rule, resolve_backend

from ..state import FastLayerState
from .commit import TraceCommit


def logit(p: float) -> float:
    # lam = 1 or gamma = 1 are legal settings; keep the unconstrained parameter finite.
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


# Registry of memory kinds: MemoryConfig subclasses register under their ``kind`` so a config list
# read from JSON (``{"kind": "readout", ...}``) builds the right dataclass.
MEMORY_KINDS: Dict[str, type] = {}


@dataclasses.dataclass
class MemoryConfig:
    """Base of every memory's config. Subclasses are dataclasses with a class attribute ``kind``
    (registered in :data:`MEMORY_KINDS` on definition), a ``name`` field (the attribute the model
    holds the memory under, and its state slot's name), validation in ``__post_init__`` and
    :meth:`build`."""

    kind = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            MEMORY_KINDS[cls.kind] = cls

    def build(self, host) -> "PlasticMemory":
        """The memory module for a model whose config is ``host`` (a
        :class:`~cl_arch.config.PlasticConfig`: ``d_model``, ``vocab_size`` and the rule's settings)."""
        raise NotImplementedError

    # Fields added after configs were first saved and fingerprinted; at their default (the old
    # behaviour) they are left out of the dict, so configs and fingerprints from before keep theirs.
    ADDED_LATER: ClassVar[Dict[str, Any]] = {"write_chunk": 1}

    def to_dict(self) -> Dict[str, Any]:
        """``{"kind": ..., field: value, ...}`` (JSON-serialisable; fields of :attr:`ADDED_LATER` at
        their default left out)."""
        d = dataclasses.asdict(self)
        for name, default in self.ADDED_LATER.items():
            if name in d and d[name] == default:
                del d[name]
        return {"kind": self.kind, **d}

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> "MemoryConfig":
        """The config :meth:`to_dict` wrote; an unknown kind or field raises ``ValueError`` naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"a memory config must be a JSON object, got {type(d).__name__}")
        kind = d.get("kind")
        if kind not in MEMORY_KINDS:
            raise ValueError(f"unknown memory kind {kind!r}; known: {sorted(MEMORY_KINDS)}")
        cls = MEMORY_KINDS[kind]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"kind"})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k != "kind"})


def check_number(owner: str, name: str, v: Any, lo: float, hi: float, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """``v`` as a float in the interval, or ``ValueError`` naming ``owner.name``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{owner}.{name}: must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{owner}.{name}: must be in {lb}{lo}, {hi}{hb}, got {v!r}")
    return float(v)


def check_int(owner: str, name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{owner}.{name}: must be an integer >= {lo}, got {v!r}")
    return v


def check_choice(owner: str, name: str, v: Any, allowed) -> None:
    if v not in allowed:
        raise ValueError(f"{owner}.{name}: must be one of {tuple(allowed)}, got {v!r}")


class PlasticMemory(nn.Module):
    """Base of every fast-weight memory: ``n_heads`` memories ``[K, V]`` and how they commit.

    Parameters:
        W0 ``[H, K, V]``: base memory; with P the resting state ``M = W0 + P`` where every episode
            starts and toward which the memory decays; zeros at init.
        lam_logit, gamma_logit, eta_s, eta_r ``[H]``: plasticity settings, unconstrained;
            ``lam`` and ``gamma`` are their sigmoids. The commit reads them (through the memory's
            commit strategy, :mod:`cl_arch.memory.commit`); the forward pass uses ``lam`` for the
            eligibility trace.
    """

    def __init__(self, rule, H: int, K: int, V: int, commit=None) -> None:
        """``rule``: the settings every memory of a model shares (a :class:`FastLayerConfig`, or a
        :class:`~cl_arch.config.PlasticConfig`, which carries them): the plasticity settings' initial
        values (``lam, gamma, eta_s, eta_r, learn_plasticity``), ``commit_clip``, ``baseline_rho`` and
        the kernel's ``chunk_size`` / ``recurrent_threshold``. ``commit``: a commit strategy
        (default :class:`TraceCommit`)."""
        super().__init__()
        self.n_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.commit_strategy = commit if commit is not None else TraceCommit()
        self.rule_clip = rule.commit_clip
        self.baseline_rho = rule.baseline_rho
        self.chunk_size, self.recurrent_threshold = rule.chunk_size, rule.recurrent_threshold
        self.W0 = nn.Parameter(torch.zeros(H, K, V))
        learn = rule.learn_plasticity
        if rule.lam is not None:
            self.lam_logit = nn.Parameter(torch.full((H,), logit(rule.lam)), requires_grad=learn)
        else:
            self.lam_logit = None
        self.gamma_logit = nn.Parameter(torch.full((H,), logit(rule.gamma)), requires_grad=learn)
        self.eta_s = nn.Parameter(torch.full((H,), float(rule.eta_s)), requires_grad=learn)
        self.eta_r = nn.Parameter(torch.full((H,), float(rule.eta_r)), requires_grad=learn)

    @property
    def lam(self) -> Optional[torch.Tensor]:
        """Trace decay per head ``[H]`` in (0, 1), or None when the trace is disabled."""
        return self.commit_strategy.trace_decay(self)

    @property
    def gamma(self) -> torch.Tensor:
        """Persistent-memory retention per head ``[H]`` in (0, 1)."""
        return torch.sigmoid(self.gamma_logit)

    @property
    def state_dtype(self) -> torch.dtype:
        """States are kept in float32 (float64 when the model is double)."""
        return torch.promote_types(self.W0.dtype, torch.float32)

    def resting_state(self, batch_size: int, P: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``M = W0 + P`` as ``[B, H, K, V]`` (``[H, K, V]`` when P is None) in :attr:`state_dtype`;
        differentiable in W0 and P. The episode starts at M and decays back toward it."""
        M = self.W0.to(self.state_dtype)
        if P is not None:
            M = M + P.to(self.state_dtype)
        return M

    def initial_state(self, batch_size: int, P: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``S0 = M = W0 + P`` as ``[B, H, K, V]`` in :attr:`state_dtype`; differentiable in W0."""
        M = self.resting_state(batch_size, P)
        return M.expand(batch_size, *self.W0.shape) if M.dim() == 3 else M

    # ------------------------------------------------------------------ the commit (docs/design.md)
    def plasticity_parameters(self) -> Dict[str, nn.Parameter]:
        """The learnable settings the commit reads, by name: what pretraining freezes and
        ``finetune(trainable="plasticity")`` trains (``{}`` under the state commit)."""
        return self.commit_strategy.trainable(self)

    @property
    def trace_follows_state(self) -> bool:
        """True when the trace decay is tied to the memory's own decay (a per-call ``lam``
        override is then ignored): the state commit."""
        return self.commit_strategy.trace_follows_state

    def commit_rates(self) -> Dict[str, torch.Tensor]:
        """This memory's own per-head commit settings ``gamma, eta_s, eta_r`` (``[H]`` each),
        differentiable in the learnable parameters (meta-training reads them through here)."""
        return self.commit_strategy.rates(self)

    @property
    def commit_clip(self) -> Optional[float]:
        """Per-head Frobenius bound on the committed trace (None: unbounded)."""
        return self.commit_strategy.clip(self)

    def commit(self, P: torch.Tensor, E: torch.Tensor, r=None, b=None, *, gamma=None, eta_s=None, eta_r=None,
               clip: Optional[float] = None, rho: Optional[float] = None,
               backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
        """One three-factor commit of this memory: ``P <- gamma P + (eta_s + eta_r (r - b)) clip(E)``.

        Every caller commits through here (via ``model.commit``); the rates and clip come from
        the memory's commit strategy, so no caller special-cases a memory.

        Args:
            P, E: ``[N, H, K, V]`` persistent memory and the episode's trace.
            r, b: reward and running baseline, floats or ``[N]``; ``r=None`` is retention only.
            gamma, eta_s, eta_r: floats or ``[H]`` overriding this memory's own (None: own).
            clip: a bound overriding :attr:`commit_clip` (``math.inf``: unbounded); None: own.
            rho: baseline step (None: the model's ``baseline_rho``).
            backend: ``reward_commit``'s; ``"naive"`` keeps the autograd graph.

        Returns:
            ``(P_new [N, H, K, V], b_new [N])``.
        """
        own = self.commit_rates()

        def pick(name, v):
            return own[name].to(P.dtype) if v is None else v

        return reward_commit(P, E.to(P.dtype), r, b, gamma=pick("gamma", gamma), eta_s=pick("eta_s", eta_s),
                             eta_r=pick("eta_r", eta_r), clip=self.commit_clip if clip is None else clip,
                             rho=self.baseline_rho if rho is None else rho, backend=backend)

    def cache_shape(self, batch_size: int):
        """Shape of the input cache a stream carries (``FastLayerState.conv``), or None."""
        raise NotImplementedError

    def run_rule(self, q, k, v, beta, g, state: FastLayerState, lam, output_final_state: bool, rule: str = "delta",
                 scale=None, rest: bool = True):
        """:func:`plastic_rule` on this memory's state: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``,
        ``beta, g [B, T, H]`` -> ``(o [B, T, H, V], S_T, E_T)``.

        The memory relaxes toward its resting state ``M = W0 + P`` (docs/design.md, "The rule"), so
        what a commit put in P acts on every token. ``rest=False`` is the first design's rule: start at ``W0 + P`` and
        decay toward zero. ``lam`` overrides the trace decay (float or ``[H]``; None: own).
        Decode steps take the per-token loop, training and prefill the chunked form (FLA's rule).
        """
        B, T = q.shape[:2]
        M = self.resting_state(B, state.P)
        S0 = None if state.S is None else state.S.to(self.state_dtype)
        if not rest:
            S0, M = (self.initial_state(B, state.P) if S0 is None else S0), None
        lam = self.lam if lam is None else torch.as_tensor(lam, device=q.device)
        mode = "recurrent" if (not self.training and T <= self.recurrent_threshold) else "chunk"
        return plastic_rule(
            q, k, v, beta, g, rule=rule, scale=scale,
            lam=None if lam is None else lam.to(self.state_dtype),
            resting_state=M,
            initial_state=S0,
            initial_trace=None if (lam is None or state.E is None) else state.E.to(self.state_dtype),
            output_final_state=output_final_state,
            backend=resolve_backend(mode, q.device),
            chunk_size=self.chunk_size,
            check_values=False,  # computed by the network: no host sync per layer and step
        )
