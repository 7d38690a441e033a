"""Fine-tuning a pretrained plastic transformer, optionally only how it learns.

``finetune(cfg)`` loads ``train.init_from`` and trains on the config's corpus with the
pretraining loop (:func:`cl_arch.train.pretrain.run_training`). ``finetune.trainable`` picks
what changes:

- ``"all"``: every parameter (plain continued training / domain adaptation);
- ``"plasticity"``: only ``lam, gamma, eta_s, eta_r`` of each fast layer; the base model is frozen
  and its next-byte predictions within one episode are unchanged;
- ``"fast"``: the plasticity parameters plus each fast layer's base memory ``W0`` and write path
  (``k_proj, v_proj, b_proj`` (write strength), ``a_proj, A_log, dt_bias`` (decay), short conv).
  Queries, output projections, attention, MLPs and embeddings stay frozen, so what the model reads
  and how it maps a read to a prediction are kept; only what it writes, and how it keeps it, move.

The commit rates act only between episodes, so with ``finetune.episodes = E > 1`` every
sequence of the corpus is cut into E consecutive episodes: an episode's trace is committed into
``P`` with the retention rule (``reward_commit`` with ``r = None``: ``P <- gamma P + eta_s clip(E)``),
differentiably, and ``P`` starts the next episode, whose attention context and fast state are
fresh. The loss is the next-byte loss over all episodes, so ``lam, gamma, eta_s`` learn how much
of one stretch of a file to carry into the next. ``eta_r`` needs a reward and is learnt by
meta-training (:mod:`cl_arch.train.meta`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from cl_arch import PlasticTransformer
from cl_arch.state import ModelState

from .config import ConfigError, FinetuneRunConfig
from .pretrain import TrainingSetup, lm_loss, run_training

# The readout memory's write path is its write strength and decay; its read scale goes with them
# because it alone decides how much the memory's (committed) contents move the logits.
WRITE_PATH = ("W0", "k_proj", "v_proj", "b_proj", "a_proj", "A_log", "dt_bias", "conv", "beta_logit", "read_scale")


def select_trainable(model: PlasticTransformer, trainable: str) -> List[str]:
    """Set ``requires_grad`` per :mod:`this module's <cl_arch.train.finetune>` ``trainable`` choice.

    Returns:
        the names of the parameters left trainable.
    """
    if trainable not in ("all", "plasticity", "fast"):
        raise ValueError(f"trainable must be 'all', 'plasticity' or 'fast', got {trainable!r}")
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable != "all":
        for layer in model.fast_layers():
            for p in layer.plasticity_parameters().values():
                p.requires_grad_(True)
            if trainable == "fast":
                for name in WRITE_PATH:
                    mod = getattr(layer, name, None)
                    if isinstance(mod, torch.nn.Parameter):
                        mod.requires_grad_(True)
                    elif isinstance(mod, torch.nn.Module):
                        for p in mod.parameters():
                            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def commit_persistent(model: PlasticTransformer, state: ModelState, reward: Optional[torch.Tensor] = None,
                      baseline: Optional[torch.Tensor] = None, advantage: Optional[torch.Tensor] = None
                      ) -> List[torch.Tensor]:
    """Differentiable commit of an episode's traces into every fast layer's ``P``.

    ``P <- gamma P + (eta_s + eta_r * adv) clip(E_T)`` through each memory's own commit
    (:meth:`~cl_arch.layers.plasticity.PlasticMemory.commit`: its learnable ``gamma, eta_s, eta_r``
    per head and its clip) on the PyTorch path, which keeps the graph.

    Args:
        state: the state returned at the end of the episode (``E`` of each fast layer; ``P`` may be
            None for zeros).
        reward, baseline: ``[B]``; the advantage is ``reward - baseline``. Both None: retention only
            (``eta_s``).
        advantage: ``[B]``, given directly instead of reward/baseline (e.g. an expected advantage
            that itself carries gradient).

    Returns:
        the new ``P`` of each fast layer, ``[B, H, K, V]``.
    """
    P_new, _ = model.commit(state, reward=reward, baseline=baseline, advantage=advantage, backend="naive")
    return P_new


def episode_state(model: PlasticTransformer, P: List[Optional[torch.Tensor]]) -> ModelState:
    """Start-of-episode state holding only the persistent memories ``P`` (one per fast memory,
    ``[B, H, K, V]`` or None); differentiable in P."""
    B = next((p.shape[0] for p in P if p is not None), 1)  # all None: the batch size is not needed
    return model.init_state(B, P)


def episodic_lm_loss(model, block: torch.Tensor, episodes: int) -> torch.Tensor:
    """Next-byte loss of ``block [B, T + 1]`` cut into ``episodes`` consecutive episodes, each
    starting from the previous one's committed ``P`` (retention commit, see the module docstring).

    Returns the mean cross-entropy (nats) over all ``T`` predictions.
    """
    raw = model.module if hasattr(model, "module") else model
    x, y = block[:, :-1], block[:, 1:]
    T = x.shape[1]
    bounds = [round(i * T / episodes) for i in range(episodes + 1)]
    P: List[Optional[torch.Tensor]] = [None] * len(raw.fast_layers())
    total = x.new_zeros((), dtype=torch.float32)
    for e in range(episodes):
        lo, hi = bounds[e], bounds[e + 1]
        logits, state = model(x[:, lo:hi], state=episode_state(raw, P))
        total = total + F.cross_entropy(logits.float().flatten(0, 1), y[:, lo:hi].flatten(), reduction="sum")
        if e + 1 < episodes:
            P = commit_persistent(raw, state)
    return total / y.numel()


def finetune(cfg: FinetuneRunConfig) -> Dict[str, Any]:
    """Fine-tune ``train.init_from`` (see the module docstring); returns the loop's results plus
    ``trainable_parameters`` (names)."""
    if not cfg.train.init_from:
        raise ConfigError("train.init_from: fine-tuning needs a checkpoint (a save_pretrained folder)")
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    model = PlasticTransformer.from_pretrained(cfg.train.init_from)
    ft = cfg.finetune
    if ft.episodes > 1 and model.config.lam is None:
        raise ConfigError("finetune.episodes: episodic fine-tuning commits eligibility traces, but the "
                          "checkpoint's model has lam = None (no trace); use finetune.episodes: 1")
    if ft.episodes > cfg.data.seq_len:
        raise ConfigError(f"finetune.episodes: {ft.episodes} episodes do not fit in data.seq_len={cfg.data.seq_len}")
    names = select_trainable(model, ft.trainable)
    if ft.episodes == 1:
        loss_fn = lm_loss
    else:
        def loss_fn(m, block):
            return episodic_lm_loss(m, block, ft.episodes)
    # Validation scores the same objective, so a plasticity-only run shows its effect.
    results = run_training(cfg, TrainingSetup(model=model, loss_fn=loss_fn, kind="finetune",
                                              val_loss_fn=None if ft.episodes == 1 else loss_fn))
    results["trainable_parameters"] = names
    return results
