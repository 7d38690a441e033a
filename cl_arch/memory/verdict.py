"""The verdict memory: a reward-modulated output memory that learns what reading cannot, which of
the model's own suggestions a user accepts (docs/design.md, "Rewards on text").

The reading memories learn the text; a completion product's users differ in what they accept, and
that is not written in the text they all share. This memory adds a logit correction read under the
episodic memory's wide sparse keys,

    logits += scale * phi(h_t)^T Q          Q [B, H, F, V], phi(h) = unit(relu(R unit(h) - theta))

and learns ``Q`` by REINFORCE from the verdict on what the session generated, never from text it
observed:

    E += phi(h_t) (e(a_t) - pi_t)^T         per generated token a_t (pi_t: the model's softmax, all memories read)
    Q <- Q + eta (r - b) E                  at the verdict; b the session's running reward baseline

``E`` is ``d log pi(a) / dQ`` divided by ``scale``, so the commit is a policy-gradient step on the
proposals' log-likelihood weighted by their advantage. ``Q`` is this memory's persistent memory
``P`` (saved with a session like every ``P``); ``W0`` stays zero, so with ``Q = 0`` the read is zero
and the logits are the model's without this memory. Within an episode nothing is written (no ``S``
recurrence): the trace is built by the session, token by token, through :meth:`VerdictMemory.reinforce`.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..state import FastLayerState, StepContext
from .base import MemoryConfig, check_int, check_number
from .episodic import EpisodicConfig, EpisodicMemory
from .output import OutputContext

# forwards of at most this many positions (B * T: decode steps) read W0 and Q on the key's firing features only
SPARSE_READ_ROWS = 8


@dataclass(frozen=True)
class VerdictCommit:
    """``Q <- Q + eta (r - b) E``: no decay, no retention of what was read (``eta_s = 0``), no clip
    (the trace of a short suggestion is bounded: ``|E| <= sqrt(2)`` per token). Without a reward
    (``end_episode``) Q is unchanged exactly."""

    eta: float = 1.0
    trace_follows_state = True  # a session's lam override does not apply: the trace sums, undecayed

    def trace_decay(self, memory) -> torch.Tensor:
        return torch.ones_like(memory.eta_s)

    def rates(self, memory) -> Dict[str, torch.Tensor]:
        return {"gamma": torch.ones_like(memory.eta_s), "eta_s": torch.zeros_like(memory.eta_s),
                "eta_r": torch.full_like(memory.eta_s, self.eta)}

    def clip(self, memory) -> None:
        return None

    def trainable(self, memory) -> Dict[str, torch.nn.Parameter]:
        return {}


@dataclass
class VerdictConfig(MemoryConfig):
    """A verdict memory (docs/design.md, "Rewards on text").

    Attributes:
        name: the model attribute and state slot it lives under.
        heads: heads of ``[F, vocab]`` (their reads add up).
        features: ``F``, the key width (the episodic memory's keys).
        threshold: ``theta`` of the keys (fixed here: chosen on the training corpus, not learned).
        scale: read scale of ``phi^T Q`` into the logits.
        eta: commit step on the advantage ``r - b`` (1.0: chosen on the training package logging).
        seed: seed of the fixed projection ``R`` (the episodic memory's default seed: the same keys).
    """

    kind = "verdict"
    name: str = "verdict"
    heads: int = 1
    features: int = 2048
    threshold: float = 1.5
    scale: float = 1.0
    eta: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "heads", self.heads)
        check_int(owner, "features", self.features)
        check_int(owner, "seed", self.seed, lo=0)
        self.threshold = check_number(owner, "threshold", self.threshold, 0.0, math.inf)
        self.scale = check_number(owner, "scale", self.scale, 0.0, math.inf, lo_open=True)
        self.eta = check_number(owner, "eta", self.eta, 0.0, math.inf)

    def build(self, host) -> "VerdictMemory":
        return VerdictMemory(self, host.d_model, host.vocab_size, host)


class VerdictMemory(EpisodicMemory):
    """``forward(out, state, ctx) -> (scale * phi(h)^T (W0 + P) [B, T, vocab], FastLayerState)``.

    The keys are the episodic memory's (this class reuses its ``R`` and ``features``); the state's
    ``conv`` slot carries the key ``phi(h)`` of the last position: the key under which the token
    generated next is traced. ``S`` is never written; ``E`` changes only through :meth:`add_trace`
    (:meth:`policy_gradient`, :meth:`reinforce`); the commit is :class:`VerdictCommit`.
    """

    def __init__(self, config: VerdictConfig, d_model: int, vocab_size: int, rule) -> None:
        keys = EpisodicConfig(name=config.name, heads=config.heads, features=config.features, values="onehot",
                              threshold=config.threshold, scale=config.scale, seed=config.seed)
        super().__init__(keys, d_model, vocab_size, rule)
        self.config = config
        self.commit_strategy = VerdictCommit(config.eta)
        # fixed settings, chosen on the training corpus: no training moves them
        for p in (self.key_threshold, self.read_scale, self.A_log, self.beta_logit):
            p.requires_grad_(False)

    @property
    def state_commit(self) -> bool:
        return False

    def _w0_is_zero(self) -> bool:
        """W0 is zero unless a fold wrote into it: checked once per change of W0 (its storage and
        in-place version counter), not on every decode step."""
        key = (self.W0.data_ptr(), self.W0._version, self.W0.device)
        if getattr(self, "_w0_key", None) != key:
            self._w0_key, self._w0_zero = key, not bool(self.W0.detach().any())
        return self._w0_zero

    def cache_shape(self, batch_size: int):
        """``[B, 1, F]``: the key ``phi(h)`` of the last position read (zeros: nothing read)."""
        return (batch_size, 1, self.head_k_dim)

    def forward(self, out: OutputContext, state: Optional[FastLayerState] = None,
                ctx: Optional[StepContext] = None) -> Tuple[torch.Tensor, Optional[FastLayerState]]:
        """
        Args:
            out: the call's :class:`OutputContext` (``h [B, T, d_model]``).
            state: this memory's slot: ``P [B, H, F, V]`` is ``Q`` (None: zeros), ``E`` the episode's
                trace, ``conv [B, 1, F]`` the last position's key ``phi(h)``.
            ctx: ``need_state`` (modulation and lam do not apply: nothing is written here).

        Returns:
            ``[B, T, vocab]`` to add to the logits (zeros when ``Q`` is None: nothing learned), and
            the new state (None when ``ctx.need_state`` is False).
        """
        ctx = ctx if ctx is not None else StepContext()
        state = state if state is not None else FastLayerState()
        h = out.h
        cdt = torch.promote_types(h.dtype, torch.float32)
        hn = F.normalize(h.to(cdt), p=2, dim=-1)
        scale = self.read_scale.to(cdt)
        W0 = None if (not self.W0.requires_grad and self._w0_is_zero()) else self.W0.to(cdt)
        P = None if state.P is None else state.P.to(cdt)
        rows = hn.shape[0] * hn.shape[1]
        if rows > SPARSE_READ_ROWS and P is not None and not P.requires_grad and not bool(P.detach().any()):
            P = None  # reading many positions with nothing learned (one scan of Q, not T x F x V multiply-adds)
        if W0 is None and P is None:
            # nothing to read: only the last position's key is kept (the whole call's keys cost a
            # [T, d] x [d, F] product and three [T, F] passes, a tenth of a reading call of the shipped model)
            key_last = self.features(hn[:, -1:])
            read = torch.zeros(*hn.shape[:2], self.head_v_dim, dtype=cdt, device=h.device).to(h.dtype)
            return read, (FastLayerState(S=state.S, E=state.E, P=state.P, conv=key_last) if ctx.need_state else None)
        phi = self.features(hn)  # [B, T, F]
        key_last = phi[:, -1:]
        if rows <= SPARSE_READ_ROWS:
            # a decode step: read only the features that fire (about 7% of F), not all of W0 and P
            cols = (phi > 0).flatten(0, 1).any(0).nonzero()[:, 0]
            phi = phi[..., cols]
            W0, P = (None if W0 is None else W0[:, cols]), (None if P is None else P[:, :, cols])
        # phi^T W0 + phi^T P read separately: W0 + P would be a 2 MB copy per decoded token
        read = torch.zeros(*phi.shape[:2], self.head_v_dim, dtype=cdt, device=h.device)
        if W0 is not None:
            read = read + torch.einsum("btf,hfv,h->btv", phi, W0, scale)
        if P is not None:
            read = read + torch.einsum("btf,bhfv,h->btv", phi, P, scale)
        read = read.to(h.dtype)
        if not ctx.need_state:
            return read, None
        return read, FastLayerState(S=state.S, E=state.E, P=state.P, conv=key_last)

    def policy_gradient(self, state: FastLayerState, tokens: torch.Tensor,
                        logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The trace's rank-one factors for the tokens ``tokens [B]`` generated from the final
        ``logits [B, V]`` of the last position read: ``(phi(h) [B, F], e(a) - softmax(logits) [B, V])``.

        ``phi(h)`` is the key of that position (the slot's ``conv``); a slot without one (nothing read
        yet) raises ``ValueError``."""
        if state.conv is None:
            raise ValueError(f"{self.config.name}: a trace step needs the key of the position the token was "
                             "generated from (read something first)")
        cdt = self.state_dtype
        phi = state.conv[:, -1].to(cdt)
        g = torch.softmax(logits.to(cdt), -1).neg_()
        g.scatter_add_(1, tokens.to(g.device).long()[:, None], torch.ones(g.shape[0], 1, dtype=cdt, device=g.device))
        return phi, g

    def add_trace(self, state: FastLayerState, phi: torch.Tensor, g: torch.Tensor) -> FastLayerState:
        """``E += phi g^T`` on every head (``phi [B, F]``, ``g [B, V]``; or ``phi [B, T, F]``, ``g [B, T, V]``:
        the sum of T such steps), in place when the slot holds a contiguous trace (a decode step then
        allocates nothing: the trace is 2 MB), otherwise into a new one. Returns the slot (the same ``S``,
        ``P`` and ``conv``)."""
        if phi.dim() == 2:
            phi, g = phi[:, None], g[:, None]
        B, H = phi.shape[0], self.n_heads
        E = state.E
        if E is None or not E.is_contiguous() or E.dtype != self.state_dtype:
            E = torch.zeros(B, H, self.head_k_dim, self.head_v_dim, dtype=self.state_dtype, device=phi.device) \
                if E is None else E.to(self.state_dtype).contiguous().clone()
        # the key is sparse: add the outer product on the rows where it fires
        cols = (phi > 0).flatten(0, 1).any(0).nonzero()[:, 0]
        rows = torch.einsum("btc,btv->bcv", phi[..., cols], g)                  # [B, C, V]
        E.view(B * H, self.head_k_dim, self.head_v_dim).index_add_(
            1, cols, rows if H == 1 else rows.repeat_interleave(H, 0))
        return FastLayerState(S=state.S, E=E, P=state.P, conv=state.conv)

    def reinforce(self, state: FastLayerState, tokens: torch.Tensor, logits: torch.Tensor) -> FastLayerState:
        """A new slot whose trace is ``state``'s plus ``phi(h) (e(a) - softmax(logits))^T`` per head
        (``tokens [B]``, ``logits [B, V]``: :meth:`policy_gradient`); ``state`` is left as it was."""
        phi, g = self.policy_gradient(state, tokens, logits)
        E = None if state.E is None else state.E.to(self.state_dtype).clone()
        return self.add_trace(FastLayerState(S=state.S, E=E, P=state.P, conv=state.conv), phi, g)


__all__ = ["VerdictCommit", "VerdictConfig", "VerdictMemory"]
