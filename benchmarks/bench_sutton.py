"""Sutton test, full size: the reward-only hidden-preference game (8 cues x 8 answers).

A model trained on associative recall (``train_recall_model``, or ``--model DIR``) plays
``--episodes`` episodes per seed with adaptation on and, on the same seeds and cue sequences,
with the state reset every episode (``adapt=False``). Sutton delta (a variant of the one in
docs/design.md, "Measuring learning") = mean reward over the last quarter of episodes, adapted
minus reset, paired by seed; 95% interval by the paired bootstrap over seeds (``cl_arch.stats``, 10,000
resamples). Prints a table, writes ``benchmarks/out/bench_sutton.json``.

    python benchmarks/bench_sutton.py --seeds 8 --episodes 200
"""
import argparse
import os
import time

import torch

from cl_arch import PlasticTransformer, Session
from cl_arch.io import write_json
from cl_arch.state import FastLayerState
from cl_arch.stats import sutton_delta
from cl_arch.train.recall import train_recall_model
from cl_arch.train.session_play import play_sessions
from cl_arch.train.tasks import PreferenceGame


def play(model, adapt, seeds, n_episodes, rule, n_cues, n_answers):
    """Rewards ``[len(seeds), n_episodes]`` and first-episode trace norms (per head)."""
    games = [PreferenceGame(n_cues, n_answers, seed=s) for s in seeds]
    sessions = [Session(model, adapt=adapt, seed=1000 + s, **rule) for s in seeds]
    cues = [g.cue_sequence(n_episodes, seed=2000 + s) for g, s in zip(games, seeds)]
    norms = []

    def first_trace_norms(e, sessions):
        if e == 0:
            norms.extend(float(torch.linalg.vector_norm(st.E, dim=(-2, -1)).max())
                         for s in sessions for st in s.state.layers if isinstance(st, FastLayerState))

    return play_sessions(sessions, games, cues, on_answer=first_trace_norms), norms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder; default: train on recall")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--cues", type=int, default=8)
    ap.add_argument("--answers", type=int, default=8)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--gamma", type=float, default=0.98)
    ap.add_argument("--eta-r", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=2.0)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_sutton.json"))
    args = ap.parse_args()
    if args.seeds < 5:
        ap.error("--seeds must be >= 5 for an interval worth quoting")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = PlasticTransformer.from_pretrained(args.model) if args.model else \
        train_recall_model(steps=args.train_steps, seed=0, log=print)
    t_train = time.perf_counter() - t0
    rule = dict(lam=args.lam, gamma=args.gamma, eta_s=0.0, eta_r=args.eta_r, clip=args.clip, rho=args.rho)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    R_on, norms = play(model, True, seeds, args.episodes, rule, args.cues, args.answers)
    R_off, _ = play(model, False, seeds, args.episodes, rule, args.cues, args.answers)
    rule_flip = dict(rule, eta_r=-args.eta_r)
    R_flip, _ = play(model, True, seeds, args.episodes, rule_flip, args.cues, args.answers)
    t_play = time.perf_counter() - t0
    q = args.episodes // 4
    first, last = R_on[:, :q].mean(1), R_on[:, -q:].mean(1)
    reset_last, flip_last = R_off[:, -q:].mean(1), R_flip[:, -q:].mean(1)
    delta = last - reset_last
    st = sutton_delta(last.double().numpy(), reset_last.double().numpy(), n_boot=10_000)
    lo, hi = st["sutton_ci"]
    res = {
        "seeds": args.seeds, "episodes": args.episodes, "cues": args.cues, "answers": args.answers,
        "chance": 1 / args.answers, "rule": rule, "trace_norm_first_episode_median": float(torch.tensor(norms).median()),
        "reward_first_quarter": float(first.mean()), "reward_last_quarter": float(last.mean()),
        "reward_last_quarter_reset": float(reset_last.mean()),
        "reward_last_quarter_eta_r_flipped": float(flip_last.mean()),
        "sutton_delta": st["sutton_delta"], "sutton_delta_ci95": [lo, hi],
        "per_seed_delta": delta.tolist(),
        "curve_adapt": R_on.mean(0).tolist(), "curve_reset": R_off.mean(0).tolist(),
        "train_s": t_train, "play_s": t_play, "threads": args.threads,
    }
    print(f"|E_T| per head at episode 1 (median): {res['trace_norm_first_episode_median']:.2f}; clip {args.clip}")
    print(f"{'':34s}{'reward':>8s}")
    print(f"{'adapt, first quarter':34s}{res['reward_first_quarter']:8.3f}")
    print(f"{'adapt, last quarter':34s}{res['reward_last_quarter']:8.3f}")
    print(f"{'state reset, last quarter':34s}{res['reward_last_quarter_reset']:8.3f}")
    print(f"{'eta_r sign flipped, last quarter':34s}{res['reward_last_quarter_eta_r_flipped']:8.3f}")
    print(f"Sutton delta {res['sutton_delta']:+.3f} [95% CI {lo:+.3f}, {hi:+.3f}] over {args.seeds} seeds x "
          f"{args.episodes} episodes (chance {1 / args.answers:.3f})")
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
