"""``cl-arch eval NAME``: run one learning-slope benchmark, print its table, write JSON + PNG.

NAME is one of :data:`BENCHMARKS` (codebase, tabcomplete, preferences, games, sutton, retention, cost,
offset, tune-dynamic). Every benchmark writes ``<out>/<name>.json`` (schema in :mod:`cl_arch.eval.lib.report`)
and ``<out>/<name>.png``. ``tune-dynamic`` sweeps dynamic evaluation's step size x decay on a
held-out package that is never reported and caches the result for ``codebase --dyn-tuned``.

Each benchmark module declares its own options, config and run (the protocol is in
:mod:`cl_arch.eval.lib.options`): ``cl-arch eval NAME --help`` lists NAME's options and the
common ones added here (``--out``, ``--report-name``, ``--model``, ``--in-place``, ``--threads``,
``--seed``); this module loads ``--model``, checks ``--out`` and prints what the benchmark describes.
"""
import argparse
import importlib
import json
from types import ModuleType

import torch

from .common import positive_int

# Command name -> module of cl_arch.eval, in the order of ``cl-arch eval --help``.
BENCHMARKS = {"codebase": "codebase", "tabcomplete": "tabcomplete", "preferences": "preferences", "games": "games",
              "sutton": "sutton", "retention": "retention", "cost": "cost", "offset": "offset",
              "tune-dynamic": "tune_dynamic"}


def benchmark(name: str) -> ModuleType:
    """The module of ``cl-arch eval NAME`` (``cl_arch.eval.<module>``)."""
    return importlib.import_module(f"cl_arch.eval.{BENCHMARKS[name]}")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: where the report goes, which model, threads, seed."""
    p.add_argument("--out", default="runs/eval", help="folder for the JSON and PNG")
    p.add_argument("--report-name", default=None, help="file stem of the report (default: NAME)")
    p.add_argument("--model", default=None, help="checkpoint folder (save_pretrained), or 'default' for the "
                   "shipped model; default: the benchmark's own (the shipped model, the cached stdlib model with "
                   "--cache-dir or --pretrain-seconds, or a recall-trained model for games, sutton, retention)")
    p.add_argument("--in-place", action="store_true", help="allow --out to be the --model folder (the report "
                   "files are written among the model's)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)


class _BenchmarkParser(argparse.ArgumentParser):
    """A benchmark's parser refuses an option it does not take itself: ``cl-arch eval NAME: error:
    unrecognized arguments: ...`` under NAME's usage (argparse would leave it to ``cl-arch``'s parser,
    whose usage does not list NAME's options). Nothing after NAME belongs to another parser."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        return namespace, extras


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


def add_parser(sub):
    p = sub.add_parser("eval", help="run a learning-slope benchmark (JSON + PNG report)",
                       description="Run one learning-slope benchmark; `cl-arch eval NAME --help` lists its options.")
    benchmarks = p.add_subparsers(dest="name", metavar="NAME", required=True, title="benchmarks",
                                  parser_class=_BenchmarkParser)
    for name in BENCHMARKS:
        mod = benchmark(name)
        bp = benchmarks.add_parser(name, help=mod.HELP, description=mod.HELP,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_common_arguments(bp)
        mod.add_arguments(bp)
    p.set_defaults(func=run)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_out(args)
    mod = benchmark(args.name)
    rep = mod.run(mod.config_from_args(args), _model(args))
    print(mod.describe(rep) if hasattr(mod, "describe") else rep.get("table", ""))
    summary = {m: v["summary"] for m, v in rep["methods"].items()}
    print(json.dumps(summary, indent=1, default=str)[:4000])
    print(f"report: {rep.get('json')}  plot: {rep.get('plot')}")
    return 0
