"""Curves of ``cl-arch train-through`` runs: training bits/byte per step (the whole 16 KB stream, its first
and last episode) and validation bits/byte per episode index before and after, on the tuning package;
a PNG and a markdown table.

    python benchmarks/through_report.py --runs same=runs/through-same,next=runs/through-next --out docs/results/through
"""
import argparse
import json
import os

import numpy as np


def smooth(x, k=9):
    x = np.asarray(x, dtype=float)
    if len(x) < k:
        return x
    return np.convolve(np.pad(x, (k // 2, k // 2), mode="edge"), np.ones(k) / k, mode="valid")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="label=run folder pairs, comma-separated")
    ap.add_argument("--out", default="runs/through_report")
    args = ap.parse_args(argv)
    runs = dict(pair.split("=", 1) for pair in args.runs.split(","))
    os.makedirs(args.out, exist_ok=True)
    data = {}
    for label, folder in runs.items():
        res = json.load(open(os.path.join(folder, "results.json")))
        steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        data[label] = {"val_before": res["val_before"], "val_after": res["val_after"], "steps": res["steps"],
                       "seconds": res["seconds"], "bytes_per_step": res["bytes_per_step"],
                       "train": [{k: s[k] for k in ("step", "bpb", "bpb_first", "bpb_last")} for s in steps],
                       "config": res["through"]}
    with open(os.path.join(args.out, "through.json"), "w") as f:
        json.dump(data, f, indent=1)
    print("| run | steps | val before: episode 1 / 8 / mean | val after: episode 1 / 8 / mean | "
          "train, last 10 steps: episode 1 / last |")
    print("|---|---|---|---|---|")
    for label, d in data.items():
        b, a, tr = d["val_before"], d["val_after"], d["train"][-10:]
        first = np.mean([t["bpb_first"] for t in tr])
        last = np.mean([t["bpb_last"] for t in tr])
        bs = "-" if b is None else f"{b[0]:.3f} / {b[-1]:.3f} / {np.mean(b):.3f}"
        print(f"| {label} | {d['steps']} | {bs} | {a[0]:.3f} / {a[-1]:.3f} / {np.mean(a):.3f} | "
              f"{first:.3f} / {last:.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, d in data.items():
        s = [t["step"] for t in d["train"]]
        line, = left.plot(s, smooth([t["bpb"] for t in d["train"]]), label=f"{label}: stream")
        left.plot(s, smooth([t["bpb_last"] for t in d["train"]]), ls=":", color=line.get_color(),
                  label=f"{label}: last episode")
        ep = np.arange(1, len(d["val_after"]) + 1)
        if d["val_before"] is not None:
            right.plot(ep, d["val_before"], ls="--", color=line.get_color(), label=f"{label}: before")
        right.plot(ep, d["val_after"], marker="o", color=line.get_color(), label=f"{label}: after")
    left.set(xlabel="step", ylabel="training bits/byte (smoothed)", title="training streams (16 KB)")
    right.set(xlabel="episode (2 KB) along the stream", ylabel="bits/byte", title="validation (asyncio windows)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "through.png"), dpi=110)
    print(f"wrote {args.out}/through.json and through.png")


if __name__ == "__main__":
    main()
