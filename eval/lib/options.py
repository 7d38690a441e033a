"""The command-line pieces the benchmarks share, and how a benchmark plugs into ``cl-arch eval``.

A benchmark module (``cl_arch.eval.<name>``) exposes:

* ``HELP``: one line for ``cl-arch eval --help``;
* a config dataclass (``CodebaseConfig``, ...) holding every setting of one run;
* ``add_arguments(parser)``: its own options (``cl-arch eval NAME --help`` lists them and the common
  ones the command line adds: ``--out``, ``--report-name``, ``--model``, ``--in-place``, ``--threads``,
  ``--seed``);
* ``config_from_args(args)``: the parsed options as its config;
* ``run(config, model=None)``: the report dict (``model`` None: the benchmark's default model);
* optionally ``describe(report)``: the text the command line prints (default: ``report["table"]``).

The groups below declare an option once for every benchmark that takes it, with the same flag,
default and type; the help says what it means for the benchmark at hand (``what``).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(kw_only=True)
class ReportOptions:
    """Where a benchmark's report goes and its seed: the settings of every benchmark's config."""

    out_dir: Optional[str] = "runs/eval"
    name: Optional[str] = None
    seed: int = 0


@dataclasses.dataclass(kw_only=True)
class TextModelOptions(ReportOptions):
    """The default text model's settings (:func:`add_model_options`; ``cl_arch.eval.lib.models.text_model``)."""

    cache_dir: Optional[str] = None
    pretrain_seconds: Optional[float] = None
    no_readout: bool = False
    no_episodic: bool = False


def float_or_model(text: str) -> float | None:
    """A float, or 'model' (None: each fast memory's own learned value)."""
    if text == "model":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'model', got {text!r}") from None


def add_model_options(p: argparse.ArgumentParser, memories: bool = True) -> None:
    """``--cache-dir``, ``--pretrain-seconds`` (the default model is the cached stdlib recipe when
    either is given, else the shipped model) and, with ``memories``, ``--no-readout`` / ``--no-episodic``."""
    p.add_argument("--cache-dir", default=None, help="where the default stdlib model is cached (default: "
                   "~/.cache/cl_arch/demo-<hash of the recipe>, shared with cl-arch demo)")
    p.add_argument("--pretrain-seconds", type=float, default=None, help="pretrain a model for this many seconds "
                   "(cached by recipe) instead of the shipped default model")
    if memories:
        p.add_argument("--no-readout", action="store_true", help="remove the model's readout memory "
                       "(the in-block fast layers alone)")
        p.add_argument("--no-episodic", action="store_true", help="remove the model's episodic memory "
                       "(to tell its share of a gain)")


def add_source_options(p: argparse.ArgumentParser, package_help: str = "a held-out stdlib package (json, email, "
                       "xml, asyncio, tomllib, zoneinfo) as the source") -> None:
    """``--source`` (a folder, file or glob of .py files) and ``--package`` (a held-out stdlib package)."""
    p.add_argument("--source", default=None, help="folder, file or glob of .py files (default: the held-out "
                   "stdlib package json)")
    p.add_argument("--package", default=None, help=package_help)


def add_stream_options(p: argparse.ArgumentParser, max_bytes: int = 100_000, episode_bytes: int = 2048) -> None:
    """:func:`add_source_options` plus ``--max-bytes`` and ``--episode-bytes``."""
    add_source_options(p)
    p.add_argument("--max-bytes", type=int, default=max_bytes, help="bytes of the stream")
    p.add_argument("--episode-bytes", type=int, default=episode_bytes, help="longest episode")


def add_rate_options(p: argparse.ArgumentParser) -> None:
    """The adapting rows' commit settings: ``--lam``, ``--eta-s``, ``--gamma``, ``--eta-r``."""
    p.add_argument("--lam", type=float, default=None, help="eligibility-trace decay (default: the model's)")
    p.add_argument("--eta-s", type=float_or_model, default=None, help="retention commit rate of the adapting "
                   "rows for every memory (default, or 'model': each memory's own commit, e.g. the readout's "
                   "state commit of its slow heads)")
    p.add_argument("--gamma", type=float_or_model, default=None, help="P retention per commit (default: the "
                   "model's)")
    p.add_argument("--eta-r", type=float, default=None, help="reward commit rate (default: the model's)")


def add_recall_options(p: argparse.ArgumentParser, episodes: int, seeds: int) -> None:
    """Games on a recall-trained model: ``--episodes``, ``--seeds``, ``--recall-steps``."""
    p.add_argument("--episodes", type=int, default=episodes, help="episodes per game or task")
    p.add_argument("--seeds", type=int, default=seeds, help="independent seeds")
    p.add_argument("--recall-steps", type=int, default=600, help="steps of recall pretraining for the default "
                   "model (cached in runs/recall-model-<steps>)")


def source_from_args(args: argparse.Namespace) -> str | None:
    """``--package`` (a held-out stdlib package) as the source, else ``--source`` (None: the benchmark's default)."""
    if getattr(args, "package", None):
        from .streams import held_out_package
        return held_out_package(args.package)
    return getattr(args, "source", None)


def config_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """``cls`` (a config dataclass) from the parsed options: ``out_dir`` and ``name`` from ``--out`` and
    ``--report-name``, every other field from the option of the same name, then ``values`` on top."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(out_dir=args.out, name=args.report_name)
    kw.update(values)
    return cls(**kw)


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [s.strip() for s in text.split(",") if s.strip()]
