"""``retention``: learn tasks one after another; what is kept? (GEM's R matrix, ACC, BWT, FWT.)

Tasks are hidden-preference games with different preferences (8 cues x 8 answers, reward only).
One learner plays task 0 for ``episodes`` episodes, then task 1, ... Its persistent memory ``P``
carries across tasks. After each task ``i`` every task ``j`` is scored without learning
(:func:`cl_arch.eval.sutton.expected_score`: mean probability of the preferred answer over j's
cues): ``R[i, j]``. ``b_j`` is the score before any learning (for FWT).

Consolidation (DESIGN.md): after each task, ``fold`` (``W0 <- W0 + P, P <- 0``) or ``distill``
would move what P holds into the slow weights, so the next task's commits do not decay or
overwrite it. Those come from :mod:`cl_arch.consolidate`; when it does not provide them yet, the
report says so under ``consolidation`` and only the no-consolidation row is measured.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.train.tasks import PreferenceGame

from . import metrics as M
from .baselines import EpisodeLearner, RowPolicy
from .games import PreferenceEnv, recall_model
from .report import curve, format_table, write_report
from .sutton import expected_score


def _consolidation_available() -> Optional[str]:
    """None if fold/distill and sessions can be used, else why not."""
    try:
        from cl_arch.consolidate import distill, fold  # noqa: F401
        from cl_arch import Session  # noqa: F401
    except ImportError as e:
        return f"skipped: {e} (cl_arch.consolidate.fold/distill and cl_arch.Session are needed)"
    return None


def learn_sequence(model: PlasticTransformer, tasks: List[PreferenceGame], episodes: int, seeds: int,
                   seed: int = 0) -> np.ndarray:
    """``R [seeds, T, T]``: row i = after learning tasks 0..i (each ``episodes`` episodes)."""
    T = len(tasks)
    pol = RowPolicy("adapt", persist=True, use_reward=True, eta_s=0.0)
    learner = EpisodeLearner(model, [pol] * seeds)
    R = np.zeros((seeds, T, T))
    g = torch.Generator().manual_seed(seed)
    for i, task in enumerate(tqdm(tasks, desc="retention", unit="task")):
        envs = [PreferenceEnv(task, episodes, seed=seed + 100 * i + s) for s in range(seeds)]
        for t in range(episodes):
            ctx = torch.tensor([e.context(t) for e in envs])
            logits = learner.step(ctx)[:, -1]
            acts = torch.tensor([e.actions for e in envs])
            probs = torch.softmax(logits.gather(1, acts).float(), -1)
            tok = acts.gather(1, torch.multinomial(probs, 1, generator=g))
            r = [envs[s].reward(t, int(tok[s, 0])) for s in range(seeds)]
            learner.step(tok)
            learner.end_episode(r)
        for s in range(seeds):
            P = [P_[s] for P_ in learner.P]
            R[s, i] = [expected_score(model, P, tj) for tj in tasks]
    return R


def run(model: Optional[PlasticTransformer] = None, tasks: int = 4, episodes: int = 150, seeds: int = 4,
        recall_steps: int = 600, out_dir: Optional[str] = "runs/eval", name: Optional[str] = None,
        seed: int = 0) -> Dict[str, Any]:
    """Sequential preference games; returns (and writes) the report with R, ACC, BWT, FWT, forgetting."""
    model = (model if model is not None else recall_model(recall_steps)).eval()
    games = [PreferenceGame(8, 8, seed=seed + 7000 + i) for i in range(tasks)]
    zero = [torch.zeros(m.n_heads, m.head_k_dim, m.head_v_dim) for m in model.fast_layers()]
    b = [expected_score(model, zero, g) for g in games]
    R = learn_sequence(model, games, episodes, seeds, seed)
    Rm = R.mean(0)
    gem = M.gem_metrics(Rm, b)
    gem["forgetting"] = M.chaudhry_forgetting(Rm)
    per_seed_bwt = [M.gem_metrics(R[s])["bwt"] for s in range(seeds)]
    methods = {f"task {j}": {"curve": curve(list(range(1, tasks + 1)), Rm[:, j].tolist()),
                             "summary": {"R_column": Rm[:, j].tolist(), "before": b[j]}} for j in range(tasks)}
    methods["task 0"]["summary"].update(gem)
    consolidation = _consolidation_available() or "available but not wired in this version"
    report = {"benchmark": "retention",
              "config": {"tasks": tasks, "episodes": episodes, "seeds": seeds, "seed": seed,
                         "model_fingerprint": model.fingerprint()},
              "x_label": "tasks learned", "y_label": "score on task j (expected reward)", "log_x": False,
              "methods": methods, "R": Rm.tolist(), "b": b, "no_consolidation": gem,
              "bwt_per_seed": per_seed_bwt, "consolidation": consolidation}
    rows = [[f"after task {i}"] + [f"{v:.3f}" for v in Rm[i]] for i in range(tasks)]
    report["table"] = (format_table(rows, ["R"] + [f"task {j}" for j in range(tasks)]) +
                       f"\n\nno consolidation: ACC {gem['acc']:.3f}, BWT {gem['bwt']:+.3f}, FWT {gem['fwt']:+.3f}, "
                       f"forgetting {gem['forgetting']:+.3f}; chance 0.125\nconsolidation: {consolidation}")
    if out_dir:
        write_report(report, out_dir, name or "retention")
    return report


__all__ = ["learn_sequence", "run"]
