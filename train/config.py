"""Run configurations for pretraining, fine-tuning and meta-training: YAML/JSON files + overrides.

A run config is a dataclass of sections (``model``, ``data``, ``optim``, ``train``, ...). Files
are read with :func:`load_config`, which checks everything *before* any work starts:

- an unknown key anywhere (``train.lrr``) -> error naming it, with the keys allowed there;
- a value of the wrong type (``train.batch_size: "16"``) -> error naming the field and both types;
- a model field rejected by :class:`~cl_arch.PlasticConfig` -> its message, prefixed ``model:``;
- a path that does not exist (``data.sources``, ``train.init_from``, ``train.resume``) -> error
  naming the field and the path;
- a corpus with no bytes -> error naming ``data.sources``.

Every error is a :class:`ConfigError` (a ``ValueError``) whose message starts with the field.

YAML 1.1 (PyYAML) reads ``3e-3`` as a string; float fields therefore accept strings that
``float()`` parses, nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from cl_arch import PlasticConfig

from .distributed import CHECKPOINT_FORMATS, PARALLEL

MIXED_PRECISION = ("no", "fp16", "bf16")
LOG_WITH = ("auto", "tensorboard", "none")
TRAINABLE = ("all", "plasticity", "fast")


class ConfigError(ValueError):
    """A run configuration is invalid; the message starts with the offending field."""


# The default model of `cl-arch pretrain`: 0.88M parameters, fast/attn alternating (PlasticConfig
# fills in the rest). Sized so 5 CPU minutes see ~1M bytes.
DEFAULT_MODEL: Dict[str, Any] = {"d_model": 128, "n_layers": 4, "n_heads": 4, "head_k_dim": 32,
                                 "head_v_dim": 32, "n_attn_heads": 4, "chunk_size": 64}


# ============================================================================ sections
@dataclass
class DataConfig:
    """Byte-level corpus (see :mod:`cl_arch.train.data`).

    sources: ``"stdlib"`` (default corpus: the standard library minus held-out subpackages), a
        folder (its ``*.py`` files, recursively), a file, a glob, or a list of those.
    seq_len: tokens (bytes) per training sequence; rows are ``seq_len + 1`` bytes.
    val_fraction: share of files (or, for very few files, of each file's tail) kept for validation.
    max_train_bytes / max_val_bytes: caps on bytes read (None: all).
    streaming: pack while reading (``datasets.IterableDataset``) instead of loading the corpus.
    shuffle_buffer: streaming shuffle buffer, in blocks.
    """

    sources: Union[str, List[str]] = "stdlib"
    seq_len: int = 256
    val_fraction: float = 0.05
    max_train_bytes: Optional[int] = None
    max_val_bytes: Optional[int] = 131072
    streaming: bool = False
    shuffle_buffer: int = 1000


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainConfig:
    """The loop.

    batch_size: sequences per micro-step summed over all processes (each of N processes takes
        ``batch_size / N``), so a run means the same thing on 1 or N processes.
    grad_accum: micro-steps per optimizer step (``Accelerator.accumulate``).
    max_steps: optimizer steps; the cosine schedule spans them.
    max_minutes: wall-clock budget; when set, the schedule's progress is
        ``max(step / max_steps, elapsed / budget)`` so the learning rate has decayed when time is up.
        The budget is carried through checkpoints. Leave it unset for bit-exact resumes.
    eval_every / save_every / log_every: in optimizer steps (0 disables; the end always evaluates
        and saves).
    val_blocks: validation sequences scored at each evaluation (the first ones, fixed).
    resume: a checkpoint folder, or ``"auto"`` for the newest under ``output_dir/checkpoints``
        (nothing to resume from is fine with "auto").
    init_from: a ``save_pretrained`` folder whose weights start the run (fine-tuning, continuing).
    log_with: accelerate tracker: "auto" = tensorboard when installed; metrics always go to
        ``output_dir/metrics.jsonl`` too.
    parallel: with several processes, "auto" (FSDP when ``accelerate launch`` got an FSDP config,
        else DDP), "ddp" or "fsdp" (:mod:`cl_arch.train.distributed`).
    checkpoint_format: "auto" (sharded under FSDP with ``fsdp_state_dict_type:
        SHARDED_STATE_DICT``, else full), "full" or "sharded" (FSDP only; see
        :mod:`cl_arch.train.checkpoint`).
    """

    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 600
    max_minutes: Optional[float] = 5.0
    mixed_precision: str = "no"
    seed: int = 0
    eval_every: int = 100
    val_blocks: int = 128
    eval_at_start: bool = False
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    output_dir: str = "runs/pretrain"
    resume: Optional[str] = None
    init_from: Optional[str] = None
    log_with: str = "auto"
    progress: bool = True
    activation_checkpointing: bool = False
    parallel: str = "auto"
    checkpoint_format: str = "auto"


@dataclass
class FinetuneSection:
    """What fine-tuning changes (see :mod:`cl_arch.train.finetune`).

    trainable: "all"; "plasticity" (``lam, gamma, eta_s, eta_r`` of every fast layer: the base is
        frozen); "fast" (plasticity + each fast layer's W0 and write path: k/v/beta/decay
        projections, A_log, dt_bias and the short conv).
    episodes: each sequence is cut into this many consecutive episodes; P is committed
        (retention, ``eta_s``) between them and carried, so the plasticity parameters get a
        gradient from the next-byte loss of later episodes. 1 = plain LM fine-tuning.
    """

    trainable: str = "plasticity"
    episodes: int = 4


@dataclass
class PretrainRunConfig:
    """``cl-arch pretrain`` config: model (PlasticConfig fields), data, optim, train."""

    model: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FinetuneRunConfig(PretrainRunConfig):
    """``cl-arch finetune`` config: a pretraining config plus a ``finetune`` section."""

    finetune: FinetuneSection = field(default_factory=FinetuneSection)


# ============================================================================ generic checking
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the annotation ``tp`` (returns it, ints widened for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected a bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} on {name}")  # a bug here, not in the user's file


def _build(cls, d: Any, prefix: str, base: Any = None):
    """Dataclass ``cls`` from a dict, rejecting unknown keys and wrong types (named ``prefix.key``).

    Keys not given keep their value in ``base`` (default: ``cls()``), so a section given in part
    keeps the run config's own defaults for that section (e.g. meta-training's ``train``).
    """
    where = prefix or "config"
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__} {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        keys = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"{keys}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"(allowed in {where}: {', '.join(names)})")
    base = cls() if base is None else base
    kwargs = {}
    for k, v in d.items():
        name = f"{prefix + '.' if prefix else ''}{k}"
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build(hints[k], v, name, base=getattr(base, k))
        else:
            kwargs[k] = _coerce(v, hints[k], name)
    return dataclasses.replace(base, **kwargs)


def config_to_dict(cfg) -> Dict[str, Any]:
    """Plain nested dict (JSON-serialisable) of a run config."""
    return dataclasses.asdict(cfg)


# ============================================================================ loading
def read_config_file(path: str) -> Dict[str, Any]:
    """Parse a ``.yaml``/``.yml``/``.json`` file into a dict (errors name the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: report the file, not a traceback
        raise ConfigError(f"--config: cannot parse {path}: {e}") from e
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"--config: {path} must hold a mapping at the top level, got {type(d).__name__}")
    return d


def parse_override(text: str):
    """``"train.lr=1e-3"`` -> ``(["train", "lr"], 0.001)``; the value is read as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from e
    return key.strip().split("."), value


def apply_overrides(d: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Set dotted keys in a nested dict (a copy): unknown keys are caught later by validation."""
    d = json.loads(json.dumps(d))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text) if isinstance(text, str) else text
        node = d
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: {p} is not a section")
        node[path[-1]] = value
    return d


def build_config(cls, d: Dict[str, Any], check_paths: bool = True):
    """Validate a nested dict into ``cls`` (see the module docstring for what is checked)."""
    cfg = _build(cls, d, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def load_config(cls, path: Optional[str] = None, overrides: Sequence[str] = (), check_paths: bool = True):
    """Defaults of ``cls`` <- the file at ``path`` (YAML or JSON) <- ``overrides`` (``key.sub=value``).

    Raises:
        ConfigError: naming the field (unknown key, wrong type, missing path, empty corpus...).
    """
    d = read_config_file(path) if path else {}
    d = apply_overrides(d, overrides)
    return build_config(cls, d, check_paths=check_paths)


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate_sections(cfg) -> None:
    """Range and choice checks shared by every run config (no file system access)."""
    if hasattr(cfg, "model"):
        try:
            # A run config may build its model config its own way (meta-training: recall_config).
            builder = getattr(cfg, "build_model_config", None)
            builder() if builder is not None else PlasticConfig.from_dict(cfg.model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from e
    if hasattr(cfg, "data"):
        d = cfg.data
        _positive("data.seq_len", d.seq_len)
        if not 0.0 < d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {d.val_fraction!r}")
        _positive("data.max_train_bytes", d.max_train_bytes)
        _positive("data.max_val_bytes", d.max_val_bytes)
        _positive("data.shuffle_buffer", d.shuffle_buffer)
        if isinstance(d.sources, list) and not d.sources:
            raise ConfigError("data.sources: the list is empty: empty corpus")
    if hasattr(cfg, "optim"):
        o = cfg.optim
        _positive("optim.lr", o.lr)
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio!r}")
        _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
        _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(o, b) < 1.0:
                raise ConfigError(f"optim.{b}: must be in [0, 1), got {getattr(o, b)!r}")
        _positive("optim.grad_clip", o.grad_clip)
    if hasattr(cfg, "train"):
        t = cfg.train
        for name in ("batch_size", "grad_accum", "max_steps", "val_blocks"):
            _positive(f"train.{name}", getattr(t, name))
        for name in ("eval_every", "save_every", "log_every", "keep_checkpoints"):
            _positive(f"train.{name}", getattr(t, name), allow_zero=True)
        _positive("train.max_minutes", t.max_minutes)
        _choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
        _choice("train.log_with", t.log_with, LOG_WITH)
        _choice("train.parallel", t.parallel, PARALLEL)
        _choice("train.checkpoint_format", t.checkpoint_format, CHECKPOINT_FORMATS)
    if hasattr(cfg, "validate_section"):
        cfg.validate_section()  # a run config defined elsewhere (meta) checks its own section
    if hasattr(cfg, "finetune"):
        _choice("finetune.trainable", cfg.finetune.trainable, TRAINABLE)
        if not cfg.train.init_from:
            raise ConfigError("train.init_from: fine-tuning needs a checkpoint (a save_pretrained folder)")
        _positive("finetune.episodes", cfg.finetune.episodes)


def _check_checkpoint_dir(name: str, path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{name}: path {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{name}: {path!r} is not a checkpoint (no config.json)")


def validate(cfg, check_paths: bool = True) -> None:
    """All checks of :func:`validate_sections`, then (``check_paths``) paths and the corpus."""
    validate_sections(cfg)
    if not check_paths:
        return
    if hasattr(cfg, "data"):
        from .data import corpus_files

        sources = cfg.data.sources
        if sources != "stdlib":
            for src in [sources] if isinstance(sources, str) else sources:
                if not (os.path.exists(src) or any(c in src for c in "*?[")):
                    raise ConfigError(f"data.sources: path {src!r} does not exist")
        try:
            corpus_files(sources)
        except ValueError as e:
            raise ConfigError(f"data.sources: {e}") from e
    if hasattr(cfg, "train"):
        if cfg.train.init_from is not None:
            _check_checkpoint_dir("train.init_from", cfg.train.init_from)
        if cfg.train.resume not in (None, "auto"):
            # A training checkpoint is known by its training state (a sharded one has no config.json).
            if not os.path.isdir(cfg.train.resume):
                raise ConfigError(f"train.resume: path {cfg.train.resume!r} does not exist")
            if not os.path.isfile(os.path.join(cfg.train.resume, "training_state.pt")):
                raise ConfigError(f"train.resume: {cfg.train.resume!r} is not a training checkpoint "
                                  "(no training_state.pt)")
