"""Seed sweep of the reward-memory tests' learned thresholds (tests/test_reward_memory.py).

    python benchmarks/reward_memory_thresholds.py MODEL_DIR

MODEL_DIR: the recall model the tests use (pytest caches it in .pytest_cache/d/recall_model/<digest>).
Prints, for seeds 0-4 of the draws, each test's figures next to its threshold.
"""
import sys, torch, numpy as np
torch.set_num_threads(1)
from cl_arch import PlasticTransformer, Session
from cl_arch.eval import games
from cl_arch.eval.lib.learners import RowPolicy
from cl_arch.eval.lib.play import BanditEnv, PreferenceEnv, play
from cl_arch.train.reward_memory import HELD_OUT_TOKENS, RewardMemorySettings, with_reward_memory
from cl_arch.train.tasks import BOS, Bandit, PreferenceGame
base = PlasticTransformer.from_pretrained(sys.argv[1]).eval()
kept_pol = RowPolicy("kept", persist=True, use_reward=True, eta_s=0.0)
for sd in range(5):
    m = with_reward_memory(base, RewardMemorySettings(scale=8.0, eta_r=0.3))
    S, E = 4, 100; probs = [0.1, 0.1, 0.9, 0.1]
    envs = [BanditEnv(Bandit(k=4, seed=10*sd+s, probs=probs, arm_tokens=HELD_OUT_TOKENS["arms"][:4])) for _ in range(3) for s in range(S)]
    res = play(m, envs, games._policies(S, None, None, True), E, seed=3+sd, yoke=games._yoke(S, True), desc="b")
    last = res["expected"][:, -25:].mean(1)
    b = (last[:S].mean(), last[S:2*S].mean(), last[2*S:].mean())
    cues, answers = HELD_OUT_TOKENS["cues"][:4], HELD_OUT_TOKENS["reward_answers"]
    def kl(keys):
        mm = with_reward_memory(base, RewardMemorySettings(scale=8.0, eta_r=0.4, keys=keys)); ev=[]
        for s in range(4):
            g_ = PreferenceGame(4, 2, seed=s, cue_tokens=cues, answer_tokens=answers)
            g_.preferred = {c: answers[i % 2] for i, c in enumerate(g_.cues)}
            ev.append(PreferenceEnv(g_, 160, seed=50 + s + 10*sd))
        return play(mm, ev, [kept_pol]*4, 160, seed=5+sd, desc=keys)["expected"][:, -40:].mean()
    c = (kl("hidden+token"), kl("hidden"))
    m2 = with_reward_memory(base, RewardMemorySettings(scale=8.0, eta_r=0.4))
    c2, a2 = HELD_OUT_TOKENS["cues"][:4], HELD_OUT_TOKENS["answers"][:4]
    def late(credit):
        ev = [PreferenceEnv(PreferenceGame(4, 4, seed=s+10*sd, cue_tokens=c2, answer_tokens=a2), 160, seed=70+s+10*sd) for s in range(4)]
        return play(m2, ev, [kept_pol]*4, 160, seed=3+sd, delay=3, credit=credit, desc=credit)["expected"][:, -40:].mean()
    l = (late("stored"), late("current"))
    cs, an = HELD_OUT_TOKENS["cues"][:3], HELD_OUT_TOKENS["answers"][:3]; best = {x: an[i] for i, x in enumerate(cs)}
    g = torch.Generator().manual_seed(sd)
    def paid(keep):
        s = Session(m2, seed=11+sd); w=[]
        for t in range(120):
            cc = cs[int(torch.randint(0, 3, (1,), generator=g))]
            a = s.generate([BOS, cc], max_new_tokens=1, allowed_tokens=an)[0]
            r = 1.0 if a == best[cc] else 0.0; s.reward(r)
            if not keep: s.reset()
            w.append(r)
        return float(np.mean(w[-40:]))
    p = (paid(True), paid(False))
    print(f"seed {sd}: bandit kept/reset/yoked {b[0]:.3f}/{b[1]:.3f}/{b[2]:.3f} (>0.6, 0.3+-0.05, <kept-0.2) | cue tok/hid {c[0]:.3f}/{c[1]:.3f} (>0.75,<0.62) | late stored/current {l[0]:.3f}/{l[1]:.3f} (>0.6,<0.4) | session kept/reset {p[0]:.3f}/{p[1]:.3f} (>0.75,<0.55)", flush=True)
