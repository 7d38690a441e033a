"""Error-driven writes against one-hot writes on the held-out packages (issue 24, step 1): the shipped
model as shipped, with its episodic memory switched to error writes (``model.set_write``), and with
an extra error-writing memory beside its own; each read by ``cl-arch eval codebase`` (rows frozen,
adapt, no_persist), then one table and JSON over all of them.

    python benchmarks/error_writes.py --out runs/error_writes            # json, email, xml at 100 KB
    python benchmarks/error_writes.py --packages asyncio --max-bytes 30000  # the tuning package

``beta * scale`` = 0.5 was chosen on asyncio (30 KB, S carried: 0.25 / 0.5 / 0.8 gain +0.037 / +0.042 /
+0.037 bits/byte over the model alone); the reported packages were not looked at before.
"""
import argparse
import json
import os
import subprocess
import sys

from cl_arch import EpisodicConfig, load_default

VARIANTS = ("shipped", "episodic_error", "extra_error")


def build(variant: str, folder: str) -> str:
    """Save ``variant`` of the shipped model under ``folder``; returns its fingerprint."""
    model = load_default()
    if variant == "episodic_error":
        model.set_write("episodic", "error", beta=0.5, scale=1.0)
    elif variant == "extra_error":
        model.add_memory(EpisodicConfig(name="error", write="error", seed=1, beta=0.5, scale=1.0))
    model.save_pretrained(folder)
    return model.fingerprint()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/error_writes")
    ap.add_argument("--packages", default="json,email,xml")
    ap.add_argument("--max-bytes", type=int, default=100_000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    rows, summary = [], {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            ap.error(f"--variants: unknown {variant!r}; choose from {VARIANTS}")
        folder = os.path.join(args.out, "models", variant)
        fp = build(variant, folder)
        for pkg in args.packages.split(","):
            out = os.path.join(args.out, variant, pkg)
            cmd = [sys.executable, "-m", "cl_arch.scripts.cli", "eval", "codebase", "--model", folder, "--package", pkg,
                   "--max-bytes", str(args.max_bytes), "--methods", "frozen,adapt,no_persist", "--no-dynamic-eval",
                   "--threads", "1", "--out", out]
            print(f"{variant} {pkg}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            report = json.load(open(os.path.join(out, "codebase.json")))
            for name, m in report["methods"].items():
                s = m["summary"]
                summary[f"{variant}/{pkg}/{name}"] = {"fingerprint": fp, **s}
                rows.append((variant, pkg, name, s["bpb"], s.get("gain_bpb_10k"), s.get("gain_bpb_100k"),
                             s.get("drift_bpb")))
    with open(os.path.join(args.out, "error_writes.json"), "w") as f:
        json.dump(summary, f, indent=1)
    fmt = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    print("| variant | package | row | bits/byte | gain@10k | gain@100k | stdlib drift |")
    print("|---|---|---|---|---|---|---|")
    for v, p, n, bpb, g10, g100, d in rows:
        print(f"| {v} | {p} | {n} | {bpb:.3f} | {fmt(g10)} | {fmt(g100)} | {fmt(d)} |")


if __name__ == "__main__":
    main()
