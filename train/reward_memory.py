"""A reward memory for learning from rewards on any tokens (issue 14), and its settings fitted over
a distribution of reward tasks.

Why: the in-block fast layers of a model trained on associative recall store what their keys and
values were trained on (key and value token ranges). A reward-modulated commit of their trace
writes arm or POS/NEG tokens that those layers never learned to write or read, so a bandit played
by them is at chance (regret 64.8 after 300 pulls against uniform play's 67.3).

The reward memory (:class:`cl_arch.memory.RewardMemoryConfig`) is a readout memory in ``trace`` commit mode: a
fast-weight head after the last block whose keys are the unit final hidden states and whose
values are one-hot tokens read straight into the logits. Its values therefore mean "this token",
whatever the token, and nothing about it depends on the token ids a pretraining task used. Each
episode's commit is DESIGN's three-factor rule on it,

    P <- gamma P + eta_r (r - b) clip(E),     E = the trace of this episode's writes

and with a trace decay ``lam`` near 0 the trace holds the last write only: the generated answer
written under its prompt's key, ``beta k (e_a - S^T k)``. The read at that key then moves by
``eta_r beta (r - b) (e_a - z)``: toward the action when it paid more than the running baseline
``b``, away from it when it paid less: credit to the action that was taken, scaled by how
surprising the reward was. On a fixed prompt this is a gradient bandit on the logits (a numpy
model of it is within 10% of Thompson sampling at k = 4 with a good step size).

:func:`cl_arch.eval.reward_fit.fit_reward_memory` chooses the memory's settings (read scale, step ``eta_r``, trace decay)
by playing a distribution of reward tasks (``draw_reward_tasks``: bandits with drawn arm counts
and pay-outs, preference games with drawn sizes, reward noise) on the *training* token sets and
keeping the setting with the highest mean normalised reward. It is a search, not a gradient: the
few settings are scalars, and every candidate is scored on whole learning curves.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

from cl_arch import PlasticTransformer
from cl_arch.memory import RewardMemoryConfig
from cl_arch.train.tasks import ARMS, KEYS, NEG, POS, VALUES

# Token sets: fitting (meta-training) plays only the first; evaluations report the second.
TRAIN_TOKENS = {"cues": list(KEYS[:32]), "answers": list(VALUES[:32]), "arms": list(ARMS[:8])}
HELD_OUT_TOKENS = {"cues": list(KEYS[32:]), "answers": list(VALUES[32:]), "arms": list(ARMS[8:]),
                   "reward_answers": [POS, NEG]}


@dataclass
class RewardMemorySettings:
    """Settings of the reward memory (one readout head with the trace commit).

    Attributes:
        scale: read scale, logits added per unit read.
        eta_r: commit step on the reward surprise ``r - b``.
        beta: write strength of the in-episode delta rule (the trace holds ``beta`` times it).
        lam: trace decay; near 0 the trace holds the generated answer's write only, 1 every write.
        gamma: retention of P per commit (1: a stationary world; < 1 forgets old rewards).
        span: memory span in tokens within an episode (long: episodes are a few tokens).
        keys: ``"hidden+token"`` (default) keys a write by the final hidden state *and* the
            embedding of the token it follows; ``"hidden"`` by the hidden state alone. A model
            trained on recall ends ``BOS cue`` in the same hidden state for every cue (cosine
            0.999-1.000 on the games' recall model), so hidden-state keys cannot tell cues apart
            and the memory learns one cue-blind preference.
    """

    scale: float = 8.0
    eta_r: float = 0.2
    beta: float = 0.5
    lam: float = 1e-3
    gamma: float = 0.9999
    span: float = 1e6
    keys: str = "hidden+token"

    def __post_init__(self) -> None:
        if self.keys not in ("hidden", "hidden+token"):
            raise ValueError(f"RewardMemorySettings.keys must be 'hidden' or 'hidden+token', got {self.keys!r}")
        for name, lo, hi in (("beta", 0.0, 1.0), ("lam", 0.0, 1.0), ("gamma", 0.0, 1.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and lo < v < hi):
                raise ValueError(f"RewardMemorySettings.{name} must lie in ({lo}, {hi}), got {v!r}")
        for name in ("scale", "eta_r", "span"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"RewardMemorySettings.{name} must be a positive number, got {v!r}")

    def memory_config(self, name: str = "reward") -> RewardMemoryConfig:
        """The :class:`~cl_arch.memory.RewardMemoryConfig` of a memory with these settings."""
        return RewardMemoryConfig(name=name, scale=float(self.scale), eta_r=float(self.eta_r), beta=float(self.beta),
                                  lam=float(self.lam), gamma=float(self.gamma), span=float(self.span), keys=self.keys)


def with_reward_memory(model: PlasticTransformer, settings: Optional[RewardMemorySettings] = None,
                       in_block_reward: bool = False) -> PlasticTransformer:
    """A copy of ``model`` with a reward memory (``model.add_memory(settings.memory_config())``, named
    ``reward``) after its other memories.

    Args:
        model: a trained model (left unchanged).
        settings: the memory's settings (default :class:`RewardMemorySettings`).
        in_block_reward: keep the in-block fast layers' own ``eta_r``. False (default) sets it to
            0: their reward commit writes tokens they were never trained to store (see the module
            docstring), and it only adds noise to what they learned.
    Returns:
        The new model (eval mode); every other weight is copied unchanged.
    """
    settings = settings or RewardMemorySettings()
    new = copy.deepcopy(model)
    mem = new.add_memory(settings.memory_config())
    if not in_block_reward:
        with torch.no_grad():
            for m in new.fast_layers():
                if m is not mem:
                    m.eta_r.fill_(0.0)
    return new.eval()


__all__ = ["TRAIN_TOKENS", "HELD_OUT_TOKENS", "RewardMemorySettings", "with_reward_memory"]
