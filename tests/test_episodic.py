"""The episodic memory (docs/design.md, "The episodic memory"): sharp wide keys, the state commit."""
import pytest
import torch
import torch.nn.functional as F

from cl_arch import EpisodicConfig, PlasticConfig, PlasticTransformer, ReadoutConfig, Session
from cl_arch.consolidate import fold
from cl_arch.kernels.plastic import naive_plastic_rule
from cl_arch.state import ModelState


def model_with_episodic(seed=0, dtype=torch.float64, readout=True, episodic=None, **kw):
    """A tiny model with a one-head readout (``readout=False``: none) and an episodic memory of 96
    features updated by ``episodic`` (``episodic=False``: none)."""
    memories = [ReadoutConfig(heads=1)] if readout else []
    if episodic is not False:
        memories.append(EpisodicConfig(**{"heads": 1, "features": 96, **(episodic or {})}))
    base = dict(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8, n_attn_heads=2, mlp_ratio=2.0,
                chunk_size=8, recurrent_threshold=4, memories=memories)
    base.update(kw)
    torch.manual_seed(seed)
    return PlasticTransformer(PlasticConfig(**base)).to(dtype).eval()


def test_episodic_is_the_last_fast_memory_and_state_slot():
    m = model_with_episodic()
    assert m.fast_layers()[-2:] == [m.readout, m.episodic] and m.output_memories() == [m.readout, m.episodic]
    _, state = m(torch.randint(0, 256, (2, 11)))
    assert len(state.layers) == m.config.n_layers + 2
    assert state.layers[-1].S.shape == (2, 1, 96, 256)  # [B, H, F, vocab]
    assert state.layers[-1].conv.shape == (2, 1, 32)  # unit(h) of the last position
    with pytest.raises(ValueError, match="episodic memory"):
        m(torch.randint(0, 256, (2, 3)), state=ModelState(state.layers[:-1], state.position))


def test_episodic_matches_the_rule_written_out(output_memory_parts):
    """q_t = phi(h_t), k_t = phi(h_{t-1}) (zero at t = 0), phi(h) = unit(relu(R unit(h) - theta)),
    v_t = one-hot(x_t); the read, times the read scale, is added to the logits."""
    m = model_with_episodic(episodic=dict(threshold=0.5))
    with torch.no_grad():
        m.episodic.W0.normal_(0, 0.1)
        m.episodic.read_scale.fill_(3.0)
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(1))
    logits, base, h = output_memory_parts(m, ids, "episodic")
    ep = m.episodic
    with torch.no_grad():
        hn = F.normalize(h, dim=-1)
        phi = F.normalize(torch.relu(hn @ ep.R.T - ep.key_threshold), dim=-1)
        assert ((phi > 0).double().mean() < 0.6) and (phi > 0).any()  # the threshold makes keys sparse
        k = torch.cat([torch.zeros_like(phi[:, :1]), phi[:, :-1]], 1).unsqueeze(2)
        v = F.one_hot(ids, 256).double().unsqueeze(2)
        beta = torch.sigmoid(ep.beta_logit).expand(1, 23, 1)
        g = (-ep.A_log.exp()).expand(1, 23, 1)
        o, _, _ = naive_plastic_rule(phi.unsqueeze(2), k, v, beta, g, scale=1.0, resting_state=ep.W0)
    assert torch.allclose(logits, base + 3.0 * o[:, :, 0], atol=1e-10)


@pytest.mark.parametrize("T,cut", [(63, 29), (40, 1), (17, 16)], ids=["T63-cut29", "T40-cut1", "T17-cut16"])
def test_reading_in_pieces_equals_one_call(T, cut):
    """The state (S, E and the cached unit(h)) carries the stream: pieces give the same logits and final state."""
    m = model_with_episodic(seed=T)
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        whole, s_whole = m(ids)
        a, s = m(ids[:, :cut])
        b, s = m(ids[:, cut:], state=s)
    assert torch.allclose(whole, torch.cat([a, b], 1), atol=1e-10)
    for x, y in zip(s_whole.layers[-1:], s.layers[-1:]):
        assert torch.allclose(x.S, y.S, atol=1e-10) and torch.allclose(x.E, y.E, atol=1e-10)


def test_episodic_is_causal():
    m = model_with_episodic(seed=4)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    other = ids.clone()
    other[0, 20] = (other[0, 20] + 1) % 256
    with torch.no_grad():
        a, _ = m(ids)
        b, _ = m(other)
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.allclose(a[:, 20:], b[:, 20:])


def test_a_second_session_starts_better_with_the_committed_p():
    """What the memory is for: a session reads a random byte string, commits (P <- S_T - W0), and a new
    session reading the same string again predicts it better than the first did; without the commit
    (P reset) it predicts it exactly as the first did. Fails if the commit, the resting state or the
    keys' sharpness is wrong."""
    for seed in range(3):
        m = model_with_episodic(seed=seed, readout=False, episodic=dict(features=512, threshold=1.0))
        with torch.no_grad():
            m.episodic.read_scale.fill_(6.0)
            m.episodic.beta_logit.fill_(3.0)
        text = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(seed)).tolist()

        def session_loss(saved):
            s = Session(m) if saved is None else Session.from_bytes(m, saved)  # a new session, P from disk
            nll = s.observe(text)  # prequential, NaN for the episode's first token
            loss = nll[1:].mean().item()
            s.end_episode()
            return loss, s

        first, s1 = session_loss(None)
        assert s1.P[-1].abs().max() > 0  # the state commit kept the episodic state
        again, _ = session_loss(s1.to_bytes())
        fresh, _ = session_loss(None)
        assert fresh == pytest.approx(first, abs=1e-9)
        assert again < first - 1.0, (seed, first, again)  # measured 1.62-1.90 nats lower over seeds 0-7


def test_embed_values_read_back_through_the_head():
    """episodic_values="embed": V = d_model, the read goes through the tied output head."""
    m = model_with_episodic(episodic=dict(values="embed"), readout=False)
    assert m.episodic.W0.shape == (1, 96, 32)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        m.episodic.read_scale.fill_(2.0)
        on, state = m(ids)
        assert state.layers[-1].S.shape == (1, 1, 96, 32)
        m.episodic.read_scale.zero_()
        off, _ = m(ids)
    assert not torch.allclose(on, off) and torch.equal(on[:, 0], off[:, 0])  # nothing written before x_0


def test_fold_of_an_episodic_p_is_exact():
    m = model_with_episodic()
    g = torch.Generator().manual_seed(3)
    P = [0.05 * torch.randn(1, l.n_heads, l.head_k_dim, l.head_v_dim, generator=g, dtype=torch.float64)
         for l in m.fast_layers()]
    ids = torch.randint(0, 256, (1, 25), generator=g)
    with torch.no_grad():
        before, _ = m(ids, state=m.init_state(1, P))
    fold(m, [p[0] for p in P])
    with torch.no_grad():
        after, _ = m(ids)
    assert torch.allclose(after, before, atol=1e-10)


def test_save_and_load_keep_the_projection(tmp_path):
    m = model_with_episodic(dtype=torch.float32, episodic=dict(seed=7))
    with torch.no_grad():
        m.episodic.read_scale.fill_(2.0)
    m.save_pretrained(tmp_path / "m")
    loaded = PlasticTransformer.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded.episodic.R, m.episodic.R)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], m(ids)[0])


def test_gradients_reach_the_episodic_settings_but_not_w0():
    m = model_with_episodic().train()
    ids = torch.randint(0, 256, (2, 24))
    logits, _ = m(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    ep = m.episodic
    for p in (ep.key_threshold, ep.A_log, ep.beta_logit, ep.read_scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert ep.W0.grad is None  # the readout holds the learned prior; this memory's W0 only takes folds


@pytest.mark.parametrize("field,value", [("heads", -1), ("features", 0), ("beta", 1.0), ("span", 0.5),
                                         ("threshold", float("nan")), ("threshold", -0.5), ("values", "dense")])
def test_bad_episodic_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"EpisodicConfig.{field}"):
        EpisodicConfig(**{field: value})
    with pytest.raises(ValueError, match=f"EpisodicConfig.{field}"):  # a config file's memories list
        PlasticConfig.from_dict({"memories": [{"kind": "episodic", field: value}]})


def test_train_episodic_learns_only_the_memory_settings():
    """A few steps on training spans: the memory's settings move, every other weight stays bitwise."""
    from cl_arch.train.episodic import EpisodicTrainConfig, train_episodic
    m = model_with_episodic(dtype=torch.float32, episodic=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = EpisodicTrainConfig(steps=3, batch_size=1, seq_len=64, n_spans=2, span_bytes=128,
                              episodic={"heads": 1, "features": 64})
    trained, record = train_episodic(m, cfg, progress=False, log=lambda *a: None)
    sd = trained.state_dict()
    for k, v in before.items():
        assert torch.equal(sd[k], v), k
    assert trained.episodic.key_threshold.item() != EpisodicConfig().threshold
    assert len(record["history"]) == 3 and set(record["learned"]) == {"threshold", "span", "beta", "scale"}
    assert [row[3] for row in record["history"]] == ["fresh", "own", "foreign"]
    with pytest.raises(ValueError, match="span_bytes >= 2 \\* seq_len"):
        EpisodicTrainConfig(seq_len=64, span_bytes=100)
    with pytest.raises(ValueError, match="carry"):
        EpisodicTrainConfig(carry=("later",))


def test_cli_adds_and_trains_an_episodic_memory(tmp_path):
    from cl_arch.scripts.cli import main
    m = model_with_episodic(dtype=torch.float32, episodic=False)
    m.save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    assert main(["train-episodic", "--init-from", str(tmp_path / "base"), "--output-dir", str(out), "--steps", "2",
                 "--features", "64", "--n-spans", "2", "--span-bytes", "128", "--seq-len", "64", "--no-progress"]) == 0
    loaded = PlasticTransformer.from_pretrained(out)
    assert loaded.config.memory("episodic").heads == 1 and loaded.config.memory("episodic").features == 64
    record = __import__("json").load(open(out / "episodic.json"))
    assert len(record["history"]) == 2 and "--features 64" in record["command"]


def test_a_negative_threshold_never_writes_under_the_zero_key():
    """theta below 0 (reached by training or set in a loaded file; the config refuses it) must not give
    the zero cache of every episode's first token a key: phi(0) = 0 whatever theta holds."""
    m = model_with_episodic(episodic=dict(threshold=0.5))
    with torch.no_grad():
        m.episodic.key_threshold.fill_(-0.7)
    assert float(m.episodic.features(torch.zeros(3, 32)).abs().max()) == 0.0
    ids = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(0))
    _, state = m(ids)
    S = state.layers[-1].S  # one token read: the only write is under k_0 = phi(zero cache)
    assert torch.equal(S, torch.zeros_like(S) + m.episodic.W0.to(S.dtype))
