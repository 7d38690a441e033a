"""``sutton``: the Sutton test. Does keeping the state learned in attempt k improve attempt k + 1?

``delta = E[R_{k+1} | state kept] - E[R_{k+1} | state reset]`` with a paired bootstrap interval,
and a *yoked* control: a memory of the same age learned on a different task. If kept beats reset
but not yoked, the gain is from having a memory, not from learning this task.

* games (hidden preferences): per seed, a learner plays game A for ``episodes`` episodes (memory
  kept), another plays game B (the yoked memory). Then attempt k + 1 is scored on A with three
  memories: A's (kept), none (reset), B's (yoked); ``R`` = expected reward over all of A's cues.
  Pairs: seeds.
* tabcomplete: a stream of an unseen package is read with the adapting learner (kept), the
  frozen model (reset) and a row whose ``P`` is, at every episode, the one learned by the same
  number of episodes of a *different* package (yoked). ``R_{k+1}`` = mean line acceptance of
  episode k + 1. Pairs: episodes (consecutive episodes are correlated, so the interval is an
  optimistic one).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.train.data import resolve_sources
from cl_arch.train.tasks import PreferenceGame

from .lib import metrics as M
from .lib.learners import EpisodeLearner, RowPolicy
from .lib.models import recall_model, stdlib_model
from .lib.options import add_model_options, add_recall_options, add_stream_options, source_from_args
from .lib.options import config_from_args as options_config
from .lib.play import PreferenceEnv, expected_score, play
from .lib.report import curve, format_table, write_report
from .lib.streams import held_out_package, line_acceptance, segment_stream


def sutton_scores(model: PlasticTransformer, P_kept: List[torch.Tensor], P_yoked: List[torch.Tensor],
                  game: PreferenceGame) -> Tuple[float, float, float]:
    """Attempt k + 1 of ``game`` scored three ways (:func:`expected_score`): with the memory learned
    on it (``P_kept``), with none (zeros: reset) and with one of the same age learned on another
    game (``P_yoked``). Returns ``(kept, reset, yoked)``."""
    zero = [torch.zeros_like(p) for p in P_kept]
    return expected_score(model, P_kept, game), expected_score(model, zero, game), expected_score(model, P_yoked, game)


def games_test(model: PlasticTransformer, episodes: int, seeds: int, seed: int = 0) -> Dict[str, Any]:
    """The Sutton test on the hidden-preference game; returns curves and the delta figures.

    Games A and B of every seed are played in one batch by :func:`cl_arch.eval.lib.play.play`; at each
    checkpoint the memories are probed with :func:`sutton_scores`."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    gA = [PreferenceGame(8, 8, seed=seed + i) for i in range(seeds)]
    gB = [PreferenceGame(8, 8, seed=seed + 1000 + i) for i in range(seeds)]
    envs = [PreferenceEnv(g, episodes, seed=seed + 50 + i) for i, g in enumerate(gA + gB)]
    pol = RowPolicy("kept", persist=True, use_reward=True, eta_s=0.0)
    checkpoints = sorted({max(1, episodes // 8), episodes // 4, episodes // 2, episodes})
    kept: Dict[int, List[float]] = {}
    reset: Dict[int, List[float]] = {}
    yoked: Dict[int, List[float]] = {}

    def probe(done: int, learner: EpisodeLearner) -> None:
        if done not in checkpoints:
            return
        P_rows = [[P[i] for P in learner.P] for i in range(2 * seeds)]
        scores = [sutton_scores(model, P_rows[i], P_rows[seeds + i], gA[i]) for i in range(seeds)]
        kept[done], reset[done], yoked[done] = ([s[j] for s in scores] for j in range(3))

    play(model, envs, [pol] * (2 * seeds), episodes, temperature=1.0, seed=seed, desc="sutton games", probe=probe)
    st = M.sutton_delta(kept[episodes], reset[episodes], yoked[episodes], seed=seed)
    curves = {k: [float(np.mean(d[c])) for c in checkpoints] for k, d in (("kept", kept), ("reset", reset), ("yoked", yoked))}
    return {"checkpoints": checkpoints, "curves": curves, "stats": st}


def tab_test(model: PlasticTransformer, source: str, other: str, max_bytes: int, episode_bytes: int,
             eta_s: float = 1.0, seed: int = 0) -> Dict[str, Any]:
    """The Sutton test on tab completion (see module doc); returns per-episode acceptances and stats."""
    segA = segment_stream(resolve_sources(source), max_bytes, episode_bytes)
    segB = segment_stream(resolve_sources(other), max_bytes, episode_bytes)
    n = min(len(segA), len(segB))
    kept_pol = RowPolicy("kept", persist=True, use_reward=True, eta_s=eta_s)
    A = EpisodeLearner(model, [RowPolicy("reset"), kept_pol, RowPolicy("yoked")])
    Bl = EpisodeLearner(model, [kept_pol])
    acc = np.full((3, n), np.nan)

    def read(learner, seg, prev):
        x = torch.tensor([prev] + list(seg[:-1]))
        y = torch.tensor(list(seg))
        corr = []
        for c0 in range(0, len(seg), 256):
            lg = learner.step(x[c0:c0 + 256].unsqueeze(0).expand(learner.B, -1))
            corr.append((lg.argmax(-1) == y[c0:c0 + 256]).numpy())
        lines = line_acceptance(np.concatenate(corr, 1), seg)
        return [float(np.mean([a[i] / m for a, m in lines])) if lines else None for i in range(learner.B)]

    for k in tqdm(range(n), desc="sutton tabcomplete", unit="ep"):
        for li in range(len(A.P)):  # the yoked row reads A with the memory B has at the same age
            A.P[li][2] = Bl.P[li][0]
        A.new_episode()
        r = read(A, *segA[k])
        acc[:, k] = [np.nan if v is None else v for v in r]
        A.end_episode(r)
        Bl.end_episode(read(Bl, *segB[k]))
    ok = ~np.isnan(acc).any(0)
    ok[0] = False  # episode 1 has no earlier attempt
    st = M.sutton_delta(acc[1, ok], acc[0, ok], acc[2, ok], seed=seed)
    return {"acceptance": acc, "stats": st, "episodes": n}


@dataclass
class SuttonConfig:
    """Every setting of one Sutton run (:func:`run`). ``parts``: which tests (``games``,
    ``tabcomplete``); games: ``episodes`` x ``seeds`` on the recall model (``recall_steps``);
    tabcomplete: ``source`` and the yoked tree ``other`` (default held-out stdlib ``json`` and
    ``tomllib``), the first ``max_bytes`` in episodes of ``episode_bytes``, read by the text model
    (``cache_dir``, ``pretrain_seconds``: :func:`~cl_arch.eval.lib.models.stdlib_model`)."""
    episodes: int = 200
    seeds: int = 8
    parts: Tuple[str, ...] = ("games", "tabcomplete")
    source: Optional[str] = None
    other: Optional[str] = None
    max_bytes: int = 40_000
    episode_bytes: int = 2048
    recall_steps: int = 600
    cache_dir: Optional[str] = None
    pretrain_seconds: Optional[float] = None
    out_dir: Optional[str] = "runs/eval"
    name: Optional[str] = None
    seed: int = 0


HELP = "the Sutton test: does the state kept from attempt k improve attempt k + 1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval sutton``'s options (defaults: :class:`SuttonConfig`'s)."""
    add_recall_options(p, episodes=200, seeds=8)
    add_model_options(p, memories=False)
    add_stream_options(p, max_bytes=40_000)


def config_from_args(args: argparse.Namespace) -> SuttonConfig:
    """The parsed options of :func:`add_arguments` as a :class:`SuttonConfig`."""
    return options_config(SuttonConfig, args, source=source_from_args(args))


def run(cfg: Optional[SuttonConfig] = None, model: Optional[PlasticTransformer] = None,
        text_model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Both Sutton tests (settings: ``cfg``, default :class:`SuttonConfig`). ``model`` plays the games
    (default: recall-trained for ``cfg.recall_steps``); ``text_model`` reads the code (default: the
    stdlib model); returns (and with ``cfg.out_dir`` writes) the report."""
    cfg = cfg or SuttonConfig()
    episodes, seeds, seed, parts = cfg.episodes, cfg.seeds, cfg.seed, cfg.parts
    max_bytes, episode_bytes = cfg.max_bytes, cfg.episode_bytes
    methods: Dict[str, Any] = {}
    rows = []
    record: Dict[str, Any] = {"episodes": episodes, "seeds": seeds, "seed": seed, "parts": list(parts)}
    if "games" in parts:
        gm = model if model is not None else recall_model(cfg.recall_steps)
        res = games_test(gm.eval(), episodes, seeds, seed)
        for k, ys in res["curves"].items():
            methods[f"games/{k}"] = {"curve": curve(res["checkpoints"], ys), "summary": {"final": ys[-1]}}
        methods["games/kept"]["summary"].update(res["stats"])
        s = res["stats"]
        rows.append(["games (preference 8x8)", s["n"], f"{s['sutton_delta']:+.3f} [{s['sutton_ci'][0]:+.3f}, {s['sutton_ci'][1]:+.3f}]",
                     f"{s['yoked_delta']:+.3f} [{s['yoked_ci'][0]:+.3f}, {s['yoked_ci'][1]:+.3f}]"])
    if "tabcomplete" in parts:
        tm = text_model if text_model is not None else stdlib_model(cfg.cache_dir, seconds=cfg.pretrain_seconds)
        src, oth = cfg.source or held_out_package("json"), cfg.other or held_out_package("tomllib")
        record.update(source=os.path.abspath(src), other=os.path.abspath(oth), max_bytes=max_bytes, episode_bytes=episode_bytes)
        res = tab_test(tm.eval(), src, oth, max_bytes, episode_bytes, seed=seed)
        xs = list(range(1, res["episodes"] + 1))
        for i, k in enumerate(("reset", "kept", "yoked")):
            ys = M.running_mean(np.nan_to_num(res["acceptance"][i]), 4)
            methods[f"tabcomplete/{k}"] = {"curve": curve(xs, ys), "summary": {"acceptance": float(np.nanmean(res["acceptance"][i]))}}
        methods["tabcomplete/kept"]["summary"].update(res["stats"])
        s = res["stats"]
        rows.append(["tabcomplete", s["n"], f"{s['sutton_delta']:+.4f} [{s['sutton_ci'][0]:+.4f}, {s['sutton_ci'][1]:+.4f}]",
                     f"{s['yoked_delta']:+.4f} [{s['yoked_ci'][0]:+.4f}, {s['yoked_ci'][1]:+.4f}]"])
    report = {"benchmark": "sutton", "config": record, "x_label": "episodes", "y_label": "reward / acceptance",
              "log_x": False, "methods": methods}
    report["table"] = format_table(rows, ["task", "pairs", "kept - reset [95% CI]", "kept - yoked [95% CI]"])
    if cfg.out_dir:
        write_report(report, cfg.out_dir, cfg.name or "sutton")
    return report


__all__ = ["HELP", "SuttonConfig", "add_arguments", "config_from_args", "sutton_scores", "games_test", "tab_test", "run"]
