"""Session speed on CPU: decode tokens/s with adaptation on vs off, and commit cost.

Targets (issue 4): decode with adaptation on <= 1.15x the time of adaptation off; a commit
(``Session.reward``: the three-factor step for every fast layer plus the new episode) <= 1% of a
64-token episode. Prints a table and writes ``benchmarks/out/bench_session.json``.

    python benchmarks/bench_session.py [--threads 1] [--repeats 7] [--model shipped|random|DIR]
                                       [--decoders none,auto[,compile]] [--batch N [--mixed-prompts]]
                                       [--commit-backends naive,twopass]

Each ``--decoders`` setting gets an adaptive and a frozen session, timed interleaved in one process
(medians of ``--repeats``); the ratios to ``none`` (one forward per token) are measured side by side.
``--commit-backends``: ``Session.reward`` alone (the state taken back from the decoder first) with the commit
that ``backend="auto"`` runs on the CPU (``twopass``) and with the reference (``naive``) in its place, interleaved.
"""
import argparse
import os
import platform
import statistics
import time

import torch

from cl_arch import PlasticConfig, PlasticTransformer, Session
from cl_arch.io import write_json


def episode(session, prompt, n_new):
    t0 = time.perf_counter()
    session.generate(prompt, max_new_tokens=n_new, seed=0)
    t1 = time.perf_counter()
    session.reward(1.0)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def batch_rows(model, modes, name, prompt, args):
    """Aggregate tokens/s of ``Session.batch_generate`` over ``args.batch`` adaptive sessions (one
    position: one group), per decoder setting, interleaved; medians of ``args.repeats``."""
    groups = {m: [Session(model, seed=i, decoder=m) for i in range(args.batch)] for m in modes}
    # --mixed-prompts: row i's prompt is i % 8 tokens longer, so with attention the rows sit at 8 positions
    prompts = [prompt + prompt[:i % 8] if args.mixed_prompts else prompt for i in range(args.batch)]
    times = {m: [] for m in modes}
    for r in range(args.repeats + 1):  # the first round warms up (builds the batch decoder)
        for m, ss in groups.items():
            t0 = time.perf_counter()
            Session.batch_generate(ss, prompts, max_new_tokens=args.new_tokens, seeds=list(range(len(ss))))
            if r:
                times[m].append(time.perf_counter() - t0)
            for s in ss:
                s.reward(1.0)
    out = {name[m]: {"tokens_per_s": args.batch * args.new_tokens / statistics.median(times[m]),
                     "prompt_lengths": sorted({len(p) for p in prompts})} for m in modes}
    for m in modes:
        print(f"batch_generate x{args.batch} ({len(out[name[m]]['prompt_lengths'])} prompt lengths), "
              f"decoder={name[m]}: {out[name[m]]['tokens_per_s']:.1f} tokens/s aggregate")
    return out


def commit_rows(model, prompt, args, backends: list) -> dict:
    """Median ms of ``Session.reward`` after a ``--new-tokens`` episode per commit backend (what ``"auto"``
    resolves to on the CPU replaced by each in turn), the sessions timed interleaved."""
    from cl_arch.kernels import commit as commit_kernels

    auto = commit_kernels.COMMIT_BACKENDS["twopass"]
    sessions = {b: Session(model, adapt=True, seed=0) for b in backends}
    times = {b: [] for b in backends}
    try:
        for r in range(args.repeats + 2):  # two warm-up rounds: a non-zero P, the decoder built
            for b, s in sessions.items():
                commit_kernels.COMMIT_BACKENDS["twopass"] = commit_kernels.COMMIT_BACKENDS[b] if b != "twopass" else auto
                s.generate(prompt, max_new_tokens=args.new_tokens, seed=r)
                _ = s.state  # taken back from the decoder: the timing is the commit and the new episode
                t0 = time.perf_counter()
                s.reward(1.0)
                if r >= 2:
                    times[b].append(time.perf_counter() - t0)
    finally:
        commit_kernels.COMMIT_BACKENDS["twopass"] = auto
    out = {b: 1e3 * statistics.median(v) for b, v in times.items()}
    print("Session.reward, ms (median): " + ", ".join(f"{b} {v:.2f}" for b, v in out.items()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default="random", help="'random' (PlasticConfig(), seed 0), 'shipped' (the default "
                    "model, with its readout and episodic memories) or a save_pretrained folder")
    ap.add_argument("--decoders", default="none,auto",
                    help="Session(decoder=...) settings to time, comma-separated: none, auto, eager, compile "
                         "(compile: the first episode compiles, 30-60 s)")
    ap.add_argument("--batch", type=int, default=0,
                    help="also time Session.batch_generate over this many adaptive sessions per --decoders setting")
    ap.add_argument("--mixed-prompts", action="store_true",
                    help="--batch rows with prompts of 8 lengths (rows at different positions), not one")
    ap.add_argument("--commit-backends", default="",
                    help="also time Session.reward alone per commit backend, e.g. naive,twopass")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_session.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "random":
        model = PlasticTransformer(PlasticConfig()).eval()  # the default byte model: 4 layers, d=128
    elif args.model == "shipped":
        from cl_arch.eval.lib.models import default_model
        model = default_model(log=lambda *a: None)
    else:
        model = PlasticTransformer.from_pretrained(args.model).eval()
    prompt = list(range(40, 40 + args.prompt_len))
    modes = [None if m == "none" else m for m in args.decoders.split(",")]
    sessions = {(m, a): Session(model, adapt=a == "on", seed=0, decoder=m) for m in modes for a in ("on", "off")}
    for s in sessions.values():  # warm-up (a compiled decoder compiles here); gives adaptive sessions a non-zero P
        for _ in range(2):
            episode(s, prompt, 8)
    times = {k: [] for k in sessions}
    commits = {k: [] for k in sessions}
    for _ in range(args.repeats):  # interleaved, so load changes hit every row alike
        for k, s in sessions.items():
            gen, com = episode(s, prompt, args.new_tokens)
            times[k].append(gen)
            commits[k].append(com)
    med = {k: statistics.median(v) for k, v in times.items()}
    name = {m: "none" if m is None else m for m in modes}
    main_mode = modes[-1]  # the last listed (default "auto", the Session default) fills the top-level fields
    com = statistics.median(commits[(main_mode, "on")])
    by_decoder = {name[m]: {
        "episode_s": {a: med[(m, a)] for a in ("on", "off")},
        "decode_tokens_per_s": {a: args.new_tokens / med[(m, a)] for a in ("on", "off")},
        "ratio_on_over_off": med[(m, "on")] / med[(m, "off")],
        "commit_s": statistics.median(commits[(m, "on")]),
    } for m in modes}
    base = by_decoder.get("none")
    for m in modes:
        if base is not None:
            by_decoder[name[m]]["speedup_over_none"] = {a: base["episode_s"][a] / med[(m, a)] for a in ("on", "off")}
    res = {
        "device": "cpu", "threads": args.threads, "torch": torch.__version__, "machine": platform.processor(),
        "model": {"source": args.model, "layers": model.config.layer_types, "d_model": model.config.d_model,
                  "params": model.num_parameters(), "memories": [m.to_dict() for m in model.config.memories]},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "decoder": name[main_mode],
        "episode_s": by_decoder[name[main_mode]]["episode_s"],
        "decode_tokens_per_s": by_decoder[name[main_mode]]["decode_tokens_per_s"],
        "ratio_on_over_off": by_decoder[name[main_mode]]["ratio_on_over_off"],
        "commit_s": com,
        "commit_fraction_of_episode": com / med[(main_mode, "on")],
        "by_decoder": by_decoder,
        "targets": {"ratio_on_over_off": 1.15, "commit_fraction_of_episode": 0.01},
    }
    if args.batch:
        res["batch_generate"] = batch_rows(model, modes, name, prompt, args)
    if args.commit_backends:
        res["reward_ms_by_commit_backend"] = commit_rows(model, prompt, args, args.commit_backends.split(","))
    print(f"{'Session(decoder=...)':22s}{'tok/s on':>10s}{'tok/s off':>10s}{'on/off':>8s}{'x none (on)':>12s}"
          f"{'x none (off)':>13s}")
    for m in modes:
        r = by_decoder[name[m]]
        sp = r.get("speedup_over_none", {"on": float("nan"), "off": float("nan")})
        print(f"{name[m]:22s}{r['decode_tokens_per_s']['on']:10.1f}{r['decode_tokens_per_s']['off']:10.1f}"
              f"{r['ratio_on_over_off']:8.3f}{sp['on']:12.2f}{sp['off']:13.2f}")
    print(f"(a prompt of {args.prompt_len} tokens + {args.new_tokens} generated per episode; tokens/s counts the "
          f"generated ones over the whole generate call)")
    print(f"commit ({name[main_mode]}): {1e3 * com:.2f} ms = {100 * res['commit_fraction_of_episode']:.2f}% of a "
          f"{args.new_tokens}-token episode (target <= 1%)")
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
