"""Reading a byte stream episode by episode, every byte scored before anything learns from it.

:func:`run_stream` reads ``[(segment, prev_byte)]`` streams (:func:`~cl_arch.eval.lib.streams.segment_stream`)
with the batched rows of an :class:`~cl_arch.eval.lib.learners.EpisodeLearner` and any readers taken one at a
time (dynamic evaluation, full context); :func:`default_policies` names the batched rows the codebase and
tab-completion benchmarks share.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer

from .learners import DynamicEval, EpisodeLearner, RowPolicy
from .streams import line_acceptance


def default_policies(eta_s: Optional[float] = None, eta_r: Optional[float] = None, gamma: Optional[float] = None,
                     methods: Sequence[str] = ("frozen", "adapt", "adapt+reward", "no_persist")) -> List[RowPolicy]:
    """The batched methods of this benchmark (dynamic evaluation runs separately)."""
    table = {
        "frozen": RowPolicy("frozen"),
        "static": RowPolicy("static", writes=False),
        "adapt": RowPolicy("adapt", persist=True, eta_s=eta_s, eta_r=0.0, gamma=gamma),
        "adapt+reward": RowPolicy("adapt+reward", persist=True, use_reward=True, eta_s=eta_s, eta_r=eta_r,
                                  gamma=gamma),
        "adapt+surprise": RowPolicy("adapt+surprise", persist=True, use_reward=True, eta_s=eta_s, eta_r=eta_r,
                                    gamma=gamma, reward_from="surprise"),
        "no_persist": RowPolicy("no_persist", carry_context=True),
    }
    unknown = [m for m in methods if m not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(table)} (+ dynamic_eval)")
    if "frozen" not in methods:
        raise ValueError("methods must include 'frozen': every gain is measured against it")
    return [table[m] for m in methods]



def run_stream(model: PlasticTransformer, segments: Sequence[Tuple[bytes, int]], policies: Sequence[RowPolicy],
               dyn: Optional[DynamicEval] = None, chunk: int = 256, desc: str = "stream",
               lam: Optional[float] = None, learner: Optional[EpisodeLearner] = None,
               solo: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read ``segments`` prequentially with every row of ``policies`` (batched) and every reader of
    ``solo`` (one at a time: ``name -> reader`` with ``step(ids [1, T], targets [1, T]) -> logits``
    and ``new_episode()``, e.g. :class:`DynamicEval` or :class:`~cl_arch.eval.lib.context.FullContext`;
    ``dyn`` is the same as ``solo={"dynamic_eval": dyn}``).

    Returns per method: ``bits [N]`` (loss of every byte in bits), ``lines`` (list of
    ``(accepted, length)`` per non-blank line), ``seconds`` (wall time: ``"batched"`` for all
    policy rows together, and one entry per solo reader), ``rewards`` (per episode, the reward each
    batched row was given: its mean line acceptance, None for an episode without a non-blank
    line); plus the :class:`EpisodeLearner` (its ``P``; None when ``policies`` is empty: solo
    readers only) and the solo readers. ``learner``: go on
    with this one (e.g. a second session over the same stream) instead of a fresh one.
    """
    solo = dict(solo or {})
    # A surprise reward is the gain over the frozen row; a row read without one (timed alone) commits
    # with retention only, as an episode without a reward does.
    frozen = next((i for i, p in enumerate(policies) if p.name == "frozen"), None)
    if dyn is not None:
        solo["dynamic_eval"] = dyn
    if learner is None and policies:
        learner = EpisodeLearner(model, policies, lam=lam)
    names = [p.name for p in policies] + list(solo)
    bits: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    lines: Dict[str, List[Tuple[int, int]]] = {n: [] for n in names}
    secs = {"batched": 0.0, **{n: 0.0 for n in solo}}
    ep_rewards: List[List[Optional[float]]] = []
    B = learner.B if learner is not None else 0
    for seg, prev in tqdm(segments, desc=desc, unit="ep", mininterval=2.0):
        x = torch.tensor([prev] + list(seg[:-1]), dtype=torch.long)
        y = torch.tensor(list(seg), dtype=torch.long)
        ep_bits, ep_corr = [], []
        solo_bits: Dict[str, List[np.ndarray]] = {n: [] for n in solo}
        solo_corr: Dict[str, List[np.ndarray]] = {n: [] for n in solo}
        for c0 in range(0, len(seg), chunk):
            xi, yi = x[c0:c0 + chunk], y[c0:c0 + chunk]
            if learner is not None:
                t0 = time.perf_counter()
                logits = learner.step(xi.unsqueeze(0).expand(B, -1))
                lp = torch.log_softmax(logits.float(), -1)
                ep_bits.append((-lp.gather(-1, yi.expand(B, -1).unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
                ep_corr.append((logits.argmax(-1) == yi).numpy())
                secs["batched"] += time.perf_counter() - t0
            for n, reader in solo.items():
                t0 = time.perf_counter()
                dl = reader.step(xi.unsqueeze(0), yi.unsqueeze(0))
                lp = torch.log_softmax(dl.float(), -1)
                solo_bits[n].append((-lp[0].gather(-1, yi.unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
                solo_corr[n].append((dl[0].argmax(-1) == yi).numpy())
                secs[n] += time.perf_counter() - t0
        if learner is not None:
            # The episode's last byte was only a target so far; a user's session observes (writes) it
            # too before the episode closes, so the learner does the same (its logits score nothing).
            t0 = time.perf_counter()
            learner.step(y[-1:].unsqueeze(0).expand(B, -1))
            secs["batched"] += time.perf_counter() - t0
            corr = np.concatenate(ep_corr, axis=1)
            b = np.concatenate(ep_bits, axis=1)
            acc = line_acceptance(corr, seg)
            rewards = []
            for i, p in enumerate(policies):
                bits[p.name].append(b[i])
                lines[p.name].extend((int(a[i]), n) for a, n in acc)
                if p.reward_from == "surprise":
                    rewards.append(None if frozen is None else float(b[frozen].mean() - b[i].mean()))
                else:
                    rewards.append(float(np.mean([a[i] / n for a, n in acc])) if acc else None)
            ep_rewards.append(rewards)
            t0 = time.perf_counter()
            learner.end_episode(rewards)
            secs["batched"] += time.perf_counter() - t0
        for n, reader in solo.items():
            bits[n].append(np.concatenate(solo_bits[n]))
            sacc = line_acceptance(np.concatenate(solo_corr[n])[None], seg)
            lines[n].extend((int(a[0]), k) for a, k in sacc)
            reader.new_episode()
    return {"bits": {n: np.concatenate(v) for n, v in bits.items()}, "lines": lines, "seconds": secs,
            "learner": learner, "dyn": solo.get("dynamic_eval"), "solo": solo, "names": names,
            "rewards": ep_rewards}



def log_points(n: int, lo: int = 100, per_decade: int = 4) -> List[int]:
    """Log-spaced interaction counts ``lo .. n`` (always ending at n)."""
    if n < lo:
        return [n]
    k = int(math.floor(math.log10(n / lo) * per_decade)) + 1
    pts = sorted({int(round(lo * 10 ** (i / per_decade))) for i in range(k)} | {n})
    return [p for p in pts if p <= n]
