"""The chunked error-driven write (kernels/error_write/chunk.py): the matrix-product backend against the
naive loop of the same rule in float64 (outputs, final states, gradients), chunk 1 against the exact
rule, a stream split on a chunk boundary, and ``write_chunk`` in a model (save/load, fingerprints)."""
import pytest
import torch
from test_error_write import _inputs, _model

from cl_arch import EpisodicConfig, PlasticTransformer
from cl_arch.kernels.error_write import error_write

SEQ = ("q", "k", "targets", "base", "eta", "g")
CASES = [(1, 1, 1, 16, 8, 4, True, 0.5), (2, 37, 2, 64, 16, 8, True, 0.5), (2, 63, 1, 32, 12, 16, False, None),
         (3, 29, 2, 48, 10, 64, True, 8.0), (1, 50, 2, 32, 9, 7, True, 0.5)]


@pytest.mark.parametrize("B,T,H,K,V,C,sparse,decay", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-C{c[5]}-{'sparse' if c[6] else 'dense'}-g{c[7]}"
                              for c in CASES])
def test_chunk_backend_equals_the_naive_loop_of_the_chunked_rule(B, T, H, K, V, C, sparse, decay):
    """With autograd on (out-of-place updates) and off (the state updated in place, one ``baddbmm`` per
    chunk); the inputs, the initial state first of all, are left as they were."""
    x = _inputs(B, T, H, K, V, sparse=sparse, decay=decay)
    before = {n: v.clone() for n, v in x.items() if isinstance(v, torch.Tensor)}
    want = error_write(**x, backend="naive", chunk_size=C)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = error_write(**x, backend="torch_chunk", chunk_size=C)
        for name, a, b in zip(("read", "S", "p"), got, want):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"{name} (grad {grad})")
    for n, v in before.items():
        assert torch.equal(x[n], v), n


def test_chunk_without_a_resting_state_leaves_the_initial_state_alone():
    """No resting state (``D`` is the initial state itself): the in-place update works on a copy."""
    for B, H in ((1, 1), (2, 2)):
        x = {**_inputs(B, 21, H, 16, 6), "resting_state": None}
        S0 = x["initial_state"].clone()
        want = error_write(**x, backend="naive", chunk_size=8)
        with torch.no_grad():
            got = error_write(**x, backend="torch_chunk", chunk_size=8)
        assert torch.equal(x["initial_state"], S0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_chunk_one_is_the_exact_rule_and_larger_chunks_differ():
    x = _inputs(2, 40, 2, 32, 12, sparse=False)
    exact = error_write(**x, backend="naive")
    for backend in ("naive", "torch_chunk"):
        for a, b in zip(error_write(**x, backend=backend, chunk_size=1), exact):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # stale errors inside a chunk are a different rule: the test above would pass a backend ignoring C
    chunked = error_write(**x, backend="torch_chunk", chunk_size=8)
    assert float((chunked[1] - exact[1]).abs().max()) > 1e-6


def test_a_stream_split_on_a_chunk_boundary_equals_one_call():
    x = _inputs(2, 40, 2, 32, 9)
    read, S, p = error_write(**x, chunk_size=8)
    cut = 24
    r1, S1, p1 = error_write(**{k: (v[:, :cut] if k in SEQ else v) for k, v in x.items()}, chunk_size=8)
    rest = {k: (v[:, cut:] if k in SEQ else v) for k, v in x.items()}
    r2, S2, p2 = error_write(**{**rest, "initial_state": S1, "initial_probs": p1}, chunk_size=8)
    torch.testing.assert_close(torch.cat([r1, r2], 1), read, atol=1e-12, rtol=0)
    torch.testing.assert_close(S2, S, atol=1e-12, rtol=0)
    torch.testing.assert_close(p2, p, atol=1e-12, rtol=0)


def test_gradients_equal_the_naive_loop_and_float32_within_tolerance():
    x = _inputs(2, 19, 2, 16, 7, sparse=False)
    leaves = ("q", "k", "base", "eta", "g", "scale", "initial_state", "resting_state", "initial_probs")
    grads = []
    for backend in ("naive", "torch_chunk"):
        y = {k: (v.clone().requires_grad_(True) if k in leaves else v) for k, v in x.items()}
        read, S, p = error_write(**y, backend=backend, chunk_size=5)
        (read.sin().sum() + S.pow(2).sum() + p.log().sum()).backward()
        grads.append({k: y[k].grad for k in leaves})
    for k in leaves:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-9, rtol=1e-9, msg=k)
    x32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}
    for a, b in zip(error_write(**x32, chunk_size=5), error_write(**x, backend="naive", chunk_size=5)):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5)


def test_bad_chunk_sizes_are_named():
    x = _inputs(1, 4, 1, 8, 5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            error_write(**x, chunk_size=bad)
    with pytest.raises(ValueError, match="exact rule only"):
        error_write(**x, backend="torch_recurrent", chunk_size=4)
    with pytest.raises(ValueError, match="write_chunk"):
        EpisodicConfig(write="error", write_chunk=0)


def test_write_chunk_in_a_model_reads_the_chunked_rule_and_survives_save_load(tmp_path):
    model = _model()
    before = model.fingerprint()
    assert "write_chunk" not in model.memory("error").config.to_dict()  # old configs keep their fingerprint
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact, _ = model(ids)
        model.set_write("error", "error", chunk=16)
        chunked, state = model(ids)
    assert model.fingerprint() != before and model.memory("error").config.write_chunk == 16
    assert 1e-6 < float((chunked - exact).abs().max())  # the rule changed
    # one call over 40 tokens equals three calls cut on chunk boundaries (16, 16, 8)
    with torch.no_grad():
        st, parts = None, []
        for a, b in ((0, 16), (16, 32), (32, 40)):
            o, st = model(ids[:, a:b], state=st)
            parts.append(o)
    torch.testing.assert_close(torch.cat(parts, 1), chunked, atol=1e-10, rtol=0)
    model.save_pretrained(tmp_path / "m")
    loaded = PlasticTransformer.from_pretrained(tmp_path / "m").double().eval()
    assert loaded.memory("error").config.write_chunk == 16 and loaded.fingerprint() == model.fingerprint()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], chunked, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("with_E0", [True, False], ids=["E0", "noE0"])
def test_trace_from_state_in_place_equals_the_formula(dtype, tol, with_E0):
    """The state commit's end-of-call trace: the no-grad in-place path against the formula
    ``(S_T - M) + carry (E_0 - (S_0 - M))``, ``M`` broadcast over the batch as the memory passes it."""
    from cl_arch.memory.write import _trace_from_state

    g = torch.Generator().manual_seed(3)
    S_T, S0, E0 = (torch.randn(2, 3, 8, 5, generator=g, dtype=dtype) for _ in range(3))
    M = torch.randn(3, 8, 5, generator=g, dtype=dtype).expand(2, 3, 8, 5)
    carry = torch.rand(2, 3, 1, 1, generator=g, dtype=dtype)
    E0 = E0 if with_E0 else None
    want = _trace_from_state(S_T, S0, M, E0, carry)  # autograd on: the formula
    keep = [t.clone() for t in (S_T, S0)]
    with torch.no_grad():
        got = _trace_from_state(S_T, S0, M, E0, carry)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(S_T, keep[0]) and torch.equal(S0, keep[1])  # the inputs are not written
