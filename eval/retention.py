"""``retention``: learn tasks one after another; what is kept? (GEM's R matrix, ACC, BWT, FWT.)

Tasks are hidden-preference games with different preferences (8 cues x 8 answers, reward only).
One learner plays task 0 for ``episodes`` episodes, then task 1, ... Its persistent memory ``P``
carries across tasks. After each task ``i`` every task ``j`` is scored without learning
(:func:`cl_arch.eval.lib.play.expected_score`: mean probability of the preferred answer over j's
cues): ``R[i, j]``. ``b_j`` is the score before any learning (for FWT).

Consolidation (docs/design.md, "Public API"): after each task, ``fold`` (``W0 <- W0 + P,
P <- 0``) or ``distill`` (teacher with P -> student without, on the task's episodes) moves what
P holds into the slow weights of the learner's own model copy, so the next task's commits do not
decay or overwrite it; the report gives ACC/BWT/FWT/forgetting without and with each (``consolidation``). A
consolidation that raises is recorded in the report, not fatal.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.train.tasks import PreferenceGame

from .lib import metrics as M
from .lib.learners import EpisodeLearner, RowPolicy
from .lib.models import recall_model
from .lib.options import add_recall_options
from .lib.options import ReportOptions
from .lib.options import config_from_args as options_config
from .lib.play import PreferenceEnv, expected_score
from .lib.report import curve, format_table, write_report


def _consolidation_available() -> Optional[str]:
    """None if fold/distill can be imported, else why not."""
    try:
        from cl_arch.consolidate import distill, fold  # noqa: F401
    except ImportError as e:
        return f"skipped: {e} (cl_arch.consolidate.fold/distill are needed)"
    return None


def _play_task(learner: EpisodeLearner, envs: List[PreferenceEnv], episodes: int, gens: List[torch.Generator]
               ) -> List[List[List[int]]]:
    """Play ``episodes`` episodes of each row's env, row ``s`` sampling with ``gens[s]`` (so a row
    plays the same whether batched or alone); returns every row's episodes as token lists
    (prompt + answer: the replay data distillation trains on)."""
    seqs: List[List[List[int]]] = [[] for _ in envs]
    for t in range(episodes):
        ctx = torch.tensor([e.context(t) for e in envs])
        logits = learner.step(ctx)[:, -1]
        acts = torch.tensor([e.actions for e in envs])
        probs = torch.softmax(logits.gather(1, acts).float(), -1)
        pick = torch.cat([torch.multinomial(probs[s], 1, generator=gens[s]) for s in range(len(envs))])
        tok = acts.gather(1, pick[:, None])
        r = [envs[s].reward(t, int(tok[s, 0])) for s in range(len(envs))]
        learner.step(tok)
        learner.end_episode(r)
        for s in range(len(envs)):
            seqs[s].append(ctx[s].tolist() + [int(tok[s, 0])])
    return seqs


def _generators(seed: int, seeds: int) -> List[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + 17 * s + 1) for s in range(seeds)]


def learn_sequence(model: PlasticTransformer, tasks: List[PreferenceGame], episodes: int, seeds: int,
                   seed: int = 0) -> np.ndarray:
    """``R [seeds, T, T]``: row i = after learning tasks 0..i (each ``episodes`` episodes)."""
    T = len(tasks)
    pol = RowPolicy("adapt", persist=True, use_reward=True, eta_s=0.0)
    learner = EpisodeLearner(model, [pol] * seeds)
    R = np.zeros((seeds, T, T))
    gens = _generators(seed, seeds)
    for i, task in enumerate(tqdm(tasks, desc="retention", unit="task")):
        envs = [PreferenceEnv(task, episodes, seed=seed + 100 * i + s) for s in range(seeds)]
        _play_task(learner, envs, episodes, gens)
        for s in range(seeds):
            P = [P_[s] for P_ in learner.P]
            R[s, i] = [expected_score(model, P, tj) for tj in tasks]
    return R


def learn_sequence_consolidated(model: PlasticTransformer, tasks: List[PreferenceGame], episodes: int, seeds: int,
                                method: str, seed: int = 0, distill_steps: int = 60, distill_lr: float = 1e-3
                                ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """As :func:`learn_sequence`, but after each task the learner's ``P`` is consolidated into the
    slow weights of its own copy of the model, then reset to zero.

    ``method="fold"``: :func:`cl_arch.consolidate.fold` (``W0 <- W0 + P``, exact at that moment;
    afterwards the memory no longer decays with ``gamma`` nor is overwritten by the next task's
    commits). ``method="distill"``: :func:`cl_arch.consolidate.distill` (teacher with P, student
    without, on the task's episodes as replay; its default trainable weights). The plays use the
    same seeds as :func:`learn_sequence`, so the rows are paired with the unconsolidated run
    until the first consolidation. A consolidation that raises is recorded and that row's P is
    kept (the run goes on unconsolidated for that step).

    Returns ``(R [seeds, T, T], events)``: one event per (seed, task) with the outcome.
    """
    from cl_arch import consolidate

    if method not in ("fold", "distill"):
        raise ValueError(f"method must be 'fold' or 'distill', got {method!r}")
    T = len(tasks)
    pol = RowPolicy("adapt", persist=True, use_reward=True, eta_s=0.0)
    R = np.zeros((seeds, T, T))
    events: List[Dict[str, Any]] = []
    gens = _generators(seed, seeds)
    # one model copy per seed: consolidation changes its weights
    models = [copy.deepcopy(model) for _ in range(seeds)]
    learners = [EpisodeLearner(m, [pol]) for m in models]
    for i, task in enumerate(tqdm(tasks, desc=f"retention+{method}", unit="task")):
        for s in range(seeds):
            env = PreferenceEnv(task, episodes, seed=seed + 100 * i + s)
            seqs = _play_task(learners[s], [env], episodes, [gens[s]])[0]
            P = [P_[0].clone() for P_ in learners[s].P]
            ev: Dict[str, Any] = {"seed": s, "task": i, "method": method}
            try:
                if method == "fold":
                    rep = consolidate.fold(models[s], [p.clone() for p in P])
                    ev["max_rounding"] = rep.get("max_rounding")
                    kept = True
                else:
                    rep = consolidate.distill(models[s], [p.clone() for p in P], replay=seqs, steps=distill_steps,
                                              lr=distill_lr, batch_size=min(32, len(seqs)), seed=seed + s)
                    kept = not rep.get("rolled_back", False)
                    ev["gain_retained"] = (rep.get("gain") or {}).get("gain_retained")
                    ev["rolled_back"] = rep.get("rolled_back")
                ev["ok"] = True
            except Exception as e:  # noqa: BLE001 - a failing consolidation is a result, not a crash
                ev.update(ok=False, error=f"{type(e).__name__}: {e}")
                kept = False
            if kept:
                for P_ in learners[s].P:
                    P_[0].zero_()
            learners[s].new_episode()  # S = W0 + P from the (possibly) new weights
            events.append(ev)
            Pnow = [P_[0] for P_ in learners[s].P]
            R[s, i] = [expected_score(models[s], Pnow, tj) for tj in tasks]
    return R, events


def _gem(R: np.ndarray, b: List[float]) -> Tuple[Dict[str, float], List[float]]:
    Rm = R.mean(0)
    gem = M.gem_metrics(Rm, b)
    gem["forgetting"] = M.chaudhry_forgetting(Rm)
    return gem, [M.gem_metrics(R[s])["bwt"] for s in range(R.shape[0])]


@dataclass
class RetentionConfig(ReportOptions):
    """Every setting of one retention run (:func:`run`): ``tasks`` preference games learned one after
    another, ``episodes`` each, ``seeds`` learners; each method of ``consolidation`` applied after every
    task (``distill_steps`` for distill); the default model is recall-trained for ``recall_steps``."""
    tasks: int = 4
    episodes: int = 150
    seeds: int = 4
    consolidation: Tuple[str, ...] = ("fold", "distill")
    distill_steps: int = 60
    recall_steps: int = 600


HELP = "tasks learned one after another: what is kept (R matrix, ACC, BWT, FWT)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval retention``'s options (defaults: :class:`RetentionConfig`'s)."""
    add_recall_options(p, episodes=150, seeds=4)


def config_from_args(args: argparse.Namespace) -> RetentionConfig:
    """The parsed options of :func:`add_arguments` as a :class:`RetentionConfig`."""
    return options_config(RetentionConfig, args)


def run(cfg: Optional[RetentionConfig] = None, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Sequential preference games; returns (and writes) the report with R, ACC, BWT, FWT, forgetting,
    without consolidation and with each method of ``consolidation`` applied after every task."""
    cfg = cfg or RetentionConfig()
    tasks, episodes, seeds, seed, distill_steps = cfg.tasks, cfg.episodes, cfg.seeds, cfg.seed, cfg.distill_steps
    model = (model if model is not None else recall_model(cfg.recall_steps)).eval()
    games = [PreferenceGame(8, 8, seed=seed + 7000 + i) for i in range(tasks)]
    zero = [torch.zeros(m.n_heads, m.head_k_dim, m.head_v_dim) for m in model.fast_layers()]
    b = [expected_score(model, zero, g) for g in games]
    R = learn_sequence(model, games, episodes, seeds, seed)
    Rm = R.mean(0)
    gem, per_seed_bwt = _gem(R, b)
    methods = {f"task {j}": {"curve": curve(list(range(1, tasks + 1)), Rm[:, j].tolist()),
                             "summary": {"R_column": Rm[:, j].tolist(), "before": b[j]}} for j in range(tasks)}
    methods["task 0"]["summary"].update(gem)
    why_not = _consolidation_available()
    consolidated: Dict[str, Any] = {}
    for method in (() if why_not else cfg.consolidation):
        Rc, events = learn_sequence_consolidated(model, games, episodes, seeds, method, seed, distill_steps)
        gc, bwt_c = _gem(Rc, b)
        failed = [e for e in events if not e["ok"]]
        consolidated[method] = {"R": Rc.mean(0).tolist(), **gc, "bwt_per_seed": bwt_c,
                                "failed": len(failed), "errors": sorted({e["error"] for e in failed})[:3],
                                "events": events}
        Rcm = Rc.mean(0)
        methods[f"task 0 ({method})"] = {"curve": curve(list(range(1, tasks + 1)), Rcm[:, 0].tolist()),
                                         "summary": {"R_column": Rcm[:, 0].tolist(), **gc}}
    report = {"benchmark": "retention",
              "config": {"tasks": tasks, "episodes": episodes, "seeds": seeds, "seed": seed,
                         "distill_steps": distill_steps, "model_fingerprint": model.fingerprint()},
              "x_label": "tasks learned", "y_label": "score on task j (expected reward)", "log_x": False,
              "methods": methods, "R": Rm.tolist(), "b": b, "no_consolidation": gem,
              "bwt_per_seed": per_seed_bwt, "consolidation": consolidated if not why_not else why_not}
    rows = [[f"after task {i}"] + [f"{v:.3f}" for v in Rm[i]] for i in range(tasks)]
    lines = [f"{'none':8s}: ACC {gem['acc']:.3f}, BWT {gem['bwt']:+.3f}, FWT {gem['fwt']:+.3f}, "
             f"forgetting {gem['forgetting']:+.3f}"]
    for method, c in consolidated.items():
        lines.append(f"{method:8s}: ACC {c['acc']:.3f}, BWT {c['bwt']:+.3f}, FWT {c['fwt']:+.3f}, "
                     f"forgetting {c['forgetting']:+.3f}" + (f"  ({c['failed']} consolidations failed: "
                                                             f"{c['errors']})" if c["failed"] else ""))
    if why_not:
        lines.append(f"consolidation: {why_not}")
    report["table"] = (format_table(rows, ["R (no consolidation)"] + [f"task {j}" for j in range(tasks)]) +
                       "\n\nconsolidation after each task (chance 0.125):\n" + "\n".join(lines))
    if cfg.out_dir:
        write_report(report, cfg.out_dir, cfg.name or "retention")
    return report


__all__ = ["HELP", "RetentionConfig", "add_arguments", "config_from_args", "learn_sequence", "learn_sequence_consolidated", "run"]
