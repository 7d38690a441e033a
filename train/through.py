"""Training through adaptation: the loss is the model's loss *after* its fast weights adapted over a
long stream (docs/design.md, "Training through adaptation").

Pretraining scores 1 KB windows read from a fresh state, so no weight was ever trained on what the
fast weights hold after reading for a while, across the episode commits a session makes. Here a step
reads ``batch_size`` contiguous ``context_bytes`` windows of the training corpus as a session does
under ``adapt``: episodes of ``episode_bytes``, each closed by the model's own commit (``P`` from the
trace, the output memories' state commit), the next started from ``W0 + P``. The loss is every
byte's next-byte loss along the stream, so later episodes are scored with what earlier ones wrote.
Gradients flow through the fast weights' writes within a window of ``tbptt`` episodes, commits
included; the state that crosses a window's end is detached (truncated, first-order, as TTT-E2E's
outer loop where the exact gradient is too dear). Every weight trains (the base, the memories'
settings, the plasticity), with AdamW, warmup and cosine, checkpoints and exact resume
(:class:`~cl_arch.train.trainer.Trainer` and its parts).

Validation reads held-out windows of ``val_package`` (the tuning package, never a reported stream)
the same way and records bits/byte per episode index: a model that learns from what it read has
its later episodes lower.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from cl_arch import PlasticTransformer
from cl_arch.io import write_json
from cl_arch.memory import FastWeightLayer
from cl_arch.memory.fast_layer import TARGETS
from cl_arch.training import SingleProcess

from .data import stdlib_dir, stdlib_files
from .trainer import Checkpointer, MetricsLog, Trainer, WarmupCosine, param_groups

logger = logging.getLogger(__name__)
LN2 = math.log(2.0)


@dataclasses.dataclass
class ThroughConfig:
    """Settings of :func:`train_through`.

    context_bytes: stream length per row (>= 16 KB spans several episode commits).
    episode_bytes: bytes per episode (the evaluations' ``--episode-bytes``); must divide ``context_bytes``.
    tbptt: episodes per backward window (gradients cross ``tbptt - 1`` commits).
    batch_size, steps, max_minutes, lr, warmup_steps, weight_decay, grad_clip, seed: the optimisation.
    target: set the in-block fast layers' write target first ("same" | "next"; None: keep the model's).
    skip_memories: memories switched off while training (their weights do not train; they are on at
        inference): the episodic memory's F = 2048 state costs 3x the rest of a step on a CPU.
    val_package, val_windows: the held-out package and how many windows validation reads.
    save_every, keep, resume: checkpoints (``resume``: "auto", a folder, or None).
    """
    context_bytes: int = 16384
    episode_bytes: int = 2048
    tbptt: int = 2
    batch_size: int = 2
    steps: int = 400
    max_minutes: Optional[float] = None
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    target: Optional[str] = None
    skip_memories: Sequence[str] = ("episodic",)
    val_package: str = "asyncio"
    val_windows: int = 4
    save_every: int = 10
    keep: int = 2
    resume: Optional[str] = "auto"

    def __post_init__(self) -> None:
        for name in ("context_bytes", "episode_bytes", "tbptt", "batch_size", "steps", "val_windows", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"ThroughConfig.{name} must be a positive integer, got {v!r}")
        if self.context_bytes % self.episode_bytes:
            raise ValueError(f"ThroughConfig: episode_bytes ({self.episode_bytes}) must divide context_bytes "
                             f"({self.context_bytes})")
        self.skip_memories = list(self.skip_memories)
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(f"ThroughConfig.target must be one of {TARGETS} or None, got {self.target!r}")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"ThroughConfig.{name} must be a positive number, got {v!r}")


def set_target(model: PlasticTransformer, target: str) -> None:
    """Switch every in-block fast layer's write target in place (``"same"``: ``k_t -> v_t``;
    ``"next"``: ``k_{t-1} -> v_t``); the weights are kept, so the switched model needs training."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    layers = [m for m in model.modules() if isinstance(m, FastWeightLayer)]
    if target == "next" and any(m.conv is None for m in layers):
        raise ValueError("target 'next' needs the fast layers' short conv (conv_size >= 2)")
    model.config.target = target
    for m in layers:
        m.config.target = target
        m.next_target = target == "next"
        if m.conv is not None:
            m.conv.lookback = int(m.next_target)


class StreamWindows:
    """Endless ``[batch_size, context_bytes + 1]`` windows of whole training files (resumable:
    window ``i`` is drawn from its own seeded generator, so ``load_state([i])`` continues exactly)."""

    def __init__(self, files: Sequence[str], context_bytes: int, batch_size: int, seed: int):
        self.files = [f for f in files if os.path.getsize(f) > context_bytes]
        if not self.files:
            raise ValueError(f"no training file holds more than {context_bytes} bytes")
        self.context_bytes, self.batch_size, self.seed, self.position = context_bytes, batch_size, seed, 0

    def window(self, i: int) -> List[int]:
        rng = random.Random(self.seed * 1_000_003 + i)
        with open(rng.choice(self.files), "rb") as fh:
            data = fh.read()
        start = rng.randrange(0, len(data) - self.context_bytes)
        return list(data[start:start + self.context_bytes + 1])

    def __iter__(self):
        while True:
            rows = [self.window(self.position * self.batch_size + b) for b in range(self.batch_size)]
            self.position += 1
            yield torch.tensor(rows, dtype=torch.long)

    def state(self) -> List[int]:
        return [self.position]

    def load_state(self, position: Sequence[int]) -> None:
        self.position = int(position[0])


def read_stream(model: PlasticTransformer, rows: torch.Tensor, episode_bytes: int, tbptt: int,
                backward=None) -> List[torch.Tensor]:
    """Read ``rows [B, L + 1]`` as sessions under ``adapt`` do and return each episode's mean loss
    (nats, detached). With ``backward``, each window of ``tbptt`` episodes' summed loss / episodes is
    back-propagated through the writes and commits inside it, and the state crossing is detached."""
    B, n_ep = rows.shape[0], (rows.shape[1] - 1) // episode_bytes
    state, window, losses = None, None, []
    for e in range(n_ep):
        seg = rows[:, e * episode_bytes:(e + 1) * episode_bytes + 1]
        logits, state = model(seg[:, :-1], state=state)
        loss = F.cross_entropy(logits.float().flatten(0, 1), seg[:, 1:].flatten())
        losses.append(loss.detach())
        window = loss if window is None else window + loss
        # The episode's commit, as `adapt` makes it: r = None (retention), the model's own rates.
        grad = backward is not None and torch.is_grad_enabled()
        P, _ = model.commit(state, reward=None, missing_trace="zeros", backend="naive" if grad else "auto")
        state = model.init_state(B, P)
        if backward is not None and ((e + 1) % tbptt == 0 or e == n_ep - 1):
            backward(window / n_ep)
            window = None
            state = state.detach()
    return losses


@torch.no_grad()
def validate(model: PlasticTransformer, windows: Sequence[torch.Tensor], episode_bytes: int) -> List[float]:
    """Bits/byte per episode index over held-out ``windows`` (each ``[1, L + 1]``), read as ``adapt`` reads."""
    was = model.training
    model.eval()
    per = None
    for w in windows:
        ls = torch.stack(read_stream(model, w, episode_bytes, 1)) / LN2
        per = ls if per is None else per + ls
    model.train(was)
    return (per / len(windows)).tolist()


def train_through(model: PlasticTransformer, cfg: ThroughConfig, output_dir: str, progress: bool = False,
                  files: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train ``model`` (in place) through adaptation; writes checkpoints, ``metrics.jsonl``,
    ``results.json`` and the model (``final/``) under ``output_dir``; returns the results dict."""
    torch.manual_seed(cfg.seed)
    if cfg.target is not None:
        set_target(model, cfg.target)
    os.makedirs(output_dir, exist_ok=True)
    data = StreamWindows(files if files is not None else stdlib_files("train"), cfg.context_bytes,
                         cfg.batch_size, cfg.seed)
    val_files = [f for f in stdlib_files("held_out")
                 if os.path.relpath(f, stdlib_dir()).split(os.sep)[0] == cfg.val_package]
    val_src = StreamWindows(val_files, cfg.context_bytes, 1, cfg.seed + 7)
    val = [torch.tensor([val_src.window(i)]) for i in range(cfg.val_windows)]
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    schedule = WarmupCosine(opt, cfg.lr, cfg.warmup_steps, 0.1)
    trainer: Optional[Trainer] = None
    skip = [n for n in cfg.skip_memories if model.memory(n) is not None]
    for mem in model.output_memories():
        c = mem.config
        if mem.config.name not in skip and getattr(c, "write", None) == "error" and getattr(c, "write_chunk", 1) == 1:
            # the exact error write's only differentiable backend loops over tokens (~19x the chunked rule)
            logger.warning("memory %r trains through the exact error write (per-token loop); "
                           "model.set_write(%r, 'error', chunk=64) reads the same bits in matrix products",
                           c.name, c.name)

    def loss_fn(m, rows):
        with m.memories_off(*skip):
            losses = read_stream(m, rows, cfg.episode_bytes, cfg.tbptt, backward=trainer.parallel.backward)
        ls = torch.stack(losses) / LN2
        return None, {"bpb": ls.mean(), "bpb_first": ls[0], "bpb_last": ls[-1]}

    run_config = {"through": dataclasses.asdict(cfg), "model": model.config.to_dict()}
    trainer = Trainer(model, opt, data, loss_fn, schedule=schedule, grad_clip=cfg.grad_clip, max_steps=cfg.steps,
                      budget_s=None if cfg.max_minutes is None else cfg.max_minutes * 60,
                      checkpointer=Checkpointer(os.path.join(output_dir, "checkpoints"), every=cfg.save_every,
                                                keep=cfg.keep, resume=cfg.resume, extra={"run_config": run_config}),
                      metrics_log=MetricsLog(output_dir, SingleProcess()), log_every=1,
                      name="train-through", progress=progress,
                      postfix=lambda mt, lr: {"bpb": f"{mt['bpb']:.3f}", "last": f"{mt['bpb_last']:.3f}"})
    info = trainer.resume()
    saved = (info or {}).get("run_config", {}).get("through", {})
    if info is not None and saved.get("target") != cfg.target:
        raise ValueError(f"the checkpoint under {output_dir} was trained with target={saved.get('target')!r}, "
                         f"this run asks for target={cfg.target!r}: pass the same --target or a new --output-dir")
    t0 = time.time()
    with model.memories_off(*skip):
        before = None if info is not None else validate(model, val, cfg.episode_bytes)
    if before is not None:
        logger.info(f"validation before ({cfg.val_package}, bits/byte per episode): "
                    + " ".join(f"{b:.3f}" for b in before))
    run = trainer.train()
    trainer.save()
    with model.memories_off(*skip):
        after = validate(model, val, cfg.episode_bytes)
    logger.info("validation after: " + " ".join(f"{b:.3f}" for b in after))
    model.eval()
    model.save_pretrained(os.path.join(output_dir, "final"))
    results = {"steps": trainer.step, "stopped": run["stopped"], "seconds": time.time() - t0,
               "bytes_per_step": cfg.batch_size * cfg.context_bytes, "val_before": before, "val_after": after,
               "train": [{k: h[k] for k in ("bpb", "bpb_first", "bpb_last")} for h in run["history"]],
               **run_config}
    write_json(os.path.join(output_dir, "results.json"), results)
    return results
