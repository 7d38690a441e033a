"""The in-block fast-weight memory: a token mixer whose gated delta-rule (or Hebbian) memory has a
learned base W0 and a persistent memory P, read and written by :func:`cl_arch.kernels.plastic_rule`;
and :class:`FastLayerConfig`, its settings (which are also every memory's rule settings)."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.norm import GatedRMSNorm, RMSNorm
from ..state import FastLayerState, StepContext
from .base import PlasticMemory, check_choice, check_int, check_number

RULES = ("delta", "hebb")
TARGETS = ("same", "next")


@dataclass
class FastLayerConfig:
    """What one fast-weight layer needs, on its own: a retrofit into another network builds
    ``FastWeightLayer(FastLayerConfig(d_model=4096, n_heads=16, ...))`` with no model config.

    A model's :class:`~cl_arch.config.PlasticConfig` extends it: its fields are the settings of the
    model's in-block fast layers, and the plasticity and kernel settings (``lam`` ... ``baseline_rho``,
    ``chunk_size``, ``recurrent_threshold``) are also the initial values of its output memories'.
    Checked on construction; an invalid value raises ``ValueError`` naming ``<class>.<field>``.
    """

    d_model: int = 128
    n_heads: int = 4
    head_k_dim: int = 32
    head_v_dim: int = 32
    conv_size: int = 4  # short causal depthwise conv on q/k/v; 0 disables
    rule: str = "delta"
    # "same": token t writes k_t -> v_t; "next": the key of the previous position writes this token's
    # value (k_{t-1} -> v_t), so a read with q_t retrieves what followed similar contexts (a
    # next-token-aligned fast weight, docs/design.md "Next-token fast layers"). Needs conv_size >= 2.
    target: str = "same"
    use_gate: bool = True
    chunk_size: int = 64
    recurrent_threshold: int = 16
    norm_eps: float = 1e-6
    fast_rest: str = "resting"  # decay toward W0 + P ("resting") or toward 0 from S0 = W0 + P ("zero")
    decay_init: str = "fla"  # decay at init: "fla" (random, as GatedDeltaNet) or "spread" (decay_spans)
    decay_spans: List[float] = dataclasses.field(default_factory=lambda: [4.0, 4096.0])  # tokens, first/last head
    # --- plasticity (initial values of the learnable per-head parameters, fixed settings) ---
    lam: Optional[float] = 0.5  # eligibility-trace decay; None disables the trace
    gamma: float = 0.98  # persistent-memory retention per commit
    eta_s: float = 0.0  # self-supervised commit rate
    eta_r: float = 1.0  # reward-modulated commit rate
    commit_clip: float = 10.0  # Frobenius-norm bound per head on the committed trace
    baseline_rho: float = 0.1  # running reward-baseline rate
    learn_plasticity: bool = True

    def __post_init__(self) -> None:
        owner = type(self).__name__

        def num(name: str, lo: float, hi: float, **kw: bool) -> None:
            setattr(self, name, check_number(owner, name, getattr(self, name), lo, hi, **kw))

        for name in ("d_model", "n_heads", "head_k_dim", "head_v_dim", "chunk_size"):
            check_int(owner, name, getattr(self, name))
        for name in ("conv_size", "recurrent_threshold"):
            check_int(owner, name, getattr(self, name), lo=0)
        if self.conv_size == 1:
            raise ValueError(f"{owner}.conv_size: must be 0 (disabled) or >= 2")
        num("norm_eps", 0.0, 1.0, lo_open=True)
        check_choice(owner, "rule", self.rule, RULES)
        check_choice(owner, "target", self.target, TARGETS)
        if self.target == "next" and self.conv_size == 0:
            raise ValueError(f"{owner}.target: 'next' rebuilds the previous position's key from the short-conv "
                             f"cache, so it needs conv_size >= 2 (got 0)")
        for name in ("use_gate", "learn_plasticity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name}: must be a bool, got {getattr(self, name)!r}")
        check_choice(owner, "fast_rest", self.fast_rest, ("resting", "zero"))
        check_choice(owner, "decay_init", self.decay_init, ("spread", "fla"))
        spans = self.decay_spans
        if (not isinstance(spans, (list, tuple)) or len(spans) != 2 or
                any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 1.0 <= x < math.inf for x in spans)
                or spans[0] > spans[1]):
            raise ValueError(f"{owner}.decay_spans: must be [shortest, longest] time scales in tokens, "
                             f"1 <= shortest <= longest, got {spans!r}")
        self.decay_spans = [float(x) for x in spans]
        if self.lam is not None:
            num("lam", 0.0, 1.0)
        num("gamma", 0.0, 1.0, lo_open=True)
        num("eta_s", -math.inf, math.inf)
        num("eta_r", -math.inf, math.inf)
        num("commit_clip", 0.0, math.inf, lo_open=True)
        num("baseline_rho", 0.0, 1.0)

    def fast_layer(self) -> "FastLayerConfig":
        """The :class:`FastLayerConfig` part alone (for a model's config: its blocks' layers' settings)."""
        return FastLayerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FastLayerConfig)})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# The fields one fast-weight layer reads.
FAST_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(FastLayerConfig))


class ShortConv(nn.Module):
    """Causal depthwise conv over time, then SiLU. ``x [B, T, C] -> [B, T, C]``.

    The last ``kernel_size - 1 + lookback`` inputs are returned as a cache so that feeding a sequence
    in pieces gives the same output as feeding it whole; with ``lookback`` extra rows the output also
    holds the ``lookback`` positions before ``x`` (``[B, lookback + T, C]``), recomputed from the cache.
    """

    def __init__(self, channels: int, kernel_size: int, lookback: int = 0):
        super().__init__()
        self.kernel_size = kernel_size
        self.lookback = lookback
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    @property
    def cache_len(self) -> int:
        return self.kernel_size - 1 + self.lookback

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C]``, ``cache [B, cache_len, C]`` or None (zeros) -> (y ``[B, lookback + T, C]``, new cache)."""
        B, T, C = x.shape
        if cache is None:
            cache = x.new_zeros(B, self.cache_len, C)
        xx = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, cache_len + T, C]
        y = self.conv(xx.transpose(1, 2)).transpose(1, 2)  # 'valid' conv: exactly lookback + T outputs
        return F.silu(y), xx[:, T:]


class FastWeightLayer(PlasticMemory):
    """Token mixer whose memory is a per-head matrix rewritten at every token (docs/design.md, "The rule").

    ``forward(x [B, T, d_model], state, ctx) -> (y [B, T, d_model], FastLayerState)``.

    Parameters beyond the projections and those of :class:`PlasticMemory` (W0, plasticity settings):
        A_log, dt_bias ``[H]``: decay ``g = -exp(A_log) * softplus(a_proj(x) + dt_bias)`` (FLA's GatedDeltaNet).
    """

    def __init__(self, config: FastLayerConfig, layer_idx: int = 0):
        """``config``: a :class:`FastLayerConfig` (a model's :class:`~cl_arch.config.PlasticConfig`
        is one: its fast-layer fields are used), e.g. alone for a layer inserted into another network."""
        if not isinstance(config, FastLayerConfig):
            raise ValueError(f"FastWeightLayer needs a PlasticConfig or FastLayerConfig, got {type(config).__name__}")
        config = config.fast_layer()
        super().__init__(config, config.n_heads, config.head_k_dim, config.head_v_dim)
        self.layer_idx = layer_idx
        self.config = config
        H, K, V = config.n_heads, config.head_k_dim, config.head_v_dim
        d = config.d_model

        self.q_proj = nn.Linear(d, H * K, bias=False)
        self.k_proj = nn.Linear(d, H * K, bias=False)
        self.v_proj = nn.Linear(d, H * V, bias=False)
        self.b_proj = nn.Linear(d, H, bias=False)  # write strength beta
        self.a_proj = nn.Linear(d, H, bias=False)  # data-dependent decay
        self.next_target = config.target == "next"
        self.conv = (ShortConv(2 * H * K + H * V, config.conv_size, lookback=int(self.next_target))
                     if config.conv_size > 0 else None)
        if config.use_gate:
            self.g_proj = nn.Linear(d, H * V, bias=False)
            self.o_norm = GatedRMSNorm(V, config.norm_eps)
        else:
            self.g_proj = None
            self.o_norm = RMSNorm(V, config.norm_eps)
        self.o_proj = nn.Linear(H * V, d, bias=False)

        if config.decay_init == "spread":
            # Time scales spread log-uniformly over the heads, from a few tokens to thousands
            # (config.decay_spans): g = -1/span at init, so some heads hold thousands of tokens
            # whatever the draw. Opt-in: on the 2-head recall fixture it did not make recall
            # form more reliably (seeds 1-3 stayed near chance in 400 steps, as with FLA's draw).
            lo, hi = config.decay_spans
            span = torch.logspace(math.log10(lo), math.log10(hi), H) if H > 1 else torch.tensor([math.sqrt(lo * hi)])
            A = torch.ones(H)
            dt = 1.0 / span
        else:
            # FLA's GatedDeltaNet: A uniform in [1, 16]; dt log-uniform in [1e-3, 0.1].
            A = torch.empty(H).uniform_(1, 16)
            dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.A_log = nn.Parameter(torch.log(A))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def cache_shape(self, batch_size: int):
        """Short-conv cache ``[B, conv_size - 1 (+1 with target "next"), channels]``, or None without a conv."""
        return None if self.conv is None else (batch_size, self.conv.cache_len, self.conv.conv.in_channels)

    def project_qkv(self, x: torch.Tensor, conv_cache: Optional[torch.Tensor] = None):
        """The read/write vectors of ``x [B, T, d_model]``: projections, short conv, unit q and k.

        Returns ``q, k [B, T, H, K]``, ``v [B, T, H, V]`` and the new conv cache (None without conv).
        With target ``"next"``, ``k[:, t]`` is the key of position ``t - 1`` (zero before the stream's
        first token), rebuilt from the conv cache across calls, so the write at ``t`` is ``k_{t-1} -> v_t``.
        """
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k_dim, self.head_v_dim
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if self.conv is not None:
            # The conv lets a key see the previous tokens, so the value position can read it.
            qkv, conv_cache = self.conv(qkv, conv_cache)
        else:
            qkv, conv_cache = F.silu(qkv), None
        if self.next_target:  # qkv holds T + 1 positions: the one before x, then x's
            q, k, v = qkv[:, 1:].split([H * K, H * K, H * V], dim=-1)
            k = qkv[:, :-1, H * K:2 * H * K]
        else:
            q, k, v = qkv.split([H * K, H * K, H * V], dim=-1)
        q = F.normalize(q.view(B, T, H, K), p=2, dim=-1)
        k = F.normalize(k.reshape(B, T, H, K), p=2, dim=-1)  # unit keys keep the delta rule stable
        return q, k, v.view(B, T, H, V), conv_cache

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        state: Optional[FastLayerState] = None,
        ctx: Optional[StepContext] = None,
    ) -> Tuple[torch.Tensor, Optional[FastLayerState]]:
        """
        Args:
            x: ``[B, T, d_model]``.
            state: this layer's state from the previous call, or None (new episode, no P).
            ctx: the call's :class:`~cl_arch.state.StepContext`: ``modulation [B, T]`` in [0, 1]
                multiplies the write strength (e.g. a reward or surprise signal; None means 1);
                ``need_state`` False skips the final states (training without carry); ``lam``
                overrides the trace decay (float or ``[H]``, e.g. a session's hand-set ``lam``;
                it enables the trace even when the config disables it; None: own).

        Returns:
            ``y [B, T, d_model]`` and the new :class:`FastLayerState` (None if not requested).
        """
        ctx = ctx if ctx is not None else StepContext()
        modulation, output_final_state, lam = ctx.modulation, ctx.need_state, ctx.lam
        B, T, _ = x.shape
        H, V = self.n_heads, self.head_v_dim
        state = state if state is not None else FastLayerState()

        q, k, v, conv_cache = self.project_qkv(x, state.conv)

        # Gates in at least float32: a bf16 log-decay summed over a chunk loses too much.
        cdt = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.b_proj(x).to(cdt))  # [B, T, H]
        if modulation is not None:
            beta = beta * modulation.to(cdt).unsqueeze(-1)
        g = -self.A_log.to(cdt).exp() * F.softplus(self.a_proj(x).to(cdt) + self.dt_bias.to(cdt))

        o, S_T, E_T = self.run_rule(q, k, v, beta, g, state, lam, output_final_state, rule=self.config.rule,
                                    rest=self.config.fast_rest == "resting")

        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        else:
            o = self.o_norm(o)
        y = self.o_proj(o.reshape(B, T, H * V))
        if not output_final_state:
            return y, None
        return y, FastLayerState(S=S_T, E=E_T, P=state.P, conv=conv_cache)
