"""Review fixes (issue 11): consolidation and session writes are all-or-nothing, non-finite
numbers are failures, session files are checksummed whole, and the commit's argument checks.

Every test here failed on the code before the fix (the reason is given where it is not plain).
Tiny randomly initialised models: nothing here needs a model that learned anything.
"""
import importlib
import json
import math
import os

import pytest
import torch
from safetensors.torch import save as st_save

from cl_arch import PlasticConfig, PlasticTransformer, Session, SessionStore
from cl_arch.consolidate import distill, fold, load_report, merge, undo, write_report
from cl_arch.kernels.commit import reward_commit
from cl_arch.session import ReplayRecord, _sample, _tensors_digest

from test_consolidate import assert_bitwise, weights_of

# The package re-exports the functions under the modules' names: reach the modules themselves.
distill_mod = importlib.import_module("cl_arch.consolidate.distill")
merge_mod = importlib.import_module("cl_arch.consolidate.merge")

CFG = dict(d_model=32, n_layers=2, n_heads=2, head_k_dim=16, head_v_dim=16, n_attn_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    model = PlasticTransformer(PlasticConfig(**CFG)).eval()
    with torch.no_grad():
        for m in model.fast_layers():
            m.W0.normal_(0, 0.1)
    return model


def with_P(model, seed=0, scale=0.1, **kw):
    """A session with a random (finite) P in every fast layer, the readout's included."""
    s = Session(model, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    s.P = [scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in s.P]
    s.reset(persistent=False)
    return s


def played(s, episodes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for e in range(episodes):
        s.observe(torch.randint(0, 256, (6,), generator=g).tolist())
        s.generate([], max_new_tokens=2, seed=e)
        s.reward([1.0, -0.5, 0.25][e % 3])
    return s


def tokens(n, T, seed):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def same_P(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def clone_P(s):
    return [p.clone() for p in s.P]


# ---------------------------------------------------------------------- session file helpers
def split(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body):
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + body


def edit_description(data, fn):
    """The file with ``fn(description)`` applied to its JSON description, checksum left alone."""
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["cl_arch_session"])
    fn(meta)
    header["__metadata__"]["cl_arch_session"] = json.dumps(meta, sort_keys=True)
    return join(header, body)


def legacy_bytes(s):
    """What ``Session.to_bytes`` wrote before issue 11 (schema 1: the tensors alone are checksummed).

    Checked byte for byte against the old ``to_bytes`` when this test was written."""
    from cl_arch import __version__
    from dataclasses import asdict

    tensors = {f"P.{i}": p[0].detach().cpu().contiguous() for i, p in enumerate(s.P)}
    tensors["baseline"] = torch.tensor([s.baseline], dtype=torch.float64)
    meta = {
        "schema": "cl_arch.session/1", "cl_arch_version": __version__, "fingerprint": s.model.fingerprint(),
        "adapt": s.adapt, "rule": dict(s.rule), "replay_size": s.replay_size, "baseline": s.baseline,
        "episodes": s.episodes, "rewards": s.rewards, "reward_sum": s.reward_sum, "n_fast_layers": len(s.P),
        "replay": [asdict(r) for r in s.replay], "tensors_sha256": _tensors_digest(tensors),
    }
    return st_save(tensors, metadata={"cl_arch_session": json.dumps(meta, sort_keys=True, allow_nan=True)})


# ---------------------------------------------------------------------- 1. distill: NaN is a failure
def test_distill_rolls_back_diverged_training():
    # A huge lr overflows the student. Where it shows: the loss during training (3 steps), the
    # figures measured with the finite weights written into the model (1 step: the model's layers do
    # not read their activations back to check them, so the NaN surfaces in the NLL), weights that
    # overflow float16 (a half model). The old code raised in the first two cases and in the third
    # wrote the inf weights before measuring; the NaN-forgetting test below is the case where it
    # kept them.
    for dtype, budget, steps, lr, shows in ((torch.float32, 1.0, 3, 1e30, "diverged at step"),
                                            (torch.float32, None, 1, 1e30, "non-finite figures"),
                                            (torch.float16, None, 1, 1e6, "non-finite weights")):
        model = tiny().to(dtype)
        original, fp0 = weights_of(model), model.fingerprint()
        s = with_P(model)
        P0 = clone_P(s)
        rep = distill(model, s, replay=tokens(4, 12, 1), anchor=tokens(4, 12, 2), budget=budget, steps=steps, lr=lr)
        assert rep["rolled_back"] and not rep["session_reset"], (dtype, steps)
        assert shows in rep["rollback_reason"] and "finite" in rep["rollback_reason"]
        assert model.fingerprint() == fp0 and rep["fingerprint_after"] == fp0
        assert_bitwise(model, original)
        assert same_P(s.P, P0)


def test_distill_rolls_back_on_nan_forgetting_with_finite_weights(monkeypatch):
    model = tiny()
    original, fp0 = weights_of(model), model.fingerprint()
    s = with_P(model)
    P0 = clone_P(s)
    real = distill_mod.mean_nll

    def nan_once_written(m, batches, P=None, params=None):
        # NaN only for the student written into the model (finite weights, diverged figures)
        if params is None and P is None and m.fingerprint() != fp0:
            return float("nan")
        return real(m, batches, P, params)

    monkeypatch.setattr(distill_mod, "mean_nll", nan_once_written)
    rep = distill(model, s, replay=tokens(4, 12, 1), anchor=tokens(4, 12, 2), budget=1.0, steps=2, lr=1e-3)
    assert rep["rolled_back"] and "finite" in rep["rollback_reason"]
    assert_bitwise(model, original)
    assert same_P(s.P, P0)


# ---------------------------------------------------------------------- 2. session files
def test_edited_description_is_refused(tmp_path):
    model = tiny()
    s = played(Session(model, seed=0))
    data = s.to_bytes()
    Session.from_bytes(model, data)  # the untouched file loads
    edits = {
        "rule": lambda m: m["rule"].update(eta_r=5.0),
        "count": lambda m: m.update(episodes=m["episodes"] + 1),
        "replay reward": lambda m: m["replay"][0].update(reward=9.0),
        "replay ids": lambda m: m["replay"][0]["ids"].__setitem__(0, (m["replay"][0]["ids"][0] + 1) % 256),
        "adapt": lambda m: m.update(adapt=False),
    }
    for what, fn in edits.items():
        p = tmp_path / f"{what}.safetensors"
        p.write_bytes(edit_description(data, fn))
        with pytest.raises(ValueError, match="checksum") as e:
            Session.load(model, p)
        assert str(p) in str(e.value), what


def test_files_of_the_previous_format_still_load():
    model = tiny()
    s = played(Session(model, seed=0, lam=0.7, clip=3.0))
    t = Session.from_bytes(model, legacy_bytes(s))
    assert same_P(s.P, t.P) and t.rule == s.rule and t.replay == s.replay
    assert (t.baseline, t.episodes, t.rewards, t.reward_sum) == (s.baseline, s.episodes, s.rewards, s.reward_sum)


def test_missing_data_offsets_is_a_value_error(tmp_path):
    model = tiny()
    header, body = split(Session(model).to_bytes())
    del header["P.0"]["data_offsets"]
    p = tmp_path / "no_offsets.safetensors"
    p.write_bytes(join(header, body))
    with pytest.raises(ValueError, match="data_offsets") as e:  # was a bare KeyError
        Session.load(model, p)
    assert str(p) in str(e.value)


def test_replay_ids_are_checked_against_the_vocabulary():
    model = tiny()
    s = played(Session(model, seed=0))
    s.replay = s.replay + [ReplayRecord(ids=[1, 256], reward=None, advantage=None, surprise=1.0, episode=3)]
    for data in (s.to_bytes(), legacy_bytes(s)):  # a checksum cannot vouch for what was written wrong
        with pytest.raises(ValueError, match="vocabulary"):
            Session.from_bytes(model, data)


# ---------------------------------------------------------------------- 3. undo restores session files
def test_fold_undo_round_trip_restores_model_and_session_file(tmp_path):
    model = tiny()
    original = weights_of(model)
    path = tmp_path / "user.safetensors"
    played(with_P(model), 2).save(path)
    saved = path.read_bytes()

    # A saved session folded by path: the file is left as it was (it now belongs to the old weights).
    rep = fold(model, str(path), out=tmp_path / "fold.json")
    assert path.read_bytes() == saved
    info = undo(model, str(tmp_path / "fold.json"), sessions=[str(path)])  # was: fingerprint refused
    assert info["sessions_restored"] == 1
    assert_bitwise(model, original)
    assert path.read_bytes() == saved

    # The same session carried on with the folded model and saved there (P = 0, new fingerprint):
    # undo puts its P back into the file, tied to the restored weights again.
    s = Session.load(model, path, seed=0)
    rep = fold(model, s)
    assert all(int(torch.count_nonzero(p)) == 0 for p in s.P)
    s.save(path)
    assert path.read_bytes() != saved
    undo(model, rep, sessions=[str(path)])  # was: restored the loaded copy only
    assert_bitwise(model, original)
    assert path.read_bytes() == saved


def test_undo_is_all_or_nothing(tmp_path, monkeypatch):
    model = tiny()
    paths = [tmp_path / f"u{i}.safetensors" for i in range(2)]
    for i, p in enumerate(paths):
        with_P(model, seed=i).save(p)
    live = with_P(model, seed=5)
    rep = fold(model, [Session.load(model, paths[0]), Session.load(model, paths[1]), live])
    after, fp_after = weights_of(model), model.fingerprint()
    files = [p.read_bytes() for p in paths]
    live_P = clone_P(live)

    # A session file of another model: refused before anything changes.
    foreign = tmp_path / "foreign.safetensors"
    with_P(tiny(seed=3)).save(foreign)
    with pytest.raises(ValueError, match="fingerprint"):
        undo(model, rep, sessions=[str(paths[0]), str(foreign), live])

    # The second file cannot be written: the first one, the model and the live session stay.
    real = os.replace

    def fail_second(src, dst):
        if os.fspath(dst) == str(paths[1]):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        undo(model, rep, sessions=[str(paths[0]), str(paths[1]), live])
    monkeypatch.setattr(os, "replace", real)
    assert model.fingerprint() == fp_after
    assert_bitwise(model, after)
    assert [p.read_bytes() for p in paths] == files
    assert same_P(live.P, live_P)
    assert sorted(os.listdir(tmp_path)) == ["foreign.safetensors", "u0.safetensors", "u1.safetensors"]


# ---------------------------------------------------------------------- 4. merge / distill / fold
def test_merge_and_distill_restore_the_training_flag_after_an_error(monkeypatch):
    model = tiny()
    original = weights_of(model)
    sessions = [with_P(model, seed=0), with_P(model, seed=1)]
    P0 = [clone_P(s) for s in sessions]

    def boom(*a, **k):
        raise RuntimeError("boom")

    model.train()
    monkeypatch.setattr(merge_mod, "mean_nll", boom)
    with pytest.raises(RuntimeError, match="boom"):
        merge(model, sessions, probes=[tokens(2, 8, 0), tokens(2, 8, 1)])
    assert model.training  # was left in eval mode
    monkeypatch.setattr(distill_mod, "_kl", boom)
    with pytest.raises(RuntimeError, match="boom"):
        distill(model, sessions[0], replay=tokens(2, 8, 0), steps=2)
    assert model.training
    assert_bitwise(model, original)
    assert all(same_P(s.P, p) for s, p in zip(sessions, P0))


def test_merge_refuses_non_finite_deltas_without_writing_any_layer():
    model = tiny()
    original = weights_of(model)
    sessions = [with_P(model, seed=0), with_P(model, seed=1)]
    for s in sessions:  # layer 0's delta stays finite, the readout's overflows float32
        s.P[-1][0, 0, 0, 0] = 1e5
    P0 = [clone_P(s) for s in sessions]
    with pytest.raises(ValueError, match="non-finite"):
        merge(model, sessions, scale=1e35)  # the old code wrote inf into W0
    assert_bitwise(model, original)
    assert all(same_P(s.P, p) for s, p in zip(sessions, P0))


def test_fold_refuses_a_low_precision_overflow():
    model = tiny().half()
    original = weights_of(model)
    P = [torch.zeros(m.W0.shape) for m in model.fast_layers()]
    P[-1][1, 2, 3] = 1e5  # finite in float32, inf in float16
    P0 = [p.clone() for p in P]
    with pytest.raises(ValueError, match="float16"):
        fold(model, P)  # the old code stored inf
    assert_bitwise(model, original)
    assert same_P(P, P0)


# ---------------------------------------------------------------------- transactions
def test_consolidation_is_undone_when_its_report_cannot_be_written(tmp_path):
    model = tiny()
    original = weights_of(model)
    (tmp_path / "blocker").write_text("a file where the report folder should be")
    out = tmp_path / "blocker" / "report.json"
    sessions = [with_P(model, seed=0), with_P(model, seed=1)]
    for s in sessions:
        s.observe([1, 2, 3])  # an episode in progress: a reset would discard it
    P0 = [clone_P(s) for s in sessions]
    calls = {
        "fold": lambda: fold(model, sessions, out=out),
        "merge": lambda: merge(model, sessions, out=out),
        "distill": lambda: distill(model, sessions[0], replay=tokens(2, 8, 0), steps=1, out=out),
    }
    for name, call in calls.items():
        with pytest.raises(OSError):
            call()
        assert_bitwise(model, original)  # the old code kept the new weights and reset the sessions
        assert all(same_P(s.P, p) for s, p in zip(sessions, P0)), name
        assert all(s.episode_length == 3 for s in sessions), name


def test_write_report_keeps_the_old_pair_when_the_new_one_fails(tmp_path):
    model = tiny()
    rep = fold(model, with_P(model), reset=False)
    path = tmp_path / "r.json"
    write_report(rep, path)
    old = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    undo(model, rep)
    rep2 = fold(model, with_P(model, seed=1), reset=False)
    rep2["not_json"] = object()  # the JSON fails after the tensors were written
    with pytest.raises(TypeError):
        write_report(rep2, path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == old  # undo file not replaced
    assert load_report(path)["fingerprint_after"] == rep["fingerprint_after"]


# ---------------------------------------------------------------------- 5. reward_commit
def test_reward_commit_gamma_rule_and_error_paths():
    g = torch.Generator().manual_seed(0)
    P, E = torch.randn(2, 2, 4, 3, generator=g), torch.randn(2, 2, 4, 3, generator=g)
    r, b = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.5])
    # One rule for floats and tensors: gamma in (0, 1].
    for bad in (0.0, 0, -0.1, 1.5, float("nan")):
        for gamma in (bad, torch.tensor([bad, 0.9]), torch.tensor(bad)):
            with pytest.raises(ValueError, match="^gamma "):
                reward_commit(P, E, r, b, gamma=gamma)  # the old code took a tensor holding 0
    a = reward_commit(P, E, r, b, gamma=1.0)
    t = reward_commit(P, E, r, b, gamma=torch.ones(2))
    assert torch.equal(a[0], t[0]) and torch.equal(a[1], t[1])

    nan_E = E.clone()
    nan_E[1, 0, 2, 2] = float("nan")
    cases = {
        "P": dict(P=P[0, 0]),
        "E": dict(E=E[:, :, :3]),
        "r": dict(r=torch.ones(3)),
        "b": dict(b=torch.zeros(2, 1)),
        "gamma": dict(gamma=torch.full((3,), 0.9)),
        "eta_r": dict(eta_r=torch.ones(2, 2)),
    }
    for name, kw in cases.items():
        args = dict(P=P, E=E, r=r, b=b) | kw
        with pytest.raises(ValueError, match=f"^{name} "):
            reward_commit(args.pop("P"), args.pop("E"), **args)
    for kw, name in ((dict(r=float("nan")), "r"), (dict(r=torch.tensor([1.0, float("inf")])), "r"),
                     (dict(E=nan_E), "E"), (dict(clip=0.0), "clip"), (dict(clip=-1.0), "clip"),
                     (dict(clip=float("nan")), "clip"), (dict(eta_s=float("nan")), "eta_s"),
                     (dict(rho=1.5), "rho")):
        args = dict(P=P, E=E, r=r, b=b) | kw
        P_in = args.pop("P").clone()
        keep = P_in.clone()
        with pytest.raises(ValueError, match=f"^{name} "):
            reward_commit(P_in, args.pop("E"), inplace=True, **args)
        assert torch.equal(P_in, keep)  # nothing written when it raises


# ---------------------------------------------------------------------- 6. SessionStore.open
def test_store_open_applies_adapt_and_replay_size(tmp_path):
    model = tiny()
    store = SessionStore(tmp_path)
    s = played(store.open(model, "alice", replay_size=8), 4)
    store.save(s, "alice")
    kept = sorted(s.replay, key=lambda r: (r.score, r.episode))[-2:]

    t = store.open(model, "alice", adapt=False, replay_size=2)  # the old code dropped both
    assert t.adapt is False and t.replay_size == 2
    assert sorted(t.replay, key=lambda r: r.episode) == sorted(kept, key=lambda r: r.episode)
    assert same_P(t.P, s.P)  # P is kept, only not used while adapt is off
    x = tokens(1, 10, 3)
    with torch.no_grad():
        frozen, _ = model(x)
    nll = t.observe(x[0])
    ref = -torch.log_softmax(frozen[0].double(), -1)[:-1].gather(1, x[0, 1:, None]).squeeze(1)
    assert torch.equal(nll[1:], ref)  # adapt=False is the frozen model
    u = store.open(model, "alice")  # nothing given: the stored settings
    assert u.adapt is True and u.replay_size == 8 and len(u.replay) == 4
    with pytest.raises(ValueError, match="replay_size"):
        store.open(model, "alice", replay_size=-1)


# ---------------------------------------------------------------------- 8. non-finite logits
def test_non_finite_logits_raise_before_the_session_changes():
    model = tiny()
    s = Session(model, seed=0)
    other = Session(model, seed=1)
    for x in (s, other):
        x.observe([1, 2, 3])
    with torch.no_grad():
        model.readout.read_scale.fill_(float("nan"))  # logits NaN, every layer's inputs finite

    def state_of(x):
        snap = x.snapshot()._data
        return snap["episode_ids"], snap["episode_nll"], snap["next_logits"], snap["rng"], \
            [t for layer in snap["state"].layers for t in vars(layer).values() if t is not None]

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))

    before = state_of(s)
    calls = [lambda: s.observe([4, 5]),
             lambda: s.generate([4], max_new_tokens=2),
             lambda: s.generate([], max_new_tokens=3),  # the old code returned [255, 255, 255]
             lambda: Session.batch_generate([s, other], [[], []], max_new_tokens=2)]
    for call in calls:
        with pytest.raises(ValueError, match="non-finite logits"):
            call()
        assert same(state_of(s), before)
    with pytest.raises(ValueError, match="non-finite logits"):
        _sample(torch.full((256,), float("nan")), 1.0, None, None, None, torch.Generator())
    with torch.no_grad():
        model.readout.read_scale.fill_(1.0)
    assert len(s.generate([4], max_new_tokens=2)) == 2 and s.episode_length == 6


# ---------------------------------------------------------------------- 7. plastic_rule devices
@pytest.mark.parametrize("name", ["beta", "g", "initial_state", "initial_trace", "resting_state"])
def test_plastic_rule_names_an_input_on_another_device(name):
    """Every tensor input must share q's device; one on another device (here 'meta', which needs no
    second accelerator) is named before any backend runs, instead of failing deep in a kernel."""
    from cl_arch.kernels.plastic import plastic_rule
    B, T, H, K, V = 1, 5, 2, 4, 4
    x = dict(q=torch.randn(B, T, H, K), k=torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1),
             v=torch.randn(B, T, H, V), beta=torch.rand(B, T, H), g=-torch.rand(B, T, H),
             initial_state=torch.zeros(B, H, K, V), initial_trace=torch.zeros(B, H, K, V),
             resting_state=torch.zeros(H, K, V))
    x[name] = torch.empty(x[name].shape, device="meta")
    with pytest.raises(ValueError, match=f"{name} is on meta"):
        plastic_rule(**x, lam=0.5)


def test_delta_rule_refuses_keys_that_make_it_diverge():
    """beta |k|^2 > 2 makes the delta step expand the state; it is named instead of returning inf. The
    Hebbian rule has no such bound and still runs; keys at the bound run."""
    from cl_arch.kernels.plastic import plastic_rule
    B, T, H, K, V = 1, 7, 2, 4, 4
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    x = dict(q=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V), beta=torch.ones(B, T, H))
    o, S, _ = plastic_rule(k=k * 2 ** 0.5, **x)  # beta |k|^2 = 2: on the bound, allowed
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    for scale in (1.5, 1e30):
        with pytest.raises(ValueError, match=r"k is too long for the delta rule"):
            plastic_rule(k=k * scale, **x)
    o, S, _ = plastic_rule(k=k * 1.5, rule="hebb", **x)
    assert torch.isfinite(o).all()
