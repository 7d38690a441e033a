"""``cl-arch eval NAME``: run one learning-slope benchmark, print its table, write JSON + PNG.

NAME is one of codebase, tabcomplete, games, sutton, retention, cost, offset, tune-dynamic. Every
benchmark writes ``<out>/<name>.json`` (schema in :mod:`cl_arch.eval.report`) and ``<out>/<name>.png``.
``tune-dynamic`` sweeps dynamic evaluation's step size x decay on a held-out package that is never
reported (:mod:`cl_arch.eval.tune_dynamic`) and caches the result for ``codebase --dyn-tuned``.
"""
import argparse
import json

import torch


def add_parser(sub):
    p = sub.add_parser("eval", help="run a learning-slope benchmark (JSON + PNG report)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", choices=["codebase", "tabcomplete", "games", "sutton", "retention", "cost", "offset",
                                       "tune-dynamic"])
    p.add_argument("--out", default="runs/eval", help="folder for the JSON and PNG")
    p.add_argument("--report-name", default=None, help="file stem of the report (default: NAME)")
    p.add_argument("--model", default=None, help="checkpoint folder (save_pretrained), or 'default' for the shipped "
                   "model; default: the shipped model (codebase, tabcomplete, cost, offset, tune-dynamic; with "
                   "--cache-dir or --pretrain-seconds the cached stdlib model) or a recall-trained model (games, "
                   "sutton, retention)")
    p.add_argument("--in-place", action="store_true", help="allow --out to be the --model folder (the report "
                   "files are written among the model's)")
    p.add_argument("--cache-dir", default=None, help="where the default stdlib model is cached (default: "
                   "~/.cache/cl_arch/demo-<hash of the recipe>, shared with cl-arch demo)")
    p.add_argument("--pretrain-seconds", type=float, default=None, help="pretrain a model for this many seconds "
                   "(cached by recipe) instead of the shipped default model")
    p.add_argument("--source", default=None, help="codebase/tabcomplete/offset: folder, file or glob of .py files "
                   "(default: the held-out stdlib package json; offset: json, email and xml)")
    p.add_argument("--package", default=None, help="codebase/tabcomplete/sutton/offset: a held-out stdlib package "
                   "(json, email, xml, asyncio, tomllib, zoneinfo) as the source; offset takes a comma-separated "
                   "list (e.g. json,email,xml); tune-dynamic: the package tuned on (default asyncio; never "
                   "json, email or xml, the reported streams)")
    p.add_argument("--lam", type=float, default=None, help="codebase: eligibility-trace decay (default: the model's)")
    p.add_argument("--max-bytes", type=int, default=None, help="codebase/tabcomplete: bytes of the stream "
                   "(default 100000); tune-dynamic: bytes of the tuning package (default 30000)")
    p.add_argument("--episode-bytes", type=int, default=2048, help="codebase/tabcomplete: longest episode")
    p.add_argument("--eta-s", type=_float_or_model, default=None, help="retention commit rate of the adapting "
                   "rows for every memory (default, or 'model': each memory's own commit, e.g. the readout's "
                   "state commit of its slow heads)")
    p.add_argument("--gamma", type=_float_or_model, default=None, help="codebase: P retention per commit "
                   "(default: the model's)")
    p.add_argument("--eta-r", type=float, default=None, help="reward commit rate (default: the model's)")
    p.add_argument("--dyn-lr", type=float, default=3e-4, help="dynamic evaluation step size (default: the best of "
                   "tune-dynamic on asyncio for the shipped model)")
    p.add_argument("--dyn-rule", choices=["rms", "sgd"], default="rms")
    p.add_argument("--dyn-decay", type=float, default=1e-3, help="codebase: dynamic evaluation's pull toward the "
                   "pretrained weights per step (default: tune-dynamic's best on asyncio for the shipped model)")
    p.add_argument("--full-context-window", type=int, default=4096, help="codebase: attention window of the "
                   "full_context row (bytes)")
    p.add_argument("--dyn-params", choices=["all", "fast_W0"], default=None, help="tune-dynamic: which weights "
                   "dynamic evaluation adapts (default all; fast_W0: only the fast memories' W0, the sparse "
                   "variant); codebase: also run that variant (all: dynamic_eval, fast_W0: sparse_dynamic_eval)")
    p.add_argument("--dyn-tuned", action="store_true", help="codebase: take dynamic evaluation's step size and "
                   "decay from the sweep on asyncio (cl-arch eval tune-dynamic; cached per model, run if missing)")
    p.add_argument("--no-dynamic-eval", action="store_true", help="codebase: skip dynamic evaluation")
    p.add_argument("--methods", default="frozen,adapt,adapt+reward,no_persist", help="codebase: rows, "
                   "comma-separated, from static, frozen, adapt, adapt+reward, no_persist (batched) and "
                   "full_context, sparse_dynamic_eval, dynamic_eval (one at a time)")
    p.add_argument("--second-session", action="store_true", help="codebase: read the stream again as a new "
                   "session (S dropped, P kept): what the committed P carries that S cannot")
    p.add_argument("--fold-budget", type=float, default=None, help="codebase: also report the held-out drift "
                   "after a fold guarded by this forgetting budget (bits/byte on training-corpus windows)")
    p.add_argument("--no-readout", action="store_true", help="codebase/offset: remove the model's readout memory "
                   "(the in-block fast layers alone)")
    p.add_argument("--no-episodic", action="store_true", help="codebase/offset: remove the model's episodic memory "
                   "(to tell its share of a gain)")
    p.add_argument("--episodes", type=int, default=None, help="games/sutton/retention: episodes per game or task")
    p.add_argument("--seeds", type=int, default=None, help="games/sutton/retention: independent seeds")
    p.add_argument("--reward-memory", action="store_true", help="games: add a reward memory to the model, its "
                   "settings fitted on the training token sets (cl_arch.train.reward_memory; cached in runs/)")
    p.add_argument("--tokens", choices=["default", "held_out"], default="default", help="games: play on the "
                   "default token sets or on those reward-memory fitting never sees")
    p.add_argument("--reward-fit", choices=["search", "meta"], default="search", help="games: how the reward "
                   "memory's settings are chosen on the training token sets: grid search, or meta-gradient through "
                   "the commits")
    p.add_argument("--reward-delay", type=int, default=0, help="games: rewards arrive this many episodes late")
    p.add_argument("--credit", choices=["stored", "current"], default="stored", help="games: a late reward is "
                   "committed with the trace of the episode that earned it (stored) or of the one just ended")
    p.add_argument("--no-yoked", action="store_true", help="games: leave out the yoked control rows")
    p.add_argument("--recall-steps", type=int, default=600, help="steps of recall pretraining for the default "
                   "games model (cached in runs/recall-model-<steps>)")
    p.add_argument("--max-file-bytes", type=int, default=4096, help="offset: bytes read from the start of each file")
    p.add_argument("--min-file-bytes", type=int, default=1024, help="offset: shorter files are skipped")
    p.add_argument("--bucket", type=int, default=128, help="offset: bucket width in bytes of file offset")
    p.add_argument("--max-files", type=int, default=None, help="offset: at most this many files (a seeded sample)")
    p.add_argument("--users", type=int, default=8, help="tabcomplete: simulated users, each with a drawn style "
                   "and file order (kept/reset/yoked rows, cl_arch.eval.tabcomplete.run_users); 0: one stream as "
                   "written, adapt on vs off")
    p.add_argument("--suggestions", type=int, default=500, help="tabcomplete: suggestions (non-blank lines) per user")
    p.add_argument("--window", type=int, default=100, help="tabcomplete: the last window of suggestions reported")
    p.add_argument("--style", default=None, help="tabcomplete: one style for every user, e.g. "
                   "'indent=2,quotes=double,naming=camel' (default: drawn per user)")
    p.add_argument("--reward", choices=["binary", "signed", "fraction"], default="binary", help="tabcomplete: per "
                   "suggestion 1/0, 1/-1 or the accepted share of the line")
    p.add_argument("--min-chars", type=int, default=4, help="tabcomplete: a suggestion is accepted when right "
                   "through the indentation and this many characters (or the whole line)")
    p.add_argument("--rows", default="kept,reset,yoked,unrewarded", help="tabcomplete: rows from kept, reset, "
                   "yoked, unrewarded, static")
    p.add_argument("--user-episode-bytes", type=int, default=256, help="tabcomplete (users): longest episode")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _float_or_model(text: str):
    """A float, or 'model' (None: each fast memory's own learned value)."""
    if text == "model":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'model', got {text!r}")


def _model(args):
    from .common import load_model
    return None if args.model is None else load_model(args.model, log=print).eval()


def _check_out(args):
    """Refuse, before the benchmark runs, an --out that is the model folder or cannot be written."""
    from .common import check_writable_folder, default_model_dir, refuse_overwrite

    # None runs the shipped model unless a recipe (--cache-dir/--pretrain-seconds) or a recall model is asked for.
    model = default_model_dir() if args.model in (None, "default") else args.model
    refuse_overwrite([("--out", args.out)], [("--model", model)], args.in_place)
    check_writable_folder("--out", args.out)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name
    if args.max_bytes is None:
        args.max_bytes = 30_000 if name == "tune-dynamic" else 100_000
    if name == "tune-dynamic" and args.source:
        raise ValueError("tune-dynamic tunes on a held-out stdlib package (--package), not on --source")
    _check_out(args)
    model = _model(args)
    if args.no_readout or args.no_episodic:
        from cl_arch.eval.codebase import stdlib_model
        from cl_arch.eval.models import without_memories
        model = without_memories(model if model is not None else stdlib_model(args.cache_dir, seconds=args.pretrain_seconds),
                                 readout=args.no_readout, episodic=args.no_episodic)
    if args.package and name not in ("offset", "tune-dynamic"):  # these resolve their own packages
        from cl_arch.eval.codebase import held_out_package
        args.source = held_out_package(args.package)
    if name == "codebase":
        from cl_arch.eval import codebase
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        extra = {"all": "dynamic_eval", "fast_W0": "sparse_dynamic_eval"}.get(args.dyn_params)
        if extra and extra not in methods:
            methods.append(extra)
        rep = codebase.run(source=args.source, model=model, max_bytes=args.max_bytes,
                           episode_bytes=args.episode_bytes, eta_s=args.eta_s, eta_r=args.eta_r, gamma=args.gamma,
                           dyn_lr=args.dyn_lr, dyn_rule=args.dyn_rule, dyn_decay=args.dyn_decay,
                           dyn_tuned=args.dyn_tuned, full_context_window=args.full_context_window,
                           with_dynamic_eval=not args.no_dynamic_eval, lam=args.lam,
                           out_dir=args.out, name=args.report_name, cache_dir=args.cache_dir,
                           pretrain_seconds=args.pretrain_seconds, seed=args.seed,
                           second_session=args.second_session, methods=tuple(methods),
                           fold_budget=args.fold_budget)
    elif name == "tabcomplete":
        from cl_arch.eval import tabcomplete
        from cl_arch.eval.user_style import Style
        if args.users > 0:
            rep = tabcomplete.run_users(source=args.source, model=model, users=args.users,
                                        suggestions=args.suggestions, window=args.window,
                                        style=Style.parse(args.style) if args.style else None, reward=args.reward,
                                        min_chars=args.min_chars, rows=[r.strip() for r in args.rows.split(",")],
                                        episode_bytes=args.user_episode_bytes, eta_s=args.eta_s, eta_r=args.eta_r,
                                        gamma=args.gamma, lam=args.lam, out_dir=args.out, name=args.report_name,
                                        cache_dir=args.cache_dir, pretrain_seconds=args.pretrain_seconds,
                                        seed=args.seed)
        else:
            rep = tabcomplete.run(source=args.source, model=model, max_bytes=args.max_bytes,
                                  episode_bytes=args.episode_bytes, eta_s=args.eta_s, eta_r=args.eta_r,
                                  out_dir=args.out, name=args.report_name, cache_dir=args.cache_dir,
                                  pretrain_seconds=args.pretrain_seconds, seed=args.seed)
    elif name in ("games", "sutton", "retention"):
        import importlib
        mod = importlib.import_module(f"cl_arch.eval.{name}")
        kw = {k: v for k, v in (("episodes", args.episodes), ("seeds", args.seeds)) if v is not None}
        if name == "games":
            kw.update(reward_memory=args.reward_memory, tokens=args.tokens, yoked=not args.no_yoked,
                      reward_fit=args.reward_fit, delay=args.reward_delay, credit=args.credit)
        if name == "sutton":
            kw.update(source=args.source, cache_dir=args.cache_dir, pretrain_seconds=args.pretrain_seconds,
                      max_bytes=min(args.max_bytes, 40_000), episode_bytes=args.episode_bytes)
        rep = mod.run(model=model, recall_steps=args.recall_steps, out_dir=args.out, name=args.report_name,
                      seed=args.seed, **kw)
    elif name == "offset":
        from cl_arch.eval import offset
        from cl_arch.eval.codebase import stdlib_model
        if model is None:
            model = stdlib_model(args.cache_dir, seconds=args.pretrain_seconds)
        sources = ([p.strip() for p in args.package.split(",") if p.strip()] if args.package
                   else [args.source] if args.source else list(offset.DEFAULT_SOURCES))
        rep = offset.run(model, sources=sources, max_file_bytes=args.max_file_bytes,
                         min_file_bytes=args.min_file_bytes, bucket=args.bucket, max_files=args.max_files,
                         out_dir=args.out, name=args.report_name or "offset", seed=args.seed)
    elif name == "tune-dynamic":
        from cl_arch.eval import tune_dynamic
        rep = tune_dynamic.run(model=model, package=args.package or "asyncio", max_bytes=args.max_bytes,
                               params=args.dyn_params or "all", seed=args.seed, out_dir=args.out,
                               name=args.report_name, cache_dir=args.cache_dir,
                               pretrain_seconds=args.pretrain_seconds)
        print(f"dynamic evaluation ({rep['params']}) tuned on {rep['tuned_on']}, first {rep['max_bytes']} bytes; "
              f"frozen {rep['frozen_bpb']:.4f} bits/byte; best lr {rep['best']['lr']:g}, decay "
              f"{rep['best']['decay']:g}: {rep['best']['gain_bpb']:+.4f} bits/byte over frozen")
        print(f"sweep {'read from' if rep['cached'] else 'cached in'} {rep['cache_path']}")
    else:
        from cl_arch.eval import cost
        rep = cost.run(model=model, out_dir=args.out, name=args.report_name, cache_dir=args.cache_dir,
                       seed=args.seed)
    print(rep.get("table", ""))
    if "fold_table" in rep:
        print("\nfold guarded by a forgetting budget (fraction chosen on training-corpus windows):")
        print(rep["fold_table"])
    if "second_session_table" in rep:
        print("\nsecond session over the same stream (S dropped, P kept):")
        print(rep["second_session_table"])
        print("\neach row's second session against its own first (what the saved P is worth):")
        print(rep["second_session_vs_first_table"])
    summary = {m: v["summary"] for m, v in rep["methods"].items()}
    print(json.dumps(summary, indent=1, default=str)[:4000])
    print(f"report: {rep.get('json')}  plot: {rep.get('plot')}")
    return 0
