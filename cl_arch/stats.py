"""Bootstrap intervals and the Sutton delta: the one implementation every layer imports.

Pure numpy, no model knowledge, so ``train`` (the meta-training Sutton test), ``eval`` (through
:mod:`cl_arch.eval.lib.metrics`, which re-exports these) and ``benchmarks`` all use the same
resampling. Every function takes plain sequences or numpy arrays and returns Python floats.

All intervals are percentile-bootstrap intervals: ``n_boot`` resamples of the units (pairs, or
whole clusters) with replacement from ``numpy.random.default_rng(seed)``, and the ``alpha / 2`` and
``1 - alpha / 2`` quantiles (numpy's default, linear interpolation) of the resampled statistic.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

Interval = Tuple[float, float]


def as_1d(x: Iterable[float], name: str) -> np.ndarray:
    """``x`` as a non-empty one-dimensional float64 array (``ValueError`` otherwise)."""
    a = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` indices into ``n`` units, drawn with replacement (the bootstrap's draws)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(boots: np.ndarray, alpha: float = 0.05) -> Interval:
    """The ``alpha / 2`` and ``1 - alpha / 2`` quantiles of the resampled statistics ``boots``."""
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, alpha: float = 0.05,
                        seed: int = 0) -> Tuple[float, Interval]:
    """Mean paired difference and its percentile-bootstrap interval.

    ``d_i = a_i - b_i``; ``delta = mean(d)``; the interval is the ``alpha/2`` and ``1 - alpha/2``
    quantiles of ``mean(d[idx])`` over ``n_boot`` resamples ``idx`` of the pairs with replacement.
    With one pair the interval collapses to the point.
    """
    x, y = as_1d(a, "a"), as_1d(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    d = x - y
    boots = d[resample_indices(d.size, n_boot, seed)].mean(axis=1)
    return float(d.mean()), percentile_interval(boots, alpha)


def cluster_bootstrap_ci(d: Sequence[float], clusters: Sequence, n_boot: int = 2000, seed: int = 0,
                         alpha: float = 0.05) -> Tuple[float, Interval]:
    """Mean of ``d [N]`` and its percentile interval, resampling whole ``clusters [N]`` (e.g.
    one user's episode: suggestions in it share a memory state, so they are not independent).

    A resample draws as many clusters as there are, with replacement, and takes the mean of all
    their values (``sum of sums / sum of counts``, so large clusters weigh more, as in ``mean(d)``).
    """
    x = as_1d(d, "d")
    cl = np.asarray(clusters)
    if cl.shape != x.shape:
        raise ValueError(f"clusters must give one label per value: {cl.shape} vs {x.shape}")
    ids, inv = np.unique(cl, return_inverse=True)
    sums, counts = np.bincount(inv, weights=x), np.bincount(inv).astype(float)
    idx = resample_indices(len(ids), n_boot, seed)
    boots = sums[idx].sum(1) / counts[idx].sum(1)
    return float(x.mean()), percentile_interval(boots, alpha)


def sutton_delta(kept: Sequence[float], reset: Sequence[float], yoked: Optional[Sequence[float]] = None,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Dict[str, object]:
    """The Sutton test: does carrying state from attempt k improve attempt k + 1?

    ``delta = E[R_{k+1} | state kept from attempt k] - E[R_{k+1} | state reset]`` over paired
    samples (same seed / task / episode, only the carried state differs), with a paired bootstrap
    interval (:func:`paired_bootstrap_ci`). The *yoked* control carries a state of the same age
    learned on a different task: ``delta_yoked = E[R | kept] - E[R | yoked]`` separates learning
    *this* task from merely having a non-empty memory (its interval uses ``seed + 1``).

    Returns:
        ``{"sutton_delta", "sutton_ci", "n"}`` and, with ``yoked``, ``{"yoked_delta", "yoked_ci"}``.
    """
    d, ci = paired_bootstrap_ci(kept, reset, n_boot, alpha, seed)
    out: Dict[str, object] = {"sutton_delta": d, "sutton_ci": list(ci), "n": len(list(kept))}
    if yoked is not None:
        dy, ciy = paired_bootstrap_ci(kept, yoked, n_boot, alpha, seed + 1)
        out.update(yoked_delta=dy, yoked_ci=list(ciy))
    return out


__all__ = ["as_1d", "resample_indices", "percentile_interval", "paired_bootstrap_ci", "cluster_bootstrap_ci",
           "sutton_delta"]
