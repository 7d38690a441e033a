"""Next-byte pretraining on accelerate: one script for CPU, one GPU, DDP or FSDP.

``pretrain(cfg)`` runs :class:`~cl_arch.train.config.PretrainRunConfig`: packed byte blocks from
:mod:`cl_arch.train.data`, the model's chunked path (``model.train()``), AdamW with warmup +
cosine, gradient accumulation via ``Accelerator.accumulate``, clipping, periodic validation in
bits/byte, checkpoints with exact resume (:mod:`cl_arch.train.checkpoint`), accelerate trackers
and a tqdm bar. The loop itself (:func:`run_training`) also serves fine-tuning, which passes its
own loss and parameter choice.

Launch on several processes with ``accelerate launch --config_file configs/accelerate/<ddp|fsdp>.yaml
-m cl_arch.scripts.cli pretrain ...``; ``train.batch_size`` is the global batch, split evenly
between processes. Under FSDP the model is sharded by :mod:`cl_arch.train.distributed`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from cl_arch import PlasticConfig, PlasticTransformer

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import PretrainRunConfig, config_to_dict
from .data import BlockBatches, corpus_files, dataset_tensor, packed_dataset, split_corpus
from .progress import RunProgress

LN2 = math.log(2.0)


# ============================================================================ schedule
class WarmupCosine:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr``.

    The cosine runs over a progress fraction in [0, 1] that the loop supplies (steps done over
    max steps, or the share of a wall-clock budget, whichever is further); ``state_dict`` keeps
    the last step and progress so a resumed run continues the same curve.
    """

    def __init__(self, optimizer, lr: float, warmup_steps: int, min_lr_ratio: float):
        self.optimizer, self.lr, self.warmup, self.min_ratio = optimizer, lr, warmup_steps, min_lr_ratio
        self.step_num, self.progress = 0, 0.0

    def lr_at(self, step: int, progress: float) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        # The cosine spans the whole run's progress; warmup only overrides its first steps.
        p = min(max(progress, 0.0), 1.0)
        return self.lr * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))

    def set(self, step: int, progress: float) -> float:
        """Set every parameter group's lr for optimizer step ``step``; returns it."""
        self.step_num, self.progress = step, progress
        lr = self.lr_at(step, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step_num, "progress": self.progress, "lr": self.lr, "warmup": self.warmup,
                "min_ratio": self.min_ratio}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.step_num, self.progress = int(d["step"]), float(d["progress"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: decay matrices (dim >= 2), not gains, biases, gates or ``_no_weight_decay``.

    Only parameters with ``requires_grad`` are included (fine-tuning freezes the rest).
    """
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters")
    return groups


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

    Results: ``final_val_bpb``, ``val_history`` [(step, bpb)], ``train_losses`` (mean over
    processes, nats, one per optimizer step of this invocation), ``steps``, ``tokens``,
    ``seconds``, ``tokens_per_s``, ``stopped`` ("max_steps" | "max_minutes").
    """
    t, o = cfg.train, cfg.optim
    output_dir = t.output_dir
    accelerator = make_accelerator(cfg, output_dir)
    from accelerate.utils import broadcast, set_seed

    set_seed(t.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if t.batch_size % world != 0:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by {world} processes")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)

    plan = dist_utils.resolve_plan(t.parallel, t.checkpoint_format, world)
    train_ds, val, data_info = load_data(cfg)
    model = setup.model
    if t.activation_checkpointing or plan.activation_checkpointing:
        enable_activation_checkpointing(model)  # before sharding: FSDP's hooks then wrap the recompute
    model = dist_utils.shard_model(model, plan)  # fsdp only; before the optimizer sees the parameters
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=1e-8)
    schedule = WarmupCosine(optimizer, o.lr, o.warmup_steps, o.min_lr_ratio)

    # Resume before prepare(): weights and optimizer state go into the raw objects (into each
    # process's shards under FSDP).
    step, position, elapsed_before = 0, (0, 0), 0.0
    ckpt_root = os.path.join(output_dir, "checkpoints")
    resume = ckpt.find_latest(ckpt_root) if t.resume == "auto" else t.resume
    if resume:
        info = ckpt.load_checkpoint(resume, model, optimizer, schedule, rank=rank)
        step, position, elapsed_before = int(info["step"]), tuple(info["data_position"]), float(info["elapsed"])
        if accelerator.is_main_process:
            print(f"resumed from {resume} at step {step}")
    if plan.fsdp:  # sharded above; accelerate would wrap it in DDP on CPU (distributed.py says why)
        raw_model = model
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        raw_model = accelerator.unwrap_model(model)
    replicated = dist_utils.replicated_parameters(raw_model) if plan.fsdp else []
    raw_model.check_inputs = False  # data-pipeline inputs: no host read per step (restored at the end)

    stream = BlockBatches(train_ds, t.batch_size, rank=rank, world_size=world, seed=t.seed,
                          shuffle_buffer=cfg.data.shuffle_buffer, start=position)
    batches = iter(stream)
    run_config = config_to_dict(cfg)
    if accelerator.is_main_process:
        accelerator.init_trackers(setup.kind, config=_flat_scalars(run_config))
        print(f"{setup.kind}: {raw_model.num_parameters() / 1e6:.2f}M parameters "
              f"({raw_model.num_parameters(trainable_only=True) / 1e6:.2f}M trainable), {world} process(es) "
              f"({plan.mode}), "
              f"{data_info['train_files']} train / {data_info['val_files']} val files, "
              f"{len(train_ds) if hasattr(train_ds, '__len__') else 'streaming'} train blocks of "
              f"{cfg.data.seq_len + 1} bytes")

    metrics_path = os.path.join(output_dir, "metrics.jsonl")

    def log(d: Dict[str, Any], at: int) -> None:
        if accelerator.is_main_process:
            accelerator.log(d, step=at)
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": at, **d}) + "\n")

    def save(at: int, elapsed: float) -> None:
        ckpt.save_checkpoint(os.path.join(ckpt_root, f"step_{at:06d}"), raw_model, optimizer, schedule,
                             {"step": at, "data_position": list(stream.state()), "elapsed": elapsed,
                              "config": json.dumps(run_config)}, accelerator,
                             sharded=plan.checkpoint_format == "sharded")
        if accelerator.is_main_process:
            ckpt.prune_checkpoints(ckpt_root, t.keep_checkpoints)

    budget = t.max_minutes * 60.0 if t.max_minutes else None
    val_history: List = []
    if t.eval_at_start and step == 0:
        bpb = evaluate_bpb(model, val, t.batch_size // world, accelerator, setup.val_loss_fn)
        val_history.append((0, bpb))
        log({"val_bpb": bpb}, 0)

    bar = RunProgress(setup.kind, t.max_steps, budget, step=step, elapsed=elapsed_before,
                      disable=not (t.progress and accelerator.is_local_main_process))
    model.train()
    start = time.time()
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    losses: List[float] = []
    stopped = "max_steps"
    first_step = step
    while step < t.max_steps:
        elapsed = elapsed_before + time.time() - start
        if budget is not None:
            # All processes must agree on the clock (it sets the lr and the stop), so rank 0's wins.
            if world > 1:
                elapsed = float(broadcast(torch.tensor([elapsed], dtype=torch.float64,
                                                       device=accelerator.device), from_process=0)[0])
            if elapsed >= budget:
                stopped = "max_minutes"
                break
        progress = step / t.max_steps if budget is None else max(step / t.max_steps, elapsed / budget)
        lr = schedule.set(step, progress)

        step_loss = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for _ in range(t.grad_accum):
            block = next(batches).to(accelerator.device)
            with accelerator.accumulate(model):
                if plan.fsdp:  # reduce-scatter once per optimizer step, not per micro-step
                    model.set_requires_gradient_sync(accelerator.sync_gradients)
                with accelerator.autocast():
                    loss = setup.loss_fn(model, block)
                accelerator.backward(loss)
                # (accelerate's prepared optimizer skips non-sync micro-steps itself; FSDP's raw one
                # needs the guard, which is a no-op for the former)
                if accelerator.sync_gradients:
                    if plan.fsdp:
                        dist_utils.all_reduce_grads(replicated, world)  # FSDP leaves them unreduced
                        if o.grad_clip is not None:
                            grad_norm = dist_utils.clip_grad_norm(model.parameters(), o.grad_clip)
                    elif o.grad_clip is not None:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / t.grad_accum
        step += 1
        mean_loss = float(accelerator.reduce(step_loss, "mean")) if world > 1 else float(step_loss)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss is {mean_loss} at step {step}: lower optim.lr or "
                                     "set optim.grad_clip")
        losses.append(mean_loss)
        bar.update(step, elapsed_before + time.time() - start, loss=f"{mean_loss:.3f}", bpb=f"{mean_loss / LN2:.3f}",
                   lr=f"{lr:.2e}")
        if t.log_every and step % t.log_every == 0:
            entry = {"train_loss": mean_loss, "train_bpb": mean_loss / LN2, "lr": lr}
            if grad_norm is not None:
                entry["grad_norm"] = float(grad_norm)
            log(entry, step)
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            bpb = evaluate_bpb(model, val, max(1, t.batch_size // world), accelerator, setup.val_loss_fn)
            val_history.append((step, bpb))
            log({"val_bpb": bpb}, step)
            if accelerator.is_main_process:
                bar.write(f"step {step}: validation {bpb:.4f} bits/byte")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            save(step, elapsed_before + time.time() - start)
    bar.close()
    seconds = time.time() - start
    bpb = evaluate_bpb(model, val, max(1, t.batch_size // world), accelerator, setup.val_loss_fn)
    val_history.append((step, bpb))
    log({"val_bpb": bpb}, step)
    save(step, elapsed_before + seconds)
    dist_utils.save_final(raw_model, os.path.join(output_dir, "final"), rank)  # gathers under FSDP
    steps_run = step - first_step
    results = {
        "kind": setup.kind, "final_val_bpb": bpb, "val_history": val_history, "train_losses": losses,
        "steps": step, "steps_this_run": steps_run, "tokens": steps_run * tokens_per_step,
        "seconds": seconds, "tokens_per_s": steps_run * tokens_per_step / max(seconds, 1e-9),
        "stopped": stopped, "processes": world, "parallel": plan.mode,
        "checkpoint_format": plan.checkpoint_format, "parameters": raw_model.num_parameters(),
        "output_dir": output_dir, **data_info,
    }
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump({**results, "config": run_config}, f, indent=2)
        print(f"{setup.kind}: {step} steps, {seconds:.0f}s, {results['tokens_per_s']:.0f} tokens/s, "
              f"final validation {bpb:.4f} bits/byte ({stopped})")
    # Not accelerator.end_training(): it also destroys the process group, and a later run in this
    # process (a fine-tune after a pretrain, the FSDP test's runs) would then have none.
    for tracker in accelerator.trackers:
        tracker.finish()
    raw_model.check_inputs = True
    return results


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
