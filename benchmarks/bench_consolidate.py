"""Consolidation figures on a recall-trained model: fold exactness, distill gain retained and
forgetting, merge interference across methods and seeds.

    python benchmarks/bench_consolidate.py [--model DIR | --train-steps 400] [--seeds 3] [--threads 1]

A session observes ``key value`` pairs of a fixed association (8 keys for distill, 4 disjoint keys
per session for merge) over several episodes of 12 pairs (recall.py's cross-episode layout),
committing each into P (retention, eta_s = 1, lam = 1: the whole episode's writes, the memory the
model was trained to read after BOS; see tests/test_consolidate.py). Its gain is the NLL drop of
each value at the first occurrence of its key in a fresh episode (only P can know it). Prints
tables, writes ``benchmarks/out/bench_consolidate.json`` and a PNG.
"""
import argparse
import os
import statistics
import time

import torch

from cl_arch import PlasticTransformer
from cl_arch.consolidate import distill, fold, merge, undo
from cl_arch.io import write_json
from cl_arch.session import Session
from cl_arch.train.tasks import KEYS, association, association_episode, recall_anchor
from cl_arch.train.tasks import association_probes as probes


def learned_session(model, assoc, episodes, seed, n_pairs=12):
    s = Session(model, lam=1.0, eta_s=1.0, eta_r=0.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(episodes):
        s.observe(association_episode(assoc, n_pairs, g))
        s.end_episode()
    return s


def bench_fold(model, seed):
    s = learned_session(model, association(list(KEYS[:8]), seed), 8, seed)
    ids = torch.randint(32, 160, (4, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref, _ = model(ids, state=model.init_state(4, [p[0] for p in s.P]))
    rep = fold(model, s)
    with torch.no_grad():
        out, _ = model(ids)
    rel = float((out - ref).abs().max() / ref.abs().max())
    undo(model, rep)
    return {"max_rel_error": rel, "seconds": rep["seconds"]}


def bench_distill(model, seed, steps, lr, rank, budget):
    assoc = association(list(KEYS[:8]), seed)
    s = learned_session(model, assoc, 12, seed)
    rep = distill(model, s, anchor=recall_anchor(64, 16, 99 + seed), probes=probes(assoc, 8, 5 + seed),
                  budget=budget, steps=steps, lr=lr, rank=rank)
    undo(model, rep)
    return {k: rep[k] for k in ("gain_retained", "forgetting_bits", "forgetting_relative", "rolled_back",
                                "anchor_bits_before", "seconds")} | {"gain_nats": rep["gain"]["gain_nats"]}


def bench_merge(model, seed, configs):
    sessions, prs = [], []
    for u in range(4):
        assoc = association(list(KEYS[4 * u:4 * u + 4]), seed + 10 + u)
        sessions.append(learned_session(model, assoc, 8, seed + u))
        prs.append(probes(assoc, 8, seed + 50 + u))
    anchor = recall_anchor(64, 16, 99 + seed)
    from cl_arch.consolidate.common import mean_nll, to_batches

    ab = to_batches(anchor)
    base_anchor = mean_nll(model, ab)
    out = {}
    for name, kw in configs.items():
        rep = merge(model, sessions, probes=prs, reset=False, **kw)
        forget = (mean_nll(model, ab) - base_anchor) / 0.6931471805599453
        out[name] = {"retained": [e["gain_retained"] for e in rep["sessions"]],
                     "gain_nats": [e["gain_nats"] for e in rep["sessions"]], "forgetting_bits": forget}
        undo(model, rep)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="recall-trained model directory (default: train one)")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model = PlasticTransformer.from_pretrained(args.model)
    else:
        from cl_arch.train.recall import recall_accuracy, train_recall_model

        t = time.time()
        model = train_recall_model(steps=args.train_steps, seed=0, log=print)
        print(f"trained recall model in {time.time() - t:.0f}s, accuracy {recall_accuracy(model):.3f}")
    model.eval()

    results = {"fold": [], "distill": {}, "merge": []}
    for seed in range(args.seeds):
        results["fold"].append(bench_fold(model, seed))
    print("\nfold: max relative logit error", max(r["max_rel_error"] for r in results["fold"]))

    distill_cfgs = {"full 40 steps lr 3e-3": dict(steps=40, lr=3e-3, rank=None),
                    "full 100 steps lr 1e-3": dict(steps=100, lr=1e-3, rank=None),
                    "rank 4, 100 steps lr 1e-2": dict(steps=100, lr=1e-2, rank=4)}
    print(f"\n{'distill':28s} {'gain nats':>9s} {'retained':>9s} {'forget bits':>12s} {'rel':>7s} {'s':>6s}")
    for name, cfg in distill_cfgs.items():
        rows = [bench_distill(model, seed, budget=0.05, **cfg) for seed in range(args.seeds)]
        results["distill"][name] = rows
        for seed, r in enumerate(rows):
            print(f"{name + ' seed ' + str(seed):28s} {r['gain_nats']:9.3f} {r['gain_retained']:9.1%} "
                  f"{r['forgetting_bits']:+12.4f} {r['forgetting_relative']:+7.1%} {r['seconds']:6.1f}"
                  + ("  ROLLED BACK" if r["rolled_back"] else ""))

    merge_cfgs = {"mean": dict(method="mean"), "sum (mean x4)": dict(method="mean", scale=4.0),
                  "ties d=0.5": dict(method="ties", density=0.5), "ties d=0.5 x2": dict(method="ties", density=0.5, scale=2.0),
                  "ties d=0.2 x2": dict(method="ties", density=0.2, scale=2.0),
                  "regmean": dict(method="regmean")}
    print(f"\n{'merge (4 disjoint sessions)':28s} {'retained per session':>32s} {'min':>6s} {'forget bits':>12s}")
    for seed in range(args.seeds):
        res = bench_merge(model, seed, merge_cfgs)
        results["merge"].append(res)
        for name, r in res.items():
            print(f"{name + ' seed ' + str(seed):28s} {' '.join(f'{v:6.1%}' for v in r['retained']):>32s} "
                  f"{min(r['retained']):6.1%} {r['forgetting_bits']:+12.4f}")
    summary = {name: statistics.mean(min(res[name]["retained"]) for res in results["merge"]) for name in merge_cfgs}
    print("mean over seeds of the worst session's retained gain:", {k: round(v, 3) for k, v in summary.items()})

    path = write_json(os.path.join(args.out, "bench_consolidate.json"),
                      {"threads": args.threads, "seeds": args.seeds, "results": results})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        for i, name in enumerate(merge_cfgs):
            vals = [v for res in results["merge"] for v in res[name]["retained"]]
            ax.scatter([i] * len(vals), vals, alpha=0.6)
        ax.axhline(0.5, ls="--", c="gray")
        ax.set_xticks(range(len(merge_cfgs)), list(merge_cfgs), rotation=15)
        ax.set_ylabel("gain retained per session")
        ax.set_title("merge of 4 disjoint sessions")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_consolidate.png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
