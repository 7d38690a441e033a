"""The verdict memory on text (docs/design.md, "Rewards on text"): the session's trace is the policy
gradient, nothing but a verdict moves Q, a reject moves the read away from what was rejected and an
accept toward it, rejected text is not read as the user's, and Q survives a save. ~35 s on one core."""
import math

import numpy as np
import pytest
import torch

import cl_arch
from cl_arch import Session
from cl_arch.memory import VerdictConfig
from cl_arch.memory.output import OutputContext
from cl_arch.state import FastLayerState

CONTEXT = b"import os\n\n\ndef main(path):\n    name = os.path.basename(path)\n    print("


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = cl_arch.load_default()
    if m.memory("verdict") is None:
        m.add_memory(VerdictConfig())
    return m


def verdict_index(m):
    return m.fast_layer_names().index("verdict")


def log_pi(s: Session, token: int) -> float:
    return float(torch.log_softmax(s._next_logits.double(), -1)[token])


def test_trace_is_the_gradient_of_log_pi_at_the_memory(model):
    """Memory level, float64: d log softmax(z + scale phi^T Q)[a] / dQ = scale * E."""
    mem = model.verdict
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 1, model.config.d_model, generator=g, dtype=torch.float64)
    z = torch.randn(1, 1, model.config.vocab_size, generator=g, dtype=torch.float64)
    Q = (0.1 * torch.randn(1, mem.n_heads, mem.head_k_dim, mem.head_v_dim, generator=g,
                           dtype=torch.float64)).requires_grad_()
    mem64 = mem.double()
    try:
        read, st = mem64(OutputContext(h, torch.zeros(1, 1, dtype=torch.long), model.embed, model.lm_head, z),
                         FastLayerState(P=Q))
        a = 7
        torch.log_softmax(z + read, -1)[0, 0, a].backward()
        E = mem64.reinforce(st, torch.tensor([a]), (z + read).detach()[:, -1]).E
    finally:
        mem.float()
    assert float(E.abs().sum()) > 0
    torch.testing.assert_close(Q.grad, float(mem.read_scale[0]) * E, rtol=1e-10, atol=1e-12)


def test_session_trace_is_the_gradient_of_its_samples(model):
    """Session level: E after generating two tokens = the gradient of their summed log pi w.r.t. Q,
    from one differentiable forward over prompt + tokens."""
    s = Session(model, seed=3)
    prompt = list(CONTEXT)
    toks = s.generate(prompt, max_new_tokens=2)
    vi = verdict_index(model)
    E = s.state.fast()[vi].E
    Q = torch.zeros_like(s.P[vi]).requires_grad_()
    P = [p if i != vi else Q for i, p in enumerate(s.P)]
    logits, _ = model(torch.tensor([prompt + toks]), state=model.init_state(1, P))
    lp = torch.log_softmax(logits[0].double(), -1)
    T = len(prompt)
    (lp[T - 1, toks[0]] + lp[T, toks[1]]).backward()
    torch.testing.assert_close(Q.grad, float(model.verdict.read_scale[0]) * E, rtol=1e-3, atol=1e-6)


def test_only_a_verdict_on_generated_text_moves_q(model):
    vi = verdict_index(model)
    s = Session(model, seed=0)
    s.observe(CONTEXT)
    s.reward(1.0)  # observe only: no trace
    assert torch.equal(s.P[vi], torch.zeros_like(s.P[vi]))
    s.generate(CONTEXT, max_new_tokens=3)
    s.end_episode()  # no reward: Q keeps
    assert torch.equal(s.P[vi], torch.zeros_like(s.P[vi]))
    s.baseline = 0.0
    s.generate(CONTEXT, max_new_tokens=3)
    s.verdict(0.0)  # r = b: no advantage
    assert torch.equal(s.P[vi], torch.zeros_like(s.P[vi]))
    s.generate(CONTEXT, max_new_tokens=3)
    s.verdict(1.0)
    assert float(s.P[vi].abs().sum()) > 0


def _after_verdict(model, r: float):
    """log pi of the greedy suggestion at CONTEXT in the next episode, after a verdict ``r`` (baseline 0.5);
    and whether the verdict put the session back where the suggestion started."""
    s = Session(model, seed=0)
    s.baseline = 0.5
    s.observe(CONTEXT)
    before = s._next_logits.clone()
    a = s.generate(b"", max_new_tokens=1, temperature=0)[0]
    s.verdict(r, keep=False)
    back = torch.equal(s._next_logits, before)
    s.end_episode()
    s.observe(CONTEXT)  # the same context in a new episode reads Q (and what the reading memories kept)
    return log_pi(s, a), back


def test_reject_moves_away_accept_moves_toward(model):
    """Against r = b (no advantage: the reading memories' commit alone), a reject lowers log pi of the
    rejected token and an accept raises it."""
    (rej, b0), (same, b1), (acc, b2) = (_after_verdict(model, r) for r in (0.0, 0.5, 1.0))
    assert b0 and b1 and b2
    assert rej < same - 0.01 and acc > same + 0.01, (rej, same, acc)


def test_a_rejected_suggestion_is_not_read_as_the_users_text(model):
    """Reject: the reading memories commit what they would have without the suggestion (bitwise);
    accept: the suggestion stays read."""
    names = model.fast_layer_names()
    ep = names.index("episodic")
    a, b = Session(model, seed=0), Session(model, seed=0)
    a.observe(CONTEXT)
    a.generate(b"", max_new_tokens=4)
    a.reward(0.0)
    b.observe(CONTEXT)
    b.reward(0.0)
    assert torch.equal(a.P[ep], b.P[ep])
    c = Session(model, seed=0)
    c.observe(CONTEXT)
    n = c.episode_length
    c.generate(b"", max_new_tokens=4)
    c.verdict(1.0)
    assert c.episode_length == n + 4
    c.generate(b"", max_new_tokens=4)
    c.verdict(0.0)
    assert c.episode_length == n + 4


def test_bad_verdicts_error_and_change_nothing(model):
    s = Session(model, seed=0)
    with pytest.raises(ValueError, match="no suggestion pending"):
        s.verdict(1.0)
    s.generate(CONTEXT, max_new_tokens=2)
    snap_state, P, b = s.state, [p.clone() for p in s.P], s.baseline
    for bad in (float("nan"), math.inf, "1", True):
        with pytest.raises(ValueError):
            s.verdict(bad)
        with pytest.raises(ValueError):
            s.reward(bad)
    assert s.state is snap_state and s.baseline == b
    assert all(torch.equal(x, y) for x, y in zip(s.P, P))
    with pytest.raises(ValueError, match="keep"):
        s.verdict(1.0, keep="yes")


def test_q_survives_save_and_load(model, tmp_path):
    vi = verdict_index(model)
    s = Session(model, seed=0)
    for r in (1.0, 0.0, 1.0):
        s.generate(CONTEXT, max_new_tokens=2)
        s.reward(r)
    assert float(s.P[vi].abs().sum()) > 0
    s.save(tmp_path / "s.safetensors")
    t = Session.load(model, tmp_path / "s.safetensors")
    assert torch.equal(t.P[vi], s.P[vi]) and t.baseline == s.baseline


def _hidden_preference(model, rewarded: bool, seed: int, trials: int = 30) -> float:
    """A user who accepts '"' and rejects "'" (the shipped model mostly proposes "'" here): proposals
    sampled among the two quotes after drawn contexts; returns the final policy's expected acceptance
    (mean over the contexts of pi('"') among the two)."""
    contexts = [b"    x = ", b"    print(", b"    d[", b"    return ", b"    if name == ", b"    f(a, "]
    s = Session(model, seed=seed)
    g = np.random.default_rng(seed)
    quotes = [ord("'"), ord('"')]
    for _ in range(trials):
        c = contexts[int(g.integers(len(contexts)))]
        a = s.generate(b"def f(a):\n" + c, max_new_tokens=1, allowed_tokens=quotes)[0]
        if rewarded:
            s.reward(1.0 if a == ord('"') else 0.0)
        else:
            s.end_episode()  # the same reading, no verdict
    p = []
    for c in contexts:
        s.observe(b"def f(a):\n" + c)
        p.append(float(torch.softmax(s._next_logits[quotes].double(), -1)[1]))
        s.end_episode()
    return float(np.mean(p))


def test_rewarded_beats_unrewarded_on_a_hidden_preference(model):
    """Seeds 0-3, 30 proposals each. Measured when written: rewarded 0.94-0.98 (mean 0.97), unrewarded
    0.19-0.97 (mean 0.59: it reads its own proposals back and drifts toward whichever it drew early);
    the margin asked on the means is 0.2 (measured 0.37)."""
    rew = [_hidden_preference(model, True, s) for s in range(4)]
    unr = [_hidden_preference(model, False, s) for s in range(4)]
    assert min(rew) > 0.85 and np.mean(rew) - np.mean(unr) > 0.2, (rew, unr)


def test_the_benchmark_rows_are_what_a_session_does(model):
    """cl_arch.eval.lib.preferences.simulate's rewarded row = a Session that observes the shared text,
    proposes (first byte among the quotes, then greedy), and sends verdict(r, keep=False): the same
    suggestions and verdicts, and Q to float rounding."""
    import os

    from cl_arch.eval.lib import preferences as PR
    from cl_arch.train.data import resolve_sources, stdlib_dir

    text, points = PR.shared_text(resolve_sources(os.path.join(stdlib_dir(), "logging")), 6, seed=0)
    users, yoke = PR.draw_users(2, 0)
    final = {}
    out = PR.simulate(model, text, points, users, max_len=3, yoke=yoke, final=final)
    s = Session(model, seed=0)
    vi = verdict_index(model)
    pos, acc = 0, []
    for pt in points:
        s.observe(list(text[pos:pt.offset]))
        pos = pt.offset
        sugg = s.generate([], max_new_tokens=1, temperature=0, allowed_tokens=list(PR.QUOTES))
        sugg += s.generate([], max_new_tokens=2, temperature=0)
        kept = PR.accepted_chars(bytes(sugg), PR.user_target(text, pt, int(users[0, pt.kind]), 3))
        acc.append(float(kept > 0))
        s.verdict(acc[-1], keep=False)
    assert acc == out["rewarded"][0].tolist()
    assert float(final["Q"][0].abs().sum()) > 0
    torch.testing.assert_close(s.P[vi][0], final["Q"][0], rtol=1e-4, atol=1e-6)
    assert abs(s.baseline - float(final["b"][0])) < 1e-6


def test_the_codebase_learner_reads_as_without_the_verdict_memory(model):
    """The codebase and games benchmarks' EpisodeLearner never generates, so the verdict memory builds no
    trace there: logits and every other memory's commits bitwise equal to the model without it, Q stays 0
    (3 KB of json in 1 KB episodes; 12 KB in 2 KB episodes measured the same when written)."""
    from cl_arch.eval.lib.learners import EpisodeLearner, RowPolicy
    from cl_arch.eval.lib.streams import held_out_package, segment_stream
    from cl_arch.train.data import resolve_sources

    segs = segment_stream(resolve_sources(held_out_package("json")), 3000, 1024)
    pols = [RowPolicy("adapt", persist=True), RowPolicy("adapt+reward", persist=True, use_reward=True)]

    def run():
        learner, out = EpisodeLearner(model, pols), []
        for k, (seg, prev) in enumerate(segs):
            out.append(learner.step(torch.tensor([[prev] + list(seg)] * 2)).clone())
            learner.end_episode([float(k % 2)] * 2)
        return out, [p.clone() for p in learner.P]

    on, P_on = run()
    with model.memories_off("verdict"):
        off, P_off = run()
    vi = verdict_index(model)
    assert len(segs) >= 3 and all(torch.equal(a, b) for a, b in zip(on, off))
    assert all(torch.equal(a, b) for a, b in zip([p for i, p in enumerate(P_on) if i != vi], P_off))
    assert not P_on[vi].any()
