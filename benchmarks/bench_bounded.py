"""Boundedness over 1e6 micro-updates: random tokens, random modulation, rewards in [-1, 1].

A session of the default byte model reads ``--tokens`` tokens in episodes of ``--episode-len``
and commits each with a uniform random reward in [-1, 1]. Checks that no state becomes NaN/inf,
and records the largest per-head Frobenius norms of S and P against the analytic bound
``|P| <= (|eta_s| + 2 |eta_r|) * clip / (1 - gamma)``. Prints a table, writes
``benchmarks/out/bench_bounded.json``; exits 1 if a check fails.

    python benchmarks/bench_bounded.py --tokens 1000000
"""
import argparse
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from cl_arch import PlasticConfig, PlasticTransformer, Session
from cl_arch.io import write_json
from cl_arch.state import FastLayerState


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--episode-len", type=int, default=64)
    ap.add_argument("--gamma", type=float, default=0.98)
    ap.add_argument("--eta-s", type=float, default=0.2)
    ap.add_argument("--eta-r", type=float, default=2.0)
    ap.add_argument("--clip", type=float, default=0.2, help="below the natural |E| (~0.4): the clip binds")
    ap.add_argument("--lam", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_bounded.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PlasticTransformer(PlasticConfig(n_layers=2, layer_types=["fast", "fast"])).eval()
    with torch.no_grad():
        for m in model.fast_layers():
            m.W0.normal_(0, 0.1)
    s = Session(model, lam=args.lam, gamma=args.gamma, eta_s=args.eta_s, eta_r=args.eta_r, clip=args.clip,
                rho=0.1, replay_size=8)
    bound = (abs(args.eta_s) + 2 * abs(args.eta_r)) * args.clip / (1 - args.gamma)
    g = torch.Generator().manual_seed(0)
    max_S = max_P = max_E = 0.0
    finite = True
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=args.tokens, unit="tok", mininterval=2.0)
    while tokens < args.tokens:
        n = min(args.episode_len, args.tokens - tokens)
        x = torch.randint(0, model.config.vocab_size, (n,), generator=g)
        s.observe(x, modulation=torch.rand(n, generator=g))
        for st in s.state.layers:
            if isinstance(st, FastLayerState):
                finite &= bool(torch.isfinite(st.S).all()) and bool(torch.isfinite(st.E).all())
                max_S = max(max_S, float(torch.linalg.vector_norm(st.S, dim=(-2, -1)).max()))
                max_E = max(max_E, float(torch.linalg.vector_norm(st.E, dim=(-2, -1)).max()))
        s.reward(float(torch.rand((), generator=g)) * 2 - 1)
        for P in s.P:
            finite &= bool(torch.isfinite(P).all())
            max_P = max(max_P, float(torch.linalg.vector_norm(P, dim=(-2, -1)).max()))
        tokens += n
        bar.update(n)
        if not finite:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    ok = finite and max_P <= bound and math.isfinite(s.baseline)
    res = {"tokens": tokens, "episodes": s.episodes, "episode_len": args.episode_len,
           "rule": {"lam": args.lam, "gamma": args.gamma, "eta_s": args.eta_s, "eta_r": args.eta_r,
                    "clip": args.clip}, "finite": finite, "max_head_norm_S": max_S, "max_head_norm_E": max_E,
           "max_head_norm_P": max_P, "P_bound": bound, "baseline": s.baseline, "seconds": elapsed,
           "tokens_per_s": tokens / elapsed, "ok": ok}
    print(f"{'micro-updates (tokens)':28s}{tokens:>14,d}")
    print(f"{'commits (episodes)':28s}{s.episodes:>14,d}")
    print(f"{'all finite':28s}{str(finite):>14s}")
    print(f"{'max |S| per head':28s}{max_S:14.3f}")
    print(f"{'max |E| per head':28s}{max_E:14.3f}")
    print(f"{'max |P| per head':28s}{max_P:14.3f}  (bound {bound:.1f})")
    print(f"{'time':28s}{elapsed:13.1f}s  ({tokens / elapsed:,.0f} tokens/s)")
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
