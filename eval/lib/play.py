"""Playing reward games: the environments and the batched play loop shared by ``games``, the
Sutton test, retention and the reward-memory fit (:mod:`cl_arch.eval.reward_fit`).

Every episode shows a prompt, the model answers one token sampled from its softmax restricted to
the legal actions, the answer is fed back (so the fast layers write it and the eligibility trace
holds ``prompt -> answer``), and the episode's reward goes to the commit.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.train.tasks import Bandit, PreferenceGame

from .learners import EpisodeLearner, RowPolicy


class PreferenceEnv:
    """One :class:`PreferenceGame` with a seeded cue sequence; ``answer_map`` renames answers."""

    def __init__(self, game: PreferenceGame, episodes: int, seed: int, answer_tokens: Optional[List[int]] = None):
        self.game = game
        self.cues = game.cue_sequence(episodes, seed=seed)
        # the game speaks value tokens; a renamed game (cue-reward) answers with other tokens
        self.actions = list(answer_tokens) if answer_tokens is not None else list(game.answers)
        self._to_game = dict(zip(self.actions, game.answers))

    def context(self, t: int) -> List[int]:
        return self.game.prompt(self.cues[t])

    def reward(self, t: int, action: int) -> float:
        return self.game.reward(self.cues[t], self._to_game[action])

    def expected(self, t: int, probs: np.ndarray) -> float:
        """Expected reward of the policy ``probs [A]`` at episode ``t``."""
        return float(np.dot(probs, self.payoffs(t)))

    def payoffs(self, t: int) -> np.ndarray:
        """Expected reward of each action at episode ``t`` ``[A]``."""
        pref = self.game.preferred[self.cues[t]]
        return np.array([1.0 if a == pref else 0.0 for a in self.game.answers])

    def best(self) -> float:
        return 1.0

    def chance(self) -> float:
        return 1.0 / len(self.actions)


class BanditEnv:
    """A :class:`Bandit` as an environment; expected reward = ``sum_a pi(a) mu_a``."""

    def __init__(self, bandit: Bandit):
        self.bandit = bandit
        self.actions = list(bandit.arms)

    def context(self, t: int) -> List[int]:
        return self.bandit.prompt()

    def reward(self, t: int, action: int) -> float:
        return self.bandit.pull(action)

    def expected(self, t: int, probs: np.ndarray) -> float:
        return float(np.dot(probs, self.payoffs(t)))

    def payoffs(self, t: int) -> np.ndarray:
        """Expected reward of each arm ``[A]``."""
        return np.asarray(self.bandit.probs, dtype=float)

    def best(self) -> float:
        return max(self.bandit.probs)

    def chance(self) -> float:
        return float(np.mean(self.bandit.probs))


def action_table(envs: Sequence[Any]):
    """``acts [B, A]`` token ids of each row's actions and ``legal [B, A]`` bool: rows may have
    different action counts, padded with their first action and masked out of the softmax."""
    A = max(len(e.actions) for e in envs)
    acts = torch.tensor([list(e.actions) + [e.actions[0]] * (A - len(e.actions)) for e in envs])
    legal = torch.tensor([[j < len(e.actions) for j in range(A)] for e in envs])
    return acts, legal


def action_probs(logits: torch.Tensor, acts: torch.Tensor, legal: torch.Tensor, temperature: float = 1.0):
    """The policy ``[B, A]``: softmax of ``logits [B, V]`` over each row's legal actions."""
    z = (logits.gather(1, acts).float() / temperature).masked_fill(~legal, float("-inf"))
    return torch.softmax(z, -1)


@torch.no_grad()
def play(model: PlasticTransformer, envs: Sequence[Any], policies: Sequence[RowPolicy], episodes: int,
         temperature: float = 1.0, seed: int = 0, switch: Optional[Dict[int, Sequence[Any]]] = None,
         desc: str = "play", yoke: Optional[Sequence[Optional[int]]] = None, delay: int = 0,
         credit: str = "stored", probe: Optional[Callable[[int, EpisodeLearner], None]] = None,
         close: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Play ``episodes`` episodes; row ``i`` plays ``envs[i]`` with ``policies[i]``, all in one batch.

    Args:
        switch: ``{episode: new_envs}``: from that episode on, rows play the new environments
            (the rule shift); memories are kept.
        yoke: per row, None or the index of a partner row: a yoked row's commit gets the reward
            its partner earned in the same episode, not its own (the yoked control: as much
            reward, none of it contingent on what the row did). Its reported reward is its own.
        delay: the reward of episode ``t`` reaches the learner at the end of episode ``t + delay``
            (the first ``delay`` episodes commit without one).
        credit: with a delay, ``"stored"`` commits the reward with the trace of the episode that
            earned it (kept until the reward arrives); ``"current"`` with the trace of the episode
            that just ended (the misattribution a learner without stored traces makes).
        probe: called as ``probe(episodes_done, learner)`` before the first episode (0) and after
            every episode's commit, e.g. to score the rows' memories (``learner.P``) at checkpoints
            (the Sutton test). It must not draw from torch's or the play's generators.
        close: a token every row reads after its answer, before the commit (None: the episode ends on
            the answer). Some recall models write a pair when the token after it arrives (their
            short convolution sees the pair behind it); an episode ending on the answer then commits
            a trace holding no prompt -> answer, and such a model learns nothing from its rewards.
    Returns:
        ``reward``, ``expected`` ``[B, episodes]`` floats, ``action [B, episodes]`` action indices.
    """
    if len(envs) != len(policies):
        raise ValueError(f"{len(envs)} environments but {len(policies)} policies")
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ValueError(f"delay must be an integer >= 0 (episodes), got {delay!r}")
    if credit not in ("stored", "current"):
        raise ValueError(f"credit must be 'stored' or 'current', got {credit!r}")
    pending: List[Any] = []  # (traces or None, rewards) of episodes whose reward has not arrived
    learner = EpisodeLearner(model, policies)
    g = torch.Generator().manual_seed(seed)
    B = len(envs)
    out = {k: np.zeros((B, episodes)) for k in ("reward", "expected", "action")}
    envs = list(envs)
    acts, legal = action_table(envs)
    if probe is not None:
        probe(0, learner)
    for t in tqdm(range(episodes), desc=desc, unit="ep", mininterval=2.0):
        if switch and t in switch:
            envs = list(switch[t])
            acts, legal = action_table(envs)
        ctx = [e.context(t) for e in envs]
        if len({len(c) for c in ctx}) != 1:
            raise ValueError("all rows' prompts must have one length (they are batched)")
        logits = learner.step(torch.tensor(ctx))[:, -1]  # [B, V]
        probs = action_probs(logits, acts, legal, temperature)  # [B, A]
        pick = torch.multinomial(probs, 1, generator=g).squeeze(1)  # [B]
        tokens = acts.gather(1, pick[:, None])  # [B, 1]
        rewards = [envs[i].reward(t, int(tokens[i, 0])) for i in range(B)]
        learner.step(tokens)  # the answer is written: the trace now holds prompt -> answer
        if close is not None:
            learner.step(torch.full_like(tokens, close))
        given = rewards if yoke is None else [rewards[i if j is None else j] for i, j in enumerate(yoke)]
        if delay == 0:
            learner.end_episode(given)
        else:
            pending.append((learner.traces() if credit == "stored" else None, given))
            if len(pending) > delay:
                traces, arrived = pending.pop(0)
                learner.end_episode(arrived, traces=traces)
            else:
                learner.end_episode(None)
        pn = probs.numpy()
        out["reward"][:, t] = rewards
        out["expected"][:, t] = [envs[i].expected(t, pn[i, :len(envs[i].actions)]) for i in range(B)]
        out["action"][:, t] = pick.numpy()
        if probe is not None:
            probe(t + 1, learner)
    return out


__all__ = ["PreferenceEnv", "BanditEnv", "action_table", "action_probs", "play"]


@torch.no_grad()
def expected_score(model: PlasticTransformer, P: List[torch.Tensor], game: PreferenceGame) -> float:
    """Mean probability of the preferred answer over all of ``game``'s cues, with persistent memory
    ``P`` (one ``[H, K, V]`` per fast layer), no learning: ``mean_c pi(pref(c) | c)``."""
    C = game.n_cues
    st = model.materialize_state(model.init_state(C, [p.expand(C, *p.shape[-3:]) for p in P]), C)
    logits, _ = model(torch.tensor([game.prompt(c) for c in game.cues]), state=st)
    probs = torch.softmax(logits[:, -1, game.answers].float(), -1)
    idx = torch.tensor([game.answers.index(game.preferred[c]) for c in game.cues])
    return float(probs.gather(1, idx[:, None]).mean())
