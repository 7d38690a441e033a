"""Metrics against hand-computed cases."""
import math

import numpy as np
import pytest

from cl_arch.eval.lib import metrics as M


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


# ---------------------------------------------------------------------- one bootstrap (cl_arch.stats)
# Inputs and figures pinned from the copies before they were merged into cl_arch/stats.py:
# eval/metrics.paired_bootstrap_ci and sutton_delta, train/meta.paired_bootstrap (np.percentile,
# identical on these inputs) and eval/tabcomplete.cluster_bootstrap_ci.
_A = [1.328857, 1.94192, 1.44672, -0.67318, -1.0928, 0.367196, 1.161351, 0.809187, 2.110286, 1.050843, 0.93976, -0.431323]
_B = [-0.25229, -0.221862, 0.418139, -0.431255, 0.272261, 0.056819, 0.424569, 0.224943, 1.657684, -0.663676, 1.199187,
      -0.402612]
_Y = [0.861728, -0.16179, 0.117464, 1.435271, 1.365452, 0.809978, -0.766401, 0.046324, 0.702917, -0.111866, -0.510018,
      -0.665389]
_CL = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4]


def _same(x, y):
    return x == pytest.approx(y, rel=1e-12, abs=1e-15)


def test_bootstrap_figures_did_not_move():
    from cl_arch import stats as S

    d, ci = S.paired_bootstrap_ci(_A, _B)
    assert _same(d, 0.5564091666666667) and _same(ci, (0.04595292916666677, 1.0672841937500002))
    _, ci = S.paired_bootstrap_ci(_A, _B, n_boot=500, alpha=0.1, seed=7)
    assert _same(ci, (0.08978257916666675, 0.9990236291666665))
    _, ci = S.paired_bootstrap_ci(_A, _B, n_boot=1000, seed=5)  # train/meta's former paired_bootstrap
    assert _same(ci, (0.057963741666666735, 1.08540123125))
    st = S.sutton_delta(_A, _B, _Y, seed=3)
    assert st["n"] == 12 and _same(st["sutton_delta"], 0.5564091666666667)
    assert _same(st["sutton_ci"], [0.03626872708333342, 1.0966845499999993])
    assert _same(st["yoked_delta"], 0.48626225000000006) and _same(st["yoked_ci"], [-0.3552820270833334, 1.1988381124999996])
    d = np.array(_A) - np.array(_B)
    m, ci = S.cluster_bootstrap_ci(d, np.array(_CL))
    assert _same(m, 0.5564091666666667) and _same(ci, (-0.2306365555555555, 1.2942181428571427))
    _, ci = S.cluster_bootstrap_ci(d, np.array(_CL), n_boot=300, seed=4)
    assert _same(ci, (-0.31776017708333315, 1.268792))
    with pytest.raises(ValueError):
        S.cluster_bootstrap_ci(d, np.array(_CL[:-1]))


def test_one_bootstrap_and_one_sutton_delta():
    """Every layer uses cl_arch.stats: the names elsewhere are the same objects, and no other module
    of the project (benchmarks included) defines a bootstrap or a Sutton delta of its own."""
    import ast
    import os

    from cl_arch import stats as S
    from cl_arch.eval import tabcomplete
    from cl_arch.train import meta

    assert M.paired_bootstrap_ci is S.paired_bootstrap_ci and M.sutton_delta is S.sutton_delta
    assert tabcomplete.cluster_bootstrap_ci is S.cluster_bootstrap_ci
    assert meta.sutton_delta is S.sutton_delta and not hasattr(meta, "paired_bootstrap")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for folder in ("cl_arch", "kernels", "train", "eval", "scripts", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                            "bootstrap" in node.name or node.name == "sutton_delta"):
                        found.append((os.path.relpath(path, root), node.name))
    assert sorted(found) == [("cl_arch/stats.py", "cluster_bootstrap_ci"), ("cl_arch/stats.py", "paired_bootstrap_ci"),
                             ("cl_arch/stats.py", "sutton_delta")], found


def test_play_sessions_is_the_session_loop():
    """cl_arch.train.session_play.play_sessions (bench_sutton, retrofit_learning) gives the rewards and
    memories of the loop it replaced: generate one answer, pay the reward, per session."""
    import torch

    from cl_arch import PlasticTransformer, Session
    from cl_arch.train.recall import recall_config
    from cl_arch.train.session_play import play_sessions
    from cl_arch.train.tasks import PreferenceGame

    torch.manual_seed(0)
    model = PlasticTransformer(recall_config(d_model=32, head_k_dim=16, head_v_dim=16, eta_s=0.0, eta_r=1.0)).eval()
    with torch.no_grad():
        for layer in model.fast_layers():
            layer.eta_r.fill_(20.0)
            layer.W0.normal_()
    games = [PreferenceGame(4, 4, seed=s) for s in range(2)]
    cues = [g.cue_sequence(6, seed=10 + s) for s, g in enumerate(games)]
    rule = {"eta_s": 0.0, "eta_r": 20.0}
    # seeded answers, one session at a time (benchmarks/retrofit_learning.py's former loop)
    for s, (g, c) in enumerate(zip(games, cues)):
        a, b = Session(model, seed=s, **rule), Session(model, seed=s, **rule)
        R = play_sessions([a], [g], [c], seeds=lambda i, t: 7 * 100_003 + t)
        for t, cue in enumerate(c):
            tok = b.generate(g.prompt(cue), max_new_tokens=1, temperature=1.0, allowed_tokens=g.answers,
                             seed=7 * 100_003 + t)[0]
            assert float(R[0, t]) == g.reward(cue, tok)
            b.reward(g.reward(cue, tok))
        assert all(torch.equal(p, q) for p, q in zip(a.P, b.P)) and a.baseline == b.baseline
    # batched, each session drawing from its own generator (benchmarks/bench_sutton.py's former loop)
    ours = [Session(model, seed=1000 + s, **rule) for s in range(2)]
    R = play_sessions(ours, games, cues)
    theirs = [Session(model, seed=1000 + s, **rule) for s in range(2)]
    for e in range(6):
        outs = Session.batch_generate(theirs, [g.prompt(c[e]) for g, c in zip(games, cues)], max_new_tokens=1,
                                      allowed_tokens=games[0].answers)
        for i, (s, g, c, o) in enumerate(zip(theirs, games, cues, outs)):
            assert float(R[i, e]) == g.reward(c[e], o[0])
            s.reward(g.reward(c[e], o[0]))
    assert all(torch.equal(p, q) for a, b in zip(ours, theirs) for p, q in zip(a.P, b.P))
    with pytest.raises(ValueError):  # one session, two games
        play_sessions([Session(model)], games, cues)
    with pytest.raises(ValueError):  # sampling is restricted to one answer set
        play_sessions([Session(model), Session(model)], [games[0], PreferenceGame(4, 3)], cues)
