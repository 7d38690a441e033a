"""The one optimiser loop of cl_arch: a :class:`Trainer` built from parts, and its progress bar.

The loop lives here, in the core, because :mod:`cl_arch.consolidate` (distillation) trains with it
and ``cl_arch`` never imports training code; the parts for full runs (accelerate, DDP / FSDP,
training checkpoints, metrics files, the warmup-cosine schedule and AdamW groups) are in
:mod:`cl_arch.train.trainer`, which re-exports :class:`Trainer`. As torchtitan's ``Trainer`` is
built from ``components/*``, this one is handed its parts and owns only the loop:

- the model, the optimizer and a **schedule** (``set(step, progress) -> lr``, ``state_dict``);
- the **data**: an iterable of batches (``state()`` / ``load_state(position)`` when it can resume);
- the **loss**: ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` a scalar the trainer
  back-propagates, or None when the part ran its own backward passes through
  ``trainer.parallel.backward`` (meta-training's truncated windows); ``metrics`` plain floats or
  scalar tensors, averaged over micro-steps and processes;
- **parallel**: backward, gradient accumulation, gradient averaging, clipping and the clock all
  processes agree on (:class:`SingleProcess` here; ``cl_arch.train.trainer.Parallel`` for
  accelerate, DDP and FSDP);
- **checkpointing**, **metrics logging** and hooks (evaluation, projections after a step);
- **progress**: :class:`RunProgress`.

Every optimiser of the project runs on it: pretraining and fine-tuning, meta-training, the
retrofit's fine-tuning, recall pretraining, the episodic memory's settings, distillation and the
reward memory's meta-gradient each supply data, a loss and their parameter choice.

**The progress bar.** A run stops at ``max_steps`` or when ``max_minutes`` is spent, whichever
comes first; its learning rate follows the same progress, ``max(step / max_steps, elapsed /
budget)``. A bar counting steps to ``max_steps`` is wrong whenever the budget binds (``cl-arch
demo`` pretraining for 150 s showed 0/5000 steps and a 25-minute ETA), so with a budget
:class:`RunProgress` counts that progress in seconds of the budget: the bar fills as the schedule
advances, its ETA is the time the run has left, and the step count goes to the postfix.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

LossFn = Callable[[Any, Any], tuple[torch.Tensor | None, dict[str, Any]]]


class RunProgress:
    """A tqdm bar over a run's progress (see the module docstring).

    Args:
        desc: the bar's label.
        max_steps: the run's step limit.
        budget_s: wall-clock budget in seconds, or None (the bar then counts steps).
        step, elapsed: where a resumed run starts (steps done, seconds spent before).
        disable: no bar (other processes, ``train.progress: false``).
        file: where tqdm writes (default stderr).
    """

    def __init__(self, desc: str, max_steps: int, budget_s: float | None = None, step: int = 0,
                 elapsed: float = 0.0, disable: bool = False, file=None):
        from tqdm.auto import tqdm

        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 or None, got {budget_s}")
        self.max_steps, self.budget, self.step = max_steps, budget_s, step
        if budget_s is None:
            self.bar = tqdm(total=max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
                            disable=disable, file=file)
        else:
            fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s of budget [{elapsed}<{remaining}{postfix}]"
            self.bar = tqdm(total=budget_s, initial=self.position(step, elapsed), desc=desc, unit="s",
                            bar_format=fmt, dynamic_ncols=True, disable=disable, file=file)

    def position(self, step: int, elapsed: float) -> float:
        """Where the bar stands: ``step`` (no budget), else ``progress * budget`` seconds with
        ``progress = max(step / max_steps, elapsed / budget)`` capped at 1."""
        if self.budget is None:
            return float(step)
        return min(1.0, max(step / self.max_steps, elapsed / self.budget)) * self.budget

    def update(self, step: int, elapsed: float, **postfix) -> None:
        """Move to ``step`` steps done after ``elapsed`` seconds; ``postfix`` is shown beside the bar."""
        self.step = step
        if self.budget is not None:
            postfix = {"step": f"{step}/{self.max_steps}", **postfix}
        delta = self.position(step, elapsed) - self.bar.n
        if self.budget is None:
            delta = int(delta)  # whole steps print as "3/40", not "3.0/40"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(delta)  # tqdm's own rate estimate, hence its ETA, follows these increments

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class SingleProcess:
    """The parallel part of a one-process run: plain ``backward``, no accumulation context, clipping
    with ``torch.nn.utils.clip_grad_norm_`` over the parameters that have a gradient. Batches are
    left on the device they come on."""

    world, rank, device, is_main, is_local_main, sync_gradients = 1, 0, None, True, True, True
    accelerator = None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def autocast(self):
        return contextlib.nullcontext()

    def accumulate(self, model):
        return contextlib.nullcontext()

    def sync_and_clip(self, model, max_norm: float | None, clip_params=None) -> torch.Tensor | None:
        if max_norm is None:
            return None
        params = [p for p in (model.parameters() if clip_params is None else clip_params) if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def clock(self, elapsed: float) -> float:
        return elapsed


def to_device(batch: Any, device) -> Any:
    """``batch`` (a tensor, or tuples / lists / dicts of them) on ``device`` (None: as it is)."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _default_postfix(metrics: dict[str, float], lr: float | None) -> dict[str, str]:
    out = {k: f"{v:.3f}" for k, v in metrics.items()}
    if lr is not None:
        out["lr"] = f"{lr:.2e}"
    return out


class Trainer:
    """The loop: ``train_step(batch)`` takes one optimizer step, ``train()`` runs to the end.

    Args:
        model: the module the loss calls (accelerate's wrapper, an FSDP module or a plain module).
        optimizer: a torch optimizer (or accelerate's wrapper of one).
        data: an iterable of micro-batches (module docstring); ``grad_accum`` of them per step.
        loss_fn: ``(model, batch) -> (loss, metrics)`` (module docstring).
        schedule: sets the lr per step from ``(step, progress)``
            (:class:`cl_arch.train.trainer.WarmupCosine`); None: the optimizer's lr.
        parallel: how gradients meet across processes: :class:`cl_arch.train.trainer.Parallel`
            (DDP, FSDP, accelerate), or the default :class:`SingleProcess`.
        grad_accum: micro-batches per optimizer step.
        grad_clip: max global gradient norm (None: no clipping); ``clip_params`` the parameters
            clipped (default the model's).
        max_steps: the step limit; ``budget_s``: a wall-clock limit in seconds (None: none).
        checkpointer: :class:`cl_arch.train.trainer.Checkpointer` (None: no checkpoints, no resume).
        metrics_log, log_every: where (:class:`cl_arch.train.trainer.MetricsLog`) and how often step
            entries go (``log_entry(metrics, lr, grad_norm) -> dict`` builds one).
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
                 parallel: Any = None, grad_accum: int = 1, grad_clip: float | None = None,
                 clip_params=None, max_steps: int, budget_s: float | None = None,
                 checkpointer: Any = None, metrics_log: Any = None,
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
        self.schedule, self.parallel = schedule, parallel or SingleProcess()
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
        step_loss = None  # the mean loss over micro-steps, on the loss's device
        sums: dict[str, torch.Tensor] = {}
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
                if step_loss is None:
                    step_loss = torch.zeros((), device=loss.device)
                step_loss += loss.detach() / self.grad_accum
            for k, v in metrics.items():
                v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float64)
                sums[k] = sums.get(k, 0.0) + v / self.grad_accum
        self.step += 1
        out = self._reduce(step_loss, sums)
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
            figures = torch.stack([sums[k].reshape(()) for k in names])
            if par.world > 1:
                figures = figures.to(par.device)
                scale = torch.tensor([par.world if k in self.reduce_sum else 1.0 for k in names],
                                     dtype=torch.float64, device=par.device)
                figures = par.mean(figures) * scale
            out.update({k: float(figures[i]) for i, k in enumerate(names)})
        return out

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """Steps until ``max_steps`` or the budget; returns ``{"steps", "steps_this_run", "seconds",
        "stopped" ("max_steps" | "max_minutes"), "history"}`` (history: one metrics dict per step)."""
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


__all__ = ["LossFn", "RunProgress", "SingleProcess", "Trainer", "to_device"]
