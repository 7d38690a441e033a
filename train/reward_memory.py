"""A reward memory for learning from rewards on any tokens (issue 14), and its settings fitted over
a distribution of reward tasks.

Why: the in-block fast layers of a model trained on associative recall store what their keys and
values were trained on (key and value token ranges). A reward-modulated commit of their trace
writes arm or POS/NEG tokens that those layers never learned to write or read, so a bandit played
by them is at chance (regret 64.8 after 300 pulls against uniform play's 67.3).

The reward memory is a readout memory (``cl_arch/layers/readout.py``) in ``trace`` commit mode: a
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

:func:`fit_reward_memory` chooses the memory's settings (read scale, step ``eta_r``, trace decay)
by playing a distribution of reward tasks (:func:`draw_reward_tasks`: bandits with drawn arm counts
and pay-outs, preference games with drawn sizes, reward noise) on the *training* token sets and
keeping the setting with the highest mean normalised reward. It is a search, not a gradient: the
few settings are scalars, and every candidate is scored on whole learning curves.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.train.tasks import ARMS, KEYS, NEG, POS, VALUES, Bandit, PreferenceGame

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


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def with_reward_memory(model: PlasticTransformer, settings: Optional[RewardMemorySettings] = None,
                       in_block_reward: bool = False) -> PlasticTransformer:
    """A copy of ``model`` with a reward memory added after its last block.

    Args:
        model: a trained model without a readout memory (``config.readout_heads == 0``).
        settings: the memory's settings (default :class:`RewardMemorySettings`).
        in_block_reward: keep the in-block fast layers' own ``eta_r``. False (default) sets it to
            0: their reward commit writes tokens they were never trained to store (see the module
            docstring), and it only adds noise to what they learned.
    Returns:
        The new model (eval mode); every other weight is copied unchanged.
    """
    settings = settings or RewardMemorySettings()
    if model.readout is not None:
        raise ValueError("with_reward_memory: the model already has a readout memory (readout_heads > 0); "
                         "a second one would need its own module")
    cfg = PlasticConfig.from_dict({**model.config.to_dict(), "readout_heads": 1, "readout_commit": "trace",
                                   "readout_scale": float(settings.scale), "readout_beta": float(settings.beta),
                                   "readout_keys": settings.keys})
    new = PlasticTransformer(cfg).to(model.device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("readout.") for k in missing):
        raise ValueError(f"model does not match its own config plus a readout memory: missing {missing}, "
                         f"unexpected {unexpected}")
    r = new.readout
    with torch.no_grad():
        r.A_log.fill_(-math.log(settings.span))
        if r.lam_logit is None:
            raise ValueError("the reward memory needs an eligibility trace: the model's config has lam=None")
        r.lam_logit.fill_(_logit(settings.lam))
        r.gamma_logit.fill_(_logit(settings.gamma))
        r.eta_s.fill_(0.0)
        r.eta_r.fill_(float(settings.eta_r))
        if not in_block_reward:
            for m in new.fast_layers():
                if m is not r:
                    m.eta_r.fill_(0.0)
    return new.eval()


# ---------------------------------------------------------------------------- the task distribution
class NoisyReward:
    """An environment whose reward is flipped (``1 - r``) with probability ``p`` (seeded)."""

    def __init__(self, env: Any, p: float, seed: int):
        self.env, self.p, self.actions = env, p, env.actions
        self._rng = random.Random(seed)

    def context(self, t: int) -> List[int]:
        return self.env.context(t)

    def reward(self, t: int, action: int) -> float:
        r = self.env.reward(t, action)
        return 1.0 - r if self._rng.random() < self.p else r

    def expected(self, t: int, probs: np.ndarray) -> float:
        return self.env.expected(t, probs)

    def best(self) -> float:
        return self.env.best()

    def chance(self) -> float:
        return self.env.chance()


def draw_reward_tasks(n: int, episodes: int, seed: int, tokens: Optional[Dict[str, Sequence[int]]] = None,
                      families: Sequence[str] = ("bandit", "preference", "cue_reward"),
                      noise: Sequence[float] = (0.0, 0.1)):
    """``n`` reward tasks drawn from a distribution, as environments for :func:`cl_arch.eval.games.play`.

    Bandits draw ``k`` in 2..8 arms from ``tokens["arms"]`` and uniform pay-outs; preference games
    draw 2..8 cues and 2..8 answers from ``tokens["cues"]`` / ``tokens["answers"]`` (random
    subsets, so token identity carries nothing); cue-reward games draw 4..16 cues and two answer
    tokens (the evaluation's are POS/NEG, never drawn here); each task's reward is flipped with a probability
    drawn from ``noise``. Every environment has ``best()`` and ``chance()`` (expected reward of the
    best and of uniform play), for normalised scores.
    """
    from cl_arch.eval.games import BanditEnv, PreferenceEnv

    tokens = tokens or TRAIN_TOKENS
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fam = families[i % len(families)]
        if fam == "bandit":
            k = rng.randint(2, min(8, len(tokens["arms"])))
            env = BanditEnv(Bandit(k=k, seed=seed * 1000 + i, arm_tokens=rng.sample(list(tokens["arms"]), k)))
        elif fam == "preference":
            nc, na = rng.randint(2, 8), rng.randint(2, 8)
            game = PreferenceGame(nc, na, seed=seed * 1000 + i, cue_tokens=rng.sample(list(tokens["cues"]), nc),
                                  answer_tokens=rng.sample(list(tokens["answers"]), na))
            env = PreferenceEnv(game, episodes, seed=seed * 1000 + 500 + i)
        elif fam == "cue_reward":
            nc = rng.randint(4, 16)
            game = PreferenceGame(nc, 2, seed=seed * 1000 + i, cue_tokens=rng.sample(list(tokens["cues"]), nc),
                                  answer_tokens=rng.sample(list(tokens["answers"]), 2))
            env = PreferenceEnv(game, episodes, seed=seed * 1000 + 500 + i)
        else:
            raise ValueError(f"unknown task family {fam!r}; known: bandit, preference, cue_reward")
        p = rng.choice(list(noise))
        out.append(NoisyReward(env, p, seed * 1000 + 700 + i) if p > 0 else env)
    return out


def normalised_score(expected: np.ndarray, envs: Sequence[Any]) -> np.ndarray:
    """Per task, the mean over episodes of ``(E[r] - chance) / (best - chance)``: 0 is uniform play,
    1 is the best action from the first episode. ``expected [n, episodes]``."""
    lo = np.array([e.chance() for e in envs])[:, None]
    hi = np.array([e.best() for e in envs])[:, None]
    return ((expected - lo) / np.maximum(hi - lo, 1e-6)).mean(1)


def default_grid() -> List[RewardMemorySettings]:
    """Candidate settings: read scale x step (their product sets how far one surprise moves a
    logit) with the trace on the generated answer only; then, at three of them, the trace over
    every write of the episode (``lam`` 0.999), and hidden-state keys alone."""
    grid = [RewardMemorySettings(scale=a, eta_r=e) for a in (4.0, 8.0, 16.0, 32.0) for e in (0.1, 0.2, 0.4)]
    for a, e in ((8.0, 0.2), (8.0, 0.4), (16.0, 0.2)):
        grid.append(RewardMemorySettings(scale=a, eta_r=e, lam=0.999))
        grid.append(RewardMemorySettings(scale=a, eta_r=e, keys="hidden"))
    return grid


def fit_reward_memory(model: PlasticTransformer, grid: Optional[Sequence[RewardMemorySettings]] = None,
                      n_tasks: int = 16, episodes: int = 300, seed: int = 0, log=print) -> Dict[str, Any]:
    """Choose the reward memory's settings on the training distribution of reward tasks.

    Every candidate of ``grid`` (default :func:`default_grid`) plays the same ``n_tasks`` tasks of
    :func:`draw_reward_tasks` on :data:`TRAIN_TOKENS` for ``episodes`` episodes (P kept, reward
    only); the score is the mean :func:`normalised_score`.

    Returns:
        ``{"best": settings dict, "candidates": [{"settings", "score"}], "n_tasks", "episodes", "seed"}``.
    """
    from cl_arch.eval.baselines import RowPolicy
    from cl_arch.eval.games import play

    grid = list(grid) if grid is not None else default_grid()
    rows = []
    for i, st in enumerate(grid):
        envs = draw_reward_tasks(n_tasks, episodes, seed)
        m = with_reward_memory(model, st)
        pol = RowPolicy("kept", persist=True, use_reward=True, eta_s=0.0)
        res = play(m, envs, [pol] * len(envs), episodes, seed=seed, desc=f"fit {i + 1}/{len(grid)}")
        score = float(normalised_score(res["expected"], envs).mean())
        rows.append({"settings": dataclasses.asdict(st), "score": score})
        log(f"fit {i + 1}/{len(grid)}: scale {st.scale:g} eta_r {st.eta_r:g} lam {st.lam:g} keys {st.keys}: "
            f"score {score:.4f}")
    best = max(rows, key=lambda r: r["score"])
    return {"best": best["settings"], "candidates": rows, "n_tasks": n_tasks, "episodes": episodes, "seed": seed,
            "tokens": "train"}


__all__ = ["TRAIN_TOKENS", "HELD_OUT_TOKENS", "RewardMemorySettings", "with_reward_memory", "NoisyReward",
           "draw_reward_tasks", "normalised_score", "default_grid", "fit_reward_memory"]
