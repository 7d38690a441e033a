"""Fitting the reward memory's settings on a distribution of reward tasks (issue 14).

The reward memory itself (:mod:`cl_arch.train.reward_memory`) is a model part; choosing its settings
means playing games, so the search lives here beside them: every candidate plays the same draw of
tasks on the *training* token sets (:data:`~cl_arch.train.reward_memory.TRAIN_TOKENS`) and the one
with the highest mean normalised reward wins. The evaluations report on the held-out token sets.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from cl_arch import PlasticTransformer
from cl_arch.train.reward_memory import TRAIN_TOKENS, RewardMemorySettings, with_reward_memory
from cl_arch.train.tasks import Bandit, PreferenceGame
from cl_arch.train.trainer import Trainer

from .lib.learners import RowPolicy
from .lib.play import BanditEnv, PreferenceEnv, action_probs, action_table, play

logger = logging.getLogger(__name__)


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

    def payoffs(self, t: int) -> np.ndarray:
        return self.env.payoffs(t)

    def best(self) -> float:
        return self.env.best()

    def chance(self) -> float:
        return self.env.chance()


# The evaluations (eval/games.py, sutton, retention) seed their environments with small integers
# (``seed + i``); the fit once used ``seed * 1000 + i``, so its bandits 0, 3, 6 were the evaluated bandits
# 0, 3, 6 (same pay-outs, same pull streams). Fit environments now draw from seeds at 2**31 and above, which
# no evaluation reaches. Not higher: torch's CPU generator keeps only the low 32 bits of a seed, so
# 2**40 + i would draw exactly what seed i draws.
FIT_SEED_OFFSET = 1 << 31


def fit_seed_base(seed: int) -> int:
    """First environment seed of the fit's draw ``seed``: ``2**31 + 1000 seed`` (disjoint from evaluations)."""
    base = FIT_SEED_OFFSET + 1000 * int(seed)
    if not (0 <= int(seed) and base + 1000 <= 1 << 32):
        raise ValueError(f"fit seed must be in [0, {((1 << 31) - 1000) // 1000}], got {seed}")
    return base


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
    tokens = tokens or TRAIN_TOKENS
    rng = random.Random(seed)
    base = fit_seed_base(seed)
    out = []
    for i in range(n):
        fam = families[i % len(families)]
        if fam == "bandit":
            k = rng.randint(2, min(8, len(tokens["arms"])))
            env = BanditEnv(Bandit(k=k, seed=base + i, arm_tokens=rng.sample(list(tokens["arms"]), k)))
        elif fam == "preference":
            nc, na = rng.randint(2, 8), rng.randint(2, 8)
            game = PreferenceGame(nc, na, seed=base + i, cue_tokens=rng.sample(list(tokens["cues"]), nc),
                                  answer_tokens=rng.sample(list(tokens["answers"]), na))
            env = PreferenceEnv(game, episodes, seed=base + 500 + i)
        elif fam == "cue_reward":
            nc = rng.randint(4, 16)
            game = PreferenceGame(nc, 2, seed=base + i, cue_tokens=rng.sample(list(tokens["cues"]), nc),
                                  answer_tokens=rng.sample(list(tokens["answers"]), 2))
            env = PreferenceEnv(game, episodes, seed=base + 500 + i)
        else:
            raise ValueError(f"unknown task family {fam!r}; known: bandit, preference, cue_reward")
        p = rng.choice(list(noise))
        out.append(NoisyReward(env, p, base + 700 + i) if p > 0 else env)
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
                      n_tasks: int = 16, episodes: int = 300, seed: int = 0, log=None) -> Dict[str, Any]:
    """Choose the reward memory's settings on the training distribution of reward tasks.

    Every candidate of ``grid`` (default :func:`default_grid`) plays the same ``n_tasks`` tasks of
    :func:`draw_reward_tasks` on :data:`TRAIN_TOKENS` for ``episodes`` episodes (P kept, reward
    only); the score is the mean :func:`normalised_score`.

    Returns:
        ``{"best": settings dict, "candidates": [{"settings", "score"}], "n_tasks", "episodes", "seed"}``.
    """
    log = log if log is not None else logger.info
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


def _rollout(model: PlasticTransformer, envs: Sequence[Any], episodes: int, generator: torch.Generator,
             temperature: float = 1.0, picks: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Play ``envs`` (one row each) for ``episodes`` episodes keeping the autograd graph of the reward
    memory's commits; returns the normalised expected reward ``[B, episodes]`` (differentiable).

    Actions are sampled (no gradient through the choice, as in ``train/meta.py``); the expected
    reward of each episode, ``sum_a pi(a) payoff(a)``, depends on the settings through the read
    scale and through every earlier commit ``P <- gamma P + eta_r (r - b) clip(E)``.

    ``picks`` (a list) records the sampled action index of each episode (``[B]`` per entry) or, for the
    episodes it already holds, replays them: the score along a fixed action path is the smooth function
    whose gradient the meta step follows, so a replay isolates the step from sampling flips.
    """
    mem = model.reward
    B = len(envs)
    acts, legal = action_table(envs)
    A = acts.shape[1]
    lo = torch.tensor([e.chance() for e in envs])
    span = torch.tensor([max(e.best() - e.chance(), 1e-6) for e in envs])
    n_fast = len(model.fast_layers())
    P = torch.zeros(B, mem.n_heads, mem.head_k_dim, mem.head_v_dim)
    b = torch.zeros(B)
    out = []
    for t in range(episodes):
        state = model.init_state(B, [None] * (n_fast - 1) + [P])
        logits, state = model(torch.tensor([e.context(t) for e in envs]), state=state)
        probs = action_probs(logits[:, -1], acts, legal, temperature)
        pay = torch.tensor(np.stack([np.pad(e.payoffs(t), (0, A - len(e.actions))) for e in envs]), dtype=probs.dtype)
        out.append(((probs * pay).sum(-1) - lo) / span)
        if picks is not None and t < len(picks):
            pick = picks[t]
        else:
            pick = torch.multinomial(probs.detach(), 1, generator=generator).squeeze(1)
            if picks is not None:
                picks.append(pick)
        tokens = acts.gather(1, pick[:, None])
        r = torch.tensor([envs[i].reward(t, int(tokens[i, 0])) for i in range(B)])
        _, state = model(tokens, state=state)
        P, b = mem.commit(P, state.layers[-1].E, r, b, backend="naive")
    return torch.stack(out, 1)


def meta_train_reward_memory(model: PlasticTransformer, settings: Optional[RewardMemorySettings] = None,
                             steps: int = 30, n_tasks: int = 16, episodes: int = 100, lr: float = 0.05,
                             seed: int = 0, log=None) -> Dict[str, Any]:
    """Meta-train the reward memory's settings through its commits on the training task distribution.

    Every step draws ``n_tasks`` new tasks (:func:`draw_reward_tasks`, training token sets), plays
    them for ``episodes`` episodes with the graph of every commit kept (:func:`_rollout`), and takes
    an Adam step on the memory's read scale, write strength, ``eta_r`` and ``gamma`` to raise the
    mean normalised expected reward. The network and the keys are frozen.

    Args:
        model: the base model (no readout memory); ``settings`` start the search (default
            :class:`~cl_arch.train.reward_memory.RewardMemorySettings`).
    Returns:
        ``{"best": learned settings dict, "start": settings dict, "curve": [score per step], ...}``.
        Progress goes to ``log`` (default: this module's logger).
    """
    log = log if log is not None else logger.info
    start = settings or RewardMemorySettings()
    m = with_reward_memory(model, start)
    for p in m.parameters():
        p.requires_grad_(False)
    mem = m.reward
    params = [mem.read_scale, mem.beta_logit, mem.eta_r, mem.gamma_logit]
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)

    def project(trainer: Trainer) -> None:
        with torch.no_grad():  # projected: a step and a read scale stay positive (a settings' invariant)
            mem.eta_r.clamp_(min=1e-3)
            mem.read_scale.clamp_(min=1e-2)
        step, score = trainer.step - 1, trainer.history[-1]["score"]
        if step % 5 == 0 or step == steps - 1:
            with torch.no_grad():
                log(f"meta step {step}: score {score:.4f} scale {mem.read_scale.item():.2f} "
                    f"beta {torch.sigmoid(mem.beta_logit).item():.3f} eta_r {mem.eta_r.item():.3f} "
                    f"gamma {torch.sigmoid(mem.gamma_logit).item():.5f}")

    def loss_fn(_, envs):
        score = _rollout(m, envs, episodes, g).mean()
        return -score, {"score": score.detach()}

    tasks = (draw_reward_tasks(n_tasks, episodes, seed * 100_000 + step) for step in range(steps))
    run = Trainer(m, torch.optim.Adam(params, lr=lr), tasks, loss_fn, max_steps=steps, after_step=project,
                  name="meta-train reward memory", progress=True, train_mode=lambda _: None,
                  postfix=lambda mt, lr_: {"score": f"{mt['score']:.4f}"}).train()
    curve = [h["score"] for h in run["history"]]
    with torch.no_grad():
        learned = dataclasses.replace(start, scale=mem.read_scale.item(), beta=torch.sigmoid(mem.beta_logit).item(),
                                      eta_r=mem.eta_r.item(), gamma=min(torch.sigmoid(mem.gamma_logit).item(), 0.999999))
    return {"best": dataclasses.asdict(learned), "start": dataclasses.asdict(start), "curve": curve,
            "steps": steps, "n_tasks": n_tasks, "episodes": episodes, "lr": lr, "seed": seed, "tokens": "train",
            "method": "meta-gradient through the commits"}


__all__ = ["NoisyReward", "draw_reward_tasks", "normalised_score", "default_grid", "fit_reward_memory",
           "meta_train_reward_memory"]
