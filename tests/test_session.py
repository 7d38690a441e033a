"""Session: generation with adaptation on, commits, guard, snapshots, batching, persistence,
bad input, crash safety, the `cl-arch adapt` program, boundedness and the Sutton test."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cl_arch import FastLayerState, PlasticConfig, PlasticTransformer, Session, SessionStore
from cl_arch.kernels.commit import reward_commit
from cl_arch.train.tasks import PreferenceGame

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, dtype=torch.float32, **kw):
    """A small untrained model (fast + attention) with non-zero W0, for mechanics tests."""
    base = dict(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, n_attn_heads=2,
                mlp_ratio=2.0, chunk_size=8, recurrent_threshold=4)
    base.update(kw)
    torch.manual_seed(seed)
    model = PlasticTransformer(PlasticConfig(**base)).to(dtype)
    with torch.no_grad():
        for layer in model.fast_layers():
            layer.W0.normal_(0, 0.1)
    return model.eval()


def ids(n, seed=0, lo=0, hi=256):
    return torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def played(session, n_episodes=3, seed=0):
    """Give a session some history: episodes of random tokens with rewards."""
    for e in range(n_episodes):
        session.observe(ids(6, seed=seed * 100 + e))
        session.generate([], max_new_tokens=3, seed=e)
        session.reward([1.0, -0.5, 0.25][e % 3])
    return session


def assert_same_session(a, b):
    for p, q in zip(a.P, b.P):
        assert torch.equal(p, q)
    assert (a.baseline, a.episodes, a.rewards, a.reward_sum) == (b.baseline, b.episodes, b.rewards, b.reward_sum)
    assert [r.ids for r in a.replay] == [r.ids for r in b.replay]


# ---------------------------------------------------------------------- generation mechanics
def test_adapt_off_is_the_frozen_model():
    model = tiny_model()
    s = Session(model, adapt=False)
    x = ids(20, seed=1)
    for episode in range(3):
        nll = s.observe(x)
        logits, _ = model(torch.tensor([x]))
        ref = -torch.log_softmax(logits[0].double(), -1)[:-1].gather(1, torch.tensor(x[1:])[:, None]).squeeze(1)
        assert math.isnan(nll[0]) and torch.equal(nll[1:], ref)
        s.reward(1.0)
        assert all(torch.count_nonzero(p) == 0 for p in s.P)
    assert s.episodes == 3 and s.baseline > 0


def test_generate_writes_every_token_including_the_last():
    model = tiny_model(dtype=torch.float64)
    s = Session(model, seed=0)
    prompt = ids(9, seed=2)
    out = s.generate(prompt, max_new_tokens=6, temperature=0.7, top_k=50, top_p=0.9)
    assert len(out) == 6 and all(0 <= t < 256 for t in out)
    _, ref = model(torch.tensor([prompt + out]), lam=None)
    for mine, theirs in zip(s.state.layers, ref.layers):
        if isinstance(mine, FastLayerState):
            torch.testing.assert_close(mine.S, theirs.S, rtol=0, atol=1e-10)
            torch.testing.assert_close(mine.E, theirs.E, rtol=0, atol=1e-10)
    assert s.episode_length == 15 and s.state.position == 15


def test_stream_equals_list_and_seed_reproduces():
    model = tiny_model()
    a, b = Session(model), Session(model)
    listed = a.generate([1, 2, 3], max_new_tokens=5, seed=7)
    it = b.generate([1, 2, 3], max_new_tokens=5, seed=7, stream=True)
    assert not isinstance(it, list)
    assert list(it) == listed
    assert Session(model).generate([1, 2, 3], max_new_tokens=5, temperature=0) == \
        Session(model).generate([1, 2, 3], max_new_tokens=5, temperature=0)
    allowed = [40, 41, 42]
    assert set(Session(model).generate([5], max_new_tokens=20, allowed_tokens=allowed, seed=1)) <= set(allowed)


def test_reward_is_the_three_factor_commit():
    model = tiny_model(dtype=torch.float64)
    s = Session(model, lam=0.5, gamma=0.9, eta_s=0.1, eta_r=2.0, clip=0.05, rho=0.25)
    played(s, 2)
    P0, b0 = [p.clone() for p in s.P], s.baseline
    s.observe(ids(12, seed=5))
    E = [st.E.clone() for st in s.state.layers if isinstance(st, FastLayerState)]
    assert s.reward(0.75) is True
    for p_new, p_old, e in zip(s.P, P0, E):
        ref, b_ref = reward_commit(p_old, e, 0.75, b0, gamma=0.9, eta_s=0.1, eta_r=2.0, clip=0.05, rho=0.25)
        torch.testing.assert_close(p_new, ref, rtol=0, atol=0)
    assert s.baseline == pytest.approx(b0 + 0.25 * (0.75 - b0))
    # The new episode starts from W0 + P with an empty trace and caches.
    assert s.episode_length == 0 and s.state.position == 0
    assert all(st.S is None and st.E is None for st in s.state.layers if isinstance(st, FastLayerState))
    # end_episode: retention only (eta_s), baseline unchanged.
    s.observe(ids(4, seed=6))
    E = [st.E.clone() for st in s.state.layers if isinstance(st, FastLayerState)]
    P1, b1 = [p.clone() for p in s.P], s.baseline
    assert s.end_episode() is True and s.end_episode() is False
    for p_new, p_old, e in zip(s.P, P1, E):
        ref, _ = reward_commit(p_old, e, None, b1, gamma=0.9, eta_s=0.1, eta_r=2.0, clip=0.05, rho=0.25)
        torch.testing.assert_close(p_new, ref, rtol=0, atol=0)
    assert s.baseline == b1 and s.episodes == 4 and s.rewards == 3


def test_guard_veto_restores_exactly_and_probes_leave_no_trace():
    model = tiny_model()
    s = played(Session(model, seed=3), 3)
    s.observe(ids(8, seed=9))
    before = s.snapshot()
    calls = []

    def veto(sess):
        calls.append(sess.episodes)
        sess.generate([7, 8], max_new_tokens=4)  # a probe that writes into the new episode
        return False

    assert s.reward(1.0, guard=veto) is False
    assert calls == [4]  # ran after the commit
    after_veto = s.snapshot()
    for p, q in zip(after_veto._data["P"], before._data["P"]):
        assert torch.equal(p, q)
    for k in ("baseline", "episodes", "rewards", "reward_sum"):
        assert after_veto._data[k] == before._data[k]
    assert after_veto._data["episode_ids"] == []  # the vetoed episode is discarded

    # An accepting guard that probes gives the same result as no guard.
    a, b = played(Session(model, seed=3), 3), played(Session(model, seed=3), 3)
    for x in (a, b):
        x.observe(ids(8, seed=9))
    assert a.reward(1.0, guard=lambda sess: len(sess.generate([1], max_new_tokens=3)) == 3) is True
    b.reward(1.0)
    assert_same_session(a, b)
    assert a.episode_length == 0

    # A guard that raises restores the session as it was before reward() and re-raises.
    a.observe(ids(5, seed=11))
    snap = a.snapshot()

    def boom(sess):
        raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError):
        a.reward(1.0, guard=boom)
    assert a.episode_length == 5
    for p, q in zip(a.P, snap._data["P"]):
        assert torch.equal(p, q)


def test_snapshot_rollback():
    model = tiny_model()
    s = played(Session(model, seed=1), 2)
    s.observe(ids(5, seed=3))
    snap = s.snapshot()
    out1 = s.generate([], max_new_tokens=4)
    s.reward(1.0)
    s.rollback(snap)
    assert s.episode_length == 5 and s.episodes == 2
    assert s.generate([], max_new_tokens=4) == out1  # RNG restored too
    with pytest.raises(ValueError, match="not taken from this session"):
        Session(model).rollback(snap)
    s.reset()
    assert s.episodes == 0 and s.baseline == 0 and all(torch.count_nonzero(p) == 0 for p in s.P)


def test_replay_buffer_is_bounded_and_keeps_informative_episodes():
    model = tiny_model()
    s = Session(model, replay_size=4, seed=0)
    for e in range(12):
        s.observe(ids(5, seed=e))
        s.reward(5.0 if e == 1 else 0.0)  # episode 1 has by far the largest advantage
    assert len(s.replay) == 4
    assert 1 in [r.episode for r in s.replay]
    rec = s.replay[0]
    assert rec["ids"] == rec.ids and len(rec.ids) == 5 and math.isfinite(rec.surprise)


# ---------------------------------------------------------------------- isolation and batching
def test_two_sessions_never_affect_each_other():
    model = tiny_model()
    script = [(ids(7, seed=1), 1.0), (ids(5, seed=2), -1.0), (ids(9, seed=3), 0.5)]
    other = [(ids(6, seed=4), -1.0), (ids(8, seed=5), 1.0), (ids(3, seed=6), 1.0)]

    def run(sess, steps, partner=None, partner_steps=None):
        outs = []
        for i, (x, r) in enumerate(steps):
            outs.append(sess.generate(x, max_new_tokens=4))
            if partner is not None:  # interleave the other user's whole episode
                partner.generate(partner_steps[i][0], max_new_tokens=4)
                partner.reward(partner_steps[i][1])
            outs.append(sess.observe([3, 4]).tolist())
            sess.reward(r)
        return outs, [p.clone() for p in sess.P]

    alone, P_alone = run(Session(model, seed=0), script)
    mixed, P_mixed = run(Session(model, seed=0), script, Session(model, seed=1), other)
    assert json.dumps(alone) == json.dumps(mixed)  # bitwise, NaNs included
    for p, q in zip(P_alone, P_mixed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("layer_types", [["fast", "fast"], ["fast", "attn"]])
def test_batched_decode_equals_one_by_one(layer_types):
    model = tiny_model(dtype=torch.float64, layer_types=layer_types)
    prompts = [ids(5, seed=1), ids(9, seed=2), ids(5, seed=3)]

    def make():
        return [played(Session(model, seed=10 + i), 2, seed=i) for i in range(3)]

    solo, batch = make(), make()
    ref = [s.generate(p, max_new_tokens=6, top_k=40) for s, p in zip(solo, prompts)]
    got = Session.batch_generate(batch, prompts, max_new_tokens=6, top_k=40)
    assert got == ref
    for a, b in zip(solo, batch):
        assert a._episode_ids == b._episode_ids
        torch.testing.assert_close(a._next_logits, b._next_logits, rtol=0, atol=1e-6)
        for sa, sb in zip(a.state.layers, b.state.layers):
            for name in ("S", "E", "k", "v"):
                if getattr(sa, name, None) is not None:
                    torch.testing.assert_close(getattr(sa, name), getattr(sb, name), rtol=0, atol=1e-6)
        a.reward(1.0)
        b.reward(1.0)
        for p, q in zip(a.P, b.P):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="twice"):
        Session.batch_generate([batch[0], batch[0]], prompts[:2])


# ---------------------------------------------------------------------- boundedness
def _fast_E(session):
    return [st for st in session.state.layers if isinstance(st, FastLayerState)]


def test_negative_reward_never_grows_P_along_k_beyond_the_clip():
    """The delta-rule trace holds ``+beta k k^T P``-like terms; a negative advantage times such a
    trace would grow P along k without bound. With the per-head clip the growth along any k per
    commit is at most ``|eta_r (r - b)| * clip``, and repeated commits stay under
    ``|coeff| * clip / (1 - gamma)``."""
    model = tiny_model(dtype=torch.float64, layer_types=["fast", "fast"])
    clip, gamma, eta_r = 0.5, 0.9, 4.0
    s = Session(model, lam=1.0, gamma=gamma, eta_r=eta_r, eta_s=0.0, clip=clip, rho=0.0)
    g = torch.Generator().manual_seed(0)
    for layer in range(len(s.P)):
        s.P[layer] = torch.randn(s.P[layer].shape, generator=g, dtype=torch.float64)
    worst_growth = 0.0
    for step in range(50):
        s.observe([5, 6, 7])
        # one unit key per memory ([H, K, 1]; the readout memory's K is d_model)
        ks = [torch.nn.functional.normalize(torch.randn(P.shape[1], P.shape[2], 1, generator=g,
                                                        dtype=torch.float64), dim=1) for P in s.P]
        for st, P, k in zip(_fast_E(s), s.P, ks):
            # Adversarial trace: a huge write along k in the direction that grows k^T P.
            st.E = 1e6 * (k @ k.transpose(1, 2) @ P[0]).unsqueeze(0)
        along_before = [torch.linalg.vector_norm(k.transpose(1, 2) @ P[0], dim=(-2, -1)) for P, k in zip(s.P, ks)]
        s.reward(-1.0)  # baseline 0 (rho = 0): advantage -1
        for P, before, k in zip(s.P, along_before, ks):
            along_after = torch.linalg.vector_norm(k.transpose(1, 2) @ P[0], dim=(-2, -1))
            growth = along_after - gamma * before
            assert bool((growth <= eta_r * clip + 1e-9).all()), (step, growth)
            worst_growth = max(worst_growth, float(growth.max()))
            head_norm = torch.linalg.vector_norm(P[0], dim=(-2, -1))
            assert bool(torch.isfinite(head_norm).all())
    bound = eta_r * clip / (1 - gamma)
    for P in s.P:  # after 50 commits the random start has decayed (0.9**50 ~ 5e-3)
        assert float(torch.linalg.vector_norm(P[0], dim=(-2, -1)).max()) <= bound + 0.1
    assert worst_growth > 0.5 * eta_r * clip  # the adversarial trace did push as hard as allowed


def test_ten_thousand_micro_updates_stay_bounded():
    """1e4 token writes in 500 episodes with random tokens, random modulation and rewards in
    [-1, 1]: no NaN/inf, P per head under |coeff|max * clip / (1 - gamma), S bounded."""
    model = tiny_model(layer_types=["fast", "fast"])
    clip, gamma, eta_s, eta_r = 1.0, 0.95, 0.2, 2.0
    s = Session(model, lam=0.9, gamma=gamma, eta_s=eta_s, eta_r=eta_r, clip=clip, rho=0.1, replay_size=8)
    g = torch.Generator().manual_seed(0)
    p_bound = (abs(eta_s) + abs(eta_r) * 2.0) * clip / (1 - gamma)  # |r - b| <= 2 for r, b in [-1, 1]
    w0 = max(float(torch.linalg.vector_norm(m.W0.detach(), dim=(-2, -1)).max()) for m in model.fast_layers())
    max_S = max_P = 0.0
    tokens = 0
    while tokens < 10_000:
        x = torch.randint(0, 256, (20,), generator=g)
        s.observe(x, modulation=torch.rand(20, generator=g))
        tokens += 20
        for st in _fast_E(s):
            assert bool(torch.isfinite(st.S).all() and torch.isfinite(st.E).all())
            max_S = max(max_S, float(torch.linalg.vector_norm(st.S, dim=(-2, -1)).max()))
        s.reward(float(torch.rand((), generator=g)) * 2 - 1)
        for P in s.P:
            assert bool(torch.isfinite(P).all())
            max_P = max(max_P, float(torch.linalg.vector_norm(P, dim=(-2, -1)).max()))
    assert max_P <= p_bound
    # The memory relaxes toward M = W0 + P (|M| <= w0 + max_P) and a delta write replaces the read along
    # k by a convex mix of it and a value, so S stays near M: over seeds 0-4 max|S| - w0 was 0.3-0.65
    # (max_P 4.8-5.1). No tight analytic bound exists for non-orthogonal keys (the energy can grow by
    # beta |v|^2 per write while the read is shorter than the value); 10 is the margin, which a
    # geometric divergence crosses within a few steps. (The old bound, 10 (w0 + p_bound + 10), was 1030.)
    assert max_S <= w0 + max_P + 10
    assert s.episodes == 500 and math.isfinite(s.baseline) and -1 <= s.baseline <= 1


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("r", [float("nan"), float("inf"), -float("inf"), "1.0", None, True, [1.0],
                               torch.tensor([1.0, 2.0]), complex(1, 0), 3.4028235677973366e+38, -1e7],
                         ids=lambda r: repr(r)[:20])
def test_bad_rewards_raise_and_change_nothing(r):
    s = played(Session(tiny_model(), seed=0), 2)
    s.observe([1, 2, 3])
    snap = s.snapshot()
    with pytest.raises(ValueError, match="reward"):
        s.reward(r)
    assert_same_session(s, _restored(s, snap))
    assert s.episode_length == 3


def test_largest_allowed_reward_keeps_P_finite():
    s = Session(tiny_model(), seed=0)
    for r in (1e6, -1e6):
        s.observe([1, 2, 3])
        s.reward(r)
    assert all(torch.isfinite(p).all() for p in s.P) and math.isfinite(s.baseline)


def _restored(s, snap):
    """A session object holding ``snap``'s state (to compare with ``s``)."""
    other = Session(s.model)
    other._id = s._id
    other.rollback(snap)
    return other


def test_reward_without_episode_raises():
    s = played(Session(tiny_model(), seed=0), 1)
    snap = s.snapshot()
    with pytest.raises(ValueError, match="no episode"):
        s.reward(1.0)
    with pytest.raises(ValueError, match="no episode"):
        Session(tiny_model()).reward(0.0)
    assert_same_session(s, _restored(s, snap))


@pytest.mark.parametrize("bad,match", [
    ([1, 256], "out of vocabulary"), ([-1], "out of vocabulary"), (torch.tensor([1.0, 2.0]), "dtype"),
    (torch.tensor([True]), "dtype"), ("hello", "str"), ([1.5], "integers"), ([], "empty"),
    (torch.zeros(2, 3, dtype=torch.long), "1-D"), (object(), "list of ints")])
def test_bad_ids_raise_and_change_nothing(bad, match):
    s = Session(tiny_model(), seed=0)
    s.observe([1, 2])
    snap = s.snapshot()
    with pytest.raises(ValueError, match=match):
        s.observe(bad)
    with pytest.raises(ValueError):
        s.generate(bad if not isinstance(bad, list) or bad else [300], max_new_tokens=2)
    after = s.snapshot()
    assert after._data["episode_ids"] == snap._data["episode_ids"] == [1, 2]
    assert torch.equal(after._data["next_logits"], snap._data["next_logits"])


def test_bad_settings_raise():
    model = tiny_model()
    for kw in ({"gamma": 0.0}, {"lam": 1.5}, {"clip": -1.0}, {"rho": 2.0}, {"eta_r": float("nan")},
               {"bogus": 1.0}):
        with pytest.raises(ValueError):
            Session(model, **kw)
    s = Session(model)
    with pytest.raises(ValueError, match="modulation"):
        s.observe([1, 2], modulation=[0.5, 1.5])
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.generate([1], max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        s.generate([1], temperature=float("nan"))
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        s.generate([], max_new_tokens=1)


# ---------------------------------------------------------------------- persistence
def test_save_load_roundtrip(tmp_path):
    model = tiny_model()
    s = played(Session(model, seed=0, lam=0.7, clip=3.0), 3)
    path = tmp_path / "user.safetensors"
    s.save(path)
    t = Session.load(model, path, seed=0)
    assert_same_session(s, t)
    assert t.rule == s.rule and t.adapt == s.adapt
    assert [r.surprise for r in t.replay] == [r.surprise for r in s.replay]
    s.reset(persistent=False)
    s._rng.manual_seed(5)
    t._rng.manual_seed(5)
    assert s.generate([1, 2], max_new_tokens=5) == t.generate([1, 2], max_new_tokens=5)


def test_load_refuses_foreign_corrupt_truncated_and_unknown(tmp_path):
    model = tiny_model()
    s = played(Session(model, seed=0), 2)
    good = tmp_path / "good.safetensors"
    s.save(good)
    data = good.read_bytes()

    def check(name, payload, match, m=model):
        p = tmp_path / name
        p.write_bytes(payload)
        with pytest.raises(ValueError, match=match):
            Session.load(m, p)
        assert p.read_bytes() == payload  # loading never touches the file

    with pytest.raises(ValueError, match="another model"):
        Session.load(tiny_model(seed=1), good)
    assert good.read_bytes() == data
    check("trunc.safetensors", data[: len(data) - 7], "truncated")
    check("trunc2.safetensors", data[:5], "truncated")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # inside the tensor data: only the checksum can tell
    check("flip.safetensors", bytes(flipped), "corrupt")
    check("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "corrupt")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["cl_arch_session"])
    meta["schema"] = "cl_arch.session/99"
    header["__metadata__"]["cl_arch_session"] = json.dumps(meta)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    check("schema.safetensors", len(hb).to_bytes(8, "little") + hb + data[8 + n:], "unknown schema")
    with pytest.raises(FileNotFoundError):
        Session.load(model, tmp_path / "missing.safetensors")


def test_session_store_ids(tmp_path):
    model = tiny_model()
    store = SessionStore(tmp_path / "store")
    for bad in ["", "..", "../x", "a/b", "a\\b", "/etc/passwd", ".hidden", "a..b", "x" * 200, "a b", None, 3]:
        with pytest.raises(ValueError, match="invalid session id"):
            store.path(bad)
    s = store.open(model, "alice")
    assert s.episodes == 0 and not store.exists("alice")
    played(s, 2)
    path = store.save(s, "alice")
    assert os.path.dirname(path) == str((tmp_path / "store").resolve())
    assert store.ids() == ["alice"]
    t = store.open(model, "alice")
    assert_same_session(s, t)
    assert store.delete("alice") and store.ids() == []
    assert sorted(os.listdir(tmp_path)) == ["store"]  # nothing escaped the folder


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import cl_arch.session.files as cs
    from cl_arch import PlasticTransformer, Session
    model = PlasticTransformer.from_pretrained(sys.argv[1])
    s = Session.load(model, sys.argv[2])
    s.observe([1, 2, 3]); s.reward(1.0)
    cs._WRITE_CHUNK = 64
    def slow(f, chunk):
        print("WRITING", flush=True)
        time.sleep(0.05)
        f.write(chunk)
    cs._write_chunk = slow
    s.save(sys.argv[2])
    print("DONE", flush=True)
""")


def test_killed_save_leaves_old_or_new_file_whole(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    path = tmp_path / "state.safetensors"
    old = played(Session(model, seed=0), 2)
    old.save(path)
    old_bytes = path.read_bytes()
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "model"), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
        time.sleep(0.2)  # a few chunks in, far from done (the file is > 64 * 20 bytes)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == old_bytes  # the old file, whole
    assert_same_session(Session.load(model, path), old)
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert leftovers  # the half-written temp file exists: the kill really came mid-write

    # Uninterrupted, the same program replaces the file with the new state.
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert "DONE" in done.stdout, done.stderr
    new = Session.load(model, path)
    assert new.episodes == old.episodes + 1


# ---------------------------------------------------------------------- terminal program
def test_cli_adapt_reads_prompts_and_rewards_and_saves(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    state = tmp_path / "me.safetensors"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "cl_arch.scripts.cli", "adapt", "--model", str(tmp_path / "model"),
           "--session", str(state), "--max-new-tokens", "5", "--seed", "0"]
    stdin = "hello\n/reward +\nsecond prompt\n/reward -\n/reward +\nthird\n/reward 0.25\n/reward nan\nfourth\n"
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr  # two lines were refused: the run says so in its status
    assert res.stdout.count("\n") >= 4  # four completions, one print each
    assert "no episode" in res.stderr and "finite" in res.stderr  # the bad lines were reported
    s = Session.load(model, state)
    assert s.episodes == 3 and s.rewards == 3 and s.reward_sum == pytest.approx(0.25)
    assert any(torch.count_nonzero(p) > 0 for p in s.P)
    res = subprocess.run(cmd, input="again\n/reward +\n", capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "loaded" in res.stderr
    assert Session.load(model, state).episodes == 4


# ---------------------------------------------------------------------- the Sutton test
# Every game episode ends with a closing token: a key (the last of train.tasks' 16) that no cue
# uses, so it tells nothing about the preference. It is there because recall models store a pair
# in one of two places and the fixture cannot choose which: at the value token, or one token
# later, when the next key arrives (the conv over the last 4 tokens still sees the pair). Both
# recall equally well inside an episode (recall_accuracy cannot tell them apart) and training
# never shows which one a model uses (its episodes stop at a key: the last value is only a
# target), but a game episode [BOS, cue, answer] ends on the value: a model of the second kind
# then commits a trace that holds no cue -> answer (a +1 commit left p(answer) where it was, to
# 0.005; 20x larger it moved answers at random) and its games stay at chance whatever the rule
# (fixture seed 1000 on a 2-core machine: reward 0.110 -> 0.110, reset 0.105). Of the five models
# of the fixture's recipe that passed its accuracy bar there (seeds 1000, 2000, 3000, 8000, 9000),
# only seed 2000 recalled the pair an episode ended on from the next episode (carried state: 1.00;
# the others 0.06-0.09, chance); with one more key token after the pair all of them did (0.91-1.00).
SUTTON_CLOSE = 47  # train.tasks.key_tokens(16)[-1]; the games use the first 8 keys as cues


def play_preference_game(model, adapt, seeds, n_episodes, rule, n_cues=8, n_answers=8, close=SUTTON_CLOSE):
    """Reward-only hidden-preference game for several seeds at once (batched decoding); every
    episode is ``[BOS, cue, answer, close]`` (``close=None``: no closing token).

    Returns rewards ``[len(seeds), n_episodes]`` and the per-head norms |E_T| of the trace that
    each episode commits, ``[len(seeds), n_episodes, n_fast_layers, H]``."""
    games = [PreferenceGame(n_cues, n_answers, seed=s) for s in seeds]
    assert close is None or all(close not in g.cues + g.answers for g in games)
    sessions = [Session(model, adapt=adapt, seed=1000 + s, **rule) for s in seeds]
    cues = [g.cue_sequence(n_episodes, seed=2000 + s) for g, s in zip(games, seeds)]
    R = torch.zeros(len(seeds), n_episodes)
    norms = []
    for e in range(n_episodes):
        outs = Session.batch_generate(sessions, [g.prompt(c[e]) for g, c in zip(games, cues)],
                                      max_new_tokens=1, allowed_tokens=games[0].answers)
        if close is not None:
            for s in sessions:
                s.observe([close])
        norms.append(torch.stack([torch.stack([torch.linalg.vector_norm(st.E[0], dim=(-2, -1))
                                               for st in _fast_E(s)]) for s in sessions]))
        for i, (s, g, c, o) in enumerate(zip(sessions, games, cues, outs)):
            R[i, e] = g.reward(c[e], o[0])
            s.reward(R[i, e].item())
    return R, torch.stack(norms, 1)


SUTTON_RULE = dict(lam=0.5, gamma=0.98, eta_s=0.0, eta_r=1.0, rho=0.1)  # clip: sutton_clip
SUTTON_CLIP_QUANTILE = 0.9


def sutton_clip(model, seeds):
    """The commit clip, set from the model's own trace scale: the 0.9 quantile of the per-head
    trace norms of every seed's first episode (P = 0 then, so these do not depend on the clip).
    Trace norms differ 5x between recall models of one recipe (layer-1 median 1.1 to 6.9), so a
    constant clip sits far above one model's traces and throttles another's."""
    _, norms = play_preference_game(model, True, seeds, 1, dict(SUTTON_RULE, clip=1.0))
    return float(norms.flatten().quantile(SUTTON_CLIP_QUANTILE))


def sutton_figures(model, seeds, n, **rule):
    """Play the game with adaptation on and off (state reset); returns the reward over the first and
    last quarter of episodes, the reset control's last quarter, the clip and the share of head
    commits it bound. ``rule`` overrides SUTTON_RULE (e.g. a flipped ``eta_r``)."""
    clip = sutton_clip(model, seeds)
    rule = dict(SUTTON_RULE, clip=clip, **rule)
    R_on, norms = play_preference_game(model, True, seeds, n, rule)
    R_off, _ = play_preference_game(model, False, seeds, n, rule)
    q = n // 4
    return dict(first=R_on[:, :q].mean().item(), last=R_on[:, -q:].mean().item(),
                reset=R_off[:, -q:].mean().item(), clip=clip, binds=(norms > clip).float().mean().item())


def test_sutton_in_miniature(recall_model):
    """A recall-trained model learns a hidden preference from reward alone: reward over the
    last episodes beats the first ones and beats the same seeds with the state reset.

    The fixture's model differs between machines (conftest: which seed first reaches the accuracy
    bar depends on the CPU's arithmetic), so the thresholds are checked over the five models of its
    recipe that passed the bar on one 2-core machine, 16 game seeds x 100 episodes each, game seeds
    0-15 (the test's) and 16-31; reward first quarter -> last quarter, state reset, clip, share of
    head commits clipped:

    ============  ======================================  ======================================
    recall seed   game seeds 0-15                         game seeds 16-31
    ============  ======================================  ======================================
    1000          0.257 -> 0.382, reset 0.110; 2.77, 0.13  0.273 -> 0.435, reset 0.127; 3.38, 0.11
    2000          0.218 -> 0.357, reset 0.120; 3.23, 0.09  0.185 -> 0.415, reset 0.132; 2.96, 0.10
    3000          0.310 -> 0.543, reset 0.112; 5.62, 0.12  0.278 -> 0.603, reset 0.127; 6.33, 0.10
    8000          0.270 -> 0.442, reset 0.125; 7.25, 0.13  0.295 -> 0.480, reset 0.125; 7.99, 0.11
    9000          0.252 -> 0.433, reset 0.127; 4.24, 0.14  0.273 -> 0.412, reset 0.123; 4.21, 0.14
    ============  ======================================  ======================================

    Smallest gains: last - first +0.125, last - reset +0.237 (8 game seeds instead of 16 went
    down to +0.08 and +0.17). Controls on game seeds 0-15, which fail: eta_r flipped to -1
    (models 1000, 2000, 8000): last - first -0.038 to -0.047, last - reset -0.023 to -0.050;
    eta_r = 0 (no reward commit) plays exactly the reset control (last - reset 0.000).
    """
    f = sutton_figures(recall_model, list(range(16)), 100)
    print("sutton miniature: " + ", ".join(f"{k} {v:.3f}" for k, v in f.items()))
    # The clip binds on the largest commits, not on none of them and not on most.
    assert 0.02 < f["binds"] < 0.5, f
    assert f["last"] > f["first"] + 0.08, f
    assert f["last"] > f["reset"] + 0.15, f
    assert f["reset"] < 0.25, f  # the frozen model stays near chance (1/8)
