"""Next-byte pretraining on accelerate: one script for CPU, one GPU, DDP or FSDP.

``pretrain(cfg)`` runs :class:`~cl_arch.train.config.PretrainRunConfig`: packed byte blocks from
:mod:`cl_arch.train.data`, the model's chunked path (``model.train()``), AdamW with warmup +
cosine, gradient accumulation via ``Accelerator.accumulate``, clipping, periodic validation in
bits/byte, checkpoints with exact resume (:mod:`cl_arch.train.checkpoint`), accelerate trackers
and a tqdm bar. The loop is :class:`~cl_arch.train.trainer.Trainer`; :func:`run_training` builds
its parts and also serves fine-tuning, which passes its own loss and parameter choice.
``WarmupCosine`` and ``param_groups`` live in :mod:`cl_arch.train.trainer` (importable from here).

Launch on several processes with ``accelerate launch --config_file configs/accelerate/<ddp|fsdp>.yaml
-m cl_arch.scripts.cli pretrain ...``; ``train.batch_size`` is the global batch, split evenly
between processes. Under FSDP the model is sharded by :mod:`cl_arch.train.distributed`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from cl_arch import PlasticConfig, PlasticTransformer

from . import distributed as dist_utils
from .config import PretrainRunConfig, config_to_dict
from .data import BlockBatches, corpus_files, dataset_tensor, packed_dataset, split_corpus
from .trainer import Checkpointer, MetricsLog, Parallel, Trainer, WarmupCosine, param_groups

logger = logging.getLogger(__name__)
LN2 = math.log(2.0)


def enable_activation_checkpointing(model: PlasticTransformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    Wraps every block's ``forward`` in non-reentrant ``torch.utils.checkpoint`` (which supports the
    block's ``(x, state)`` output); memory drops to one block's activations at ~1.3x compute.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        if getattr(block, "_ckpt_wrapped", False):
            continue
        inner = block.forward

        def fwd(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = fwd
        block._ckpt_wrapped = True


# ============================================================================ losses
def lm_loss(model, block: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``block [B, T + 1]`` through the chunked path."""
    logits, _ = model(block[:, :-1], return_state=False)
    return F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten())


@torch.no_grad()
def evaluate_bpb(model, val: torch.Tensor, batch_size: int, accelerator=None,
                 loss_fn: Optional[Callable] = None) -> float:
    """Validation bits/byte over the rows of ``val [N, T + 1]`` (every process scores its share).

    ``loss_fn(model, rows [b, T + 1]) -> mean nats`` replaces the plain next-byte loss (the
    episodic fine-tuning loss, for one). The sum of nats and the count of bytes are reduced over
    processes, so the figure is the same however many processes run.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else val.device
    was_training = model.training
    model.eval()
    rows = val[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    # Every process runs the same number of forwards (FSDP gathers weights inside each one); a
    # process out of rows scores one row with weight 0.
    for j in range(dist_utils.padded_batches(val.shape[0], world, batch_size)):
        x = rows[j * batch_size:(j + 1) * batch_size].to(device)
        weight = 1.0
        if x.shape[0] == 0:
            x, weight = val[:1].to(device), 0.0
        ctx = accelerator.autocast() if accelerator is not None else _null()
        with ctx:
            if loss_fn is None:
                logits, _ = model(x[:, :-1], return_state=False)
                nats = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            else:
                nats = loss_fn(model, x).float() * x[:, 1:].numel()
        total += weight * torch.stack([nats.double(), torch.tensor(float(x[:, 1:].numel()), dtype=torch.float64,
                                                                   device=device)])
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return float(total[0] / total[1]) / LN2


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ============================================================================ the loop
@dataclass
class TrainingSetup:
    """What :func:`run_training` trains: built by pretrain / finetune."""

    model: PlasticTransformer
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]  # (wrapped model, block [B, T+1]) -> scalar
    kind: str = "pretrain"
    val_loss_fn: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None  # None: next-byte loss


def make_accelerator(cfg, output_dir: str):
    """Accelerator with the config's precision, accumulation and tracker (tensorboard if present)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    t = cfg.train
    log_with = None
    if t.log_with in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401
            log_with = "tensorboard"
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
                log_with = "tensorboard"
            except ImportError:
                if t.log_with == "tensorboard":
                    raise ValueError("train.log_with: tensorboard is not installed")
    # Parameters the objective does not reach (e.g. the commit rates under a plain LM loss) have no
    # gradient; DDP must be told to expect that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # `accelerate launch --multi_gpu` (torchrun) on a machine without CUDA: accelerate only forms a
    # multi-process CPU group (gloo) when told it runs on CPU, and `--cpu` alone would start a
    # single process (it expects mpirun). So a distributed launch without CUDA means CPU.
    cpu = torch.cuda.is_available() is False and os.environ.get("LOCAL_RANK") is not None
    dist_utils.destroy_group_at_exit()
    return Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                       log_with=log_with, project_dir=output_dir, kwargs_handlers=[ddp], cpu=cpu)


def load_data(cfg, accelerator=None):
    """``(train dataset, val [N, seq_len + 1] int64)`` from the config's data section."""
    d = cfg.data
    files = corpus_files(d.sources)
    train_spans, val_spans = split_corpus(files, d.val_fraction)
    block = d.seq_len + 1
    train_ds = packed_dataset(train_spans, block, d.max_train_bytes, streaming=d.streaming)
    val_ds = packed_dataset(val_spans, block, d.max_val_bytes, streaming=False)
    val = dataset_tensor(val_ds, cfg.train.val_blocks)
    return train_ds, val, {"train_files": len(train_spans), "val_files": len(val_spans),
                           "val_blocks": int(val.shape[0])}


def run_training(cfg, setup: TrainingSetup) -> Dict[str, Any]:
    """Train ``setup.model`` on the config's corpus; returns (and writes) a results dict.

    Builds the parts of a :class:`~cl_arch.train.trainer.Trainer` (the packed-block stream, AdamW
    and the warmup-cosine schedule, DDP or FSDP, checkpoints, metrics) and runs it, then scores
    the validation set and writes ``final/`` and ``results.json``.

    Results: ``final_val_bpb``, ``val_history`` [(step, bpb)], ``train_losses`` (mean over
    processes, nats, one per optimizer step of this invocation), ``steps``, ``tokens``,
    ``seconds``, ``tokens_per_s``, ``stopped`` ("max_steps" | "max_minutes").
    """
    t = cfg.train
    output_dir = t.output_dir
    accelerator = make_accelerator(cfg, output_dir)
    from accelerate.utils import set_seed

    set_seed(t.seed)
    world = accelerator.num_processes
    if t.batch_size % world != 0:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by {world} processes")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
    plan = dist_utils.resolve_plan(t.parallel, t.checkpoint_format, world)
    train_ds, val, data_info = load_data(cfg)
    run_config = config_to_dict(cfg)
    trainer = _build_trainer(cfg, setup, accelerator, plan, train_ds, val, run_config)
    raw_model = trainer.model_to_save
    if accelerator.is_main_process:
        accelerator.init_trackers(setup.kind, config=_flat_scalars(run_config))
        logger.info(f"{setup.kind}: {raw_model.num_parameters() / 1e6:.2f}M parameters "
                    f"({raw_model.num_parameters(trainable_only=True) / 1e6:.2f}M trainable), {world} process(es) "
                    f"({plan.mode}), {data_info['train_files']} train / {data_info['val_files']} val files, "
                    f"{len(train_ds) if hasattr(train_ds, '__len__') else 'streaming'} train blocks of "
                    f"{cfg.data.seq_len + 1} bytes")
    if t.eval_at_start and trainer.step == 0:
        trainer.evaluate(0, batch_size=t.batch_size // world)
    run = trainer.train()
    seconds, step = run["seconds"], trainer.step
    bpb = trainer.evaluate(step, announce=False)
    trainer.save()
    dist_utils.save_final(raw_model, os.path.join(output_dir, "final"), accelerator.process_index)  # gathers under FSDP
    steps_run = run["steps_this_run"]
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    results = {
        "kind": setup.kind, "final_val_bpb": bpb, "val_history": trainer.val_history,
        "train_losses": [h["loss"] for h in run["history"]], "steps": step, "steps_this_run": steps_run,
        "tokens": steps_run * tokens_per_step, "seconds": seconds,
        "tokens_per_s": steps_run * tokens_per_step / max(seconds, 1e-9), "stopped": run["stopped"],
        "processes": world, "parallel": plan.mode, "checkpoint_format": plan.checkpoint_format,
        "parameters": raw_model.num_parameters(), "output_dir": output_dir, **data_info,
    }
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump({**results, "config": run_config}, f, indent=2)
        logger.info(f"{setup.kind}: {step} steps, {seconds:.0f}s, {results['tokens_per_s']:.0f} tokens/s, "
                    f"final validation {bpb:.4f} bits/byte ({run['stopped']})")
    # Not accelerator.end_training(): it also destroys the process group, and a later run in this
    # process (a fine-tune after a pretrain, the FSDP test's runs) would then have none.
    for tracker in accelerator.trackers:
        tracker.finish()
    raw_model.check_inputs = True
    return results


def _build_trainer(cfg, setup: TrainingSetup, accelerator, plan, train_ds, val, run_config) -> Trainer:
    """The parts of a pretraining / fine-tuning run, resumed from its checkpoint if asked, with the
    model and optimizer prepared by accelerate (or sharded by FSDP)."""
    t, o = cfg.train, cfg.optim
    world, rank = accelerator.num_processes, accelerator.process_index
    model = setup.model
    if t.activation_checkpointing or plan.activation_checkpointing:
        enable_activation_checkpointing(model)  # before sharding: FSDP's hooks then wrap the recompute
    model = dist_utils.shard_model(model, plan)  # fsdp only; before the optimizer sees the parameters
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=1e-8)
    parallel = Parallel(accelerator, plan)
    stream = BlockBatches(train_ds, t.batch_size, rank=rank, world_size=world, seed=t.seed,
                          shuffle_buffer=cfg.data.shuffle_buffer)
    checkpointer = Checkpointer(os.path.join(t.output_dir, "checkpoints"), every=t.save_every,
                                keep=t.keep_checkpoints, resume=t.resume or None,
                                sharded=plan.checkpoint_format == "sharded", extra={"config": json.dumps(run_config)})

    def entry(m, lr, norm):
        out = {"train_loss": m["loss"], "train_bpb": m["loss"] / LN2, "lr": lr}
        return out if norm is None else {**out, "grad_norm": float(norm)}

    trainer = Trainer(model, optimizer, stream, lambda m, block: (setup.loss_fn(m, block), {}),
                      schedule=WarmupCosine(optimizer, o.lr, o.warmup_steps, o.min_lr_ratio), parallel=parallel,
                      grad_accum=t.grad_accum, grad_clip=o.grad_clip, max_steps=t.max_steps,
                      budget_s=t.max_minutes * 60.0 if t.max_minutes else None, checkpointer=checkpointer,
                      metrics_log=MetricsLog(t.output_dir, parallel, trackers=True), log_every=t.log_every,
                      log_entry=entry, eval_every=t.eval_every, name=setup.kind, progress=t.progress,
                      postfix=lambda m, lr: {"loss": f"{m['loss']:.3f}", "bpb": f"{m['loss'] / LN2:.3f}",
                                             "lr": f"{lr:.2e}"},
                      diverged_hint="lower optim.lr or set optim.grad_clip")
    # Resume before prepare(): weights and optimizer state go into the raw objects (into each
    # process's shards under FSDP).
    trainer.resume()
    if plan.fsdp:  # sharded above; accelerate would wrap it in DDP on CPU (distributed.py says why)
        parallel.synced = dist_utils.replicated_parameters(model)
    else:
        trainer.model, trainer.optimizer = accelerator.prepare(model, optimizer)
        trainer.model_to_save = accelerator.unwrap_model(trainer.model)
        parallel.wrapped = True
    trainer.model_to_save.check_inputs = False  # data-pipeline inputs: no host read per step (restored at the end)
    _attach_validation(trainer, val, max(1, t.batch_size // world), setup.val_loss_fn)
    return trainer


def _attach_validation(trainer: Trainer, val: torch.Tensor, batch_size: int, loss_fn) -> None:
    """``trainer.evaluate(step)``: validation bits/byte, logged and kept in ``trainer.val_history``."""
    trainer.val_history = []

    def evaluate(step: int, batch_size: int = batch_size, announce: bool = True) -> float:
        par = trainer.parallel
        bpb = evaluate_bpb(trainer.model, val, batch_size, par.accelerator, loss_fn)
        trainer.val_history.append((step, bpb))
        trainer.metrics_log.log({"val_bpb": bpb}, step)
        if announce and par.is_main:
            logger.info(f"step {step}: validation {bpb:.4f} bits/byte")
        return bpb

    trainer.evaluate = evaluate


def _flat_scalars(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested config -> flat ``{"train/lr": 0.003}`` of scalars (what trackers accept as hparams)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is None:
            out[key] = "None"
        else:
            out[key] = str(v)
    return out


def build_model(cfg) -> PlasticTransformer:
    """The model of a run: ``train.init_from`` weights if given, else fresh from ``model`` fields."""
    if cfg.train.init_from:
        return PlasticTransformer.from_pretrained(cfg.train.init_from)
    return PlasticTransformer(PlasticConfig.from_dict(cfg.model))


def pretrain(cfg: PretrainRunConfig) -> Dict[str, Any]:
    """Next-byte pretraining (see the module docstring); returns :func:`run_training`'s results.

    The commit-rate parameters (``lam, gamma, eta_s, eta_r``) are frozen: a single-episode
    next-byte loss does not depend on them (they act when an episode is committed), so they are
    left at their configured values for meta-training to learn.
    """
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)  # model init is part of the run's determinism
    model = build_model(cfg)
    for layer in model.fast_layers():
        for p in layer.plasticity_parameters().values():
            p.requires_grad_(False)
    return run_training(cfg, TrainingSetup(model=model, loss_fn=lm_loss, kind="pretrain"))
