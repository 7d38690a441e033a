"""cl_arch.session.stream.BatchStream, the server's continuous batch: sessions joining and leaving at token
boundaries, their states kept in one decoder between steps, give the tokens and episodes of
``Session.batch_generate(..., max_new_tokens=1)`` per step (the forward path, decoder=None): a tiny float64 model
with full attention, an error-write readout, an episodic and a verdict memory (1e-10), and the shipped model
(1e-5). Also: a state read mid-stream takes every row back, a failed step leaves every session as before it, a key
that overflows the decoder runs the step on the forward path, and the server's engine decodes through it.
"""
import copy

import pytest
import torch

import cl_arch
import cl_arch.decode.decoder as decoder_mod
from cl_arch import Session
from cl_arch.session import stream as stream_mod
from cl_arch.session.stream import BatchStream
from test_session_decoder import _live, _same, _tiny

torch.set_num_threads(1)


def _forward_step(sessions, prompts, temperature):
    return [t for (t,) in Session.batch_generate(sessions, prompts, max_new_tokens=1, temperature=temperature)]


def _schedule(model, temperature: float, tol: float, check=None, held: bool = True):
    """Four sessions: two start, a third joins at step 3 with a prompt, the first leaves at step 5, a fourth
    joins at step 6, each with its own prompt and length; the same schedule on the forward path (decoder=None)."""
    prompts = {0: [1, 2, 3], 1: [4, 5], 2: [6, 7, 8, 9], 3: [3]}
    spans = {0: (0, 5), 1: (0, 9), 2: (3, 9), 3: (6, 9)}  # steps [start, end)
    runs = {}
    for mode in (None, "auto"):
        sessions = [Session(model, seed=10 + i, decoder=mode) for i in range(4)]
        stream = BatchStream()
        out = {i: [] for i in range(4)}
        for step in range(9):
            active = [i for i in range(4) if spans[i][0] <= step < spans[i][1]]
            ps = [prompts[i] if step == spans[i][0] else [] for i in active]
            if mode is None:
                toks = _forward_step([sessions[i] for i in active], ps, temperature)
            else:
                toks = stream.step([sessions[i] for i in active], ps, [9 - step] * len(active), temperature)
                assert (stream.dec is not None) == held
            for i, t in zip(active, toks):
                out[i].append(t)
            if check is not None and mode == "auto":
                check(step, stream, sessions)
        stream.release()
        runs[mode] = (out, sessions)
    assert runs[None][0] == runs["auto"][0]
    for a, b in zip(runs[None][1], runs["auto"][1]):
        _same(a, b, tol)
    return runs["auto"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_joins_and_leaves_same_as_forward_tiny(temperature):
    """From step 3 on, 3, 2 and 3 rows run in one decoder of 4 rows (a power of two, kept while the rows stay
    above a quarter of it; the spare rows decode unread); steps 0-2 ran 2 rows in a decoder of 2."""
    decoders, rows = [], []

    def check(step, stream, sessions):
        decoders.append(stream.dec)
        rows.append([r.i for r in stream.rows])

    _schedule(_tiny(), temperature, 1e-10, check=check)
    assert [d.B for d in decoders[:3]] == [2, 2, 2] and len({id(d) for d in decoders[3:]}) == 1
    assert decoders[3].B == 4
    # from step 3 the rows that stay are not moved: session 0 leaves row 0 at step 5, session 3 takes it at 6
    assert rows[3:] == [[0, 1, 2], [0, 1, 2], [1, 2], [1, 2, 0], [1, 2, 0], [1, 2, 0]]


def test_a_join_moves_no_other_row(monkeypatch):
    """A session joining a held batch loads its own row only; the staying rows are neither dumped nor
    reloaded (one load_row per joiner, one row_state per leaver)."""
    model = _tiny()
    sessions = [Session(model, seed=i) for i in range(3)]
    stream = BatchStream()
    stream.step(sessions[:2], [[1, 2], [3]], [8, 8])
    stream.step(sessions[:3], [[], [], [4, 5, 6]], [7, 7, 7])  # 3 rows: a decoder of 4
    calls = {"load_row": 0, "row_state": 0, "load_rows": 0}
    for name in calls:
        orig = getattr(decoder_mod.Decoder, name)
        monkeypatch.setattr(decoder_mod.Decoder, name,
                            lambda self, *a, _n=name, _o=orig: (calls.__setitem__(_n, calls[_n] + 1), _o(self, *a))[1])
    extra = Session(model, seed=9)
    stream.step([sessions[1], extra, sessions[2]], [[], [7], []], [6, 6, 6])  # session 0 leaves, extra joins
    assert calls == {"load_row": 1, "row_state": 1, "load_rows": 0}
    assert sessions[0]._live is None and extra._live is not None and extra._live.i == 0


def test_shipped_same_as_forward():
    _schedule(copy.deepcopy(cl_arch.load_default()), 1.0, 1e-5)


def test_state_read_mid_stream_takes_rows_back():
    """Reading a session's state (as a reward does) takes every row back; the next step loads them again."""
    loads = []

    def check(step, stream, sessions):
        if step == 4:
            before = stream.dec
            _ = sessions[1].state  # a session between steps: rows go back to their sessions
            assert stream.dec is None and all(s._live is None for s in sessions)
            loads.append(before)

    model = _tiny()
    _schedule(model, 1.0, 1e-10, check=check)
    assert loads


def test_failed_step_leaves_sessions_as_before(monkeypatch):
    model = _tiny()
    a = [Session(model, seed=1), Session(model, seed=2)]
    ref = [Session(model, seed=1, decoder=None), Session(model, seed=2, decoder=None)]
    stream = BatchStream()
    stream.step(a, [[1, 2], [3]], [5, 5], 1.0)
    _forward_step(ref, [[1, 2], [3]], 1.0)
    stream.step(a, [[], []], [4, 4], 1.0)
    _forward_step(ref, [[], []], 1.0)
    calls = {"n": 0}
    real = stream_mod._check_logits

    def bad(logits):
        calls["n"] += 1
        raise ValueError("non-finite logits (injected)")

    monkeypatch.setattr(stream_mod, "_check_logits", bad)
    with pytest.raises(ValueError, match="injected"):
        stream.step(a, [[], []], [3, 3], 1.0)
    assert calls["n"] == 1 and stream.dec is None
    for x, y in zip(ref, a):
        _same(x, y, 1e-10)
        assert torch.equal(x._rng.get_state(), y._rng.get_state())
    monkeypatch.setattr(stream_mod, "_check_logits", real)
    assert stream.step(a, [[], []], [3, 3], 1.0) == _forward_step(ref, [[], []], 1.0)
    for x, y in zip(ref, a):
        _same(x, y, 1e-10)
    with pytest.raises(ValueError, match="no tokens to continue"):
        stream.step([Session(model)], [[]], [1], 1.0)
    with pytest.raises(ValueError, match="appears twice"):
        stream.step([a[0], a[0]], [[1], [1]], [1, 1], 1.0)


def test_overflow_runs_the_step_on_the_forward_path(monkeypatch):
    monkeypatch.setattr(decoder_mod, "default_active", lambda memory: 2)
    model = _tiny()
    _schedule(model, 1.0, 1e-10, held=False)
    assert _live(model) and all(d.overflowed() for d in _live(model))


def test_engine_decodes_through_the_stream(tmp_path):
    from cl_arch.serve import Engine, ServeConfig, open_store

    model = cl_arch.load_default()
    engine = Engine(model, open_store(str(tmp_path / "s.db"))).start()
    try:
        out = engine.call("complete", "u1", timeout=120, prompt=list(b"def f(x):\n"), max_tokens=12,
                          temperature=0.0)
        assert out["completion_tokens"] == 12
        assert any(st.dec is not None for st in engine._streams.values())  # the states stayed in a decoder
        want = Session(model, decoder=None).generate(b"def f(x):\n", max_new_tokens=12, temperature=0.0)
        assert out["token_ids"] == want
        engine.call("reward", "u1", timeout=60, reward=1.0)
    finally:
        engine.stop()
    off = Engine(model, open_store(str(tmp_path / "t.db")), ServeConfig(decoder=None)).start()
    try:  # decoder=None: a forward per step, the same tokens
        out = off.call("complete", "u1", timeout=120, prompt=list(b"def f(x):\n"), max_tokens=12, temperature=0.0)
        assert out["token_ids"] == want and all(st.dec is None for st in off._streams.values())
    finally:
        off.stop()
    with pytest.raises(ValueError, match="decoder"):
        ServeConfig(decoder="fast")


def test_the_batch_reloads_when_no_row_stays_or_the_kv_buffer_is_short(monkeypatch):
    """No session staying (the held decoder may not be the one the new sessions ask for) or a joiner whose
    prompt and tokens outgrow the decoder's KV buffer: the whole batch is loaded again (``load_rows``, a new
    decoder where needed), and the tokens still equal the forward path's."""
    model = _tiny()
    calls = {"load_row": 0, "load_rows": 0}
    for name in calls:
        orig = getattr(decoder_mod.Decoder, name)
        monkeypatch.setattr(decoder_mod.Decoder, name,
                            lambda self, *a, _n=name, _o=orig: (calls.__setitem__(_n, calls[_n] + 1), _o(self, *a))[1])
    a, b, c = (Session(model, seed=i) for i in range(3))
    stream = BatchStream()
    stream.step([a, b], [[1, 2], [3]], [4, 4])
    stream.step([c], [[5, 6]], [4])  # nobody stays: a full load
    assert calls == {"load_row": 0, "load_rows": 2} and a._live is None and b._live is None
    held = stream.dec
    long_prompt = list(range(1, 40)) * 8  # 312 tokens: past the held decoder's 256-position KV buffer
    d, ref = Session(model, seed=7), Session(model, seed=7, decoder=None)
    toks = stream.step([c, d], [[], long_prompt], [4, 4])
    assert calls == {"load_row": 0, "load_rows": 3}
    assert stream.dec is not held and stream.dec.max_len > 256
    assert toks[1] == _forward_step([ref], [long_prompt], 1.0)[0]
