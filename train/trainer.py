"""The parts of a full training run for :class:`~cl_arch.training.Trainer`, the one optimiser loop.

The loop itself is in the core (:mod:`cl_arch.training`, re-exported here as :class:`Trainer`)
because distillation (:mod:`cl_arch.consolidate`) trains with it and ``cl_arch`` never imports
training code. The parts a run composes it from:

- the **optimizer** groups (:func:`param_groups`: weight decay on matrices only) and the
  **schedule** (:class:`WarmupCosine`);
- the **data**: :class:`~cl_arch.train.data.BlockBatches` or :class:`~cl_arch.train.data.RandomRows`
  (both resumable: ``state()`` / ``load_state(position)``), or any iterable of batches;
- **parallel** (:class:`Parallel`): how gradients meet across processes (accelerate's DDP
  wrapper, FSDP shards with their replicated vectors averaged by hand, or one all-reduce of the
  trainable gradients), gradient accumulation, clipping, mixed precision and the one clock all
  processes agree on;
- **checkpointing** (:class:`Checkpointer`): :mod:`cl_arch.train.checkpoint`'s folders (atomic,
  RNG state of every process, optimizer, schedule, data position, elapsed time), resumed exactly;
- **logging**: a ``metrics.jsonl`` / accelerate-tracker log (:class:`MetricsLog`) and lines
  through ``logging``; the progress bar is :class:`~cl_arch.training.RunProgress`.

Pretraining and fine-tuning (:func:`cl_arch.train.pretrain.run_training`), meta-training, the
retrofit's fine-tuning, recall pretraining, the episodic memory's settings and the reward memory's
meta-gradient build their runs from these parts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cl_arch.training import LossFn, Trainer, to_device

from . import checkpoint as ckpt
from . import distributed as dist_utils

logger = logging.getLogger(__name__)


# ============================================================================ optimizer and schedule
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

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_num, "progress": self.progress, "lr": self.lr, "warmup": self.warmup,
                "min_ratio": self.min_ratio}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step_num, self.progress = int(d["step"]), float(d["progress"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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


# ============================================================================ data
# ============================================================================ parallel
@dataclass
class Parallel:
    """How a step's gradients meet across processes.

    Args:
        accelerator: accelerate's ``Accelerator`` (None: one process, no mixed precision).
        plan: the run's :class:`~cl_arch.train.distributed.ParallelPlan` (None: single).
        wrapped: the model went through ``accelerator.prepare`` (DDP averages the gradients; clipping
            through ``accelerator.clip_grad_norm_``).
        synced: parameters whose gradients are averaged with one all-reduce before each optimizer
            step: FSDP's replicated per-head vectors, or every trainable parameter of a model that is
            not wrapped (a loss with many forwards per backward, which DDP's wrapper does not allow).
    """

    accelerator: Any = None
    plan: dist_utils.ParallelPlan | None = None
    wrapped: bool = False
    synced: Sequence[torch.nn.Parameter] = ()

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.accelerator is None else self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def is_local_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_local_main_process

    @property
    def fsdp(self) -> bool:
        return self.plan is not None and self.plan.fsdp

    def backward(self, loss: torch.Tensor) -> None:
        (loss.backward() if self.accelerator is None else self.accelerator.backward(loss))

    def autocast(self):
        return contextlib.nullcontext() if self.accelerator is None else self.accelerator.autocast()

    @contextlib.contextmanager
    def accumulate(self, model):
        """One micro-step: ``sync_gradients`` says whether it ends the optimizer step."""
        if self.accelerator is None:
            yield
            return
        with self.accelerator.accumulate(model):
            if self.fsdp:  # reduce-scatter once per optimizer step, not per micro-step
                model.set_requires_gradient_sync(self.accelerator.sync_gradients)
            yield

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator is None or self.accelerator.sync_gradients

    def sync_and_clip(self, model, max_norm: float | None, clip_params=None) -> torch.Tensor | None:
        """Average the gradients this part owns, then clip (``clip_params``: default the model's)."""
        if self.world > 1 and self.synced:
            dist_utils.all_reduce_grads(self.synced, self.world)
        if max_norm is None:
            return None
        params = model.parameters() if clip_params is None else clip_params
        if self.wrapped and not self.fsdp:
            return self.accelerator.clip_grad_norm_(params, max_norm)
        return dist_utils.clip_grad_norm(params, max_norm)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "mean") if self.world > 1 else t

    def clock(self, elapsed: float) -> float:
        """Process 0's ``elapsed``: all processes must agree on it (it sets the lr and the stop)."""
        if self.world <= 1:
            return elapsed
        from accelerate.utils import broadcast

        return float(broadcast(torch.tensor([elapsed], dtype=torch.float64, device=self.device), from_process=0)[0])

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


# ============================================================================ checkpointing
@dataclass
class Checkpointer:
    """Training checkpoints in :mod:`cl_arch.train.checkpoint`'s format under ``root``.

    Args:
        root: the folder of ``step_N`` checkpoints.
        every: save every ``every`` steps (0: only when asked, e.g. at the end).
        keep: how many newest checkpoints to keep (0: all).
        resume: a checkpoint folder, "auto" (the newest under ``root``) or None.
        sharded: write FSDP's sharded format.
        extra: plain data saved with each checkpoint (the run config as JSON).
        weights: ``(write(model, folder), read(folder, model))`` for a model that is not a
            :class:`~cl_arch.PlasticTransformer` (None: ``save_pretrained`` / :func:`~cl_arch.train.checkpoint.load_weights`).
    """

    root: str
    every: int = 0
    keep: int = 0
    resume: str | None = None
    sharded: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    weights: tuple[Callable, Callable] | None = None

    def latest(self) -> str | None:
        return ckpt.find_latest(self.root) if self.resume == "auto" else self.resume

    def load(self, trainer: Trainer) -> dict[str, Any] | None:
        """Restore the trainer's model, optimizer, schedule and RNG; returns the saved training dict."""
        path = self.latest()
        if not path:
            return None
        read = None if self.weights is None else self.weights[1]
        info = ckpt.load_checkpoint(path, trainer.model_to_save, trainer.optimizer, trainer.schedule,
                                    rank=trainer.parallel.rank, read_weights=read)
        if trainer.parallel.is_main:
            logger.info(f"resumed from {path} at step {int(info['step'])}")
        return info

    def save(self, trainer: Trainer, elapsed: float) -> str:
        """Write ``step_<trainer.step>`` (every process calls this) and prune old ones."""
        step = trainer.step
        data_state = trainer.data.state() if hasattr(trainer.data, "state") else []
        write = None if self.weights is None else self.weights[0]
        folder = ckpt.save_checkpoint(os.path.join(self.root, f"step_{step:06d}"), trainer.model_to_save,
                                      trainer.optimizer, trainer.schedule,
                                      {"step": step, "data_position": list(data_state), "elapsed": elapsed,
                                       **self.extra}, trainer.parallel.accelerator, sharded=self.sharded,
                                      write_weights=write)
        if trainer.parallel.is_main:
            ckpt.prune_checkpoints(self.root, self.keep)
        return folder


# ============================================================================ logging
class MetricsLog:
    """Step metrics appended to ``<folder>/metrics.jsonl`` and sent to accelerate's trackers (main
    process only). ``folder`` None: nothing is written."""

    def __init__(self, folder: str | None, parallel: Parallel, trackers: bool = False):
        self.path = None if folder is None else os.path.join(folder, "metrics.jsonl")
        self.parallel, self.trackers = parallel, trackers

    def log(self, entry: dict[str, Any], step: int) -> None:
        if not self.parallel.is_main:
            return
        if self.trackers:
            self.parallel.accelerator.log(entry, step=step)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **entry}) + "\n")


__all__ = ["Checkpointer", "LossFn", "MetricsLog", "Parallel", "Trainer", "WarmupCosine", "param_groups",
           "to_device"]
