"""Learn an episodic memory's settings on the training corpus, with the rest of the model frozen.

The episodic memory (:class:`cl_arch.memory.EpisodicMemory`) sits after the last norm and only adds
to the logits, so adding one to a trained model changes nothing upstream: its inputs (the final
hidden states) and the logits it adds to can be computed once per training span with the model as
it is, and only its four settings (key threshold, span, write strength, read scale per head) are
trained on them. That is what lets the shipped model gain one without pretraining again
(``scripts/make_default_model.sh``, step 2).

Spans are contiguous ``span_bytes`` windows of training-corpus files (never the held-out packages);
the loss is next-byte cross-entropy over ``seq_len`` windows of them. Steps cycle through the
situations the memory meets in use (``cfg.carry``): ``"fresh"``, a window read with the memory
empty (a first session); ``"own"``, the second half of a span read with the P that its first
half committed (the next session of the same file); ``"foreign"``, a window read with the P that
*another* span committed (a user's P meeting unrelated text, what the stdlib drift measures). So
what is learned is how much a memory of the text read so far, and of earlier sessions, is worth,
and what a stale one costs.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from cl_arch import PlasticTransformer
from cl_arch.memory import EpisodicConfig, OutputContext
from cl_arch.state import FastLayerState, StepContext

from .data import stdlib_files
from .trainer import Trainer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EpisodicTrainConfig:
    """Settings of :func:`train_episodic`.

    steps: optimizer steps. batch_size, seq_len: windows per step and their length in bytes.
    n_spans, span_bytes: training spans cut from the corpus (hidden states computed once each).
    lr: Adam's step size. seed: span choice and window order. episodic: the
    :class:`~cl_arch.memory.EpisodicConfig` fields of the memory added to a model that has none yet
    (e.g. ``{"heads": 1}``).
    carry: the situations steps cycle through (module docstring): "fresh", "own", "foreign".
    """
    steps: int = 80
    batch_size: int = 2
    seq_len: int = 2048
    n_spans: int = 48
    span_bytes: int = 4096
    lr: float = 1e-2
    seed: int = 0
    carry: Tuple[str, ...] = ("fresh", "own", "foreign")
    episodic: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"heads": 1})

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "n_spans", "span_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EpisodicTrainConfig.{name} must be an integer >= 1, got {v!r}")
        if self.seq_len > self.span_bytes:
            raise ValueError(f"EpisodicTrainConfig.seq_len ({self.seq_len}) must not exceed span_bytes ({self.span_bytes})")
        self.carry = tuple(self.carry)
        if not self.carry or any(c not in ("fresh", "own", "foreign") for c in self.carry):
            raise ValueError(f"EpisodicTrainConfig.carry must list 'fresh', 'own' or 'foreign', got {self.carry!r}")
        if set(self.carry) & {"own", "foreign"} and 2 * self.seq_len > self.span_bytes:
            raise ValueError(f"EpisodicTrainConfig: carrying P needs span_bytes >= 2 * seq_len "
                             f"({self.span_bytes} < 2 * {self.seq_len})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"EpisodicTrainConfig.lr must be a positive number, got {self.lr!r}")


def training_spans(n: int, span_bytes: int, seed: int, files: Optional[Sequence[str]] = None) -> List[bytes]:
    """``n`` contiguous ``span_bytes`` windows of training files (default: the stdlib training split)."""
    rng = random.Random(seed)
    big = [f for f in (files if files is not None else stdlib_files("train")) if os.path.getsize(f) >= span_bytes]
    if not big:
        raise ValueError(f"no training file holds {span_bytes} bytes")
    out = []
    while len(out) < n:
        with open(rng.choice(big), "rb") as fh:
            data = fh.read()
        start = rng.randrange(0, len(data) - span_bytes + 1)
        out.append(data[start:start + span_bytes])
    return out


@torch.no_grad()
def frozen_inputs(model: PlasticTransformer, spans: Sequence[bytes], chunk: int = 256
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the episodic memory sees: ``(ids, targets, h, logits)``, each ``[N, L(, ...)]``.

    ``h [N, L, d_model]`` are the final hidden states and ``logits [N, L, vocab]`` the model's own
    logits without the episodic memory, reading each span from a fresh state in ``chunk``-byte calls
    (as a session does). ``ids`` are the inputs (a newline, then the span but its last byte).
    """
    captured = {}
    hook = model.norm_f.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    ids_all, h_all, lg_all = [], [], []
    try:
        with model.memories_off("episodic"):
            for data in spans:
                ids = torch.tensor([10] + list(data[:-1]), device=model.device)[None]
                state, hs, lgs = None, [], []
                for c in range(0, ids.shape[1], chunk):
                    lg, state = model(ids[:, c:c + chunk], state=state)
                    hs.append(captured["h"][0]); lgs.append(lg[0])
                ids_all.append(ids[0]); h_all.append(torch.cat(hs)); lg_all.append(torch.cat(lgs))
    finally:
        hook.remove()
    targets = torch.stack([torch.tensor(list(d), device=model.device) for d in spans])
    return torch.stack(ids_all), targets, torch.stack(h_all), torch.stack(lg_all)


def episodic_parameters(mem) -> List[torch.nn.Parameter]:
    """The learned settings of an :class:`~cl_arch.layers.EpisodicMemory`: key threshold ``[]``,
    ``A_log [H]`` (span), ``beta_logit [H]`` (write strength), ``read_scale [H]``."""
    return [mem.key_threshold, mem.A_log, mem.beta_logit, mem.read_scale]


def learned_settings(mem) -> Dict[str, Any]:
    """The memory's settings as plain numbers: threshold, span (tokens), beta and read scale per head."""
    return {"threshold": mem.key_threshold.item(), "span": (1.0 / mem.A_log.exp()).tolist(),
            "beta": torch.sigmoid(mem.beta_logit).tolist(), "scale": mem.read_scale.tolist()}


class SettingsWindows:
    """The data part of :func:`fit_settings`: per step ``(rows [batch_size], situation, start, src)``
    (module docstring: the situation cycles through ``carry``; ``src`` the rows whose earlier
    session the P comes from, None when fresh), drawn from one generator seeded ``seed``."""

    def __init__(self, n: int, span: int, seq_len: int, batch_size: int, carry: Sequence[str], seed: int):
        self.n, self.span, self.seq_len, self.batch_size, self.carry, self.seed = n, span, seq_len, batch_size, carry, seed

    def __iter__(self):
        n, gen, step = self.n, torch.Generator().manual_seed(self.seed), 0
        while True:
            rows = torch.randint(0, n, (self.batch_size,), generator=gen)
            mode = self.carry[step % len(self.carry)]
            if mode == "fresh":
                yield rows, mode, int(torch.randint(0, self.span - self.seq_len + 1, (1,), generator=gen)), None
            else:
                # "foreign": another span's session (any row but this one, when there is another)
                src = rows if mode == "own" else (rows + 1 + torch.randint(0, max(1, n - 1), rows.shape,
                                                                          generator=gen)) % n
                yield rows, mode, self.span - self.seq_len, src
            step += 1


def settings_loss(mem, ids, tgt, h, base, embed, head, seq_len: int, history: List[List[Any]]):
    """The loss part of :func:`fit_settings`: next-token loss of the base logits plus the memory's
    read on a :class:`SettingsWindows` batch; appends ``[step, loss bits, gain bits, situation]``."""
    to_bits = 1.0 / math.log(2)

    def loss_fn(_, batch):
        rows, mode, start, src = batch
        state = None
        if src is not None:
            with torch.no_grad():  # the earlier session, with the settings as they are now
                _, prev = mem(OutputContext(h[src, :seq_len].to(head.weight.dtype), ids[src, :seq_len], embed, head),
                              ctx=StepContext(need_state=True))
                P, _ = mem.commit(torch.zeros_like(prev.S), prev.E)  # the memory's own (state) commit
            state = FastLayerState(P=P)
        sl = slice(start, start + seq_len)
        read, _ = mem(OutputContext(h[rows, sl].to(head.weight.dtype), ids[rows, sl], embed, head), state,
                      StepContext(need_state=False))
        lo = F.cross_entropy((base[rows, sl] + read.float()).flatten(0, 1), tgt[rows, sl].flatten())
        ref = F.cross_entropy(base[rows, sl].flatten(0, 1), tgt[rows, sl].flatten())
        history.append([len(history), lo.item() * to_bits, (ref - lo).item() * to_bits, mode])
        return lo, {}

    return loss_fn


def fit_settings(mem, ids: torch.Tensor, tgt: torch.Tensor, h: torch.Tensor, base: torch.Tensor, embed, head, *,
                 steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
                 carry: Sequence[str] = ("fresh",), progress: bool = False,
                 on_step: Optional[Callable[[int, List[Any]], None]] = None) -> List[List[Any]]:
    """Adam on :func:`episodic_parameters` over random windows of precomputed inputs (the loop of
    :func:`train_episodic` and of the retrofit's ``train_episodic_hf``).

    Args:
        mem: the episodic memory; only its four settings get gradients (the caller freezes the rest).
        ids, tgt: ``[N, L]`` inputs and next-token targets; h: ``[N, L, d_model]`` final hidden
            states; base: ``[N, L, vocab]`` logits without the memory (:func:`frozen_inputs`).
        embed, head: the model's input embedding and output head (the memory's values and read-back).
        steps, batch_size, seq_len, lr, seed: the optimisation; carry: the situations steps cycle
            through (module docstring); on_step: called with ``(step, history row)``.

    Returns:
        ``history``: one ``[step, loss bits, gain bits over base, situation]`` per step.
    """
    n, span = ids.shape
    params = episodic_parameters(mem)
    for p in params:
        p.requires_grad_(True)
    history: List[List[Any]] = []

    def after(trainer: Trainer) -> None:
        if on_step is not None:
            on_step(trainer.step - 1, history[-1])

    Trainer(mem, torch.optim.Adam(params, lr=lr), SettingsWindows(n, span, seq_len, batch_size, carry, seed),
            settings_loss(mem, ids, tgt, h, base, embed, head, seq_len, history), max_steps=steps,
            after_step=after, name="episodic memory", progress=progress, train_mode=lambda m: None,
            postfix=lambda mt, lr: {"gain": f"{history[-1][2]:+.4f}", "scale": f"{mem.read_scale.mean().item():.2f}"},
            ).train()
    for p in params:
        p.requires_grad_(False)
    return history


def train_episodic(model: PlasticTransformer, cfg: EpisodicTrainConfig = EpisodicTrainConfig(),
                   files: Optional[Sequence[str]] = None, progress: bool = True,
                   log: Optional[Callable[[str], None]] = None) -> Tuple[PlasticTransformer, Dict[str, Any]]:
    """Train the episodic memory's settings with every other weight frozen.

    Args:
        model: a trained model; one without an episodic memory gets one, in place
            (``model.add_memory(EpisodicConfig(**cfg.episodic))``).
        cfg: :class:`EpisodicTrainConfig`.
        files: training files (default: the stdlib training split; never pass a reported stream).
        log: called with each progress line (default: ``logging``).

    Returns:
        ``(model, record)``: the model with the learned memory (eval mode), and a JSON-ready record
        (loss history in bits/byte, the learned settings, the loss without the memory, seconds).
    """
    log = log or logger.info
    t0 = time.time()
    if model.memory("episodic") is None:
        model.add_memory(EpisodicConfig(**cfg.episodic))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mem = model.episodic
    log(f"episodic memory: {cfg.n_spans} spans of {cfg.span_bytes} training bytes, {cfg.steps} steps")
    ids, tgt, h, base = frozen_inputs(model, training_spans(cfg.n_spans, cfg.span_bytes, cfg.seed, files))
    base_bpb = F.cross_entropy(base.flatten(0, 1), tgt.flatten()).item() / math.log(2)
    history = fit_settings(mem, ids, tgt, h, base, model.embed, model.lm_head, steps=cfg.steps,
                           batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, seed=cfg.seed,
                           carry=cfg.carry, progress=progress)
    cfg_dict = model.config.to_dict()
    settings = learned_settings(mem)
    record = {"config": dataclasses.asdict(cfg), "base_bpb_on_spans": base_bpb, "history": history,
              "final_gain_last10": sum(row[2] for row in history[-10:]) / min(10, len(history)),
              "final_gain_by_mode": {m: sum(r[2] for r in history[-30:] if r[3] == m) /
                                     max(1, sum(1 for r in history[-30:] if r[3] == m)) for m in cfg.carry},
              "learned": settings, "seconds": time.time() - t0, "model_config": cfg_dict}
    log(f"episodic memory learned {settings}; mean gain over the last 10 steps "
        f"{record['final_gain_last10']:+.4f} bits/byte")
    return model, record
