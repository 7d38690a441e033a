"""Task generators: token ranges, structure of each task, seeding."""
import pytest
import torch

from cl_arch.train import tasks
from cl_arch.train.tasks import (ARMS, BOS, KEYS, NEG, POS, VALUES, Bandit, PreferenceGame, cue_reward_batch,
                                 recall_batch, recall_episodes)


def test_ranges_are_disjoint_and_in_the_byte_vocabulary():
    ranges = [set(range(0, 6)), set(ARMS), set(KEYS), set(VALUES)]
    for i, a in enumerate(ranges):
        assert max(a) < tasks.VOCAB_SIZE
        for b in ranges[i + 1:]:
            assert not a & b


def test_recall_episodes_structure_and_mask():
    eps = recall_episodes(8, n_episodes=3, n_pairs=10, n_keys=6, n_values=5, seed=3)
    assert len(eps) == 3
    value_of = [dict() for _ in range(8)]
    for x, y, m in eps:
        assert x.shape == y.shape == m.shape == (8, 20)
        assert (x[:, 0] == BOS).all() and torch.equal(x[:, 1:], y[:, :-1])
        for b in range(8):
            for j in range(10):
                k, v = int(x[b, 2 * j + 1]), int(y[b, 2 * j + 1])
                assert k in KEYS[:6] and v in VALUES[:5]
                # recallable exactly when the key was shown before, in this or an earlier episode
                assert bool(m[b, 2 * j + 1]) == (k in value_of[b])
                assert value_of[b].setdefault(k, v) == v  # one hidden map per row
        assert not m[:, 0::2].any()  # only key positions (targets = values) can carry loss
    a = recall_episodes(4, 2, 5, seed=1)
    b = recall_episodes(4, 2, 5, seed=1)
    assert all(torch.equal(p, q) for ea, eb in zip(a, b) for p, q in zip(ea, eb))
    x, y, m = recall_batch(4, 5, seed=1)
    assert x.shape == (4, 10) and torch.equal(x, recall_batch(4, 5, seed=1)[0]) and (x[:, 0] == BOS).all()


def test_preference_game():
    g = PreferenceGame(8, 8, seed=5)
    assert g.chance == 1 / 8 and g.cues == list(KEYS[:8]) and g.answers == list(VALUES[:8])
    assert PreferenceGame(8, 8, seed=5).preferred == g.preferred
    assert any(PreferenceGame(8, 8, seed=s).preferred != g.preferred for s in range(6, 9))
    for c in g.cues:
        assert g.prompt(c) == [BOS, c]
        assert sum(g.reward(c, a) for a in g.answers) == 1.0
        assert g.reward(c, g.preferred[c]) == 1.0
    seq = g.cue_sequence(400, seed=1)
    assert seq == g.cue_sequence(400, seed=1) and set(seq) == set(g.cues)
    with pytest.raises(ValueError):
        g.prompt(VALUES[0])
    with pytest.raises(ValueError):
        PreferenceGame(0, 8)


def test_cue_reward_batch():
    x, y, m = cue_reward_batch(6, n_pairs=12, n_cues=4, seed=0)
    sign = [dict() for _ in range(6)]
    for b in range(6):
        for j in range(12):
            c, r = int(x[b, 2 * j + 1]), int(y[b, 2 * j + 1])
            assert c in KEYS[:4] and r in (POS, NEG)
            assert bool(m[b, 2 * j + 1]) == (c in sign[b])
            assert sign[b].setdefault(c, r) == r
    all_pos = cue_reward_batch(3, 8, p_positive=1.0, seed=0)[1]
    assert set(all_pos[:, 1::2].flatten().tolist()) == {POS}
    with pytest.raises(ValueError):
        cue_reward_batch(2, p_positive=1.5)


def test_bandit():
    b = Bandit(k=4, seed=0)
    assert b.prompt() == [BOS, tasks.ASK] and b.arms == list(ARMS[:4])
    assert b.best == b.arms[max(range(4), key=lambda i: b.probs[i])]
    draws = [b.pull(b.best) for _ in range(2000)]
    assert abs(sum(draws) / 2000 - max(b.probs)) < 0.05
    c, d = Bandit(k=4, seed=0), Bandit(k=4, seed=0)
    assert [c.pull(c.arms[1]) for _ in range(50)] == [d.pull(d.arms[1]) for _ in range(50)]
    assert b.pull(VALUES[0]) == 0.0  # not an arm
    fixed = Bandit(k=2, probs=[0.0, 1.0])
    assert fixed.pull(fixed.arms[0]) == 0.0 and fixed.pull(fixed.arms[1]) == 1.0
    with pytest.raises(ValueError):
        Bandit(k=2, probs=[0.5])
