"""Session.generate through the cached cl_arch.decode.Decoder (Session(decoder="auto"), the default) gives the
tokens, final state, NLL list and next-token logits of the forward path (decoder=None): the shipped model in
float32 (1e-5 relative) and a tiny random model in float64 (1e-10) with full attention, an error-write
readout, an episodic and a verdict memory; then verdicts (reject and accept), a reward, a second generate,
allowed_tokens, a stream stopped early, two sessions sharing the decoder, errors mid-generation, a key that
overflows the decoder, and the cache rebuilt after a weight change.

About 40-60 s on the shared 2-core machine (the forward path's per-token steps dominate).
"""
import copy
import math

import pytest
import torch

import cl_arch
import cl_arch.decode.decoder as decoder_mod
from cl_arch import PlasticConfig, PlasticTransformer, Session
from cl_arch.decode import Decoder
from cl_arch.memory import (
    EpisodicConfig,
    ReadoutConfig,
    RewardMemoryConfig,
    VerdictConfig,
)
from cl_arch.session import decoding
from cl_arch.state import AttnLayerState

torch.set_num_threads(1)
PROMPT = b"def add(a, b):\n    "


@pytest.fixture(scope="module")
def shipped():
    return copy.deepcopy(cl_arch.load_default())  # this file edits weights: its own copy


def _tiny() -> PlasticTransformer:
    torch.manual_seed(0)
    cfg = PlasticConfig(d_model=32, n_layers=3, layer_types=["fast", "attn", "fast"], n_heads=2, head_k_dim=8,
                        head_v_dim=8, n_attn_heads=2, vocab_size=40, attn_window=None,
                        memories=[ReadoutConfig(heads=2, write="error"),
                                  EpisodicConfig(heads=2, features=64, threshold=0.5),
                                  VerdictConfig(heads=1, features=64, threshold=0.5)])
    model = PlasticTransformer(cfg).to(torch.float64).eval()
    with torch.no_grad():  # non-zero resting states: the decay toward W0 + P is exercised
        for m in model.fast_layers():
            m.W0.normal_(0, 0.1)
    return model


def _close(a, b, tol: float, what: str) -> None:
    """Relative to the tensor's size (float32 states of ~1e2 round at ~1e-5)."""
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(a.double().abs().max().item() if a.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what} differs by {err} (scale {scale})"


def _same(a: Session, b: Session, tol: float) -> None:
    """The same episode: ids, NLLs, next-token logits, state and P."""
    assert a._episode_ids == b._episode_ids
    assert len(a._episode_nll) == len(b._episode_nll)
    for x, y in zip(a._episode_nll, b._episode_nll):
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol * max(1.0, abs(x)), (x, y)
    assert (a._next_logits is None) == (b._next_logits is None)
    if a._next_logits is not None:
        _close(a._next_logits, b._next_logits, tol, "next logits")
    # S = None means W0 + P: the forward path materializes it where it stacks sessions, a decoder where it must
    sa, sb = a.model.materialize_state(a.state, 1), b.model.materialize_state(b.state, 1)
    assert sa.position == sb.position
    for i, (x, y) in enumerate(zip(sa.layers, sb.layers)):
        for f in (("k", "v") if isinstance(x, AttnLayerState) else ("S", "E", "P", "conv")):
            u, w = getattr(x, f), getattr(y, f)
            assert (u is None) == (w is None), f"layers[{i}].{f}"
            if u is not None:
                _close(u, w, tol, f"layers[{i}].{f}")
    for p, q in zip(a.P, b.P):
        _close(p, q, tol, "P")
    assert a.baseline == pytest.approx(b.baseline, rel=tol, abs=tol)


def _pair(model, **kw):
    return Session(model, seed=3, decoder=None, **kw), Session(model, seed=3, **kw)


def _both(pair, fn):
    out = [fn(s) for s in pair]
    assert out[0] == out[1]
    return out[0]


def _live(model):
    """The model's cached decoders."""
    cache = model.__dict__.get("_cl_arch_decoders")
    return [] if cache is None else [e.decoder for e in cache.entries.values()]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shipped_same_as_forward(shipped, temperature):
    ref, dec = _pair(shipped)
    _both((ref, dec), lambda s: s.generate(PROMPT, max_new_tokens=12, temperature=temperature))
    assert _live(shipped), "the decoder was not used"
    _same(ref, dec, 1e-5)
    _both((ref, dec), lambda s: s.verdict(0.0))  # reject: back to before the suggestion
    _same(ref, dec, 1e-5)
    _both((ref, dec), lambda s: s.generate(b"", max_new_tokens=8, temperature=temperature))
    _both((ref, dec), lambda s: s.verdict(1.0))  # accept: kept, Q moved
    _same(ref, dec, 1e-5)
    _both((ref, dec), lambda s: s.reward(1.0))
    _both((ref, dec), lambda s: s.generate(PROMPT, max_new_tokens=8, temperature=temperature))
    _both((ref, dec), lambda s: s.generate(b"", max_new_tokens=4, temperature=temperature, seed=11))
    _same(ref, dec, 1e-5)


@pytest.mark.parametrize("defer_limit", [256, 3], ids=["flush-at-sync", "flush-every-3"])
def test_tiny_float64_allowed_and_stream(monkeypatch, defer_limit):
    """The verdict trace steps are queued and added when the state is taken back (or every
    ``DEFER_LIMIT`` tokens): the same trace as the forward path's one step at a time."""
    import cl_arch.decode.slots as slots_mod
    monkeypatch.setattr(slots_mod, "DEFER_LIMIT", defer_limit)
    model = _tiny()
    ref, dec = _pair(model)
    prompt = [1, 5, 9, 2, 7]
    _both((ref, dec), lambda s: s.generate(prompt, max_new_tokens=20, temperature=1.0))
    assert _live(model)[0].max_len == 256  # full attention: a KV buffer of a power of two
    _same(ref, dec, 1e-10)
    _both((ref, dec), lambda s: s.generate(b"", max_new_tokens=6, allowed_tokens=[3, 4, 30], temperature=1.0))
    _same(ref, dec, 1e-10)
    _both((ref, dec), lambda s: s.verdict(0.0))
    _same(ref, dec, 1e-10)
    # a stream stopped after 5 of 30 tokens leaves the session at those 5
    _both((ref, dec), lambda s: [t for _, t in zip(range(5), s.generate(b"", max_new_tokens=30, stream=True))])
    assert dec._live is not None  # the newest state is still in the decoder's buffers ...
    _same(ref, dec, 1e-10)  # ... and reading it takes it back
    _both((ref, dec), lambda s: s.generate([4], max_new_tokens=5))
    _both((ref, dec), lambda s: s.reward(0.5))
    _same(ref, dec, 1e-10)


def test_streams_of_two_sessions_share_the_decoder():
    model = _tiny()
    (ra, da), (rb, db) = _pair(model), _pair(model)
    streams = [s.generate([1, 2, 3], max_new_tokens=10, stream=True) for s in (ra, da)]
    first = [[next(it) for _ in range(4)] for it in streams]
    _both((rb, db), lambda s: s.generate([7, 8], max_new_tokens=6))  # db takes the decoder from da
    assert da._live is None and db._live is None
    rest = [list(it) for it in streams]
    assert first[0] + rest[0] == first[1] + rest[1]
    _same(ra, da, 1e-10)
    _same(rb, db, 1e-10)


def test_errors_mid_generation(shipped, monkeypatch):
    ref, dec = _pair(shipped)
    _both((ref, dec), lambda s: s.generate(PROMPT, max_new_tokens=2))
    before = (dec.state, list(dec._episode_ids), dec._rng.get_state(), dec._pending)
    real, calls = Decoder.step, []

    def failing(self, ids, modulation=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, ids, modulation)

    monkeypatch.setattr(Decoder, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        dec.generate(b"x = ", max_new_tokens=6)
    assert dec.state is before[0] and dec._episode_ids == before[1] and dec._pending is before[3]
    assert torch.equal(dec._rng.get_state(), before[2])
    # an error in the decoder alone: the call goes on along the forward path, with the same result
    calls.clear()
    monkeypatch.setattr(Decoder, "step", lambda self, ids, modulation=None: (_ for _ in ()).throw(RuntimeError("x"))
                        if len(calls) > 2 else (calls.append(1), real(self, ids, modulation))[1])
    _both((ref, dec), lambda s: s.generate(b"x = ", max_new_tokens=6))
    _same(ref, dec, 1e-5)
    # a stream that fails at a token keeps the tokens it yielded
    calls.clear()
    monkeypatch.setattr(Decoder, "step", failing)
    got = []
    with pytest.raises(KeyboardInterrupt):
        got.extend(dec.generate(b"", max_new_tokens=6, stream=True))
    assert len(got) == 2
    ref.generate(b"", max_new_tokens=2)
    _same(ref, dec, 1e-5)


def test_overflowing_key_falls_back(shipped, monkeypatch):
    """A decoder that keeps 2 features per key overflows at once: the call is redone on the forward path."""
    model = copy.deepcopy(shipped)
    monkeypatch.setattr(decoder_mod, "default_active", lambda memory: 2)
    ref, dec = _pair(model)
    _both((ref, dec), lambda s: s.generate(PROMPT, max_new_tokens=5, temperature=1.0))
    assert _live(model)[0].overflowed()
    _same(ref, dec, 1e-5)


def test_cache_rebuilt_after_weight_change(shipped):
    model = copy.deepcopy(shipped)
    ref, dec = _pair(model)
    _both((ref, dec), lambda s: s.generate(PROMPT, max_new_tokens=4))
    first = _live(model)[0]
    _both((ref, dec), lambda s: s.generate(b"", max_new_tokens=4))
    assert _live(model)[0] is first  # reused while nothing changed
    with torch.no_grad():
        model.episodic.A_log.add_(0.5)  # a rate the decoder reads once (its fold interval) and W0
        model.readout.W0.add_(0.01)
    _both((ref, dec), lambda s: s.generate(b"", max_new_tokens=6))
    assert _live(model)[0] is not first
    _same(ref, dec, 1e-5)
    rebuilt = _live(model)[0]
    model.set_write("episodic", "error", beta=0.5, scale=1.0)
    for s in (ref, dec):
        s.reset(persistent=False)  # states from before set_write do not fit
    _both((ref, dec), lambda s: s.generate(PROMPT, max_new_tokens=6))
    assert _live(model)[0] is not rebuilt
    _same(ref, dec, 1e-5)


def test_option_and_fallback(monkeypatch):
    with pytest.raises(ValueError, match="decoder must be one of"):
        Session(_tiny(), decoder="fast")
    torch.manual_seed(0)
    cfg = PlasticConfig(d_model=32, n_layers=2, layer_types=["fast", "attn"], n_heads=2, head_k_dim=8, head_v_dim=8,
                        n_attn_heads=2, vocab_size=40, attn_window=8, memories=[RewardMemoryConfig()])
    model = PlasticTransformer(cfg).to(torch.float64).eval()
    ref, dec = _pair(model)  # a trace-commit memory (the reward memory) and a windowed attention
    _both((ref, dec), lambda s: s.generate([1, 2], max_new_tokens=12, temperature=1.0))
    assert _live(model)[0].max_len is None
    _same(ref, dec, 1e-10)
    _both((ref, dec), lambda s: s.reward(1.0))
    _same(ref, dec, 1e-10)
    monkeypatch.setattr(decoding, "decoder_unsupported", lambda model: "the test says no")
    other = copy.deepcopy(model)  # a copy starts with no decoder
    assert not _live(other)
    assert len(Session(other, seed=0).generate([1, 2], max_new_tokens=3)) == 3  # "auto": the forward path
    assert not _live(other)
    with pytest.raises(ValueError, match="the test says no"):
        Session(other, decoder="eager").generate([1, 2], max_new_tokens=3)


def _batch(sessions, prompts, **kw):
    return Session.batch_generate(sessions, prompts, **kw)


def test_batch_generate_same_as_forward(shipped):
    refs, decs = zip(*[_pair(shipped) for _ in range(3)])
    prompts = [b"def f(a, b):\n", b"class A:\n    ", b"import os\nimp"]  # one length: one position, one group
    want = _batch(refs, prompts, max_new_tokens=10, seeds=[1, None, 2])
    got = _batch(decs, prompts, max_new_tokens=10, seeds=[1, None, 2])
    assert want == got
    assert any(d.B == 3 for d in _live(shipped))
    for r, d in zip(refs, decs):
        _same(r, d, 1e-5)
    # then each goes on alone, and verdicts apply to what the batch generated
    for r, d in zip(refs, decs):
        _both((r, d), lambda s: s.verdict(0.0))
        _both((r, d), lambda s: s.generate(b"", max_new_tokens=3))
        _same(r, d, 1e-5)


def test_batch_generate_rows_at_different_positions(shipped):
    """Prompts of different lengths: every row decodes in one batch decoder at its own position (rotary
    angle, KV slot and mask per row), one row past the 64-byte attention window, then each goes on alone."""
    refs, decs = zip(*[_pair(shipped) for _ in range(3)])
    prompts = [b"def f(a, b):\n", b"x" * 3, b"import os\n" * 9]  # 13, 3 and 90 bytes
    want = _batch(refs, prompts, max_new_tokens=9, seeds=[1, None, 2])
    got = _batch(decs, prompts, max_new_tokens=9, seeds=[1, None, 2])
    assert want == got
    assert any(d.B == 3 for d in _live(shipped))
    assert [d.state.position for d in decs] == [22, 12, 99]
    for r, d in zip(refs, decs):
        _same(r, d, 1e-5)
        _both((r, d), lambda s: s.generate(b"", max_new_tokens=3))
        _same(r, d, 1e-5)


def test_batch_generate_groups_and_fallback(monkeypatch):
    model = _tiny()  # full attention: sessions at different positions, one decoder (one KV buffer per row)
    refs, decs = zip(*[_pair(model) for _ in range(2)])
    prompts = [[1, 2, 3], [4, 5]]
    assert _batch(refs, prompts, max_new_tokens=6) == _batch(decs, prompts, max_new_tokens=6)
    assert any(d.B == 2 for d in _live(model))
    for r, d in zip(refs, decs):
        _same(r, d, 1e-10)
    torch.manual_seed(1)
    cfg = PlasticConfig(d_model=32, n_layers=2, layer_types=["fast", "fast"], n_heads=2, head_k_dim=8, head_v_dim=8,
                        vocab_size=40, memories=[EpisodicConfig(heads=2, features=64, threshold=0.5),
                                                 VerdictConfig(heads=1, features=64, threshold=0.5)])
    fast = PlasticTransformer(cfg).to(torch.float64).eval()  # no attention: one group at any positions
    refs, decs = zip(*[_pair(fast) for _ in range(2)])
    assert _batch(refs, prompts, max_new_tokens=8) == _batch(decs, prompts, max_new_tokens=8)
    assert any(d.B == 2 for d in _live(fast))
    for r, d in zip(refs, decs):
        _same(r, d, 1e-10)
    monkeypatch.setattr(decoder_mod, "default_active", lambda memory: 2)  # overflows: redone on the forward path
    other = copy.deepcopy(fast)
    refs, decs = zip(*[_pair(other) for _ in range(2)])
    assert _batch(refs, prompts, max_new_tokens=5) == _batch(decs, prompts, max_new_tokens=5)
    assert _live(other)[0].overflowed()
    for r, d in zip(refs, decs):
        _same(r, d, 1e-10)
