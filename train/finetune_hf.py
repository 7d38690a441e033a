"""Fine-tuning the fast memories retrofitted into a ``transformers`` causal LM, on text episodes.

``finetune_hf(HFFinetuneConfig(hf_model=PATH, ...))`` loads the base model, adds fast-weight
memories beside the attention of the chosen blocks (:func:`cl_arch.hf.retrofit`, or continues a
saved retrofit), freezes the base, and trains the added layers with accelerate on text episodes:
every training sequence of ``seq_len`` tokens is cut into ``episodes`` consecutive episodes joined
by differentiable retention commits (:func:`cl_arch.train.finetune.episodic_lm_loss`: the trace of
an episode goes into ``P`` with ``P <- gamma P + eta_s clip(E)``, and ``P`` starts the next episode,
whose KV cache and fast state are fresh). The loss is next-token cross-entropy over all episodes,
so the added layers learn to write what the next episode can use.

``trainable``: ``"fast"`` (the added layers, plasticity settings fixed), ``"plasticity"`` (only
``lam, gamma, eta_s, eta_r``) or ``"all"`` (both). The base model is never trained here.

Text becomes ids with the base's tokenizer when its folder has one, else as bytes (a byte-level
model: vocab_size >= 256). The corpus is :mod:`cl_arch.train.data`'s (the stdlib source by
default): nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import distributed as dist_utils
from .data import RandomRows, corpus_files, iter_span_bytes, split_corpus
from .distributed import destroy_group_at_exit
from .episodic import episodic_parameters, fit_settings, learned_settings
from .finetune import commit_persistent, episode_state, episodic_lm_loss
from .trainer import Checkpointer, Parallel, Trainer, WarmupCosine

logger = logging.getLogger(__name__)

TRAINABLE = ("fast", "plasticity", "all")


@dataclass
class HFFinetuneConfig:
    """Settings of :func:`finetune_hf` (every field checked in ``__post_init__``)."""

    hf_model: str  # folder of a transformers causal LM (save_pretrained), or a hub id already cached
    retrofit_from: Optional[str] = None  # continue a saved retrofit (save_retrofit folder) instead of a new one
    layers: Optional[List[int]] = None  # blocks to retrofit (None: all)
    n_heads: int = 4
    head_k_dim: Optional[int] = None
    head_v_dim: Optional[int] = None
    # Retrofit rule settings. eta_s > 0: a retention commit (r = None) writes only eta_s clip(E),
    # so with the model default eta_s = 0 nothing would carry between text episodes.
    rule: Dict[str, Any] = field(default_factory=lambda: {"eta_s": 1.0})
    trainable: str = "all"
    sources: Any = "stdlib"
    max_bytes: int = 2_000_000  # corpus bytes read (train and validation spans together)
    seq_len: int = 512  # tokens per training sequence
    episodes: int = 4  # episodes per sequence
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_steps: int = 200
    max_minutes: Optional[float] = None
    seed: int = 0
    output_dir: Optional[str] = "runs/finetune_hf"
    log_every: int = 20
    save_every: int = 0  # training checkpoint every N steps into <output_dir>/checkpoints (0: at the end only)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    resume: Optional[str] = None  # a checkpoint folder, or "auto" (the newest in <output_dir>/checkpoints)

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"HFFinetuneConfig.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        for name in ("seq_len", "episodes", "batch_size", "max_steps", "max_bytes", "n_heads", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HFFinetuneConfig.{name} must be an integer >= 1, got {v!r}")
        if self.episodes > self.seq_len:
            raise ValueError(f"HFFinetuneConfig.episodes: {self.episodes} episodes do not fit in seq_len={self.seq_len}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"HFFinetuneConfig.lr must be a positive number, got {self.lr!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"HFFinetuneConfig.max_minutes must be > 0 or None, got {self.max_minutes!r}")
        for name in ("save_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"HFFinetuneConfig.{name} must be an integer >= 0, got {v!r}")
        if (self.resume or self.save_every) and not self.output_dir:
            raise ValueError("HFFinetuneConfig: checkpoints (save_every, resume) need an output_dir")
        if not isinstance(self.rule, dict):
            raise ValueError(f"HFFinetuneConfig.rule must be a dict of retrofit settings, got {self.rule!r}")


# ---------------------------------------------------------------------- text -> ids
def text_encoder(hf_model: str, vocab_size: int) -> Callable[[bytes], List[int]]:
    """The base's tokenizer when its folder holds one, else bytes (needs ``vocab_size >= 256``)."""
    tok = None
    if os.path.isdir(hf_model) and any(os.path.isfile(os.path.join(hf_model, f))
                                       for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_model)
    if tok is not None:
        return lambda data: tok(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    if vocab_size < 256:
        raise ValueError(f"{hf_model} has no tokenizer and a vocabulary of {vocab_size} < 256: cannot read bytes")
    return lambda data: list(data)


def token_blocks(sources: Any, encode: Callable[[bytes], List[int]], block_len: int, max_bytes: int,
                 val_fraction: float = 0.05) -> Dict[str, torch.Tensor]:
    """``{"train", "val"}``: ``[N, block_len]`` int64 blocks of the corpus, cut from the tokens of
    its files concatenated (train and validation files kept apart, :func:`split_corpus`).

    Raises:
        ValueError: a split holds fewer tokens than one block.
    """
    train_spans, val_spans = split_corpus(corpus_files(sources), val_fraction)
    out = {}
    for name, spans, budget in (("train", train_spans, max_bytes), ("val", val_spans, max(block_len * 64, max_bytes // 10))):
        ids: List[int] = []
        used = 0
        for chunk in iter_span_bytes(spans):
            ids.extend(encode(chunk[:budget - used]))
            used += min(len(chunk), budget - used)
            if used >= budget:
                break
        n = len(ids) // block_len
        if n == 0:
            raise ValueError(f"the {name} split holds {len(ids)} tokens, fewer than one block of {block_len}")
        out[name] = torch.tensor(ids[:n * block_len], dtype=torch.long).view(n, block_len)
    return out


# ---------------------------------------------------------------------- model
def select_trainable_hf(model, trainable: str) -> List[str]:
    """Freeze the base; leave the added layers (``"fast"``), their plasticity settings
    (``"plasticity"``) or both (``"all"``) trainable. Returns the trainable names."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    ep = getattr(model, "episodic", None)
    if ep is not None and trainable in ("fast", "all"):
        # Its four settings only: W0 [H, F, V] stays zero (the base holds the learned prior; docs/design.md).
        for p in episodic_parameters(ep):
            p.requires_grad_(True)
    for layer in model.block_layers() if hasattr(model, "block_layers") else model.fast_layers():
        plastic = {id(p) for p in layer.plasticity_parameters().values()}
        for p in layer.parameters():
            is_plastic = id(p) in plastic
            p.requires_grad_(trainable == "all" or (trainable == "fast") != is_plastic)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def build_model(cfg: HFFinetuneConfig):
    """The base from ``cfg.hf_model`` with a new retrofit (or the one in ``cfg.retrofit_from``)."""
    from cl_arch.hf import load_retrofit, retrofit
    from cl_arch.hf.files import load_base_model

    base = load_base_model(cfg.hf_model)
    if cfg.retrofit_from:
        return load_retrofit(cfg.retrofit_from, base)
    return retrofit(base, layers=cfg.layers, n_heads=cfg.n_heads, head_k_dim=cfg.head_k_dim,
                    head_v_dim=cfg.head_v_dim, **cfg.rule)


# ---------------------------------------------------------------------- measuring
@torch.no_grad()
def episode_losses(model, blocks: torch.Tensor, episodes: int, carry: bool, batch_size: int = 8,
                   carry_layers: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Mean next-token loss (nats) of every episode of every block: ``[N, episodes]``.

    Each block ``[N, T + 1]`` is read as ``episodes`` consecutive episodes (fresh KV cache and fast
    state each). ``carry=True`` commits each episode's trace into ``P`` (each memory's own commit:
    the retention commit of training, the episodic memory's state commit) and starts the next
    episode from it; ``carry=False`` starts every episode at ``P = 0`` (the reset control). Episode
    ``e`` is scored on the same tokens either way, so the rows pair. ``carry_layers``: indices into
    ``model.fast_layers()`` whose ``P`` is carried (None: all); the others restart at 0.
    """
    was = model.training
    model.eval()
    try:
        out = []
        for i in range(0, blocks.shape[0], batch_size):
            block = blocks[i:i + batch_size].to(model.device)
            x, y = block[:, :-1], block[:, 1:]
            T = x.shape[1]
            bounds = [round(k * T / episodes) for k in range(episodes + 1)]
            P: List[Optional[torch.Tensor]] = [None] * len(model.fast_layers())
            rows = []
            for e in range(episodes):
                lo, hi = bounds[e], bounds[e + 1]
                logits, state = model(x[:, lo:hi], state=episode_state(model, P) if carry else None)
                ce = F.cross_entropy(logits.float().transpose(1, 2), y[:, lo:hi], reduction="none").mean(1)
                rows.append(ce.cpu())
                if carry:
                    P = commit_persistent(model, state)
                    if carry_layers is not None:
                        P = [p if j in carry_layers else None for j, p in enumerate(P)]
            out.append(torch.stack(rows, 1))
        return torch.cat(out).double()
    finally:
        model.train(was)


# ---------------------------------------------------------------------- the episodic memory's settings
@dataclass
class HFEpisodicConfig:
    """Settings of :func:`train_episodic_hf` (as ``train/episodic.py``'s, in tokens).

    steps: Adam steps. batch_size, seq_len: windows per step and their length. lr: Adam's step.
    chunk: tokens per call when computing the hidden states (as a session reads). seed: window order.
    """
    steps: int = 150
    batch_size: int = 2
    seq_len: int = 1024
    lr: float = 2e-2  # the read scale starts at 0 (train/episodic.py's at 1): a larger step reaches ~1 in time
    chunk: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HFEpisodicConfig.{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"HFEpisodicConfig.lr must be a positive number, got {self.lr!r}")


@torch.no_grad()
def frozen_inputs_hf(model, spans: torch.Tensor, chunk: int = 256, batch_size: int = 8):
    """What a retrofit's episodic memory sees on ``spans [N, L + 1]`` (token ids): ``(ids, targets,
    h, logits)`` with ``ids, targets [N, L]``, ``h [N, L, d_model]`` (the final norm's output) and
    ``logits [N, L, vocab]`` without the episodic read. Each span is read from a fresh state (block
    memories at P = 0, as an episode starts) in ``chunk``-token calls, carrying the KV cache and
    block memory states between calls. The episodic memory adds only to the logits, so none of this
    depends on its settings: computed once, it serves every training step.
    """
    if getattr(model, "episodic", None) is None:
        raise ValueError("the model has no episodic memory: retrofit(..., episodic_heads=1) or add_episodic_memory()")
    was = model.training
    model.eval()
    try:
        hs, lgs = [], []
        for i in range(0, spans.shape[0], batch_size):
            x = spans[i:i + batch_size, :-1].to(model.device)
            state, h_rows, lg_rows = None, [], []
            for c in range(0, x.shape[1], chunk):
                lg, state, h = model.run(x[:, c:c + chunk], state=state, episodic=False)
                h_rows.append(h.float()); lg_rows.append(lg.float())
            hs.append(torch.cat(h_rows, 1)); lgs.append(torch.cat(lg_rows, 1))
        return spans[:, :-1].to(model.device), spans[:, 1:].to(model.device), torch.cat(hs), torch.cat(lgs)
    finally:
        model.train(was)


def train_episodic_hf(model, spans: torch.Tensor, cfg: HFEpisodicConfig = HFEpisodicConfig(),
                      log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Learn the four settings of a retrofit's episodic memory with everything else frozen.

    Args:
        model: a :class:`~cl_arch.hf.RetrofitModel` with an episodic memory.
        spans: ``[N, L + 1]`` token ids of *training* text (never a reported stream), ``L >= cfg.seq_len``.
        cfg: :class:`HFEpisodicConfig`.
        log: called with each progress line (default: ``logging``).

    Returns:
        A JSON-ready record: ``base_bits`` (loss without the memory on the spans, bits/token),
        ``history`` (step, loss bits, gain over the base on that batch, "fresh"), ``final_gain_last10``,
        ``learned`` (threshold, span, beta, scale), ``seconds``. The model is changed in place (eval mode).
    """
    log = log or logger.info
    mem = getattr(model, "episodic", None)
    if mem is None:
        raise ValueError("the model has no episodic memory: retrofit(..., episodic_heads=1) or add_episodic_memory()")
    if spans.dim() != 2 or spans.shape[1] - 1 < cfg.seq_len:
        raise ValueError(f"spans must be [N, L + 1] with L >= seq_len = {cfg.seq_len}, got {tuple(spans.shape)}")
    t0 = time.perf_counter()
    ids, tgt, h, base = frozen_inputs_hf(model, spans, cfg.chunk)
    to_bits = 1.0 / math.log(2)
    base_bits = F.cross_entropy(base.flatten(0, 1), tgt.flatten()).item() * to_bits
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    embed, head = model.base.get_input_embeddings(), model.base.get_output_embeddings()
    model.eval()

    def report(step, row):
        if (step + 1) % 20 == 0 or step == 0:
            log(f"episodic step {step + 1} gain {row[2]:+.4f} bits/token scale "
                f"{mem.read_scale.mean().item():.3f} threshold {mem.key_threshold.item():.3f}")

    try:
        # the memory starts empty at each window: what it is worth written as the text is read
        history = fit_settings(mem, ids, tgt, h, base, embed, head, steps=cfg.steps, batch_size=cfg.batch_size,
                               seq_len=cfg.seq_len, lr=cfg.lr, seed=cfg.seed, on_step=report)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    learned = learned_settings(mem)
    n = min(10, len(history))
    record = {"config": dataclasses.asdict(cfg), "spans": list(spans.shape), "base_bits": base_bits,
              "history": history, "final_gain_last10": sum(row[2] for row in history[-n:]) / n,
              "learned": learned, "seconds": time.perf_counter() - t0}
    log(f"episodic memory learned {learned}; gain over the last {n} steps {record['final_gain_last10']:+.4f} bits/token")
    return record


# ---------------------------------------------------------------------- the loop
def _write_retrofit_weights(base_name: str):
    """A checkpoint's weights: the added layers as :func:`~cl_arch.hf.save_retrofit` writes them."""
    def write(model, folder: str) -> None:
        from cl_arch.hf import save_retrofit

        save_retrofit(model, folder, base_name=base_name)
    return write


def _read_retrofit_weights(folder: str, model) -> None:
    """Inverse of :func:`_write_retrofit_weights` into ``model`` in place; the checkpoint must have
    been written over the same base (its fingerprint) and fit the added layers."""
    from safetensors.torch import load_file

    from cl_arch.hf import RETROFIT_WEIGHTS
    from cl_arch.hf.files import read_retrofit_config

    meta = read_retrofit_config(folder)
    if meta["base"]["fingerprint"] != model.base_fingerprint():
        raise ValueError(f"checkpoint {folder} was trained over another base model (fingerprint "
                         f"{meta['base']['fingerprint']}, this one {model.base_fingerprint()})")
    path = os.path.join(folder, RETROFIT_WEIGHTS)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"corrupt checkpoint weights {path}: {e}") from e
    expected = model.fast.state_dict()
    bad = sorted(set(expected) ^ set(tensors)) + sorted(n for n in tensors if n in expected
                                                        and tensors[n].shape != expected[n].shape)
    if bad:
        raise ValueError(f"checkpoint {path} does not fit the model's added layers: {bad[:5]}")
    with torch.no_grad():
        for n, t in expected.items():
            t.copy_(tensors[n])


def _accelerator():
    from accelerate import Accelerator

    destroy_group_at_exit()
    return Accelerator(cpu=not torch.cuda.is_available())


def finetune_hf(cfg: HFFinetuneConfig, model=None, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train the retrofitted layers (see the module docstring) on the :class:`~cl_arch.train.trainer.Trainer`.

    Args:
        model: a :class:`~cl_arch.hf.RetrofitModel` to train instead of building one from ``cfg``
            (``cfg.hf_model`` is then only where the tokenizer is looked for).
        log: called with each progress line (default: ``logging``, on the main process).

    Under ``accelerate launch`` (DDP, several processes) every process draws the same batch rows and
    trains on its equal share; the trainable gradients are averaged with one all-reduce, so N
    processes take one process's steps up to float reduction order. With ``save_every`` /
    ``resume`` a run writes and continues :mod:`cl_arch.train.checkpoint` folders (the added
    layers, optimizer, schedule, data position, RNG) exactly.

    Returns:
        ``model`` (trained, eval mode), ``trainable_parameters``, ``steps``, ``seconds``,
        ``tokens_per_second``, ``curve`` (step, train loss) and ``val_loss`` before and after (nats,
        the episodic objective on validation blocks); with ``output_dir`` the retrofit is saved in
        ``<output_dir>/retrofit`` and the figures in ``<output_dir>/results.json``.

    Raises:
        ValueError: a retrofit without traces for ``episodes > 1``, ``batch_size`` not divisible by
            the number of processes, an FSDP launch, or a checkpoint of another run.
    """
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    if model is None:
        model = build_model(cfg)
    lam_none = [i for i, m in enumerate(model.fast_layers()) if m.lam is None]
    if cfg.episodes > 1 and lam_none:
        raise ValueError("episodic fine-tuning commits eligibility traces; the retrofit has lam = None (no trace): "
                         "retrofit with lam set, or use episodes = 1")
    names = select_trainable_hf(model, cfg.trainable)
    encode = text_encoder(cfg.hf_model, model.config.vocab_size)
    data = token_blocks(cfg.sources, encode, cfg.seq_len + 1, cfg.max_bytes)
    val = data["val"][:32]
    accelerator = _accelerator()
    plan = dist_utils.resolve_plan("auto", "full", accelerator.num_processes)
    if plan.fsdp:
        raise ValueError("finetune_hf runs one process or DDP (the base is frozen and the added layers are small): "
                         "launch without an FSDP config")
    params = [p for p in model.parameters() if p.requires_grad]
    parallel = Parallel(accelerator, plan, synced=params)  # no DDP wrapper: E forwards per backward
    main_log = log or (lambda text: logger.info(text) if parallel.is_main else None)
    model.to(accelerator.device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainer = _trainer(cfg, model, opt, data["train"], parallel, main_log)
    trainer.resume()
    model.check_inputs = False  # ids come from the data pipeline: no host read per step

    def val_loss() -> float:
        with torch.no_grad():
            return float(episode_losses(model, val, cfg.episodes, carry=True).mean())

    before = val_loss()
    run = trainer.train()
    if cfg.output_dir:
        trainer.save()
    model.check_inputs = True
    model.eval()
    steps_run = run["steps_this_run"]
    results: Dict[str, Any] = {
        "trainable_parameters": names, "steps": run["steps"], "seconds": run["seconds"],
        "tokens_per_second": steps_run * cfg.batch_size * cfg.seq_len / max(run["seconds"], 1e-9),
        "curve": trainer.curve, "val_loss_before": before, "val_loss_after": val_loss(),
        "processes": parallel.world, "config": dataclasses.asdict(cfg),
    }
    if cfg.output_dir and parallel.is_main:
        from cl_arch.hf import save_retrofit
        from cl_arch.io import write_json

        os.makedirs(cfg.output_dir, exist_ok=True)
        save_retrofit(model, os.path.join(cfg.output_dir, "retrofit"), base_name=cfg.hf_model)
        write_json(os.path.join(cfg.output_dir, "results.json"), results, sort_keys=True)
    results["model"] = model
    return results


def _train_added_layers(model) -> None:
    model.train()
    model.base.eval()  # the frozen base keeps its dropout off: only the added layers learn


def _trainer(cfg: HFFinetuneConfig, model, opt, rows: torch.Tensor, parallel: Parallel, log) -> Trainer:
    """The parts of :func:`finetune_hf`'s run: random training rows, the episodic loss, cosine decay
    (no warmup) over the steps or the clock, clipping at 1, checkpoints of the added layers."""
    checkpointer = None
    if cfg.output_dir:
        checkpointer = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), every=cfg.save_every,
                                    keep=cfg.keep_checkpoints, resume=cfg.resume,
                                    extra={"config": json.dumps(dataclasses.asdict(cfg), default=str)},
                                    weights=(_write_retrofit_weights(cfg.hf_model), _read_retrofit_weights))

    def loss_fn(m, block):
        return episodic_lm_loss(m, block, cfg.episodes), {}

    def report(trainer: Trainer) -> None:
        step = trainer.step
        if step % cfg.log_every == 0 or step == 1:
            trainer.curve.append({"step": step, "loss": trainer.history[-1]["loss"]})
            log(f"finetune_hf step {step} loss {trainer.curve[-1]['loss']:.4f} ({trainer.elapsed():.0f} s)")

    trainer = Trainer(model, opt, RandomRows(rows, cfg.batch_size, cfg.seed, parallel.rank, parallel.world), loss_fn,
                      schedule=WarmupCosine(opt, cfg.lr, 0, 0.0), parallel=parallel, grad_clip=1.0,
                      clip_params=[p for p in model.parameters() if p.requires_grad], max_steps=cfg.max_steps,
                      budget_s=None if cfg.max_minutes is None else 60.0 * cfg.max_minutes,
                      checkpointer=checkpointer, after_step=report, name="finetune_hf", autocast=False,
                      train_mode=_train_added_layers)
    trainer.curve = []
    return trainer


def config_from_dict(d: Dict[str, Any]) -> HFFinetuneConfig:
    """Build a config, naming unknown keys."""
    known = {f.name for f in dataclasses.fields(HFFinetuneConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown finetune_hf settings {unknown}; known: {sorted(known)}")
    return HFFinetuneConfig(**d)


def dump(results: Dict[str, Any]) -> str:
    """The results without the model, as JSON."""
    return json.dumps({k: v for k, v in results.items() if k != "model"}, indent=2, sort_keys=True, default=str)


__all__ = ["HFFinetuneConfig", "finetune_hf", "HFEpisodicConfig", "train_episodic_hf", "frozen_inputs_hf",
           "episodic_parameters", "episode_losses", "select_trainable_hf", "token_blocks",
           "text_encoder", "build_model", "config_from_dict", "TRAINABLE"]
