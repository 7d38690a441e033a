"""cl_arch.serve's engine, in process (no HTTP): batched serving equals serial Session use per
user, isolation between users (bitwise), limits named in 4xx errors, eviction that comes back
bitwise, and the SQLite store. About 6 s on two loaded cores."""
import os
import threading

import pytest
import torch

from cl_arch import PlasticConfig, PlasticTransformer, Session, SessionStore
from cl_arch.serve import (
    Engine,
    Job,
    RequestError,
    ServeConfig,
    SQLiteStore,
    open_store,
    p_digest,
)
from cl_arch.serve.config import Decoder, encode
from cl_arch.serve.store import CorruptRow, check_id

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(layer_types=None, seed=0):
    """An untrained model with non-zero W0 (so P and outputs depend on what a session read)."""
    torch.manual_seed(seed)
    m = PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                                         n_attn_heads=2, mlp_ratio=2.0, chunk_size=8, recurrent_threshold=4,
                                         layer_types=layer_types))
    with torch.no_grad():
        for layer in m.fast_layers():
            layer.W0.normal_(0, 0.1)
    return m.eval()


class Collect:
    """Callbacks of submitted jobs; ``wait()`` until all finished."""

    def __init__(self):
        self.results, self.errors, self._n, self._done = {}, {}, 0, threading.Condition()

    def job(self, key, kind, uid, **args):
        self._n += 1

        def finish(r):
            with self._done:
                self.results[key] = r
                self._done.notify_all()

        def fail(e):
            with self._done:
                self.errors[key] = e
                self._done.notify_all()
        return Job(kind, uid, args, finish, fail)

    def wait(self, timeout=60):
        with self._done:
            assert self._done.wait_for(lambda: len(self.results) + len(self.errors) == self._n, timeout)


# Per user: (prompt, max_tokens, reward) for each of three rounds; lengths differ so that
# completions join and leave the batch at different steps.
SCRIPT = {f"u{i}": [(f"prompt {i} " + "x" * (3 * i), 3 + (i * 2 + r) % 6, (-1) ** (i + r) * 0.5 * (r + 1))
                    for r in range(3)] for i in range(5)}


@pytest.mark.parametrize("layer_types", [["fast", "fast"], ["fast", "attn"]], ids=["all-fast", "fast+attn"])
def test_batched_serving_equals_serial_sessions(tmp_path, layer_types):
    model = tiny_model(layer_types)
    engine = Engine(model, open_store(str(tmp_path / "s.db")))
    c = Collect()
    for uid, rounds in SCRIPT.items():  # queued before the engine starts: every user is ready at once
        for r, (prompt, n, reward) in enumerate(rounds):
            engine.submit(c.job((uid, r, "c"), "complete", uid, prompt=encode(prompt, 256), max_tokens=n,
                                temperature=0.0, top_p=None, stop=[]))
            engine.submit(c.job((uid, r, "r"), "reward", uid, reward=reward))
    engine.start()
    c.wait()
    engine.stop()
    assert not c.errors
    m = engine.metrics
    if layer_types == ["fast", "fast"]:
        assert m.batch_rows_total > m.steps_total == m.forwards_total  # rows shared each step's one forward
    for uid, rounds in SCRIPT.items():
        s = Session(model)
        for r, (prompt, n, reward) in enumerate(rounds):
            want = s.generate(encode(prompt, 256), max_new_tokens=n, temperature=0.0)
            assert c.results[(uid, r, "c")]["token_ids"] == want, (uid, r)
            s.reward(reward)
        got = engine._sessions[uid]
        assert got.episodes == 3 and got.baseline == pytest.approx(s.baseline, abs=1e-7)
        for p, q in zip(got.P, s.P):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        # the stored row is that session, bitwise
        stored = Session.from_bytes(model, engine.store.get(uid))
        assert p_digest(stored) == p_digest(got)


def test_a_users_requests_never_change_another_users_P(tmp_path):
    model = tiny_model(["fast", "fast"])
    engine = Engine(model, open_store(str(tmp_path / "s.db"))).start()
    try:
        engine.call("complete", "bob", prompt=encode("bob's text", 256), max_tokens=4, temperature=0.0, stop=[])
        engine.call("reward", "bob", reward=1.0)
        before = engine.call("get", "bob")["p_sha256"]
        c = Collect()
        for k in range(4):  # alice's completions, observations and rewards, batched with bob's completions
            engine.submit(c.job(("a", k), "complete", "alice", prompt=encode("alice " * (k + 1), 256),
                                max_tokens=5, temperature=1.0, top_p=None, stop=[]))
            engine.submit(c.job(("b", k), "complete", "bob", prompt=encode("b", 256), max_tokens=5,
                                temperature=1.0, top_p=None, stop=[]))
            engine.submit(c.job(("o", k), "observe", "alice", ids=encode("observed", 256)))
            engine.submit(c.job(("r", k), "reward", "alice", reward=float(k) - 1.5))
        c.wait()
        assert not c.errors
        assert engine.call("get", "alice")["episodes"] == 4
        assert engine.call("get", "bob")["p_sha256"] == before  # bob never committed again: bitwise
        assert p_digest(Session.from_bytes(model, engine.store.get("bob"))) == before
    finally:
        engine.stop()


def test_limits_are_refused_with_their_name(tmp_path):
    model = tiny_model(["fast", "fast"])
    cfg = ServeConfig(max_tokens=8, max_prompt_tokens=16, max_queue=3, max_user_queue=2)
    engine = Engine(model, open_store(str(tmp_path / "s.db")), cfg)
    args = {"prompt": encode("hi", 256), "max_tokens": 4, "temperature": 0.0, "top_p": None, "stop": []}

    def refused(kind, uid, **a):
        with pytest.raises(RequestError) as e:
            engine.submit(Job(kind, uid, a, lambda r: None, lambda e: None))
        return e.value

    e = refused("complete", "u", **dict(args, max_tokens=9))
    assert (e.status, e.code) == (400, "max_tokens") and "max_tokens=8" in e.message
    e = refused("complete", "u", **dict(args, prompt=encode("x" * 17, 256)))
    assert (e.status, e.code) == (400, "max_prompt_tokens")
    e = refused("complete", "../etc", **args)
    assert (e.status, e.code) == (400, "invalid_session_id")
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"stop": ["a"] * 5}, {"max_tokens": 0}):
        assert refused("complete", "u", **dict(args, **bad)).status == 400
    for uid in ("a", "a"):  # engine not started: requests wait
        engine.submit(Job("complete", uid, args, lambda r: None, lambda e: None))
    e = refused("complete", "a", **args)
    assert (e.status, e.code) == (429, "max_user_queue")
    engine.submit(Job("get", "b", {}, lambda r: None, lambda e: None))
    e = refused("get", "c")
    assert (e.status, e.code) == (429, "max_queue") and "max_queue=3" in e.message
    assert engine.metrics.rejected == {"max_user_queue": 1, "max_queue": 1}
    engine.stop()


def test_eviction_brings_sessions_back_bitwise_and_refuses_open_episodes(tmp_path):
    model = tiny_model(["fast", "fast"])
    engine = Engine(model, open_store(str(tmp_path / "s.db")), ServeConfig(max_sessions=1)).start()
    try:
        engine.call("observe", "a", ids=encode("some text for a", 256))
        engine.call("reward", "a", reward=1.0)
        a = engine.call("get", "a")
        engine.call("observe", "b", ids=encode("b's", 256))  # evicts a (between episodes)
        assert list(engine._sessions) == ["b"] and engine.metrics.evictions_total == 1
        with pytest.raises(RequestError) as e:  # b holds an open episode: nobody may be evicted
            engine.call("observe", "a", ids=encode("more", 256))
        assert (e.value.status, e.value.code) == (429, "max_sessions")
        engine.call("reward", "b", reward=0.0)
        engine.call("observe", "a", ids=encode("more", 256))  # a back from the store
        back = engine.call("get", "a")
        assert back["in_memory"] and back["p_sha256"] == a["p_sha256"] and back["episodes"] == 1
        with pytest.raises(RequestError) as e:
            engine.call("reward", "nobody", reward=1.0)
        assert e.value.status == 404
        assert engine.call("delete", "a")["deleted"] and engine.store.ids() == ["b"]
        with pytest.raises(RequestError) as e:
            engine.call("get", "a")
        assert e.value.status == 404
    finally:
        engine.stop()


def test_store_rows_checksums_and_ids(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/s.db")
    assert isinstance(store, SQLiteStore)
    sha = store.put("u1", b"abc", 1)
    assert store.get("u1") == b"abc" and store.rows() == {"u1": {"commits": 1, "sha256": sha, "ok": True}}
    store._db.execute("UPDATE sessions SET data = ? WHERE id = 'u1'", (b"abd",))
    with pytest.raises(CorruptRow, match="fails its checksum"):
        store.get("u1")
    assert store.rows()["u1"]["ok"] is False
    assert store.get("u2") is None and not store.delete("u2")
    with pytest.raises(ValueError, match="unknown store URL scheme 'mongodb'"):
        open_store("mongodb://localhost")
    # the server's id rule is SessionStore's, id for id
    files = SessionStore(str(tmp_path / "files"))
    for uid in ["a", "A-b_c.d", "x" * 128, "x" * 129, "..", "a..b", ".a", "a/b", "/etc", "", "é", "a b", 5, None]:
        assert _ok(check_id, uid) == _ok(files.path, uid), uid
    store.close()
    assert os.path.exists(tmp_path / "s.db")


def _ok(fn, arg):
    try:
        fn(arg)
        return True
    except ValueError:
        return False


def test_text_codec_matches_the_byte_tokenizer():
    text = "héllo → 世界 <|extra_300|>"
    ids = encode(text, 256)
    assert ids == list(text.encode("utf-8"))
    d = Decoder()
    assert "".join(d.feed(t) for t in ids) + d.flush() == text
    d = Decoder()
    assert d.feed(0xE4) == "" and d.feed(300) == "\ufffd<|extra_300|>"
    with pytest.raises(RequestError, match="outside the model's vocabulary of 100"):
        encode("é", 100)
    tok = pytest.importorskip("cl_arch.hf").ClArchByteTokenizer(vocab_size=512)
    assert tok.decode(ids) == text
    d = Decoder()
    assert "".join(d.feed(t) for t in [104, 300, 105]) == tok.decode([104, 300, 105])


class FailingStore(SQLiteStore):
    """Refuses the first ``fail`` writes, as a full disk would."""

    def __init__(self, path, fail=1):
        super().__init__(path)
        self.fail = fail

    def put(self, uid, data, commits):
        if self.fail:
            self.fail -= 1
            raise OSError(28, "No space left on device")
        return super().put(uid, data, commits)


def test_a_commit_the_store_refuses_is_not_acknowledged_and_stays_open(tmp_path):
    engine = Engine(tiny_model(["fast", "fast"]), FailingStore(str(tmp_path / "s.db"))).start()
    try:
        engine.call("observe", "a", ids=encode("text to keep", 256))
        before = engine.call("get", "a")
        with pytest.raises(RequestError) as e:
            engine.call("reward", "a", reward=1.0)
        assert (e.value.status, e.value.code) == (503, "store_write") and "No space left" in e.value.message
        after = engine.call("get", "a")  # rolled back: the episode is still open, nothing committed
        assert after == before and after["episode_length"] == 12 and engine.store.ids() == []
        ok = engine.call("reward", "a", reward=1.0)  # the retry commits the same episode
        assert ok["episodes"] == 1 and engine.store.rows()["a"]["sha256"] == ok["stored_sha256"]
        alone = Session(engine.model, adapt=True)  # the same episode committed once, with no failure between
        alone.observe(encode("text to keep", 256))
        alone.reward(1.0)
        served = engine._sessions["a"]
        assert all(torch.equal(p, q) for p, q in zip(served.P, alone.P)) and served.baseline == alone.baseline
    finally:
        engine.stop()
