"""Property tests (hypothesis): any input to ``plastic_rule`` or a ``Session`` gives a finite result or a
``ValueError`` that names the argument, never a crash deeper down or a silent NaN (issue 11)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cl_arch import PlasticConfig, PlasticTransformer, ReadoutConfig, Session
from cl_arch.kernels.plastic import plastic_rule

ARGS = ("q", "k", "v", "beta", "g", "lam", "scale", "initial_state", "initial_trace", "resting_state", "rule",
        "backend", "chunk_size")
SPECIAL = [0.0, 1.0, -1.0, 2.0, float("nan"), float("inf"), -float("inf"), 1e30]


@st.composite
def rule_inputs(draw):
    B, T, H, K, V = (draw(st.integers(1, n)) for n in (2, 9, 2, 4, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    x = dict(q=rnd(B, T, H, K), k=torch.nn.functional.normalize(rnd(B, T, H, K).float(), dim=-1).to(dtype),
             v=rnd(B, T, H, V), beta=torch.rand(B, T, H, generator=gen).to(dtype),
             g=-torch.rand(B, T, H, generator=gen).to(dtype))
    opt = dict(lam=0.5, initial_state=torch.zeros(B, H, K, V), initial_trace=torch.zeros(B, H, K, V),
               resting_state=0.1 * torch.randn(H, K, V, generator=gen))
    for name in opt:
        if draw(st.booleans()):
            x[name] = opt[name]
    # one corruption: a wrong shape, a special value, a wrong type, or nothing
    kind = draw(st.sampled_from(["none", "shape", "value", "value", "value", "type", "rule", "backend", "chunk"]))
    target = draw(st.sampled_from([n for n in ARGS[:10] if n in x] or ["q"]))
    if kind == "shape" and isinstance(x[target], torch.Tensor):
        t = x[target]
        x[target] = t[..., :-1] if t.shape[-1] > 1 else torch.cat([t, t], dim=-1)
    elif kind == "value" and isinstance(x[target], torch.Tensor) and x[target].numel():
        t = x[target].clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL[3:]))  # 2, nan, +-inf, 1e30
        x[target] = t
    elif kind == "value" and target == "lam":
        x["lam"] = draw(st.sampled_from(SPECIAL + [True]))
    elif kind == "type":
        x[target] = draw(st.sampled_from([None, 3, "x", [1.0]])) if target not in ("q", "k", "v", "beta") \
            else draw(st.sampled_from([3, "x", [1.0]]))
    elif kind == "rule":
        x["rule"] = draw(st.sampled_from(["delta", "hebb", "oja", 1]))
    elif kind == "backend":
        x["backend"] = draw(st.sampled_from(["auto", "naive", "torch_chunk", "torch_recurrent", "cuda", 0]))
    elif kind == "chunk":
        x["chunk_size"] = draw(st.sampled_from([1, 3, 0, -2, 2.5, True]))
    x["scale"] = draw(st.sampled_from([None, 0.5, 0.0, -1.0, float("nan")]))
    return x


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rule_inputs())
@example(dict(q=torch.randn(1, 1, 2, 1), k=torch.tensor([-1.0, 1e30]).view(1, 1, 2, 1), v=torch.randn(1, 1, 2, 1),
              beta=torch.full((1, 1, 2), 0.2), g=torch.full((1, 1, 2), -0.3)))  # |k|^2 overflows float32
def test_plastic_rule_any_input_gives_a_finite_result_or_a_named_error(x):
    try:
        o, S, E = plastic_rule(**x)
    except ValueError as e:
        assert any(name in str(e) for name in ARGS), str(e)
        return
    for t in (o, S, E):
        if t is not None:
            assert torch.isfinite(t.float()).all()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                                            n_attn_heads=2, memories=[ReadoutConfig(heads=1)])).eval()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(tokens=st.one_of(st.lists(st.integers(-3, 300), min_size=0, max_size=6), st.just("abc"), st.just(None),
                        st.just([1.5, 2.0])),
       reward=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.just("good")))
@example(tokens=[0], reward=3.4028235677973366e+38)  # finite in float64, inf once the advantage is float32
def test_session_any_input_is_used_or_refused_by_name(tiny, tokens, reward):
    s = Session(tiny)
    P0 = [p.clone() for p in s.P]
    try:
        s.observe(tokens)
    except ValueError as e:
        assert any(w in str(e) for w in ("token", "ids", "empty", "vocab", "int", "list")), str(e)
    try:
        s.reward(reward)
    except ValueError as e:
        assert "reward" in str(e), str(e)
        assert all(torch.equal(a, b) for a, b in zip(s.P, P0))  # a refused reward leaves P alone
        return
    assert reward is None or (isinstance(reward, float) and math.isfinite(reward))
    assert all(torch.isfinite(p).all() for p in s.P)
