"""Plot each package's ``adapt`` gain over ``frozen`` in the first and the second session (S dropped,
P kept) from ``cl-arch eval codebase --second-session`` reports, one panel per package.

    python docs/results/through/second_session/plot_sessions.py --out sessions.png \
        shipped=runs/second_session/shipped/error,through-same=runs/second_session/through-same/error

Each ``label=folder`` holds ``<package>/codebase.json`` for every ``--packages`` entry.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", help="label=folder pairs, comma-separated")
    ap.add_argument("--packages", default="json,email,xml")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs = dict(pair.split("=", 1) for pair in args.runs.split(","))
    pkgs = args.packages.split(",")
    fig, axes = plt.subplots(1, len(pkgs), figsize=(4.2 * len(pkgs), 3.4), squeeze=False)
    for ax, pkg in zip(axes[0], pkgs):
        for (label, folder), color in zip(runs.items(), ("C0", "C1", "C2", "C3")):
            with open(os.path.join(folder, pkg, "codebase.json")) as f:
                rep = json.load(f)
            for curve, style, session in ((rep["methods"]["adapt"]["curve"], "--", "1st"),
                                          (rep["second_session"]["adapt"]["curve"], "-", "2nd")):
                x = [p["x"] for p in curve]
                ax.plot(x, [p["y"] for p in curve], style, color=color, marker=".", label=f"{label}, {session}")
                ax.fill_between(x, [p["lo"] for p in curve], [p["hi"] for p in curve], color=color, alpha=0.12)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(pkg)
        ax.set_xlabel("bytes read")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("adapt: gain over frozen (bits/byte)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("episodic error writes: first session vs second (S dropped, P kept), 95% bands")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)


if __name__ == "__main__":
    main()
