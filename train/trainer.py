"""One optimiser loop for every trainer in cl_arch: a :class:`Trainer` built from small parts.

As torchtitan's ``Trainer`` is built from ``components/*``, this one is handed its parts and owns
only the loop (``train_step`` / ``train``):

- the model and the **optimizer** (:func:`param_groups`: AdamW groups with weight decay on
  matrices only), and the **schedule** (:class:`WarmupCosine`);
- the **data**: an iterable of batches (``state()`` / ``load_state(position)`` when it can resume,
  as :class:`~cl_arch.train.data.BlockBatches` and :class:`~cl_arch.train.data.RandomRows` do);
- the **loss**: ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` a scalar the trainer
  back-propagates, or None when the part ran its own backward passes through
  ``trainer.parallel.backward`` (meta-training's truncated windows); ``metrics`` plain floats or
  scalar tensors, averaged over micro-steps and processes;
- **parallel** (:class:`Parallel`): how gradients meet across processes (accelerate's DDP
  wrapper, FSDP shards with their replicated vectors averaged by hand, or one all-reduce of the
  trainable gradients), gradient accumulation, clipping, and the one clock all processes agree on;
- **checkpointing** (:class:`Checkpointer`): :mod:`cl_arch.train.checkpoint`'s folders (atomic,
  RNG state of every process, optimizer, schedule, data position, elapsed time), resumed exactly;
- **progress and logging**: the :class:`~cl_arch.train.progress.RunProgress` bar, a
  ``metrics.jsonl`` / accelerate-tracker log (:class:`MetricsLog`), lines through ``logging``.

Pretraining and fine-tuning (:func:`cl_arch.train.pretrain.run_training`), meta-training, the
retrofit's fine-tuning, recall pretraining, the episodic memory's settings, distillation and the
reward memory's meta-gradient all supply data, a loss and their parameter choice to it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist_utils

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], tuple[torch.Tensor | None, dict[str, Any]]]


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
def to_device(batch: Any, device) -> Any:
    """``batch`` (a tensor, or tuples / lists / dicts of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


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


def _default_postfix(metrics: dict[str, float], lr: float | None) -> dict[str, str]:
    out = {k: f"{v:.3f}" for k, v in metrics.items()}
    if lr is not None:
        out["lr"] = f"{lr:.2e}"
    return out


# ============================================================================ the trainer
class Trainer:
    """The loop: ``train_step(batch)`` takes one optimizer step, ``train()`` runs to the end.

    Args:
        model: the module the loss calls (accelerate's wrapper, an FSDP module or a plain module).
        optimizer: a torch optimizer (or accelerate's wrapper of one).
        data: an iterable of micro-batches (module docstring); ``grad_accum`` of them per step.
        loss_fn: ``(model, batch) -> (loss, metrics)`` (module docstring).
        schedule: sets the lr per step from ``(step, progress)`` (:class:`WarmupCosine`); None: fixed.
        parallel: :class:`Parallel` (default: one process).
        grad_accum: micro-batches per optimizer step.
        grad_clip: max global gradient norm (None: no clipping); ``clip_params`` the parameters
            clipped (default the model's).
        max_steps: the step limit; ``budget_s``: a wall-clock limit in seconds (None: none).
        checkpointer: :class:`Checkpointer` (None: no checkpoints, no resume).
        metrics_log, log_every: where and how often step entries go (``log_entry(metrics, lr,
            grad_norm) -> dict`` builds one).
        evaluate, eval_every: ``evaluate(step) -> None`` every ``eval_every`` steps but the last.
        after_step: ``after_step(trainer)`` after every optimizer step (projections, clamps).
        name, progress, postfix: the bar's label, whether to show it (main process only) and
            ``postfix(metrics, lr) -> dict`` shown beside it.
        autocast: run ``loss_fn`` under accelerate's autocast.
        reduce_sum: metrics summed over processes instead of averaged (a share of a global sum).
        model_to_save: the unwrapped model that checkpoints read and write (default ``model``).
        diverged_hint: what the error on a non-finite metric advises.
        train_mode: puts the model in training mode before the loop (default ``model.train()``; a
            retrofit keeps its frozen base in eval mode).
    """

    def __init__(self, model, optimizer, data: Iterable, loss_fn: LossFn, *, schedule=None,
                 parallel: Parallel | None = None, grad_accum: int = 1, grad_clip: float | None = None,
                 clip_params=None, max_steps: int, budget_s: float | None = None,
                 checkpointer: Checkpointer | None = None, metrics_log: MetricsLog | None = None,
                 log_every: int = 0, log_entry: Callable | None = None,
                 evaluate: Callable[[int], None] | None = None, eval_every: int = 0,
                 after_step: Callable[[Trainer], None] | None = None, name: str = "train",
                 progress: bool = False, postfix: Callable = _default_postfix, autocast: bool = True,
                 reduce_sum: Sequence[str] = (), model_to_save=None,
                 diverged_hint: str = "lower the learning rate or clip the gradients",
                 train_mode: Callable[[Any], None] | None = None):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.model, self.optimizer, self.data, self.loss_fn = model, optimizer, data, loss_fn
        self.schedule, self.parallel = schedule, parallel or Parallel()
        self.grad_accum, self.grad_clip, self.clip_params = grad_accum, grad_clip, clip_params
        self.max_steps, self.budget = max_steps, budget_s
        self.checkpointer, self.metrics_log, self.log_every = checkpointer, metrics_log, log_every
        self.log_entry = log_entry or (lambda m, lr, norm: {**m, **({} if lr is None else {"lr": lr})})
        self.evaluate, self.eval_every, self.after_step = evaluate, eval_every, after_step
        self.name, self.show_progress, self.postfix, self.use_autocast = name, progress, postfix, autocast
        self.reduce_sum, self.diverged_hint = set(reduce_sum), diverged_hint
        self.train_mode = train_mode or (lambda m: m.train())
        self.model_to_save = model if model_to_save is None else model_to_save
        self.step, self.elapsed_before, self.first_step = 0, 0.0, 0
        self.history: list[dict[str, float]] = []
        self.last_lr: float | None = None
        self.last_grad_norm: torch.Tensor | None = None
        self._start: float | None = None
        self._batches = None

    # ---------------------------------------------------------------- state
    def resume(self) -> dict[str, Any] | None:
        """Load the checkpointer's checkpoint (call before the model is wrapped by accelerate)."""
        if self.checkpointer is None:
            return None
        info = self.checkpointer.load(self)
        if info is not None:
            self.step = self.first_step = int(info["step"])
            self.elapsed_before = float(info["elapsed"])
            if hasattr(self.data, "load_state"):
                self.data.load_state(info["data_position"])
        return info

    def elapsed(self) -> float:
        """Seconds of training so far, earlier runs of a resumed one included."""
        return self.elapsed_before + (0.0 if self._start is None else time.time() - self._start)

    def save(self) -> str | None:
        return None if self.checkpointer is None else self.checkpointer.save(self, self.elapsed())

    def progress_fraction(self, elapsed: float) -> float:
        p = self.step / self.max_steps
        return p if self.budget is None else max(p, elapsed / self.budget)

    # ---------------------------------------------------------------- one step
    def next_batch(self):
        """The next micro-batch of the data part, on the run's device."""
        if self._batches is None:
            self._batches = iter(self.data)
        return to_device(next(self._batches), self.parallel.device)

    def train_step(self, batch=None, progress: float | None = None) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches (``batch``: the first of them, or all
        as a list when ``grad_accum > 1``; None: drawn from the data part).

        Returns the step's metrics (``loss`` when the loss part returns one), averaged over
        micro-steps and processes; raises FloatingPointError on a non-finite one.
        """
        par = self.parallel
        lr = None
        if self.schedule is not None:
            lr = self.schedule.set(self.step, self.step / self.max_steps if progress is None else progress)
        given = list(batch) if isinstance(batch, list) else ([] if batch is None else [batch])
        step_loss = torch.zeros((), device=par.device)
        sums: dict[str, torch.Tensor] = {}
        has_loss = False
        for micro in range(self.grad_accum):
            mb = to_device(given[micro], par.device) if micro < len(given) else self.next_batch()
            with par.accumulate(self.model):
                with par.autocast() if self.use_autocast else contextlib.nullcontext():
                    loss, metrics = self.loss_fn(self.model, mb)
                if loss is not None:
                    par.backward(loss)
                if par.sync_gradients:  # accelerate's prepared optimizer skips others itself; FSDP's raw one needs this
                    self.last_grad_norm = par.sync_and_clip(self.model, self.grad_clip, self.clip_params)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                has_loss = True
                step_loss += loss.detach() / self.grad_accum
            for k, v in metrics.items():
                v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float64)
                sums[k] = sums.get(k, 0.0) + v / self.grad_accum
        self.step += 1
        out = self._reduce(step_loss if has_loss else None, sums)
        bad = {k: v for k, v in out.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"training {', '.join(f'{k} is {v}' for k, v in bad.items())} at step "
                                     f"{self.step}: {self.diverged_hint}")
        self.last_lr = lr
        self.history.append(out)
        if self.after_step is not None:
            self.after_step(self)
        return out

    def _reduce(self, step_loss: torch.Tensor | None, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over processes (sums for ``reduce_sum``): the loss in its own dtype, the rest in float64."""
        par, out = self.parallel, {}
        if step_loss is not None:
            out["loss"] = float(par.mean(step_loss)) if par.world > 1 else float(step_loss)
        if sums:
            names = list(sums)
            figures = torch.stack([sums[k].reshape(()) for k in names]).to(par.device)
            if par.world > 1:
                scale = torch.tensor([par.world if k in self.reduce_sum else 1.0 for k in names],
                                     dtype=torch.float64, device=par.device)
                figures = par.mean(figures) * scale
            out.update({k: float(figures[i]) for i, k in enumerate(names)})
        return out

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """Steps until ``max_steps`` or the budget; returns ``{"steps", "steps_this_run", "seconds",
        "stopped" ("max_steps" | "max_minutes"), "history"}`` (history: one metrics dict per step)."""
        from .progress import RunProgress

        bar = RunProgress(self.name, self.max_steps, self.budget, step=self.step, elapsed=self.elapsed_before,
                          disable=not (self.show_progress and self.parallel.is_local_main))
        self.train_mode(self.model)
        self._start = time.time()
        stopped = "max_steps"
        while self.step < self.max_steps:
            elapsed = self.elapsed()
            if self.budget is not None:
                elapsed = self.parallel.clock(elapsed)
                if elapsed >= self.budget:
                    stopped = "max_minutes"
                    break
            metrics = self.train_step(progress=self.progress_fraction(elapsed))
            bar.update(self.step, self.elapsed(), **self.postfix(metrics, self.last_lr))
            self._after(metrics)
        bar.close()
        return {"steps": self.step, "steps_this_run": self.step - self.first_step,
                "seconds": time.time() - self._start, "stopped": stopped, "history": self.history}

    def _after(self, metrics: dict[str, float]) -> None:
        step, last = self.step, self.step >= self.max_steps
        if self.metrics_log is not None and self.log_every and step % self.log_every == 0:
            self.metrics_log.log(self.log_entry(metrics, self.last_lr, self.last_grad_norm), step)
        if self.evaluate is not None and self.eval_every and step % self.eval_every == 0 and not last:
            self.evaluate(step)
        if self.checkpointer is not None and self.checkpointer.every and step % self.checkpointer.every == 0 \
                and not last:
            self.save()


__all__ = ["Checkpointer", "LossFn", "MetricsLog", "Parallel", "Trainer", "WarmupCosine",
           "param_groups", "to_device"]
