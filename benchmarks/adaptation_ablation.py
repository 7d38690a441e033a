"""The adaptation ablation of issue 24: models (the shipped one, and models trained through adaptation
with the in-block fast layers' "same" or "next" write target) x output-memory writes (the episodic
memory's one-hot delta write or the error-driven write), each read by ``cl-arch eval codebase``
(rows frozen, adapt, no_persist; gains at 1/10/100 KB, stdlib drift, ms/byte at batch 1) and by
``cl-arch eval offset --no-readout --no-episodic`` (what the in-block fast layers alone carry past the
attention window), then one table (markdown) and one JSON.

    python benchmarks/adaptation_ablation.py --out runs/ablation \
        --models shipped=default,through-same=runs/through-same/final,through-next=runs/through-next/final

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--models", default="shipped=default", help="label=folder pairs, comma-separated")
    ap.add_argument("--writes", default=",".join(WRITES))
    ap.add_argument("--packages", default="json,email,xml")
    ap.add_argument("--max-bytes", type=int, default=100_000)
    ap.add_argument("--no-offset", action="store_true", help="skip the offset evaluation")
    args = ap.parse_args(argv)
    models = dict(pair.split("=", 1) for pair in args.models.split(","))
    summary, rows = {}, []
    for label, source in models.items():
        if not args.no_offset:
            out = os.path.join(args.out, label, "offset")
            cli("offset", "--model", source, "--package", args.packages, "--no-readout", "--no-episodic", "--out", out)
            rep = json.load(open(os.path.join(out, "offset.json")))
            summary[f"{label}/offset_in_block"] = rep["difference"]["beyond_window"]
        for write in args.writes.split(","):
            if write not in WRITES:
                ap.error(f"--writes: unknown {write!r}; choose from {WRITES}")
            folder = os.path.join(args.out, "models", f"{label}-{write}")
            fp = build(source, write, folder)
            for pkg in args.packages.split(","):
                out = os.path.join(args.out, label, write, pkg)
                cli("codebase", "--model", folder, "--package", pkg, "--max-bytes", str(args.max_bytes),
                    "--methods", "frozen,adapt,no_persist", "--no-dynamic-eval", "--out", out)
                report = json.load(open(os.path.join(out, "codebase.json")))
                for name, m in report["methods"].items():
                    s = m["summary"]
                    summary[f"{label}/{write}/{pkg}/{name}"] = {"fingerprint": fp, **s}
                    rows.append((label, write, pkg, name, s["bpb"], s.get("gain_bpb_1k"), s.get("gain_bpb_10k"),
                                 s.get("gain_bpb_100k"), s.get("drift_bpb"), s.get("sec_per_token")))
            with open(os.path.join(args.out, "ablation.json"), "w") as f:
                json.dump(summary, f, indent=1)  # after every model, so a long run keeps what it measured
    fmt = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    print("| model | episodic write | package | row | bits/byte | gain@1k | gain@10k | gain@100k | drift | ms/byte |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lab, w, p, n, bpb, g1, g10, g100, d, spt in rows:
        ms = "-" if spt is None else f"{1000 * spt:.2f}"
        print(f"| {lab} | {w} | {p} | {n} | {bpb:.3f} | {fmt(g1)} | {fmt(g10)} | {fmt(g100)} | {fmt(d)} | {ms} |")
    for label in models:
        o = summary.get(f"{label}/offset_in_block")
        if o:
            print(f"{label}: in-block fast layers past the window {o['mean']:+.4f} [{o['ci'][0]:+.4f}, {o['ci'][1]:+.4f}]")


if __name__ == "__main__":
    main()
