"""The adaptation ablation of issue 24: models (the shipped one, and models trained through adaptation
with the in-block fast layers' "same" or "next" write target) x output-memory writes (the episodic
memory's one-hot delta write or the error-driven write), each read by ``cl-arch eval codebase``
(rows frozen, adapt, no_persist; gains at 1/10/100 KB, stdlib drift, ms/byte at batch 1) and by
``cl-arch eval offset --no-readout --no-episodic`` (what the in-block fast layers alone carry past the
attention window), then one table (markdown) and one JSON.

    python benchmarks/adaptation_ablation.py --out runs/ablation \
        --models shipped=default,through-same=runs/through-same/final,through-next=runs/through-next/final

``--second-session`` also reads every stream again as a new session (S dropped, P kept) and reports
each row's second session against its first; ``--fold-budget B`` the held-out drift after a fold
guarded by that forgetting budget (the fold fraction c and the anchor forgetting beside it):

    python benchmarks/adaptation_ablation.py --out runs/second_session --writes error --no-offset \
        --second-session --fold-budget 0.01 --models shipped=default,through-same=runs/through-same/final

Tuned dynamic evaluation is not rerun here (it costs hours per package on one thread): its figures
are those of ``cl-arch eval codebase`` with ``--dynamic-eval`` in docs/results/reading.md.
The error write's ``beta * scale`` = 0.5 was chosen on asyncio (benchmarks/error_writes.py).
"""
import argparse
import json
import os
import subprocess
import sys

from cl_arch import PlasticTransformer, load_default

WRITES = ("delta", "error")
POINTS = ("1k", "10k", "100k")


def build(source: str, write: str, folder: str) -> str:
    """Save ``source`` (a model folder or "default") with its episodic memory's ``write`` under ``folder``."""
    model = load_default() if source == "default" else PlasticTransformer.from_pretrained(source)
    if write == "error":
        model.set_write("episodic", "error", beta=0.5, scale=1.0)
    model.save_pretrained(folder)
    return model.fingerprint()


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "cl_arch.scripts.cli", "eval", *args, "--threads", "1"]
    print(" ".join(["cl-arch eval", *args]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def codebase(folder: str, pkg: str, out: str, args: argparse.Namespace) -> dict:
    """``cl-arch eval codebase`` of the model in ``folder`` on ``pkg``, report written under ``out``
    (reused as it is with ``--reuse`` when ``out/codebase.json`` exists); returns the report."""
    path = os.path.join(out, "codebase.json")
    if not (args.reuse and os.path.exists(path)):
        extra = ["--second-session"] if args.second_session else []
        if args.fold_budget is not None:
            extra += ["--fold-budget", str(args.fold_budget)]
        if args.eta_s is not None:
            extra += ["--eta-s", str(args.eta_s)]
        cli("codebase", "--model", folder, "--package", pkg, "--max-bytes", str(args.max_bytes),
            "--methods", "frozen,adapt,no_persist", "--no-dynamic-eval", *extra, "--out", out)
    with open(path) as f:
        return json.load(f)


def second_session_figures(report: dict, name: str) -> dict:
    """One row's second session against its first (``{"1k": [gain, lo, hi] or None, ...}``) and its
    guarded fold (fraction, anchor forgetting, held-out drift after it and its interval), where measured."""
    s = report["methods"][name]["summary"]
    fig = {k: s[k] for k in ("fold_fraction", "fold_anchor_bits", "folded_drift_bpb", "folded_drift_ci") if k in s}
    second = report.get("second_session", {}).get(name)
    if second is not None:
        s2 = second["summary"]
        fig["vs_first"] = {n: (None if s2.get(f"gain_over_first_session_{n}") is None else
                               [s2[f"gain_over_first_session_{n}"], *s2[f"gain_over_first_session_ci_{n}"]])
                           for n in POINTS}
    return fig


def fmt(v) -> str:
    """A signed figure, or "-" where there is none."""
    return "-" if v is None else f"{v:+.3f}"


def ci(v) -> str:
    """``[value, lo, hi]`` as "value [lo, hi]"."""
    return "-" if v is None else f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def print_tables(rows: list, second: list) -> None:
    """The rows as markdown; with second-session or fold figures, a second table of those."""
    print("| model | episodic write | package | row | bits/byte | gain@1k | gain@10k | gain@100k | drift | ms/byte |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lab, w, p, n, bpb, g1, g10, g100, d, spt in rows:
        ms = "-" if spt is None else f"{1000 * spt:.2f}"
        print(f"| {lab} | {w} | {p} | {n} | {bpb:.3f} | {fmt(g1)} | {fmt(g10)} | {fmt(g100)} | {fmt(d)} | {ms} |")
    if not second:
        return
    print("\n| model | episodic write | package | row | 2nd vs 1st @1k | @10k | @100k | drift, all of P "
          "| fold c | anchor forgetting | drift after the guarded fold |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for lab, w, p, n, d, fig in second:
        vs = fig.get("vs_first", {})
        c = "-" if "fold_fraction" not in fig else f"{fig['fold_fraction']:.3f}"
        anchor = "-" if "fold_anchor_bits" not in fig else f"{fig['fold_anchor_bits']:+.4f}"
        folded = ("-" if "folded_drift_bpb" not in fig else
                  ci([fig["folded_drift_bpb"], *fig["folded_drift_ci"]]))
        print(f"| {lab} | {w} | {p} | {n} | {ci(vs.get('1k'))} | {ci(vs.get('10k'))} | {ci(vs.get('100k'))} "
              f"| {fmt(d)} | {c} | {anchor} | {folded} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--models", default="shipped=default", help="label=folder pairs, comma-separated")
    ap.add_argument("--writes", default=",".join(WRITES))
    ap.add_argument("--packages", default="json,email,xml")
    ap.add_argument("--max-bytes", type=int, default=100_000)
    ap.add_argument("--no-offset", action="store_true", help="skip the offset evaluation")
    ap.add_argument("--second-session", action="store_true", help="also read each stream again as a new "
                    "session (S dropped, P kept) and report it against the first")
    ap.add_argument("--fold-budget", type=float, default=None, help="also report the held-out drift after a "
                    "fold guarded by this forgetting budget (bits/byte on training-corpus windows)")
    ap.add_argument("--eta-s", type=float, default=None, help="commit rate of every memory (default: each its own)")
    ap.add_argument("--reuse", action="store_true", help="keep a package's report where its codebase.json "
                    "exists (resume an interrupted run) instead of measuring it again")
    args = ap.parse_args(argv)
    models = dict(pair.split("=", 1) for pair in args.models.split(","))
    writes = args.writes.split(",")
    for write in writes:
        if write not in WRITES:
            ap.error(f"--writes: unknown {write!r}; choose from {WRITES}")
    summary, rows, second = {}, [], []
    for label, source in models.items():
        if not args.no_offset:
            out = os.path.join(args.out, label, "offset")
            cli("offset", "--model", source, "--package", args.packages, "--no-readout", "--no-episodic", "--out", out)
            with open(os.path.join(out, "offset.json")) as f:
                rep = json.load(f)
            summary[f"{label}/offset_in_block"] = rep["difference"]["beyond_window"]
        for write in writes:
            folder = os.path.join(args.out, "models", f"{label}-{write}")
            fp = build(source, write, folder)
            for pkg in args.packages.split(","):
                report = codebase(folder, pkg, os.path.join(args.out, label, write, pkg), args)
                for name, m in report["methods"].items():
                    s = m["summary"]
                    fig = second_session_figures(report, name)
                    summary[f"{label}/{write}/{pkg}/{name}"] = {"fingerprint": fp, **s, **fig}
                    rows.append((label, write, pkg, name, s["bpb"], s.get("gain_bpb_1k"), s.get("gain_bpb_10k"),
                                 s.get("gain_bpb_100k"), s.get("drift_bpb"), s.get("sec_per_token")))
                    if fig and name != "frozen":
                        second.append((label, write, pkg, name, s.get("drift_bpb"), fig))
            with open(os.path.join(args.out, "ablation.json"), "w") as f:
                json.dump(summary, f, indent=1)  # after every model, so a long run keeps what it measured
    print_tables(rows, second)
    for label in models:
        o = summary.get(f"{label}/offset_in_block")
        if o:
            print(f"{label}: in-block fast layers past the window {o['mean']:+.4f} [{o['ci'][0]:+.4f}, {o['ci'][1]:+.4f}]")


if __name__ == "__main__":
    main()
