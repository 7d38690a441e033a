"""Metrics against hand-computed cases."""
import math

import numpy as np
import pytest

from cl_arch.eval import metrics as M


def test_window_mean_and_gain_curve():
    frozen = [4.0] * 10
    adapted = [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0]
    # n=4: second half = items 2,3 -> adapted 3.0, frozen 4.0 -> gain 1.0
    # n=10: items 5..9 -> (2+2+1+1+1)/5 = 1.4 -> gain 2.6
    g = M.gain_curve(frozen, adapted, points=(4, 10, 1000))
    assert g == pytest.approx({4: 1.0, 10: 2.6})
    assert 1000 not in g  # beyond the stream: skipped
    assert M.window_mean(adapted, 3, window=1) == 3.0
    with pytest.raises(ValueError):
        M.window_mean(adapted, 11)
    with pytest.raises(ValueError):
        M.gain_curve([1.0], [1.0, 2.0], (1,))


def test_aulc_is_chaudhry_lca():
    # Z = [0.2, 0.4, 0.9] -> LCA = 1.5 / 3 = 0.5
    assert M.learning_curve_area([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    # normalised with chance 0.2 and ceiling 1.0: (0, 0.25, 0.875) / 3 = 0.375
    assert M.aulc([0.2, 0.4, 0.9], lo=0.2, hi=1.0) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        M.aulc([0.1], lo=1.0, hi=1.0)


def test_paired_bootstrap_and_sutton():
    kept = [1.0, 2.0, 3.0, 4.0]
    reset = [0.0, 1.0, 2.0, 3.0]
    d, (lo, hi) = M.paired_bootstrap_ci(kept, reset)
    assert d == 1.0 and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)  # constant diff
    # differences [0, 2]: mean 1; resamples of 2 can only give 0, 1 or 2
    d, (lo, hi) = M.paired_bootstrap_ci([0.0, 2.0], [0.0, 0.0], n_boot=4000)
    assert d == 1.0 and lo == pytest.approx(0.0) and hi == pytest.approx(2.0)
    out = M.sutton_delta(kept, reset, yoked=[1.0, 2.0, 3.0, 3.0])
    assert out["sutton_delta"] == 1.0 and out["n"] == 4
    assert out["yoked_delta"] == pytest.approx(0.25)
    # differences [0, 0, 0, 1]: resample means are k/4 with P(>= 3/4) = 0.051 and P(1) = 0.004, so the
    # 2.5% and 97.5% quantiles are exactly 0 and 0.75
    assert tuple(out["yoked_ci"]) == (0.0, 0.75)
    # a noisy null effect gets an interval that covers 0
    rng = np.random.default_rng(3)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=0.1, size=200)
    _, (lo, hi) = M.paired_bootstrap_ci(a, b)
    assert lo < 0 < hi
    assert M.shot_gap(0.8, 0.5) == pytest.approx(0.3)


def test_bootstrap_interval_has_its_coverage():
    """Over 300 normal samples of 40 with known mean, the 95% percentile-bootstrap interval covers
    the true mean in 90-99% of them (the percentile bootstrap under-covers a little at n = 40), and
    its width is that of the normal interval within 15%."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for i in range(300):
        a = rng.normal(0.3, 1.0, size=40)
        _, (lo, hi) = M.paired_bootstrap_ci(a, np.zeros(40), n_boot=1000, seed=i)
        covered += lo <= 0.3 <= hi
        widths.append(hi - lo)
    assert 0.90 <= covered / 300 <= 0.99, covered
    assert abs(np.mean(widths) / (2 * 1.96 / np.sqrt(40)) - 1) < 0.15


def test_gem_metrics_hand_case():
    # three tasks; row i = after learning tasks 0..i
    R = [[0.9, 0.1, 0.2],
         [0.7, 0.8, 0.3],
         [0.6, 0.5, 0.95]]
    g = M.gem_metrics(R, b=[0.1, 0.2, 0.1])
    assert g["acc"] == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert g["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)       # -0.3
    assert g["fwt"] == pytest.approx(((0.1 - 0.2) + (0.3 - 0.1)) / 2)       # 0.05
    # forgetting: task0 best 0.9 -> 0.6 (0.3); task1 best 0.8 -> 0.5 (0.3)
    assert M.chaudhry_forgetting(R) == pytest.approx(0.3)
    # a task that kept improving after it was learned: positive BWT, negative forgetting
    R2 = [[0.2, 0.0], [0.9, 0.9]]
    assert M.gem_metrics(R2)["bwt"] == pytest.approx(0.7)
    assert M.chaudhry_forgetting(R2) == pytest.approx(0.2 - 0.9)
    assert M.gem_metrics([[0.5]]) == {"acc": 0.5, "bwt": 0.0}
    with pytest.raises(ValueError):
        M.gem_metrics([[1.0, 2.0]])


def test_base_drift_regret_running_mean():
    d = M.base_drift(before=[2.0, 3.0], after=[2.5, 3.5])
    assert d["drift_bpb"] == pytest.approx(0.5) and d["drift_ci"] == pytest.approx([0.5, 0.5])
    assert M.cumulative_regret([0.1, 0.5, 0.9], [0, 2, 1, 2]) == pytest.approx([0.8, 0.8, 1.2, 1.2])
    with pytest.raises(ValueError):
        M.cumulative_regret([0.1, 0.5], [2])
    assert M.running_mean([1, 2, 3, 4], window=2) == pytest.approx([1.0, 1.5, 2.5, 3.5])
    assert M.nats_to_bits(math.log(2) * 3) == pytest.approx(3.0)
