"""Quick associative-recall pretraining: a small model whose fast memory maps keys to values.

docs/design.md ("Measuring learning"): a randomly initialised model has no reason to map a value
it wrote back to the token it came from, so tests and benchmarks of learning start from a model trained briefly on
:func:`cl_arch.train.tasks.recall_batch`. :func:`train_recall_model` does that in about a minute
on two CPU cores and is deterministic for a given seed and step count.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from cl_arch import AttnLayerState, FastLayerState, ModelState, PlasticConfig, PlasticTransformer

from .tasks import KEYS, recall_batch, recall_episodes
from .trainer import Trainer


def recall_config(**overrides) -> PlasticConfig:
    """The small all-fast-weight config used for recall tests: 2 layers, d=64, 2 heads of 32x32.

    Both mixers are fast-weight layers (no attention), so recall can only go through fast
    memory, and so can whatever a persistent memory P adds to it. No readout memory: it would
    recall a key's value from the output side and hide what the fast layers inside store.

    ``fast_rest="zero"`` (the first design's rule: episodes start at W0 + P and decay toward 0):
    under the resting-state rule the same recipe gives a model whose reward games stop learning
    (hidden preferences 8x8 through Session, 8 seeds x 100 episodes, seed-0 model: reward
    0.100 -> 0.105, reset 0.105, trace norm 0.27; with this rule 0.205 -> 0.330, reset 0.120,
    trace norm 2.55). W0 acting at every token absorbs the errors the game's commits are made of.
    """
    return PlasticConfig.from_name("recall", **overrides)


def recall_accuracy(model: PlasticTransformer, batches: int = 4, batch_size: int = 64, n_pairs: int = 24,
                    n_keys: int = 16, n_values: int = 16, seed: int = 12345) -> float:
    """Accuracy of the argmax prediction at recallable value positions (chance ``1/n_values``)."""
    was_training = model.training
    model.eval()
    hits = total = 0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(batches):
            x, y, m = recall_batch(batch_size, n_pairs, n_keys, n_values, seed=g)
            logits, _ = model(x, return_state=False)
            hits += int(((logits.argmax(-1) == y) & m).sum())
            total += int(m.sum())
    model.train(was_training)
    return hits / max(total, 1)


def train_gated_recall_model(steps: int = 400, seed: int = 0, min_accuracy: float = 0.75, tries: int = 8,
                             lr: float = 1e-2, log: Optional[Callable[[str], None]] = None, **kw):
    """:func:`train_recall_model` until the model recalls: seeds ``seed, seed + 1000, ...``.

    Whether in-context recall forms within a fixed step count is a phase transition whose timing
    depends on the seed and on the machine's float arithmetic (5 seeds of the 400-step recipe:
    1 learnt, 4 stayed near chance; lr 3e-3 and 600 steps: about half learnt, but gave models
    whose reward games did not learn). A test of *learning*
    needs a model that recalls, so the fixture keeps the first one whose
    :func:`recall_accuracy` reaches ``min_accuracy``; the seed it took is returned with it.

    Returns:
        ``(model, info)`` with ``info = {"seed", "tries", "accuracy", "accuracies"}``.

    Raises:
        RuntimeError: no try reached ``min_accuracy``.
    """
    accs = []
    for i in range(tries):
        s = seed + 1000 * i
        model = train_recall_model(steps=steps, seed=s, lr=lr, **kw)
        acc = recall_accuracy(model)
        accs.append(acc)
        if log is not None:
            log(f"recall model seed {s}: accuracy {acc:.3f}")
        if acc >= min_accuracy:
            return model, {"seed": s, "tries": i + 1, "accuracy": acc, "accuracies": accs}
    raise RuntimeError(f"train_gated_recall_model: no recall model reached accuracy {min_accuracy} in {tries} "
                       f"tries (seeds {seed} + 1000 i): {[round(a, 3) for a in accs]}")


def _key_positions(x: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: input positions holding a key token (their target is a value)."""
    return (x >= KEYS.start) & (x < KEYS.stop)


class RecallBatches:
    """The data part of :func:`train_recall_model`: one-episode recall batches ``("one", x, y, m)``
    for the first ``warmup_steps`` steps, then two-episode batches ``("two", (x1, y1, m1), (x2, y2, m2))``,
    all drawn from one generator seeded ``seed``."""

    def __init__(self, batch_size: int, n_pairs: int, n_keys: int, n_values: int, seed: int, warmup_steps: int):
        self.args, self.seed, self.warmup_steps = (batch_size, n_pairs, n_keys, n_values), seed, warmup_steps

    def __iter__(self):
        batch_size, n_pairs, n_keys, n_values = self.args
        g = torch.Generator().manual_seed(self.seed)
        step = 0
        while True:
            if step < self.warmup_steps:
                yield ("one", *recall_batch(batch_size, n_pairs, n_keys, n_values, seed=g))
            else:
                yield ("two", *recall_episodes(batch_size, 2, n_pairs // 2, n_keys, n_values, seed=g))
            step += 1


class RecallCosine:
    """``lr * (0.1 + 0.9 * cosine)`` over ``total`` steps (as ``LambdaLR`` computed it): settles the
    key -> value map in few steps."""

    def __init__(self, optimizer, lr: float, total: int):
        self.optimizer, self.lr, self.total, self.step_num = optimizer, lr, total, 0

    def set(self, step: int, progress: float) -> float:
        self.step_num = step
        f = 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(min(step / self.total, 1.0) * 3.14159265)).item())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * f
        return self.lr * f

    def state_dict(self):
        return {"step": self.step_num}

    def load_state_dict(self, d) -> None:
        self.step_num = int(d["step"])


def recall_loss(model: PlasticTransformer, batch, first_weight: float) -> torch.Tensor:
    """The loss part of :func:`train_recall_model` on a :class:`RecallBatches` batch (a scalar)."""
    if batch[0] == "one":
        # Phase 1: in-context recall in one episode, loss only where the value is
        # recallable: the key->value circuit forms fastest this way.
        _, x, y, m = batch
        logits, _ = model(x, return_state=False)
        return F.cross_entropy(logits[m], y[m])
    # Phase 2: two episodes sharing one key->value map; the second starts from the
    # first's fast weights with fresh caches, as an episode starts from W0 + P: the model
    # learns to read a memory it did not write in this episode, right after BOS.
    _, (x1, y1, m1), (x2, y2, m2) = batch
    logits1, st = model(x1)
    carried = ModelState([FastLayerState(S=s.S) if isinstance(s, FastLayerState) else AttnLayerState()
                          for s in st.layers], 0)
    logits2, _ = model(x2, state=carried, return_state=False)
    # Loss at every key position: recallable values teach recall; first occurrences (a
    # uniformly random value) teach a flat prior over values, so a player samples every
    # answer of a game at first instead of always the same one.
    k1, k2 = _key_positions(x1), _key_positions(x2)
    w = torch.cat([m1[k1].float(), m2[k2].float()]) * (1 - first_weight) + first_weight
    ce = F.cross_entropy(torch.cat([logits1[k1], logits2[k2]]), torch.cat([y1[k1], y2[k2]]), reduction="none")
    return (ce * w).sum() / w.sum()


def train_recall_model(
    config: Optional[PlasticConfig] = None,
    seconds: Optional[float] = None,
    steps: Optional[int] = 400,
    seed: int = 0,
    batch_size: int = 32,
    n_pairs: int = 24,
    n_keys: int = 16,
    n_values: int = 16,
    lr: float = 1e-2,
    first_weight: float = 0.2,
    warmup_fraction: float = 0.6,
    log: Optional[Callable[[str], None]] = None,
) -> PlasticTransformer:
    """Train a model on in-context associative recall and return it in eval mode.

    Args:
        config: model config; default :func:`recall_config`.
        seconds: wall-clock budget; training stops at whichever of ``seconds``/``steps`` comes
            first (``steps`` alone is deterministic; a time budget depends on the machine).
        steps: optimiser steps (None: only the time budget counts).
        n_pairs, n_keys, n_values: task size: each step trains on two episodes of
            ``n_pairs // 2`` pairs (see :func:`~cl_arch.train.tasks.recall_episodes`).
        warmup_fraction: share of the steps spent on one-episode recall before the two-episode
            phase.
        first_weight: loss weight of first occurrences (value not recallable) relative to 1
            for recallable ones.
        log: called with a progress line every 50 steps (e.g. ``print``).

    Returns:
        The trained :class:`PlasticTransformer` (eval mode, float32).
    """
    if seconds is None and steps is None:
        raise ValueError("train_recall_model: give seconds, steps or both")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    torch.manual_seed(seed)
    model = PlasticTransformer(config or recall_config())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    if seconds is not None and steps is None:
        raise ValueError("train_recall_model: a time budget needs a step count too (phases are in steps)")
    data = RecallBatches(batch_size, n_pairs, n_keys, n_values, seed, int(warmup_fraction * steps))
    ema = [None]

    def report(trainer: Trainer) -> None:
        loss = trainer.history[-1]["loss"]
        ema[0] = loss if ema[0] is None else 0.95 * ema[0] + 0.05 * loss
        if log is not None and trainer.step % 50 == 0:
            log(f"recall step {trainer.step}: loss {ema[0]:.3f} ({trainer.elapsed():.1f}s)")

    Trainer(model, opt, data, lambda m, batch: (recall_loss(m, batch, first_weight), {}),
            schedule=RecallCosine(opt, lr, steps), grad_clip=1.0, max_steps=steps, budget_s=seconds,
            after_step=report, name="recall").train()
    model.eval()
    return model


__all__ = ["recall_config", "recall_accuracy", "train_recall_model"]
