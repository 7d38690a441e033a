"""cl_arch.decode.Decoder: its in-place step equals the model's forward token by token (logits and the
final ModelState), for the shipped model under both episodic write rules and for a tiny random model
with a "next"-target fast layer, full attention, an error-write readout and a dense-path episodic memory;
batch 1 and 3, per-row modulation (writes off on a row), a state from a prefill passed in and out.

16-50 s on one core of the shared machine (the shipped model's per-token forwards dominate). The
compiled step's test runs where ``CL_ARCH_TEST_COMPILE=1``: inductor's first compile of the shipped step
takes 30-170 s on the shared 2-core machine (the test: 65 s).
"""
import copy
import os

import pytest
import torch

import cl_arch
from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.decode import Decoder
from cl_arch.memory import EpisodicConfig, ReadoutConfig
from cl_arch.state import AttnLayerState, ModelState

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shipped():
    return cl_arch.load_default()


def _assert_states(ref: ModelState, got: ModelState, tol: float) -> None:
    assert ref.position == got.position
    assert len(ref.layers) == len(got.layers)
    for i, (a, b) in enumerate(zip(ref.layers, got.layers)):
        fields = ("k", "v") if isinstance(a, AttnLayerState) else ("S", "E", "P", "conv")
        for f in fields:
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), f"layers[{i}].{f}: {x is None} vs {y is None}"
            if x is not None:
                assert x.shape == y.shape, f"layers[{i}].{f}: {tuple(x.shape)} vs {tuple(y.shape)}"
                err = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
                assert err <= tol, f"layers[{i}].{f} differs by {err}"


def _compare(model, B: int, dtype, tol: float, n_tokens: int = 100, prefill: int = 12, seed: int = 0,
             max_len=None, P=None, fold_every=None) -> Decoder:
    """Prefill with the model, hand the state to a Decoder, decode ``n_tokens`` both ways (row 1 with
    writes off when B > 1, others at random strengths), compare logits and the final states."""
    model = copy.deepcopy(model).to(dtype)
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, prefill + n_tokens), generator=g)
    mod = torch.rand(B, n_tokens, generator=g, dtype=dtype)
    if B > 1:
        mod[1] = 0.0
    with torch.no_grad():
        _, state = model(ids[:, :prefill], state=model.init_state(B, P=P))
    dec = Decoder(model, B, max_len=max_len, compile=False)
    for slot in dec.slots:  # fold the lazily kept decays often (every ~1e3-1e6 tokens otherwise)
        if fold_every is not None and hasattr(slot, "fold_every"):
            slot.fold_every = fold_every
    dec.load_state(state)
    worst = 0.0
    with torch.no_grad():
        for t in range(n_tokens):
            ref, state = model(ids[:, prefill + t:prefill + t + 1], state=state, modulation=mod[:, t:t + 1])
            got = dec.step(ids[:, prefill + t], modulation=mod[:, t])
            # relative to the logit's size where it exceeds 1 (float32 logits of ~20 round at ~2e-6)
            r = ref[:, 0].double()
            worst = max(worst, ((r - got.double()).abs() / r.abs().clamp(min=1.0)).max().item())
    assert worst <= tol, f"logits differ by {worst} (relative where |logit| > 1)"
    _assert_states(state, dec.state(), tol)
    return dec


def test_shipped_float64(shipped):
    _compare(shipped, 3, torch.float64, 1e-10)


def test_shipped_float32(shipped):
    _compare(shipped, 1, torch.float32, 1e-5)


def test_shipped_error_write(shipped):
    model = copy.deepcopy(shipped)
    model.set_write("episodic", "error", beta=0.5, scale=1.0)
    _compare(model, 3, torch.float64, 1e-10, n_tokens=60)


def test_shipped_verdict_read_and_shared_projection(shipped):
    """A verdict memory with a non-zero P is read (W0 + P = 0 skips the read); it shares the episodic
    memory's hn R^T, and its logits and trace equal the model's."""
    from cl_arch.decode.slots import VerdictSlot
    model = copy.deepcopy(shipped).double()
    v = model.verdict
    P = [None] * (len(model.fast_layers()) - 1)
    P.append(0.05 * torch.randn(2, v.n_heads, v.head_k_dim, v.head_v_dim, generator=torch.Generator().manual_seed(4),
                                dtype=torch.float64))
    dec = _compare(model, 2, torch.float64, 1e-10, n_tokens=40, P=P)
    slot = next(s for s in dec.slots if isinstance(s, VerdictSlot))
    assert slot.projection is not None and slot.projection.shares_projection and not slot.zero
    dec.load_state(model.init_state(2))
    assert slot.zero  # a fresh state's W0 + P is zero


def _tiny(seed: int = 0) -> PlasticTransformer:
    torch.manual_seed(seed)
    cfg = PlasticConfig(d_model=32, n_layers=3, layer_types=["fast", "attn", "fast"], n_heads=2, head_k_dim=8,
                        head_v_dim=8, n_attn_heads=2, vocab_size=40, target="next", attn_window=None,
                        memories=[ReadoutConfig(heads=2, write="error"),
                                  EpisodicConfig(heads=2, features=64, threshold=0.5)])
    model = PlasticTransformer(cfg).eval()
    with torch.no_grad():  # non-zero resting states, so the decay toward W0 + P is exercised
        for m in model.fast_layers():
            m.W0.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("B", [1, 3])
def test_tiny_next_target(B):
    model = _tiny()
    fast = model.fast_layers()
    g = torch.Generator().manual_seed(1)
    P = [0.1 * torch.randn(B, m.n_heads, m.head_k_dim, m.head_v_dim, generator=g) for m in fast]
    _compare(model, B, torch.float64, 1e-10, n_tokens=100, max_len=128, P=P, fold_every=7 if B == 3 else None)


def test_round_trip_and_prefill(shipped):
    """state() -> load_state() resumes the same stream; prefill equals the model's forward."""
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    dec = Decoder(shipped, 2, compile=False)
    logits = dec.prefill(ids[:, :10])
    with torch.no_grad():
        ref, _ = shipped(ids[:, :10], state=shipped.init_state(2))
    assert torch.equal(logits, ref)
    for t in range(10, 15):
        dec.step(ids[:, t])
    mid = dec.state()
    a = [dec.step(ids[:, t]).clone() for t in range(15, 20)]
    dec.load_state(mid)
    b = [dec.step(ids[:, t]).clone() for t in range(15, 20)]
    # the reload folds the lazily kept decay into the state: float32 rounding, not bitwise
    assert all(torch.allclose(x, y, atol=1e-5, rtol=0) for x, y in zip(a, b))


def test_buffers_not_reallocated(shipped):
    dec = Decoder(shipped, 1, compile=False)
    ptrs = [(t.data_ptr()) for s in dec.slots for t in vars(s).values() if isinstance(t, torch.Tensor)]
    for t in range(5):
        dec.step(torch.tensor([t + 65]))
    assert ptrs == [(t.data_ptr()) for s in dec.slots for t in vars(s).values() if isinstance(t, torch.Tensor)]


def test_reinforce_equals_verdict_memory(shipped):
    dec = Decoder(shipped, 1, compile=False)
    dec.step(torch.tensor([70]))
    logits = dec._logits.clone()
    before = dec.state()
    tok = torch.tensor([101])
    dec.reinforce(tok)
    want = shipped.verdict.reinforce(shipped.memory_states(before)["verdict"], tok, logits)
    assert torch.allclose(dec.state().layers[-1].E, want.E, atol=1e-7)


def test_errors(shipped):
    dec = Decoder(shipped, 2, compile=False)
    with pytest.raises(ValueError, match="ids must be an int64 tensor of shape"):
        dec.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="int64"):
        dec.step(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch size"):
        dec.load_state(shipped.materialize_state(shipped.init_state(3), 3))
    with pytest.raises(ValueError, match="batch_size"):
        Decoder(shipped, 0)
    with pytest.raises(ValueError, match="max_len"):
        Decoder(_tiny(), 1)
    tiny = Decoder(_tiny(), 1, max_len=2, compile=False)
    tiny.step(torch.tensor([1]))
    tiny.step(torch.tensor([2]))
    with pytest.raises(ValueError, match="max_len"):
        tiny.step(torch.tensor([3]))
    shipped.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            Decoder(shipped, 1)
    finally:
        shipped.eval()


def test_overflow_is_reported(shipped):
    """A key that fires more features than the decoder keeps makes state() refuse, not return wrong state."""
    dec = Decoder(shipped, 1, compile=False, n_active=2)
    for t in range(3):
        dec.step(torch.tensor([t + 97]))
    assert dec.overflowed()
    with pytest.raises(RuntimeError, match="n_active"):
        dec.state()


@pytest.mark.skipif(os.environ.get("CL_ARCH_TEST_COMPILE") != "1",
                    reason="opt-in (CL_ARCH_TEST_COMPILE=1): inductor's first compile takes 30-170 s on 2 shared cores")
def test_compiled_equals_eager(shipped):
    from torch._inductor import config as inductor_config  # noqa: F401 - fails where inductor is absent

    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(5))
    mod = torch.ones(3)
    mod[1] = 0.0
    eager, comp = Decoder(shipped, 3, compile=False), Decoder(shipped, 3, compile=True)
    toks_e, toks_c = [], []
    te, tc = ids[:, 0], ids[:, 0]
    for _ in range(40):
        te = eager.step(te, modulation=mod).argmax(-1)
        tc = comp.step(tc, modulation=mod).argmax(-1)
        toks_e.append(te)
        toks_c.append(tc)
    assert torch.equal(torch.stack(toks_e), torch.stack(toks_c))
    _assert_states(eager.state(), comp.state(), 1e-4)


@pytest.mark.parametrize("model_name", ["shipped", "tiny"])
def test_rows_at_their_own_positions(shipped, model_name):
    """load_rows: rows prefilled to different lengths (the shipped model's 64-byte window passed on one row;
    the tiny model's full attention in a 128-position buffer) decode together, each equal to its own
    one-row forward, logits and final row_states; state() refuses rows at several positions."""
    model = copy.deepcopy(shipped if model_name == "shipped" else _tiny()).to(torch.float64)
    V, lengths, n_tokens = model.config.vocab_size, [3, 70, 12], 20
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, V, (1, n + n_tokens), generator=g) for n in lengths]
    with torch.no_grad():
        states = [model(x[:, :n], state=model.init_state(1))[1] for x, n in zip(ids, lengths)]
    dec = Decoder(model, 3, max_len=None if model_name == "shipped" else 128, compile=False)
    dec.load_rows(states)
    assert dec.positions == lengths
    with pytest.raises(ValueError, match="different positions"):
        dec.state()
    with torch.no_grad():
        for t in range(n_tokens):
            got = dec.step(torch.stack([x[0, n + t] for x, n in zip(ids, lengths)])).clone()
            for b, (x, n) in enumerate(zip(ids, lengths)):
                ref, states[b] = model(x[:, n + t:n + t + 1], state=states[b])
                assert (ref[0, 0] - got[b]).abs().max().item() <= 1e-10, (t, b)
    for ref, row in zip(states, dec.row_states()):
        _assert_states(model.materialize_state(ref, 1), model.materialize_state(row, 1), 1e-10)
    with pytest.raises(ValueError, match="3 states"):
        dec.load_rows(states[:2])


def test_one_graph_per_batch_size_past_dynamo_limit():
    """The compiled step keeps one graph per batch size however many a process meets (dynamo's default
    recompile_limit, 8, would silently run the ninth eagerly) and one for ids of any stride (a prompt's
    column ``ids[:, -1]`` or a sampled token): dynamo with a counting backend, no inductor compile."""
    model = _tiny()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(example_inputs[0].shape if example_inputs else None)
        return gm.forward

    torch._dynamo.reset()
    sizes = list(range(1, 11))
    try:
        for B in sizes:
            dec = Decoder(model, B, max_len=16, compile=True)
            dec.compile_backend = backend
            eager = Decoder(model, B, max_len=16, compile=False)
            prompt = torch.randint(0, 40, (B, 5), generator=torch.Generator().manual_seed(B))
            for d in (dec, eager):
                d.prefill(prompt)
            tok_c = tok_e = prompt[:, -1]  # strided: a column of the prompt
            for _ in range(3):
                tok_c, tok_e = dec.step(tok_c).argmax(-1), eager.step(tok_e).argmax(-1)
                assert torch.equal(tok_c, tok_e)
            assert len(graphs) == B, f"batch {B}: {len(graphs)} graphs for {B} batch sizes"
        dec = Decoder(model, 4, max_len=16, compile=True)  # a batch size met before reuses its graph
        dec.compile_backend = backend
        dec.step(torch.zeros(4, dtype=torch.long))
        assert len(graphs) == len(sizes)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("model_name", ["shipped", "tiny"])
def test_a_row_replaced_midstream(shipped, model_name):
    """load_row / row_state: rows at their own positions with and without a persistent P decode together; one
    row is taken out and put back (a round trip), another replaced by a new session's state mid-stream (a
    zero P turned non-zero, so the verdict read starts); every row equals its own one-row forward, logits at
    every token and final states, at 1e-10 in float64."""
    model = copy.deepcopy(shipped if model_name == "shipped" else _tiny()).to(torch.float64)
    V, g = model.config.vocab_size, torch.Generator().manual_seed(11)
    fast = model.fast_layers()

    def P(scale):
        return None if scale == 0 else [scale * torch.randn(1, m.n_heads, m.head_k_dim, m.head_v_dim, generator=g,
                                                           dtype=torch.float64) for m in fast]

    def session(n, scale):
        ids = torch.randint(0, V, (1, n + 40), generator=g)
        with torch.no_grad():
            return ids, n, model(ids[:, :n], state=model.init_state(1, P(scale)))[1]

    rows = [session(3, 0.0), session(70, 0.0), session(12, 0.0)]  # every P zero: the verdict read is skipped
    states = [st for _, _, st in rows]
    dec = Decoder(model, 3, max_len=None if model_name == "shipped" else 160, compile=False)
    dec.load_rows(states)
    fed = [0, 0, 0]

    def run(n_tokens):
        with torch.no_grad():
            for _ in range(n_tokens):
                tok = torch.stack([ids[0, n + f] for (ids, n, _), f in zip(rows, fed)])
                got = dec.step(tok).clone()
                for b, ((ids, n, _), f) in enumerate(zip(rows, fed)):
                    ref, states[b] = model(ids[:, n + f:n + f + 1], state=states[b])
                    assert (ref[0, 0] - got[b]).abs().max().item() <= 1e-10, (b, f)
                    fed[b] += 1

    run(6)
    out = dec.row_state(0)
    _assert_states(model.materialize_state(states[0], 1), model.materialize_state(out, 1), 1e-10)
    dec.load_row(0, out)  # a round trip leaves the row as it was
    rows[2] = session(20, 0.05)  # row 2's session leaves, a new one with a non-zero P joins
    states[2], fed[2] = rows[2][2], 0
    dec.load_row(2, states[2])
    assert dec.positions == [st.position for st in states]
    run(6)
    for ref, row in zip(states, dec.row_states()):
        _assert_states(model.materialize_state(ref, 1), model.materialize_state(row, 1), 1e-10)
    with pytest.raises(ValueError, match="row must be"):
        dec.load_row(3, states[0])
    with pytest.raises(ValueError, match="row must be"):
        dec.row_state(-1)
