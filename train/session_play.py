"""Playing a reward game through :class:`cl_arch.Session` objects: the user-facing loop.

Each episode every session reads its game's prompt, answers one token sampled among the game's
answers (:meth:`Session.batch_generate`, one batched forward per step), and the game's reward
goes to :meth:`Session.reward`, which commits the episode. A session built with ``adapt=False``
never commits (its state is reset every episode): the reset arm of the Sutton test.

Used by the benchmarks that run the Sutton test through the public API
(``benchmarks/bench_sutton.py``, ``benchmarks/retrofit_learning.py``). The batched learner of the
evaluations (:func:`cl_arch.eval.lib.play.play`) and the differentiable one of meta-training
(:func:`cl_arch.train.meta.play_preference`) are other loops: see their modules.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch

from cl_arch import Session


def play_sessions(sessions: Sequence[Session], games: Sequence[Any], cues: Sequence[Sequence[int]],
                  seeds: Optional[Callable[[int, int], Optional[int]]] = None,
                  on_answer: Optional[Callable[[int, List[Session]], None]] = None) -> torch.Tensor:
    """Session ``i`` plays ``games[i]`` for ``len(cues[i])`` episodes, one cue each.

    Args:
        games: objects with ``prompt(cue)``, ``reward(cue, answer)`` and ``answers`` (e.g.
            :class:`cl_arch.train.tasks.PreferenceGame`); all must have the same answers.
        seeds: ``seeds(i, episode)``: the seed of a fresh sampling generator for that answer, or
            None (the default) to draw from each session's own generator.
        on_answer: called as ``on_answer(episode, sessions)`` after the episode's answers are
            written and before its rewards are committed (e.g. to read the eligibility traces).
    Returns:
        Rewards ``[len(sessions), episodes]`` (float32; each session commits the game's reward as given).
    """
    sessions = list(sessions)
    if not (len(sessions) == len(games) == len(cues)):
        raise ValueError(f"{len(sessions)} sessions, {len(games)} games and {len(cues)} cue sequences")
    episodes = len(cues[0]) if cues else 0
    if any(len(c) != episodes for c in cues):
        raise ValueError("every cue sequence must have the same length (the sessions play in step)")
    answers = list(games[0].answers) if games else []
    if any(list(g.answers) != answers for g in games):
        raise ValueError("the games must share one answer set (sampling is restricted to it)")
    R = torch.zeros(len(sessions), episodes)
    for e in range(episodes):
        outs = Session.batch_generate(sessions, [g.prompt(c[e]) for g, c in zip(games, cues)], max_new_tokens=1,
                                      allowed_tokens=answers,
                                      seeds=None if seeds is None else [seeds(i, e) for i in range(len(sessions))])
        if on_answer is not None:
            on_answer(e, sessions)
        for i, (s, g, c, o) in enumerate(zip(sessions, games, cues, outs)):
            r = float(g.reward(c[e], o[0]))
            R[i, e] = r
            s.reward(r)
    return R


__all__ = ["play_sessions"]
