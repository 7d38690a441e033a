"""Next-token fast layers (``FastLayerConfig.target = "next"``): the write at t is ``k_{t-1} -> v_t``.

The rule's kernels are unchanged (their backends are checked against the naive rule in
test_plastic_rule.py); what is new is which key a position writes under, rebuilt across calls from
the conv cache. Checked: the keys are the "same" layer's keys shifted by one, pieces equal one call
(chunked and per-token paths, state passed in and out), gradients reach every projection, a model
with such layers decodes token by token as it reads whole, and bad settings are named. ~3 s.
"""
import pytest
import torch

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.memory import FastLayerConfig, FastWeightLayer
from cl_arch.state import StepContext


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def layer_pair(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=32, n_heads=2, head_k_dim=8, head_v_dim=8, conv_size=4, chunk_size=16, **kw)
    nxt = FastWeightLayer(FastLayerConfig(target="next", **cfg)).double()
    same = FastWeightLayer(FastLayerConfig(target="same", **cfg)).double()
    same.load_state_dict(nxt.state_dict())
    return nxt, same


def test_keys_are_the_previous_positions_keys():
    nxt, same = layer_pair()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    qn, kn, vn, cache_n = nxt.project_qkv(x)
    qs, ks, vs, cache_s = same.project_qkv(x)
    torch.testing.assert_close(qn, qs, rtol=0, atol=0)
    torch.testing.assert_close(vn, vs, rtol=0, atol=0)
    torch.testing.assert_close(kn[:, 1:], ks[:, :-1], rtol=0, atol=0)
    assert kn[:, 0].abs().max() == 0  # nothing before the stream: a zero key writes nothing
    assert cache_n.shape[1] == cache_s.shape[1] + 1 == nxt.cache_shape(2)[1]
    # Across calls the first key of a piece is the last position of the piece before.
    _, k2, _, _ = nxt.project_qkv(x[:, 10:], nxt.project_qkv(x[:, :10])[3])
    torch.testing.assert_close(k2, kn[:, 10:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("splits", [[63], [1, 17, 45], [5, 1, 1, 56]], ids=["T63", "T1-17-45", "T5-1-1-56"])
def test_pieces_equal_one_call(training, splits):
    layer, _ = layer_pair(seed=1)
    layer.train(training)
    x = torch.randn(2, sum(splits), 32, dtype=torch.float64)
    y_all, st_all = layer(x, None, StepContext())
    ys, state, pos = [], None, 0
    for n in splits:
        y, state = layer(x[:, pos:pos + n], state, StepContext())
        ys.append(y)
        pos += n
    y = torch.cat(ys, 1)
    assert rel_err(y, y_all) < 1e-10
    assert rel_err(state.S, st_all.S) < 1e-10
    assert rel_err(state.E, st_all.E) < 1e-10
    torch.testing.assert_close(state.conv, st_all.conv, rtol=1e-12, atol=1e-12)  # matmul rounding by shape


def test_gradients_reach_every_projection_and_are_finite():
    layer, _ = layer_pair(seed=2)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    y, state = layer(x, None, StepContext())
    (y.square().sum() + state.S.sum()).backward()
    for name in ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "o_proj"):
        g = getattr(layer, name).weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert layer.conv.conv.weight.grad.abs().sum() > 0


def test_recall_reads_what_followed_the_same_context():
    """A hand-built next layer: keys = the previous token, values = this token. After reading
    "a b ... a", the read at the second "a" is "b"'s value, which a "same" layer cannot give."""
    torch.manual_seed(0)
    d = 16
    layer = FastWeightLayer(FastLayerConfig(d_model=d, n_heads=1, head_k_dim=d, head_v_dim=d, conv_size=2,
                                            target="next", use_gate=False)).double().eval()
    with torch.no_grad():
        eye = torch.eye(d, dtype=torch.float64)
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
            proj.weight.copy_(eye)
        layer.conv.conv.weight.zero_()
        layer.conv.conv.weight[:, 0, -1] = 10.0  # identity through the conv (silu(10 x) ~ 10 x for x = 1)
        layer.b_proj.weight.zero_()  # beta = 0.5
        layer.a_proj.weight.zero_()
        layer.A_log.fill_(-30.0)  # no decay
        layer.W0.zero_()
    tok = [3, 7, 11, 3]
    x = eye[tok][None]
    y, _ = layer(x, None, StepContext())
    # The read at the last position points at token 7's value: compare it with reading 7 directly.
    o = layer.o_proj.weight.pinverse() @ y[0, -1]
    assert o.argmax().item() == 7


def test_model_decodes_token_by_token_as_it_reads_whole():
    torch.manual_seed(3)
    cfg = PlasticConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                        n_attn_heads=2, layer_types=["fast", "attn"], attn_window=16, chunk_size=16,
                        conv_size=4, target="next", memories=[])
    model = PlasticTransformer(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 41))
    with torch.no_grad():
        whole, _ = model(ids)
        state, steps = None, []
        for t in range(41):
            lg, state = model(ids[:, t:t + 1], state=state)
            steps.append(lg)
    assert rel_err(torch.cat(steps, 1), whole) < 1e-9


@pytest.mark.parametrize("bad,msg", [(dict(target="prev"), "target"), (dict(target="next", conv_size=0), "conv_size")])
def test_bad_settings_are_named(bad, msg):
    with pytest.raises(ValueError, match=msg):
        FastLayerConfig(**bad)
