"""Consolidation: fold is exact and undoable, distill keeps a session's gain within a forgetting
budget (and rolls back over it), merge keeps disjoint sessions' gains, bad states are refused.

The learning tests use ``recall_model`` (trained on associative recall): a session observes
``key value`` pairs of a fixed association over several episodes and commits them into P
(retention commits, ``eta_s = 1``). Its *gain* is the drop in NLL of each value at the first
occurrence of its key in a fresh episode, where only P can know it.

How the session writes matters. ``train/recall.py`` teaches the model to read, right after
``BOS``, a memory carried from a previous episode of ``BOS k v k v ...`` (12 pairs): the *whole*
final state ``S_T``. A retention commit adds ``eta_s * clip(E_T)``, and the eligibility trace
``E`` decays by the model's ``lam`` (0.5) per token, so with the model's own settings P holds
little more than the last pair (gain ~0.3 nats/value). With ``lam = 1`` the trace is the sum of
the episode's writes, i.e. ``S_T - S_0`` up to the layers' own slow decay (``exp(g)`` is 0.90 to
0.999 per token in this model), which is the memory the model learned to read: P then takes the
values from chance (ln 16 = 2.77 nats) to ~0.1 nats, a gain of ~2.7 nats/value.
"""
import copy
import json
import os

import pytest
import torch

from cl_arch import PlasticTransformer
from cl_arch.consolidate import distill, fold, load_report, merge, undo, write_report
from cl_arch.consolidate.merge import merge_tensors
from cl_arch.session import Session
from cl_arch.train.tasks import KEYS, association, association_episode, recall_anchor
from cl_arch.train.tasks import association_probes as probes

# Offsets the associations, sessions and probes of the learning tests (CL_ARCH_TEST_SEED=1 pytest
# ... checks that a threshold is not tuned to one draw); the figures quoted are for seeds 0-2.
SEED = int(os.environ.get("CL_ARCH_TEST_SEED", "0"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- synthetic associations
# lam = 1: commit the whole episode's writes (see the module docstring); eta_s = 1, no reward
# term; gamma and clip stay the model's (0.98, 10: the clip does not bind after the first episode).
RULE = dict(lam=1.0, eta_s=1.0, eta_r=0.0)


def learned_session(model, assoc, episodes, seed, n_pairs=12):
    """A session that observed the association for ``episodes`` episodes, each committed into P
    (episodes laid out as recall.py's cross-episode phase: ``BOS`` then ``n_pairs`` pairs)."""
    s = Session(model, seed=seed, **RULE)
    g = torch.Generator().manual_seed(seed)
    for _ in range(episodes):
        s.observe(association_episode(assoc, n_pairs, g))
        s.end_episode()
    return s


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model, saved):
    now = model.state_dict()
    assert set(now) == set(saved)
    for k, v in saved.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


# ---------------------------------------------------------------------- fold
def test_fold_is_exact_and_undo_is_bitwise(recall_model, tmp_path):
    model = recall_model
    s = learned_session(model, association(list(KEYS[:8]), 1), episodes=4, seed=0)
    P_before = [p.clone() for p in s.P]
    assert all(float(p.norm()) > 0.1 for p in P_before)
    original, fp0 = weights_of(model), model.fingerprint()
    ids = torch.randint(32, 160, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_P, _ = model(ids, state=model.init_state(3, [p[0] for p in P_before]))
        without_P, _ = model(ids)
    assert (with_P - without_P).abs().max() > 1e-2  # P matters, so agreement below is a real check

    report = fold(model, s)
    with torch.no_grad():
        after, _ = model(ids)  # P = 0 now: the session's memory lives in W0
    # Bitwise: the resting state W0 + P is the same float32 sum before and after (max_rounding 0
    # below), and everything downstream of it is the same arithmetic.
    assert torch.equal(after, with_P), float((after - with_P).abs().max())
    assert all(bool((p == 0).all()) for p in s.P)
    assert report["fingerprint_after"] == model.fingerprint() != fp0
    assert report["max_rounding"] == 0.0  # float32 W0 holds the float32 sum exactly

    path = write_report(report, tmp_path / "fold.json")
    assert os.path.isfile(tmp_path / "fold.undo.safetensors")
    assert "_undo" not in json.load(open(path))
    info = undo(model, load_report(path), sessions=[s])  # from disk, as a later process would
    assert info["fingerprint"] == fp0
    assert_bitwise(model, original)
    assert all(torch.equal(a, b) for a, b in zip(s.P, P_before))
    with pytest.raises(ValueError, match="fingerprint"):
        undo(model, report)  # already undone: the model is no longer the one the report left


def test_fold_within_a_forgetting_budget_keeps_the_rest_in_the_session(recall_model, tmp_path):
    """A guarded fold moves only the fraction of P whose forgetting on the anchor fits the budget;
    the session keeps the rest, so it computes what it computed before, and undo restores both."""
    from cl_arch.consolidate.common import mean_nll, to_batches

    model = copy.deepcopy(recall_model)
    keys = list(KEYS[:8])
    s = learned_session(model, association(keys, 1), episodes=4, seed=0)
    P_before = [p.clone() for p in s.P]
    # The anchor is a *conflicting* map on the same keys: what P stores is wrong there.
    g = torch.Generator().manual_seed(7)
    anchor = torch.tensor([association_episode(association(keys, 2), 12, g) for _ in range(8)])
    batches = to_batches(anchor, 16, "anchor")
    base = mean_nll(model, batches)
    full = (mean_nll(model, batches, P=[p[0] for p in P_before]) - base) / 0.6931471805599453
    assert full > 0.5  # folding all of P would cost this much: the guard has something to do
    ids = torch.randint(32, 160, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_P, _ = model(ids, state=model.init_state(2, [p[0] for p in P_before]))
    original, fp0 = weights_of(model), model.fingerprint()

    budget = 0.25 * full
    report = fold(model, s, anchor=anchor, budget=budget)
    c = report["fold_fraction"]
    assert 0.0 < c < 1.0 and report["forgetting_bits_full"] == pytest.approx(full, rel=1e-5)
    forgot = (mean_nll(model, batches) - base) / 0.6931471805599453  # measured anew on the folded model
    assert forgot <= budget + 1e-5 and forgot == pytest.approx(report["forgetting_bits"], abs=1e-5)
    for p, p0 in zip(s.P, P_before):
        torch.testing.assert_close(p, (1 - c) * p0, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        kept, _ = model(ids, state=model.init_state(2, [p[0] for p in s.P]))
    torch.testing.assert_close(kept, with_P, rtol=1e-4, atol=1e-4)  # c P + (1 - c) P, rounded once

    path = write_report(report, tmp_path / "fold.json")
    undo(model, load_report(path), sessions=[s])
    assert model.fingerprint() == fp0
    assert_bitwise(model, original)
    assert all(torch.equal(a, b) for a, b in zip(s.P, P_before))

    # A budget the whole P fits in folds all of it, exactly as an unguarded fold.
    report = fold(model, s, anchor=anchor, budget=2 * full)
    assert report["fold_fraction"] == 1.0 and all(bool((p == 0).all()) for p in s.P)
    with torch.no_grad():
        assert torch.equal(model(ids)[0], with_P)


def test_guarded_fold_refuses_bad_budgets_without_changing_anything(recall_model):
    model = recall_model
    s = learned_session(model, association(list(KEYS[:4]), 3), episodes=2, seed=2)
    P_before = [p.clone() for p in s.P]
    original = weights_of(model)
    for kw, match in ((dict(budget=0.1), "anchor"), (dict(budget=-1.0, anchor=torch.randint(32, 96, (2, 9))), "budget"),
                      (dict(budget=float("nan"), anchor=torch.randint(32, 96, (2, 9))), "budget"),
                      (dict(budget=0.1, anchor=torch.full((2, 9), 10_000)), "token ids")):
        with pytest.raises(ValueError, match=match):
            fold(model, s, **kw)
    assert_bitwise(model, original)
    assert all(torch.equal(a, b) for a, b in zip(s.P, P_before))


def test_refuses_nan_and_foreign_states_without_changing_anything(recall_model, tmp_path):
    model = recall_model
    original, fp0 = weights_of(model), model.fingerprint()
    s = learned_session(model, association(list(KEYS[:4]), 2), episodes=2, seed=1)
    good_P = [p.clone() for p in s.P]
    bad = Session(model)
    bad.P = [p.clone() for p in good_P]
    bad.P[1][0, 0, 3, 5] = float("nan")
    for call in (lambda: fold(model, [s, bad]), lambda: merge(model, [s, bad]),
                 lambda: distill(model, bad, replay=torch.randint(32, 96, (2, 9)), steps=1)):
        with pytest.raises(ValueError, match="NaN/inf"):
            call()
    inf_P = [p.clone() for p in good_P]
    inf_P[0][0, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        fold(model, inf_P)

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fast_layers()[0].W0.add_(0.01)
    foreign = Session(other)
    foreign.P = [p.clone() for p in good_P]
    with pytest.raises(ValueError, match="fingerprint"):
        fold(model, [s, foreign])
    foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="fingerprint"):
        fold(model, str(tmp_path / "foreign.safetensors"))
    wrong_shape = [torch.zeros(2, 16, 32), torch.zeros(2, 32, 32)]
    with pytest.raises(ValueError, match="shape"):
        fold(model, wrong_shape)

    assert model.fingerprint() == fp0
    assert_bitwise(model, original)
    assert all(torch.equal(a, b) for a, b in zip(s.P, good_P))  # the good session was not reset


def test_the_same_session_twice_is_refused_without_changing_anything(recall_model, tmp_path):
    """fold and merge would add one P twice into W0 (and zero it once): the same object, file (also by
    another spelling of its path) or P tensors given twice is refused, naming both positions."""
    model = recall_model
    original = weights_of(model)
    s = learned_session(model, association(list(KEYS[:4]), 2), episodes=1, seed=3)
    P_before = [p.clone() for p in s.P]
    s.save(tmp_path / "alice.safetensors")
    other = tmp_path / "x" / ".." / "alice.safetensors"
    (tmp_path / "x").mkdir()
    for args in ([s, s], [str(tmp_path / "alice.safetensors"), str(other)], [[p for p in s.P], list(s.P)]):
        for call in (fold, merge):
            with pytest.raises(ValueError, match="session 1 is session 0 again"):
                call(model, args)
    assert_bitwise(model, original)
    assert all(torch.equal(a, b) for a, b in zip(s.P, P_before))


def test_a_guarded_fold_of_a_session_file_is_refused_before_it_drops_the_rest(recall_model, tmp_path):
    """A session given as a path is read into a copy the call drops; a guarded fold leaves (1 - c) P in
    the session, which would be lost. It is refused up front; the file and the model are untouched."""
    model = recall_model
    original = weights_of(model)
    s = learned_session(model, association(list(KEYS[:4]), 2), episodes=1, seed=4)
    path = tmp_path / "bob.safetensors"
    s.save(path)
    data = path.read_bytes()
    with pytest.raises(ValueError, match="a copy this call would drop"):
        fold(model, [str(path)], anchor=torch.randint(32, 96, (2, 9)), budget=0.01)
    assert_bitwise(model, original)
    assert path.read_bytes() == data


# ---------------------------------------------------------------------- distill
def test_distill_keeps_the_gain_within_budget(recall_model, tmp_path):
    model = recall_model
    assoc = association(list(KEYS[:8]), 1 + SEED)
    s = learned_session(model, assoc, episodes=12, seed=SEED)
    original, fp0 = weights_of(model), model.fingerprint()
    report = distill(model, s, anchor=recall_anchor(64, 16, seed=99), probes=probes(assoc, 8, seed=5 + SEED),
                     budget=0.1, steps=40, lr=3e-3, out=tmp_path / "distill.json")
    g = report["gain"]
    print(f"distill: gain {g['gain_nats']:.3f} nats/value ({g['nll_without_P']:.3f} -> {g['nll_with_P']:.3f}), "
          f"retained {report['gain_retained']:.1%} (nll after {g['nll_after']:.3f}), "
          f"forgetting {report['forgetting_bits']:+.4f} bits/token "
          f"({report['forgetting_relative']:+.1%} of {report['anchor_bits_before']:.4f}), {report['seconds']:.1f}s")
    # Seed sweep (CL_ARCH_TEST_SEED 0-4, build machine; min / median / max):
    #   gain 1.98 / 2.19 / 2.24 nats (P takes the values from chance, ln 16 = 2.77, to ~0.6);
    #   retained 56% / 69% / 89%; forgetting +0.016 / +0.026 / +0.039 bits/token.
    # Another CPU measured forgetting 0.0546, so the budget is 0.1 (the rollback test below holds
    # the budget's own logic); 1.5 nats still fails a session whose memory the model cannot read.
    assert g["gain_nats"] > 1.5
    assert report["gain_retained"] >= 0.4
    assert -0.01 < report["forgetting_bits"] <= 0.1
    assert not report["rolled_back"]
    assert report["replay_sequences"] == 12  # default replay = the session's buffer
    assert all(bool((p == 0).all()) for p in s.P)  # fast memory freed
    assert report["fingerprint_after"] == model.fingerprint() != fp0
    assert set(report["params_replaced"]) == {n for n in original if n.endswith("_proj.weight")}

    undo(model, str(tmp_path / "distill.json"))
    assert_bitwise(model, original)


def test_distill_over_budget_rolls_back(recall_model):
    model = recall_model
    assoc = association(list(KEYS[:8]), 1 + SEED)
    s = learned_session(model, assoc, episodes=6, seed=SEED)
    original, fp0 = weights_of(model), model.fingerprint()
    P_before = [p.clone() for p in s.P]
    report = distill(model, s, anchor=recall_anchor(16, 16, seed=99), probes=probes(assoc, 4, seed=5),
                     budget=0.0, steps=6, lr=3e-3)
    assert report["forgetting_bits"] > 0  # the attempt did forget a little ...
    assert report["rolled_back"]  # ... more than a budget of 0 allows
    assert report["fingerprint_after"] == fp0 == model.fingerprint()
    assert_bitwise(model, original)
    assert all(torch.equal(a, b) for a, b in zip(s.P, P_before))  # the session keeps its memory


def test_distill_low_rank_deltas_are_merged(recall_model):
    model = recall_model
    s = learned_session(model, association(list(KEYS[:4]), 3), episodes=3, seed=2, n_pairs=8)
    before = weights_of(model)
    report = distill(model, s, steps=3, lr=1e-2, rank=2, params=["mlp.up_proj.weight"])
    assert report["params_replaced"] == ["blocks.0.mlp.up_proj.weight", "blocks.1.mlp.up_proj.weight"]
    after = model.state_dict()
    for name in report["params_replaced"]:
        delta = (after[name] - before[name]).double()
        assert 0 < int(torch.linalg.matrix_rank(delta, atol=1e-5)) <= 2
    for name in before:
        if name not in report["params_replaced"]:
            assert torch.equal(after[name], before[name]), name


# ---------------------------------------------------------------------- merge
def test_merge_of_four_disjoint_sessions(recall_model):
    model = recall_model
    sessions, prs = [], []
    for u in range(4):
        assoc = association(list(KEYS[4 * u:4 * u + 4]), 10 + u + 100 * SEED)
        sessions.append(learned_session(model, assoc, episodes=8, seed=u + 10 * SEED))
        prs.append(probes(assoc, 8, seed=50 + u + 100 * SEED))
    original = weights_of(model)
    P_before = [[p.clone() for p in s.P] for s in sessions]

    figures, gains = {}, None
    for name, kw in {"mean": dict(method="mean"), "sum": dict(method="mean", scale=4.0),
                     "ties": dict(method="ties", density=0.5, scale=2.0),
                     "regmean": dict(method="regmean")}.items():
        rep = merge(model, sessions, probes=prs, reset=False, **kw)
        figures[name] = [e["gain_retained"] for e in rep["sessions"]]
        gains = [e["gain_nats"] for e in rep["sessions"]]
        undo(model, rep)
        assert_bitwise(model, original)
    print("merge gain retained per session:", {k: [round(v, 2) for v in r] for k, r in figures.items()},
          "gains (nats):", [round(g, 2) for g in gains])
    # every session's P alone knows its 4 values: weakest session 1.45 / 1.80 / 1.89 nats over seeds 0-4
    assert min(gains) > 1.0
    mean_of = {k: sum(r) / 4 for k, r in figures.items()}
    # RegMean (least squares on each session's replay read queries) is the only method whose worst
    # session kept >= 50% on seeds 0-2: mean retained 0.83-0.93, worst session 0.61. The sum keeps
    # about as much on average (0.66-0.87) but its worst session fell to 0.23; TIES d=0.5 x2 to
    # -0.04. 0.61 is too little margin to hold every session to the 50%, so the worst is
    # held to 40% and the mean to 75%.
    # Seed sweep 0-4 (min / median / max): regmean mean retained 0.75 / 0.91 / 0.93, its worst
    # session 0.47 / 0.79 / 0.83; thresholds with margin below the minimum.
    assert mean_of["regmean"] >= 0.6
    assert min(figures["regmean"]) >= 0.3
    # A plain mean divides each disjoint memory by four: it keeps less than the sum does.
    assert mean_of["mean"] < mean_of["sum"]

    rep = merge(model, sessions, weights="count", method="ties", density=0.5, scale=2.0, probes=prs)
    assert rep["weights"] == [8.0] * 4 and all(bool((p == 0).all()) for s in sessions for p in s.P)
    undo(model, rep, sessions=sessions)
    assert_bitwise(model, original)
    assert all(torch.equal(a, b) for s, Pb in zip(sessions, P_before) for a, b in zip(s.P, Pb))


def test_ties_rule_on_hand_made_vectors():
    # Two sessions, 4 entries: trimming keeps the 2 largest of each; entry 0 conflicts in sign.
    a = torch.tensor([3.0, 2.0, 0.1, 0.0]).view(1, 1, 4)
    b = torch.tensor([-1.0, 0.0, 0.2, 4.0]).view(1, 1, 4)
    res = merge_tensors([a, b], [1.0, 1.0], method="ties", density=0.5)
    # entry 0: 3 vs -1 -> sign +, only a agrees -> 3; entry 1: only a -> 2; entry 2: trimmed in
    # a, b's 0.2 is not in its top 2 either -> 0; entry 3: only b -> 4.
    assert torch.allclose(res["delta"].flatten(), torch.tensor([3.0, 2.0, 0.0, 4.0]))
    assert res["conflict_fraction"] == pytest.approx(1 / 3)
    mean = merge_tensors([a, b], [3.0, 1.0], method="mean")["delta"]
    assert torch.allclose(mean, (3 * a + b) / 4)


# ---------------------------------------------------------------------- CLI
def test_cli_fold_then_undo(recall_model, tmp_path):
    from cl_arch.scripts.cli import main

    model = recall_model
    model.save_pretrained(tmp_path / "base")
    fp0 = model.fingerprint()
    s = learned_session(model, association(list(KEYS[:4]), 4), episodes=2, seed=3, n_pairs=8)
    s.save(tmp_path / "user.safetensors")
    ids = torch.randint(32, 160, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_P, _ = model(ids, state=model.init_state(2, [p[0] for p in s.P]))

    assert main(["consolidate", "--model", str(tmp_path / "base"), "--sessions", str(tmp_path / "user.safetensors"),
                 "--method", "fold", "--out", str(tmp_path / "folded")]) == 0
    folded = PlasticTransformer.from_pretrained(tmp_path / "folded")
    report = json.load(open(tmp_path / "folded" / "report.json"))
    assert report["fingerprint_before"] == fp0 and report["fingerprint_after"] == folded.fingerprint()
    assert os.path.isfile(tmp_path / "folded" / "report.undo.safetensors")
    with torch.no_grad():
        after, _ = folded(ids)
    assert torch.equal(after, with_P)  # saved and loaded float32 weights: still bitwise

    # The session file belongs to the old weights: consolidating it into the new model is refused.
    assert main(["consolidate", "--model", str(tmp_path / "folded"), "--sessions", str(tmp_path / "user.safetensors"),
                 "--method", "fold", "--out", str(tmp_path / "twice")]) == 2
    assert main(["consolidate", "--model", str(tmp_path / "folded"), "--undo",
                 str(tmp_path / "folded" / "report.json"), "--out", str(tmp_path / "restored")]) == 0
    assert PlasticTransformer.from_pretrained(tmp_path / "restored").fingerprint() == fp0

    # With a budget the CLI folds part of P and saves the rest of the session against the new weights.
    keys = list(KEYS[:4])
    g = torch.Generator().manual_seed(5)
    torch.save({"input_ids": torch.tensor([association_episode(association(keys, 9), 8, g) for _ in range(4)])},
               tmp_path / "anchor.pt")
    assert main(["consolidate", "--model", str(tmp_path / "base"), "--sessions", str(tmp_path / "user.safetensors"),
                 "--method", "fold", "--budget", "0", "--anchor", str(tmp_path / "anchor.pt"),
                 "--out", str(tmp_path / "guarded")]) == 0
    report = json.load(open(tmp_path / "guarded" / "report.json"))
    assert report["fold_fraction"] < 1.0 and report["forgetting_bits"] <= 1e-6
    guarded = PlasticTransformer.from_pretrained(tmp_path / "guarded")
    rest = Session.load(guarded, report["sessions_kept"][0])  # loads: tied to the new fingerprint
    with torch.no_grad():
        again, _ = guarded(ids, state=guarded.init_state(2, [p[0] for p in rest.P]))
    torch.testing.assert_close(again, with_P, rtol=1e-4, atol=1e-4)
