"""Model configuration: one dataclass, validated on construction, JSON round-trippable."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

LAYER_TYPES = ("attn", "fast")
READOUT_VALUES = ("onehot", "embed")
READOUT_KEYS = ("hidden", "hidden+token")
RULES = ("delta", "hebb")


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"PlasticConfig.{name}: {msg}")


@dataclass
class PlasticConfig:
    """Hyper-parameters of a :class:`~cl_arch.model.PlasticTransformer`.

    Defaults give a tiny byte-level model that trains on CPU. Every field is checked in
    ``__post_init__``; an invalid value raises ``ValueError`` whose message names the field.
    """

    # --- backbone ---
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    layer_types: Optional[List[str]] = None  # "attn" | "fast" per layer; None: fast, attn, fast, ...
    # --- fast-weight mixer ---
    n_heads: int = 4
    head_k_dim: int = 32
    head_v_dim: int = 32
    # --- attention mixer ---
    n_attn_heads: int = 4
    attn_window: Optional[int] = None  # sliding window (tokens, including the current one)
    rope_theta: float = 10000.0
    # --- readout memory (docs/design.md, "The readout memory"): a fast-weight head after the last block ---
    readout_heads: int = 2  # 0 disables it
    readout_values: str = "onehot"  # "onehot" (V = vocab_size) or "embed" (V = d_model, tied head)
    readout_beta: float = 0.5  # initial write strength
    readout_scale: float = 2.0  # initial read scale (logits added per unit read)
    # "state": a commit keeps what the readout's slow heads hold (trace decays with the memory, so
    # E_T = S_T - M; gamma 1, eta_s 1, no clip, no reward term); heads whose memory span is shorter
    # than readout_commit_span tokens commit nothing. "trace": the same commit as the fast layers.
    readout_commit: str = "state"
    readout_commit_span: float = 4096.0
    # "hidden": keys unit(h); "hidden+token": [unit(h), one-hot(x)] / sqrt(2) (K = d_model + vocab_size), for
    # models whose final hidden state does not tell the last token apart (a recall model after a cue).
    readout_keys: str = "hidden"
    # --- episodic memory (docs/design.md, "The episodic memory"): an output-side memory with sharp wide keys
    # phi(h) = unit(relu(R unit(h) - theta)), R [episodic_features, d_model] fixed; state commit, so a session's
    # final state is the next session's start ---
    episodic_heads: int = 0  # 0 disables it
    episodic_features: int = 2048  # F, the key width
    episodic_values: str = "onehot"  # as readout_values: "onehot" (V = vocab_size) or "embed" (V = d_model)
    episodic_threshold: float = 1.5  # initial theta (learned); higher: sparser, sharper keys
    episodic_beta: float = 0.5  # initial write strength
    episodic_scale: float = 1.0  # initial read scale
    episodic_span: float = 1e5  # initial memory span in tokens (learned)
    episodic_seed: int = 0  # seed of the fixed projection R (saved with the model as a buffer)
    # --- MLP / misc ---
    mlp_ratio: float = 4.0
    conv_size: int = 4  # short causal depthwise conv on q/k/v; 0 disables
    fast_rest: str = "resting"  # fast layers decay toward W0 + P ("resting") or toward 0 from S0 = W0 + P ("zero")
    decay_init: str = "fla"  # fast-layer decay at init: "fla" (random, as GatedDeltaNet) or "spread" (decay_spans)
    decay_spans: List[float] = dataclasses.field(default_factory=lambda: [4.0, 4096.0])  # tokens, first/last head
    rule: str = "delta"
    use_gate: bool = True
    chunk_size: int = 64
    recurrent_threshold: int = 16
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    dropout: float = 0.0
    # --- plasticity (initial values of the learnable per-head parameters, fixed settings) ---
    lam: Optional[float] = 0.5  # eligibility-trace decay; None disables the trace (the readout's state commit keeps its own)
    gamma: float = 0.98  # persistent-memory retention per commit
    eta_s: float = 0.0  # self-supervised commit rate
    eta_r: float = 1.0  # reward-modulated commit rate
    commit_clip: float = 10.0  # Frobenius-norm bound per head on the committed trace
    baseline_rho: float = 0.1  # running reward-baseline rate
    learn_plasticity: bool = True

    def __post_init__(self) -> None:
        def pos_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise _err(name, f"must be an integer {'>= 0' if allow_zero else '>= 1'}, got {v!r}")

        def num(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _err(name, f"must be a finite number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
                lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
                raise _err(name, f"must be in {lb}{lo}, {hi}{hb}, got {v!r}")
            setattr(self, name, float(v))

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_k_dim", "head_v_dim",
                     "n_attn_heads", "chunk_size"):
            pos_int(name)
        for name in ("conv_size", "recurrent_threshold", "readout_heads", "episodic_heads", "episodic_seed"):
            pos_int(name, allow_zero=True)
        if self.conv_size == 1:
            raise _err("conv_size", "must be 0 (disabled) or >= 2")

        if self.layer_types is None:
            self.layer_types = ["fast" if i % 2 == 0 else "attn" for i in range(self.n_layers)]
        if not isinstance(self.layer_types, (list, tuple)):
            raise _err("layer_types", f"must be a list of {LAYER_TYPES}, got {self.layer_types!r}")
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layers:
            raise _err("layer_types", f"has length {len(self.layer_types)} but n_layers is {self.n_layers}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise _err("layer_types", f"unknown entries {bad}; allowed: {LAYER_TYPES}")

        if "attn" in self.layer_types:
            if self.d_model % self.n_attn_heads != 0:
                raise _err("n_attn_heads", f"must divide d_model={self.d_model}, got {self.n_attn_heads}")
            if (self.d_model // self.n_attn_heads) % 2 != 0:
                raise _err("n_attn_heads", "d_model / n_attn_heads must be even for rotary embeddings")
        if self.attn_window is not None:
            pos_int("attn_window")

        num("rope_theta", 0.0, math.inf, lo_open=True)
        num("mlp_ratio", 0.0, math.inf, lo_open=True)
        num("norm_eps", 0.0, 1.0, lo_open=True)
        num("init_std", 0.0, math.inf, lo_open=True)
        num("dropout", 0.0, 1.0, hi_open=True)
        if self.rule not in RULES:
            raise _err("rule", f"must be one of {RULES}, got {self.rule!r}")
        for name in ("use_gate", "tie_embeddings", "learn_plasticity"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, f"must be a bool, got {getattr(self, name)!r}")

        if self.fast_rest not in ("resting", "zero"):
            raise _err("fast_rest", f"must be 'resting' or 'zero', got {self.fast_rest!r}")
        if self.decay_init not in ("spread", "fla"):
            raise _err("decay_init", f"must be 'spread' or 'fla', got {self.decay_init!r}")
        spans = self.decay_spans
        if (not isinstance(spans, (list, tuple)) or len(spans) != 2 or
                any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 1.0 <= x < math.inf for x in spans)
                or spans[0] > spans[1]):
            raise _err("decay_spans", f"must be [shortest, longest] time scales in tokens, 1 <= shortest <= "
                       f"longest, got {spans!r}")
        self.decay_spans = [float(x) for x in spans]
        if self.readout_values not in READOUT_VALUES:
            raise _err("readout_values", f"must be one of {READOUT_VALUES}, got {self.readout_values!r}")
        if self.readout_keys not in READOUT_KEYS:
            raise _err("readout_keys", f"must be one of {READOUT_KEYS}, got {self.readout_keys!r}")
        num("readout_beta", 0.0, 1.0, lo_open=True, hi_open=True)
        num("readout_scale", -math.inf, math.inf)
        if self.readout_commit not in ("state", "trace"):
            raise _err("readout_commit", f"must be 'state' or 'trace', got {self.readout_commit!r}")
        num("readout_commit_span", 0.0, math.inf)
        pos_int("episodic_features")
        if self.episodic_values not in READOUT_VALUES:
            raise _err("episodic_values", f"must be one of {READOUT_VALUES}, got {self.episodic_values!r}")
        # theta < 0 would make phi(0) = unit(relu(-theta)) != 0: every episode's first key (the zero cache)
        # one shared write that accumulates into P
        num("episodic_threshold", 0.0, math.inf)
        num("episodic_beta", 0.0, 1.0, lo_open=True, hi_open=True)
        num("episodic_scale", -math.inf, math.inf)
        num("episodic_span", 1.0, math.inf)
        if self.lam is not None:
            num("lam", 0.0, 1.0)
        num("gamma", 0.0, 1.0, lo_open=True)
        num("eta_s", -math.inf, math.inf)
        num("eta_r", -math.inf, math.inf)
        num("commit_clip", 0.0, math.inf, lo_open=True)
        num("baseline_rho", 0.0, 1.0)

    # ------------------------------------------------------------------ derived sizes
    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width: 2/3 * mlp_ratio * d_model rounded up to a multiple of 32."""
        h = int(self.mlp_ratio * self.d_model * 2 / 3)
        return 32 * ((h + 31) // 32)

    @property
    def attn_head_dim(self) -> int:
        return self.d_model // self.n_attn_heads

    def fast_layer(self) -> "FastLayerConfig":
        """The :class:`FastLayerConfig` of this model's fast-weight layers."""
        return FastLayerConfig(**{f: getattr(self, f) for f in FAST_LAYER_FIELDS})

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "PlasticConfig":
        """A named preset (:data:`PRESETS`), with ``overrides`` on top.

        ``"demo"``: the shipped default model's architecture (fast, attn, fast, attn; d=128; a
        64-byte attention window; a 2-head one-hot readout memory; a 1-head episodic memory of 2048
        features). ``"recall"``: the small
        all-fast-weight model of the recall tests and meta-training (no attention, no readout,
        the first design's decay toward zero; see :func:`cl_arch.train.recall.recall_config`).

        Raises:
            ValueError: an unknown name (the known ones are listed) or a bad override.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown PlasticConfig preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of every field (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PlasticConfig":
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"PlasticConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PlasticConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    def to_diff_dict(self) -> Dict[str, Any]:
        """The fields that differ from the defaults: a field added later with a default that keeps
        the old behaviour leaves it, and so the model fingerprint, unchanged."""
        default = PlasticConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k not in default or v != default[k]}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); also what :meth:`PlasticTransformer.fingerprint` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "PlasticConfig":
        return cls.from_dict(json.loads(s))


# The fields one fast-weight layer reads (FastWeightLayer and its PlasticMemory base).
FAST_LAYER_FIELDS = ("d_model", "n_heads", "head_k_dim", "head_v_dim", "conv_size", "rule", "use_gate", "chunk_size",
                     "recurrent_threshold", "norm_eps", "fast_rest", "decay_init", "decay_spans", "lam", "gamma",
                     "eta_s", "eta_r", "commit_clip", "baseline_rho", "learn_plasticity")


@dataclass
class FastLayerConfig:
    """What one fast-weight layer needs, on its own: a retrofit into another network builds
    ``FastWeightLayer(FastLayerConfig(d_model=4096, n_heads=16, ...))`` with no model config.

    The fields and defaults are :class:`PlasticConfig`'s of the same names
    (:data:`FAST_LAYER_FIELDS`); :meth:`PlasticConfig.fast_layer` gives the one a model's layers
    use. Checked on construction with the same rules; errors name ``FastLayerConfig.<field>``.
    """

    d_model: int = 128
    n_heads: int = 4
    head_k_dim: int = 32
    head_v_dim: int = 32
    conv_size: int = 4
    rule: str = "delta"
    use_gate: bool = True
    chunk_size: int = 64
    recurrent_threshold: int = 16
    norm_eps: float = 1e-6
    fast_rest: str = "resting"
    decay_init: str = "fla"
    decay_spans: List[float] = dataclasses.field(default_factory=lambda: [4.0, 4096.0])
    lam: Optional[float] = 0.5
    gamma: float = 0.98
    eta_s: float = 0.0
    eta_r: float = 1.0
    commit_clip: float = 10.0
    baseline_rho: float = 0.1
    learn_plasticity: bool = True

    def __post_init__(self) -> None:
        try:  # one rule set: PlasticConfig's checks on a one-layer model made of this layer
            checked = PlasticConfig(**dataclasses.asdict(self), n_layers=1, layer_types=["fast"], readout_heads=0)
        except ValueError as e:
            raise ValueError(str(e).replace("PlasticConfig.", "FastLayerConfig.", 1)) from None
        self.decay_spans = checked.decay_spans

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Dict[str, Any]] = {
    "demo": dict(d_model=128, n_layers=4, n_heads=4, head_k_dim=32, head_v_dim=32, attn_window=64, chunk_size=64,
                 mlp_ratio=3.0, lam=0.5, eta_s=0.0, eta_r=1.0, commit_clip=10.0, readout_heads=2,
                 readout_values="onehot", episodic_heads=1, episodic_features=2048),
    "recall": dict(vocab_size=256, d_model=64, n_layers=2, layer_types=["fast", "fast"], n_heads=2, head_k_dim=32,
                   head_v_dim=32, mlp_ratio=2.0, conv_size=4, chunk_size=16, recurrent_threshold=16, lam=0.5,
                   gamma=0.98, eta_s=0.0, eta_r=1.0, commit_clip=10.0, readout_heads=0, fast_rest="zero"),
}
