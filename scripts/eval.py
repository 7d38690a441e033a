"""``cl-arch eval NAME``: run one learning-slope benchmark, print its table, write JSON + PNG.

NAME is one of codebase, tabcomplete, games, sutton, retention, cost, offset, tune-dynamic. Every
benchmark writes ``<out>/<name>.json`` (schema in :mod:`cl_arch.eval.report`) and ``<out>/<name>.png``.
``tune-dynamic`` sweeps dynamic evaluation's step size x decay on a held-out package that is never
reported (:mod:`cl_arch.eval.tune_dynamic`) and caches the result for ``codebase --dyn-tuned``.

Each benchmark is one sub-parser (``cl-arch eval NAME --help`` lists its options only), built from
:data:`BENCHMARKS`: a :class:`Benchmark` names the options it takes and maps them to its ``run(...)``
call. Every option is declared once, in :data:`OPTIONS`, and shared by the benchmarks that take it;
:data:`COMMON` (``--out``, ``--model``, ``--seed``, ...) goes to every benchmark. The benchmark
modules in ``cl_arch.eval`` know nothing of the command line.
"""
import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch

from .common import positive_int


def _float_or_model(text: str):
    """A float, or 'model' (None: each fast memory's own learned value)."""
    if text == "model":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'model', got {text!r}")


# Every option of every benchmark, declared once: flag -> add_argument's keywords. The order is the
# order of each benchmark's --help.
OPTIONS: Dict[str, Dict[str, Any]] = {
    "--out": dict(default="runs/eval", help="folder for the JSON and PNG"),
    "--report-name": dict(default=None, help="file stem of the report (default: NAME)"),
    "--model": dict(default=None, help="checkpoint folder (save_pretrained), or 'default' for the shipped "
                    "model; default: the shipped model (codebase, tabcomplete, cost, offset, tune-dynamic; with "
                    "--cache-dir or --pretrain-seconds the cached stdlib model) or a recall-trained model (games, "
                    "sutton, retention)"),
    "--in-place": dict(action="store_true", help="allow --out to be the --model folder (the report "
                       "files are written among the model's)"),
    "--cache-dir": dict(default=None, help="where the default stdlib model is cached (default: "
                        "~/.cache/cl_arch/demo-<hash of the recipe>, shared with cl-arch demo)"),
    "--pretrain-seconds": dict(type=float, default=None, help="pretrain a model for this many seconds "
                               "(cached by recipe) instead of the shipped default model"),
    "--source": dict(default=None, help="codebase/tabcomplete/offset: folder, file or glob of .py files "
                     "(default: the held-out stdlib package json; offset: json, email and xml)"),
    "--package": dict(default=None, help="codebase/tabcomplete/sutton/offset: a held-out stdlib package "
                      "(json, email, xml, asyncio, tomllib, zoneinfo) as the source; offset takes a comma-separated "
                      "list (e.g. json,email,xml); tune-dynamic: the package tuned on (default asyncio; never "
                      "json, email or xml, the reported streams)"),
    "--lam": dict(type=float, default=None, help="codebase: eligibility-trace decay (default: the model's)"),
    "--max-bytes": dict(type=int, default=None, help="codebase/tabcomplete: bytes of the stream "
                        "(default 100000); tune-dynamic: bytes of the tuning package (default 30000)"),
    "--episode-bytes": dict(type=int, default=2048, help="codebase/tabcomplete: longest episode"),
    "--eta-s": dict(type=_float_or_model, default=None, help="retention commit rate of the adapting "
                    "rows for every memory (default, or 'model': each memory's own commit, e.g. the readout's "
                    "state commit of its slow heads)"),
    "--gamma": dict(type=_float_or_model, default=None, help="codebase: P retention per commit "
                    "(default: the model's)"),
    "--eta-r": dict(type=float, default=None, help="reward commit rate (default: the model's)"),
    "--dyn-lr": dict(type=float, default=3e-4, help="dynamic evaluation step size (default: the best of "
                     "tune-dynamic on asyncio for the shipped model)"),
    "--dyn-rule": dict(choices=["rms", "sgd"], default="rms"),
    "--dyn-decay": dict(type=float, default=1e-3, help="codebase: dynamic evaluation's pull toward the "
                        "pretrained weights per step (default: tune-dynamic's best on asyncio for the shipped model)"),
    "--full-context-window": dict(type=int, default=4096, help="codebase: attention window of the "
                                  "full_context row (bytes)"),
    "--dyn-params": dict(choices=["all", "fast_W0"], default=None, help="tune-dynamic: which weights "
                         "dynamic evaluation adapts (default all; fast_W0: only the fast memories' W0, the sparse "
                         "variant); codebase: also run that variant (all: dynamic_eval, fast_W0: sparse_dynamic_eval)"),
    "--dyn-tuned": dict(action="store_true", help="codebase: take dynamic evaluation's step size and "
                        "decay from the sweep on asyncio (cl-arch eval tune-dynamic; cached per model, run if "
                        "missing)"),
    "--no-dynamic-eval": dict(action="store_true", help="codebase: skip dynamic evaluation"),
    "--methods": dict(default="frozen,adapt,adapt+reward,no_persist", help="codebase: rows, "
                      "comma-separated, from static, frozen, adapt, adapt+reward, no_persist (batched) and "
                      "full_context, sparse_dynamic_eval, dynamic_eval (one at a time)"),
    "--second-session": dict(action="store_true", help="codebase: read the stream again as a new "
                             "session (S dropped, P kept): what the committed P carries that S cannot"),
    "--fold-budget": dict(type=float, default=None, help="codebase: also report the held-out drift "
                          "after a fold guarded by this forgetting budget (bits/byte on training-corpus windows)"),
    "--no-readout": dict(action="store_true", help="codebase/offset: remove the model's readout memory "
                         "(the in-block fast layers alone)"),
    "--no-episodic": dict(action="store_true", help="codebase/offset: remove the model's episodic memory "
                          "(to tell its share of a gain)"),
    "--episodes": dict(type=int, default=None, help="games/sutton/retention: episodes per game or task"),
    "--seeds": dict(type=int, default=None, help="games/sutton/retention: independent seeds"),
    "--reward-memory": dict(action="store_true", help="games: add a reward memory to the model, its "
                            "settings fitted on the training token sets (cl_arch.train.reward_memory; cached in "
                            "runs/)"),
    "--tokens": dict(choices=["default", "held_out"], default="default", help="games: play on the "
                     "default token sets or on those reward-memory fitting never sees"),
    "--reward-fit": dict(choices=["search", "meta"], default="search", help="games: how the reward "
                         "memory's settings are chosen on the training token sets: grid search, or meta-gradient "
                         "through the commits"),
    "--reward-delay": dict(type=int, default=0, help="games: rewards arrive this many episodes late"),
    "--credit": dict(choices=["stored", "current"], default="stored", help="games: a late reward is "
                     "committed with the trace of the episode that earned it (stored) or of the one just ended"),
    "--no-yoked": dict(action="store_true", help="games: leave out the yoked control rows"),
    "--recall-steps": dict(type=int, default=600, help="steps of recall pretraining for the default "
                           "games model (cached in runs/recall-model-<steps>)"),
    "--max-file-bytes": dict(type=int, default=4096, help="offset: bytes read from the start of each file"),
    "--min-file-bytes": dict(type=int, default=1024, help="offset: shorter files are skipped"),
    "--bucket": dict(type=int, default=128, help="offset: bucket width in bytes of file offset"),
    "--max-files": dict(type=int, default=None, help="offset: at most this many files (a seeded sample)"),
    "--users": dict(type=int, default=8, help="tabcomplete: simulated users, each with a drawn style "
                    "and file order (kept/reset/yoked rows, cl_arch.eval.tabcomplete.run_users); 0: one stream as "
                    "written, adapt on vs off"),
    "--suggestions": dict(type=int, default=500, help="tabcomplete: suggestions (non-blank lines) per user"),
    "--window": dict(type=int, default=100, help="tabcomplete: the last window of suggestions reported"),
    "--style": dict(default=None, help="tabcomplete: one style for every user, e.g. "
                    "'indent=2,quotes=double,naming=camel' (default: drawn per user)"),
    "--reward": dict(choices=["binary", "signed", "fraction"], default="binary", help="tabcomplete: per "
                     "suggestion 1/0, 1/-1 or the accepted share of the line"),
    "--min-chars": dict(type=int, default=4, help="tabcomplete: a suggestion is accepted when right "
                        "through the indentation and this many characters (or the whole line)"),
    "--rows": dict(default="kept,reset,yoked,unrewarded", help="tabcomplete: rows from kept, reset, "
                   "yoked, unrewarded, static"),
    "--user-episode-bytes": dict(type=int, default=256, help="tabcomplete (users): longest episode"),
    "--threads": dict(type=positive_int, default=None, help="torch threads (default: torch's choice)"),
    "--seed": dict(type=int, default=0),
}

# Groups of options, each taken by several benchmarks.
COMMON = ("--out", "--report-name", "--model", "--in-place", "--threads", "--seed")  # every benchmark
STDLIB_MODEL = ("--cache-dir", "--pretrain-seconds")  # the default model is the (cached) stdlib model
WITHOUT_MEMORIES = ("--no-readout", "--no-episodic")  # applied to that model
STREAM = ("--source", "--package", "--max-bytes", "--episode-bytes")  # a held-out stdlib stream
RATES = ("--lam", "--eta-s", "--gamma", "--eta-r")  # the adapting rows' commit settings
DYNAMIC_EVAL = ("--dyn-lr", "--dyn-rule", "--dyn-decay", "--dyn-params", "--dyn-tuned", "--no-dynamic-eval")
RECALL_GAMES = ("--episodes", "--seeds", "--recall-steps")  # games on a recall-trained model


@dataclass(frozen=True)
class Benchmark:
    """One ``cl-arch eval NAME``: its options (besides :data:`COMMON`) and how they map to its run.

    ``run(args, model)`` gets the parsed options and the ``--model`` loaded (None: the benchmark's
    default model) and returns the benchmark's report dict.
    """
    help: str
    options: Tuple[str, ...]
    run: Callable[[argparse.Namespace, Any], Dict[str, Any]]

    def flags(self) -> Tuple[str, ...]:
        """Every option this benchmark takes, in :data:`OPTIONS` order."""
        taken = set(COMMON) | set(self.options)
        return tuple(flag for flag in OPTIONS if flag in taken)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        for flag in self.flags():
            p.add_argument(flag, **OPTIONS[flag])


class _BenchmarkParser(argparse.ArgumentParser):
    """A benchmark's parser refuses an option it does not take itself: ``cl-arch eval NAME: error:
    unrecognized arguments: ...`` under NAME's usage (argparse would leave it to ``cl-arch``'s parser,
    whose usage does not list NAME's options). Nothing after NAME belongs to another parser."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras


# ---------------------------------------------------------------------- what every benchmark shares
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


def _without_memories(args, model):
    """--no-readout / --no-episodic: the model (the default stdlib model if None) without them."""
    if not (args.no_readout or args.no_episodic):
        return model
    from cl_arch.eval.codebase import stdlib_model
    from cl_arch.eval.models import without_memories
    return without_memories(model if model is not None else stdlib_model(args.cache_dir, seconds=args.pretrain_seconds),
                            readout=args.no_readout, episodic=args.no_episodic)


def _source(args):
    """--package (a held-out stdlib package) as the source, else --source."""
    if args.package:
        from cl_arch.eval.codebase import held_out_package
        return held_out_package(args.package)
    return args.source


def _max_bytes(args, default: int = 100_000) -> int:
    return default if args.max_bytes is None else args.max_bytes


# ---------------------------------------------------------------------- each benchmark's run
def _run_codebase(args, model):
    from cl_arch.eval import codebase
    model = _without_memories(args, model)
    source = _source(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    extra = {"all": "dynamic_eval", "fast_W0": "sparse_dynamic_eval"}.get(args.dyn_params)
    if extra and extra not in methods:
        methods.append(extra)
    return codebase.run(source=source, model=model, max_bytes=_max_bytes(args),
                        episode_bytes=args.episode_bytes, eta_s=args.eta_s, eta_r=args.eta_r, gamma=args.gamma,
                        dyn_lr=args.dyn_lr, dyn_rule=args.dyn_rule, dyn_decay=args.dyn_decay,
                        dyn_tuned=args.dyn_tuned, full_context_window=args.full_context_window,
                        with_dynamic_eval=not args.no_dynamic_eval, lam=args.lam,
                        out_dir=args.out, name=args.report_name, cache_dir=args.cache_dir,
                        pretrain_seconds=args.pretrain_seconds, seed=args.seed,
                        second_session=args.second_session, methods=tuple(methods),
                        fold_budget=args.fold_budget)


def _run_tabcomplete(args, model):
    from cl_arch.eval import tabcomplete
    from cl_arch.eval.user_style import Style
    model = _without_memories(args, model)
    source = _source(args)
    if args.users > 0:
        return tabcomplete.run_users(source=source, model=model, users=args.users,
                                     suggestions=args.suggestions, window=args.window,
                                     style=Style.parse(args.style) if args.style else None, reward=args.reward,
                                     min_chars=args.min_chars, rows=[r.strip() for r in args.rows.split(",")],
                                     episode_bytes=args.user_episode_bytes, eta_s=args.eta_s, eta_r=args.eta_r,
                                     gamma=args.gamma, lam=args.lam, out_dir=args.out, name=args.report_name,
                                     cache_dir=args.cache_dir, pretrain_seconds=args.pretrain_seconds,
                                     seed=args.seed)
    return tabcomplete.run(source=source, model=model, max_bytes=_max_bytes(args),
                           episode_bytes=args.episode_bytes, eta_s=args.eta_s, eta_r=args.eta_r,
                           out_dir=args.out, name=args.report_name, cache_dir=args.cache_dir,
                           pretrain_seconds=args.pretrain_seconds, seed=args.seed)


def _recall_games_kw(args) -> Dict[str, Any]:
    kw = {k: v for k, v in (("episodes", args.episodes), ("seeds", args.seeds)) if v is not None}
    kw.update(recall_steps=args.recall_steps, out_dir=args.out, name=args.report_name, seed=args.seed)
    return kw


def _run_games(args, model):
    from cl_arch.eval import games
    return games.run(model=model, reward_memory=args.reward_memory, tokens=args.tokens, yoked=not args.no_yoked,
                     reward_fit=args.reward_fit, delay=args.reward_delay, credit=args.credit, **_recall_games_kw(args))


def _run_sutton(args, model):
    from cl_arch.eval import sutton
    return sutton.run(model=model, source=_source(args), cache_dir=args.cache_dir,
                      pretrain_seconds=args.pretrain_seconds, max_bytes=min(_max_bytes(args), 40_000),
                      episode_bytes=args.episode_bytes, **_recall_games_kw(args))


def _run_retention(args, model):
    from cl_arch.eval import retention
    return retention.run(model=model, **_recall_games_kw(args))


def _run_cost(args, model):
    from cl_arch.eval import cost
    return cost.run(model=_without_memories(args, model), out_dir=args.out, name=args.report_name,
                    cache_dir=args.cache_dir, seed=args.seed)


def _run_offset(args, model):
    from cl_arch.eval import offset
    from cl_arch.eval.codebase import stdlib_model
    model = _without_memories(args, model)
    if model is None:
        model = stdlib_model(args.cache_dir, seconds=args.pretrain_seconds)
    sources = ([p.strip() for p in args.package.split(",") if p.strip()] if args.package
               else [args.source] if args.source else list(offset.DEFAULT_SOURCES))
    return offset.run(model, sources=sources, max_file_bytes=args.max_file_bytes,
                      min_file_bytes=args.min_file_bytes, bucket=args.bucket, max_files=args.max_files,
                      out_dir=args.out, name=args.report_name or "offset", seed=args.seed)


def _run_tune_dynamic(args, model):
    from cl_arch.eval import tune_dynamic
    rep = tune_dynamic.run(model=_without_memories(args, model), package=args.package or "asyncio",
                           max_bytes=_max_bytes(args, 30_000), params=args.dyn_params or "all", seed=args.seed,
                           out_dir=args.out, name=args.report_name, cache_dir=args.cache_dir,
                           pretrain_seconds=args.pretrain_seconds)
    print(f"dynamic evaluation ({rep['params']}) tuned on {rep['tuned_on']}, first {rep['max_bytes']} bytes; "
          f"frozen {rep['frozen_bpb']:.4f} bits/byte; best lr {rep['best']['lr']:g}, decay "
          f"{rep['best']['decay']:g}: {rep['best']['gain_bpb']:+.4f} bits/byte over frozen")
    print(f"sweep {'read from' if rep['cached'] else 'cached in'} {rep['cache_path']}")
    return rep


# Name -> benchmark, in the order of ``cl-arch eval --help``.
BENCHMARKS: Dict[str, Benchmark] = {
    "codebase": Benchmark(
        "bits/byte reading an unseen source tree: memories off, adapting, committing, dynamic evaluation",
        STDLIB_MODEL + WITHOUT_MEMORIES + STREAM + RATES + DYNAMIC_EVAL
        + ("--full-context-window", "--methods", "--second-session", "--fold-budget"),
        _run_codebase),
    "tabcomplete": Benchmark(
        "next-line proposals accepted by simulated users, as the model is used",
        STDLIB_MODEL + WITHOUT_MEMORIES + STREAM + RATES
        + ("--users", "--suggestions", "--window", "--style", "--reward", "--min-chars", "--rows",
           "--user-episode-bytes"),
        _run_tabcomplete),
    "games": Benchmark(
        "reward-only learning in synthetic games",
        RECALL_GAMES + ("--reward-memory", "--tokens", "--reward-fit", "--reward-delay", "--credit", "--no-yoked"),
        _run_games),
    "sutton": Benchmark(
        "the Sutton test: does the state kept from attempt k improve attempt k + 1",
        RECALL_GAMES + STDLIB_MODEL + STREAM,
        _run_sutton),
    "retention": Benchmark(
        "tasks learned one after another: what is kept (R matrix, ACC, BWT, FWT)",
        RECALL_GAMES,
        _run_retention),
    "cost": Benchmark(
        "what remembering costs per token as interactions accumulate, against a growing context",
        STDLIB_MODEL + WITHOUT_MEMORIES,
        _run_cost),
    "offset": Benchmark(
        "loss by byte offset within held-out files: does the fast memory carry past the attention window",
        STDLIB_MODEL + WITHOUT_MEMORIES + ("--source", "--package", "--max-file-bytes", "--min-file-bytes",
                                           "--bucket", "--max-files"),
        _run_offset),
    "tune-dynamic": Benchmark(
        "dynamic evaluation's step size x decay, swept on a held-out package never reported",
        STDLIB_MODEL + WITHOUT_MEMORIES + ("--package", "--max-bytes", "--dyn-params"),
        _run_tune_dynamic),
}


def add_parser(sub):
    p = sub.add_parser("eval", help="run a learning-slope benchmark (JSON + PNG report)",
                       description="Run one learning-slope benchmark; `cl-arch eval NAME --help` lists its options.")
    benchmarks = p.add_subparsers(dest="name", metavar="NAME", required=True, title="benchmarks",
                                  parser_class=_BenchmarkParser)
    for name, bench in BENCHMARKS.items():
        bp = benchmarks.add_parser(name, help=bench.help, description=bench.help,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        bench.add_arguments(bp)
    p.set_defaults(func=run)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_out(args)
    rep = BENCHMARKS[args.name].run(args, _model(args))
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
