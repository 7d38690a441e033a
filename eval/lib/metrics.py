"""Learning metrics: how much better a model gets because it is used.

Every function works on plain Python sequences or numpy arrays and returns Python floats, so
reports serialise to JSON directly. Conventions:

* a *curve* is a sequence of per-interaction figures in stream order (per-byte losses,
  per-line acceptances, per-episode rewards);
* losses are in bits (per byte); lower is better, so a positive gain means the adapted model
  is better than the frozen one;
* ``R[i][j]`` (retention) is the score on task ``j`` after learning tasks ``0..i`` in order,
  higher is better.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

# The bootstrap and the Sutton delta live in cl_arch.stats (train imports them too); re-exported here.
from cl_arch.stats import as_1d as _arr
from cl_arch.stats import paired_bootstrap_ci, sutton_delta  # noqa: F401

LN2 = math.log(2.0)


def nats_to_bits(x: float) -> float:
    """``x / ln 2``: a cross-entropy in nats per byte as bits per byte."""
    return float(x) / LN2


# ---------------------------------------------------------------------------- gain curve
def window_mean(values: Sequence[float], n: int, window: Optional[int] = None) -> float:
    """Local mean of a curve just before interaction ``n``.

    ``mean(values[n - w : n])`` with ``w = window`` or, by default, ``w = ceil(n / 2)``, i.e. the
    second half of the first ``n`` interactions: at n = 1k, 10k, 100k bytes this reads the loss
    *around* that point (not the prequential average since byte 0, which early bytes dominate).

    Raises:
        ValueError: if the curve holds fewer than ``n`` values.
    """
    a = _arr(values, "values")
    if n < 1 or n > a.size:
        raise ValueError(f"n={n} is outside the curve's 1..{a.size} interactions")
    w = int(window) if window is not None else int(math.ceil(n / 2))
    w = max(1, min(w, n))
    return float(a[n - w:n].mean())


def gain_curve(loss_frozen: Sequence[float], loss_adapted: Sequence[float], points: Sequence[int],
               window: Optional[int] = None) -> Dict[int, float]:
    """Gain over the frozen control at each point ``n`` (docs/design.md, "Measuring learning": gain curve).

    ``gain(n) = L_frozen(n) - L_adapted(n)`` with ``L(n) = window_mean(losses, n)``: both curves
    are per-interaction prequential losses (each scored before the model learns from it) on the
    *same* stream, so the difference is paired. Points beyond the stream's length are skipped.

    Args:
        loss_frozen, loss_adapted: ``[N]`` per-interaction losses (e.g. bits per byte).
        points: interaction counts, e.g. ``(1_000, 10_000, 100_000)``.
    Returns:
        ``{n: gain}`` for each point ``n <= N``; positive = adaptation helps.
    """
    f, a = _arr(loss_frozen, "loss_frozen"), _arr(loss_adapted, "loss_adapted")
    if f.size != a.size:
        raise ValueError(f"curves differ in length: frozen {f.size}, adapted {a.size}")
    return {int(n): window_mean(f, n, window) - window_mean(a, n, window) for n in points if n <= f.size}


# ---------------------------------------------------------------------------- AULC / LCA
def learning_curve_area(scores: Sequence[float]) -> float:
    """Chaudhry et al.'s learning-curve area, ``LCA_beta = 1/(beta + 1) * sum_{b=0}^{beta} Z_b``.

    ``scores`` is ``[Z_0, ..., Z_beta]``: the score after ``b`` learning steps (or at the
    b-th measuring point), so a learner that is good *early* gets a larger area.
    """
    return float(_arr(scores, "scores").mean())


def aulc(scores: Sequence[float], lo: float = 0.0, hi: float = 1.0) -> float:
    """Area under the normalised learning curve (docs/design.md, "Measuring learning": AULC):

    ``AULC = 1/(beta + 1) * sum_b (Z_b - lo) / (hi - lo)``, i.e. :func:`learning_curve_area` of
    the curve rescaled so that ``lo`` (chance, or the frozen control) maps to 0 and ``hi``
    (perfect) to 1.
    """
    if not hi > lo:
        raise ValueError(f"aulc needs hi > lo, got lo={lo}, hi={hi}")
    z = (_arr(scores, "scores") - lo) / (hi - lo)
    return float(z.mean())


# ---------------------------------------------------------------------------- Sutton / shots
# paired_bootstrap_ci, sutton_delta: imported from cl_arch.stats above.
def shot_gap(acc_many: float, acc_few: float) -> float:
    """``acc(50 shots) - acc(5 shots)`` on held-out tasks: what more examples buy."""
    return float(acc_many) - float(acc_few)


# ---------------------------------------------------------------------------- retention (GEM)
def _matrix(R: Sequence[Sequence[float]]) -> np.ndarray:
    M = np.asarray(R, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"R must be a square T x T matrix, got shape {M.shape}")
    return M


def gem_metrics(R: Sequence[Sequence[float]], b: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """Lopez-Paz & Ranzato's GEM metrics from ``R [T, T]`` (row i: after learning tasks 0..i).

    * ``ACC = 1/T sum_j R[T-1, j]``
    * ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])``  (negative = forgetting)
    * ``FWT = 1/(T-1) sum_{j>0} (R[j-1, j] - b_j)``, with ``b_j`` the score on task j before any
      learning (only when ``b [T]`` is given).

    With T = 1 BWT and FWT are 0.
    """
    M = _matrix(R)
    T = M.shape[0]
    out = {"acc": float(M[-1].mean())}
    out["bwt"] = float(np.mean([M[-1, j] - M[j, j] for j in range(T - 1)])) if T > 1 else 0.0
    if b is not None:
        bb = _arr(b, "b")
        if bb.size != T:
            raise ValueError(f"b must have T={T} entries, got {bb.size}")
        out["fwt"] = float(np.mean([M[j - 1, j] - bb[j] for j in range(1, T)])) if T > 1 else 0.0
    return out


def chaudhry_forgetting(R: Sequence[Sequence[float]]) -> float:
    """Chaudhry et al.'s average forgetting after the last task:

    ``f_j = max_{l < T-1} R[l, j] - R[T-1, j]`` for each ``j < T-1`` (best score ever held minus
    the final score), ``F = 1/(T-1) sum_j f_j``; 0 for T = 1. Unlike BWT it compares with the best
    score a task ever had, not only the score just after it was learned; negative = improved.
    """
    M = _matrix(R)
    T = M.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([M[j:T - 1, j].max() - M[T - 1, j] for j in range(T - 1)]))


def base_drift(before: Sequence[float], after: Sequence[float]) -> Dict[str, object]:
    """Forgetting of the base corpus: ``drift = mean(after) - mean(before)`` in bits per byte.

    ``before``/``after`` are per-window losses on the *same* base-corpus windows (e.g. held-out
    stdlib files) before and after the adaptation stream; positive = the base got worse. The
    interval is the paired bootstrap over windows.
    """
    d, ci = paired_bootstrap_ci(after, before)
    return {"drift_bpb": d, "drift_ci": list(ci)}


# ---------------------------------------------------------------------------- bandits
def cumulative_regret(arm_means: Sequence[float], actions: Sequence[int]) -> List[float]:
    """``regret(t) = sum_{s<=t} (max_a mu_a - mu_{a_s})``: expected (pseudo-)regret, which does
    not depend on the reward noise."""
    mu = _arr(arm_means, "arm_means")
    acts = np.asarray(list(actions), dtype=np.int64)
    if acts.size and (acts.min() < 0 or acts.max() >= mu.size):
        raise ValueError(f"actions must lie in [0, {mu.size})")
    return np.cumsum(mu.max() - mu[acts]).tolist()


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean ``mean(values[max(0, t-window+1) : t+1])`` for every t: a smoothed curve."""
    a = _arr(values, "values")
    c = np.concatenate([[0.0], np.cumsum(a)])
    t = np.arange(1, a.size + 1)
    lo = np.maximum(0, t - window)
    return ((c[t] - c[lo]) / (t - lo)).tolist()
