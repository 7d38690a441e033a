"""Model configuration: one dataclass, validated on construction, JSON round-trippable.

:class:`PlasticConfig` holds the backbone (sizes, layer types, attention, MLP), the settings of its
in-block fast layers (inherited from :class:`~cl_arch.memory.FastLayerConfig`) and the list of its
output memories (``memories``: a :class:`~cl_arch.memory.MemoryConfig` per memory). Configs written
before the memories were listed (``readout_*`` / ``episodic_*`` fields) are read through
:func:`migrate_legacy`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .memory import EpisodicConfig, FastLayerConfig, MemoryConfig, ReadoutConfig
from .memory.base import check_int, check_number

LAYER_TYPES = ("attn", "fast")


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"PlasticConfig.{name}: {msg}")


@dataclass
class PlasticConfig(FastLayerConfig):
    """Hyper-parameters of a :class:`~cl_arch.model.PlasticTransformer`.

    The fields of :class:`~cl_arch.memory.FastLayerConfig` (``d_model``, ``n_heads`` ... the
    plasticity settings) configure the in-block fast layers, and are the rule settings the output
    memories start from. Defaults give a tiny byte-level model that trains on CPU. Every field is
    checked in ``__post_init__``; an invalid value raises ``ValueError`` whose message names the field.
    """

    # --- backbone ---
    vocab_size: int = 256
    n_layers: int = 4
    layer_types: Optional[List[str]] = None  # "attn" | "fast" per layer; None: fast, attn, fast, ...
    # --- attention mixer ---
    n_attn_heads: int = 4
    attn_window: Optional[int] = None  # sliding window (tokens, including the current one)
    rope_theta: float = 10000.0
    # --- MLP / misc ---
    mlp_ratio: float = 4.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    dropout: float = 0.0
    # --- the memories after the last block, in state order (docs/design.md, "Memories") ---
    memories: List[MemoryConfig] = dataclasses.field(default_factory=lambda: [ReadoutConfig()])

    def __post_init__(self) -> None:
        super().__post_init__()

        def num(name: str, lo: float, hi: float, **kw: bool) -> None:
            setattr(self, name, check_number("PlasticConfig", name, getattr(self, name), lo, hi, **kw))

        for name in ("vocab_size", "n_layers", "n_attn_heads"):
            check_int("PlasticConfig", name, getattr(self, name))
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
            check_int("PlasticConfig", "attn_window", self.attn_window)

        num("rope_theta", 0.0, math.inf, lo_open=True)
        num("mlp_ratio", 0.0, math.inf, lo_open=True)
        num("init_std", 0.0, math.inf, lo_open=True)
        num("dropout", 0.0, 1.0, hi_open=True)
        if not isinstance(self.tie_embeddings, bool):
            raise _err("tie_embeddings", f"must be a bool, got {self.tie_embeddings!r}")
        self.memories = check_memories(self.memories)

    # ------------------------------------------------------------------ derived sizes
    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width: 2/3 * mlp_ratio * d_model rounded up to a multiple of 32."""
        h = int(self.mlp_ratio * self.d_model * 2 / 3)
        return 32 * ((h + 31) // 32)

    @property
    def attn_head_dim(self) -> int:
        return self.d_model // self.n_attn_heads

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
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of every field (JSON-serialisable); ``memories`` as ``[{"kind": ..., ...}]``."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "memories"}
        d["layer_types"] = list(self.layer_types)
        d["memories"] = [m.to_dict() for m in self.memories]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PlasticConfig":
        """Build from :meth:`to_dict` output, or from a config written before the memories were listed
        (:func:`migrate_legacy`); unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"PlasticConfig.from_dict expects a dict, got {type(d).__name__}")
        d = migrate_legacy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PlasticConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    def to_diff_dict(self) -> Dict[str, Any]:
        """The fields that differ from the defaults, in the form the model fingerprint hashes.

        A config whose memories the flat layout of earlier versions can say (at most a readout
        named ``readout`` and an episodic memory named ``episodic``) is given in that layout
        (:func:`legacy_dict`), so every fingerprint recorded in checkpoints and session files before
        the memories were listed still names the same model. A field added later with a default
        that keeps the old behaviour leaves it, and so the fingerprint, unchanged."""
        legacy = legacy_dict(self)
        if legacy is not None:
            default = legacy_dict(PlasticConfig())
            return {k: v for k, v in legacy.items() if k not in default or v != default[k]}
        default = PlasticConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k not in default or v != default[k]}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "PlasticConfig":
        return cls.from_dict(json.loads(s))

    # ------------------------------------------------------------------ memories
    def memory(self, name: str) -> MemoryConfig:
        """The config of the memory called ``name`` (``KeyError`` listing the names if none)."""
        for m in self.memories:
            if m.name == name:
                return m
        raise KeyError(f"no memory named {name!r}; this config's: {[m.name for m in self.memories]}")


def check_memories(memories: Any) -> List[MemoryConfig]:
    """``memories`` as a list of :class:`MemoryConfig` (dicts are parsed), names unique identifiers."""
    if not isinstance(memories, (list, tuple)):
        raise _err("memories", f"must be a list of memory configs, got {type(memories).__name__}")
    out = [MemoryConfig.from_dict(m) if isinstance(m, dict) else m for m in memories]
    for m in out:
        if not isinstance(m, MemoryConfig):
            raise _err("memories", f"entries must be memory configs (e.g. ReadoutConfig), got {type(m).__name__}")
        if not isinstance(m.name, str) or not m.name.isidentifier() or m.name.startswith("_"):
            raise _err("memories", f"a memory's name must be a Python identifier not starting with '_', got {m.name!r}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise _err("memories", f"names must be unique, got {names}")
    return out


# ---------------------------------------------------------------------- configs before `memories`
# The flat fields that described the output memories (and their defaults) until the memories were
# listed: readout_<field> and episodic_<field>, one readout_commit_span shared by both.
LEGACY_READOUT = {"heads": 2, "values": "onehot", "beta": 0.5, "scale": 2.0, "commit": "state",
                  "commit_span": 4096.0, "keys": "hidden"}
LEGACY_EPISODIC = {"heads": 0, "features": 2048, "values": "onehot", "threshold": 1.5, "beta": 0.5, "scale": 1.0,
                   "span": 1e5, "seed": 0}


def migrate_legacy(d: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict in the current layout. One with ``readout_*`` / ``episodic_*`` fields (written
    before the memories were listed, e.g. the shipped model's) becomes ``memories``: a
    :class:`ReadoutConfig` named ``readout`` when ``readout_heads`` (default 2) > 0, then an
    :class:`EpisodicConfig` named ``episodic`` when ``episodic_heads`` (default 0) > 0, with the same
    settings (the episodic memory takes ``readout_commit_span``, as it did)."""
    legacy = {k for k in d if k.startswith(("readout_", "episodic_"))}
    if not legacy:
        return d
    if "memories" in d:
        raise ValueError(f"PlasticConfig: both 'memories' and the earlier flat fields {sorted(legacy)}")
    ro = {k: d.get("readout_" + k, v) for k, v in LEGACY_READOUT.items()}
    ep = {k: d.get("episodic_" + k, v) for k, v in LEGACY_EPISODIC.items()}
    unknown = sorted(legacy - {"readout_" + k for k in ro} - {"episodic_" + k for k in ep})
    if unknown:
        raise ValueError(f"PlasticConfig.from_dict: unknown keys {unknown}")
    memories: List[MemoryConfig] = []
    for cls, fields, extra in ((ReadoutConfig, ro, {}), (EpisodicConfig, ep, {"commit_span": ro["commit_span"]})):
        heads = fields["heads"]
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 0:
            raise ValueError(f"{cls.__name__}.heads: must be an integer >= 0 in a flat config "
                             f"({cls.kind}_heads), got {heads!r}")
        if heads > 0:
            memories.append(cls(**fields, **extra))
    return {**{k: v for k, v in d.items() if k not in legacy}, "memories": memories}


def legacy_dict(config: PlasticConfig) -> Optional[Dict[str, Any]]:
    """``config`` in the flat layout of earlier versions, or None when its memories do not fit it
    (other kinds or names, a readout with a fixed span, more than one of a kind, an episodic
    memory whose commit span differs from the readout's, or any setting the flat layout cannot say,
    such as an error write: the layout must read back as the same memories)."""
    ro = ep = None
    for m in config.memories:
        if type(m) is ReadoutConfig and m.name == "readout" and m.span is None and ro is None and ep is None:
            ro = m
        elif type(m) is EpisodicConfig and m.name == "episodic" and ep is None:
            ep = m
        else:
            return None
    span = ro.commit_span if ro is not None else LEGACY_READOUT["commit_span"]
    if ep is not None and ep.commit_span != span:
        return None
    d = {k: v for k, v in config.to_dict().items() if k != "memories"}
    for k, v in LEGACY_READOUT.items():
        d["readout_" + k] = getattr(ro, k) if ro is not None else (0 if k == "heads" else v)
    d["readout_commit_span"] = span
    for k, v in LEGACY_EPISODIC.items():
        d["episodic_" + k] = getattr(ep, k) if ep is not None else v
    if migrate_legacy(d)["memories"] != list(config.memories):
        return None  # a field the flat layout never had (an error write, its chunk, ...): it would be lost
    return d


PRESETS: Dict[str, Dict[str, Any]] = {
    "demo": dict(d_model=128, n_layers=4, n_heads=4, head_k_dim=32, head_v_dim=32, attn_window=64, chunk_size=64,
                 mlp_ratio=3.0, lam=0.5, eta_s=0.0, eta_r=1.0, commit_clip=10.0,
                 memories=[ReadoutConfig(heads=2, values="onehot"), EpisodicConfig(heads=1, features=2048)]),
    "recall": dict(vocab_size=256, d_model=64, n_layers=2, layer_types=["fast", "fast"], n_heads=2, head_k_dim=32,
                   head_v_dim=32, mlp_ratio=2.0, conv_size=4, chunk_size=16, recurrent_threshold=16, lam=0.5,
                   gamma=0.98, eta_s=0.0, eta_r=1.0, commit_clip=10.0, memories=[], fast_rest="zero"),
}
