"""A second session over *other files* of the same package: does the saved P help on code it has not read?

``cl-arch eval codebase --second-session`` reads the same bytes twice, so its second session is scored
on text its P was written from. Here a package's files are split in two (alternately, in sorted
order): session 1 reads half A and commits as ``adapt`` does; session 2 (S dropped, P kept) reads half
B. The control is a first session reading half B from nothing (P = 0). Reported: the gain of the
second session over the control at 1k/10k bytes (local window, 95% block bootstrap as the eval's),
for ``adapt`` and, as a check that the split is fair, ``frozen`` (0 by construction).

    python docs/results/through/second_session/split_session.py --model DIR --package json --out x.json
"""
import argparse
import json

import torch

from cl_arch import PlasticTransformer
from cl_arch.eval.codebase import POINTS, gain_interval
from cl_arch.eval.lib import metrics as M
from cl_arch.eval.lib.reading import default_policies, run_stream
from cl_arch.eval.lib.streams import held_out_package, segment_stream
from cl_arch.train.data import resolve_sources


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model folder (save_pretrained)")
    ap.add_argument("--package", required=True, help="a held-out stdlib package, e.g. json")
    ap.add_argument("--max-bytes", type=int, default=50_000, help="bytes of each half read")
    ap.add_argument("--eta-s", type=float, default=None, help="commit rate (default: each memory's own)")
    ap.add_argument("--out", required=True, help="JSON report")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PlasticTransformer.from_pretrained(args.model).eval()
    files = resolve_sources(held_out_package(args.package))
    if len(files) < 2:
        raise SystemExit(f"{args.package}: {len(files)} file(s), need two to split")
    half_a = segment_stream(files[0::2], args.max_bytes, 2048)
    half_b = segment_stream(files[1::2], args.max_bytes, 2048)
    policies = default_policies(args.eta_s, None, None, ("frozen", "adapt"))
    with torch.no_grad():
        first = run_stream(model, half_b, policies, desc="control: B from nothing")
        session = run_stream(model, half_a, policies, desc="session 1: A")
        session["learner"].new_session()
        second = run_stream(model, half_b, policies, desc="session 2: B", learner=session["learner"])
    report = {"model": args.model, "fingerprint": model.fingerprint(), "package": args.package,
              "files_a": [f.rsplit("/", 1)[-1] for f in files[0::2]],
              "files_b": [f.rsplit("/", 1)[-1] for f in files[1::2]],
              "bytes_a": sum(len(s) for s, _ in half_a), "bytes_b": sum(len(s) for s, _ in half_b),
              "eta_s": args.eta_s, "rows": {}}
    for name in ("frozen", "adapt"):
        a, b = first["bits"][name], second["bits"][name]
        gains = M.gain_curve(a, b, POINTS)
        report["rows"][name] = {
            "bpb_control": float(a.mean()), "bpb_second": float(b.mean()),
            **{f"gain_{n // 1000}k": [gains[n], *gain_interval(a, b, n)] for n in gains}}
        print(name, json.dumps(report["rows"][name]))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
