"""Session speed on CPU: decode tokens/s with adaptation on vs off, and commit cost.

Targets (issue 4): decode with adaptation on <= 1.15x the time of adaptation off; a commit
(``Session.reward``: the three-factor step for every fast layer plus the new episode) <= 1% of a
64-token episode. Prints a table and writes ``benchmarks/out/bench_session.json``.

    python benchmarks/bench_session.py [--threads 1] [--repeats 7] [--model shipped|random|DIR]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default="random", help="'random' (PlasticConfig(), seed 0), 'shipped' (the default "
                    "model, with its readout and episodic memories) or a save_pretrained folder")
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
    sessions = {"on": Session(model, adapt=True, seed=0), "off": Session(model, adapt=False, seed=0)}
    for s in sessions.values():  # warm-up; gives the adaptive session a non-zero P
        for _ in range(2):
            episode(s, prompt, 8)
    times = {k: [] for k in sessions}
    commits = {k: [] for k in sessions}
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for k, s in sessions.items():
            gen, com = episode(s, prompt, args.new_tokens)
            times[k].append(gen)
            commits[k].append(com)
    med = {k: statistics.median(v) for k, v in times.items()}
    com = statistics.median(commits["on"])
    res = {
        "device": "cpu", "threads": args.threads, "torch": torch.__version__, "machine": platform.processor(),
        "model": {"source": args.model, "layers": model.config.layer_types, "d_model": model.config.d_model,
                  "params": model.num_parameters(), "memories": [m.to_dict() for m in model.config.memories]},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "episode_s": med,
        "decode_tokens_per_s": {k: args.new_tokens / v for k, v in med.items()},
        "ratio_on_over_off": med["on"] / med["off"],
        "commit_s": com,
        "commit_fraction_of_episode": com / med["on"],
        "targets": {"ratio_on_over_off": 1.15, "commit_fraction_of_episode": 0.01},
    }
    print(f"{'':28s}{'adapt on':>12s}{'adapt off':>12s}")
    print(f"{'episode (prompt+64 tok) ms':28s}{1e3 * med['on']:12.1f}{1e3 * med['off']:12.1f}")
    print(f"{'decode tokens/s':28s}{res['decode_tokens_per_s']['on']:12.1f}{res['decode_tokens_per_s']['off']:12.1f}")
    print(f"on/off time ratio: {res['ratio_on_over_off']:.3f} (target <= 1.15)")
    print(f"commit: {1e3 * com:.2f} ms = {100 * res['commit_fraction_of_episode']:.2f}% of a 64-token episode "
          f"(target <= 1%)")
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
