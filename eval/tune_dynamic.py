"""``tune-dynamic``: dynamic evaluation's step size x decay, swept on a held-out package never reported.

The sweep and its protocol are :mod:`cl_arch.eval.lib.dyntune` (cached per model, so ``codebase
--dyn-tuned`` reuses it); this module reports it: one curve per decay, the gain over the frozen
model against the step size, and the table of every setting.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from cl_arch import PlasticTransformer

from .lib.dyntune import load_or_tune
from .lib.models import text_model
from .lib.options import add_model_options
from .lib.options import TextModelOptions
from .lib.options import config_from_args as options_config
from .lib.report import curve, format_table, write_report


# ---------------------------------------------------------------------------- report
def table(result: Dict[str, Any]) -> str:
    """Markdown table of a sweep: one row per setting, the best marked ``*``."""
    best = result["best"]
    rows = []
    for g in sorted(result["grid"], key=lambda g: (g["decay"], g["lr"])):
        mark = "*" if (g["lr"], g["decay"]) == (best["lr"], best["decay"]) else ""
        rows.append([f"{g['lr']:g}", f"{g['decay']:g}",
                     "diverged" if g["diverged"] else f"{g['bpb']:.4f}",
                     "-" if g["gain_bpb"] is None else f"{g['gain_bpb']:+.4f}",
                     "-" if g.get("drift") is None else f"{g['drift']:.2e}", f"{g['sec']:.0f}", mark])
    return format_table(rows, ["lr", "decay", "bits/byte", "gain over frozen", "weight drift", "sec", "best"])


def report(result: Dict[str, Any]) -> Dict[str, Any]:
    """The sweep as a benchmark report (:mod:`cl_arch.eval.lib.report` schema): one curve per decay,
    gain over frozen (bits/byte) against the step size."""
    methods: Dict[str, Any] = {}
    for d in result["decays"]:
        pts = sorted((g for g in result["grid"] if g["decay"] == d), key=lambda g: g["lr"])
        ys = [float("nan") if g["gain_bpb"] is None else g["gain_bpb"] for g in pts]
        ok = [g for g in pts if g["gain_bpb"] is not None]
        top = max(ok, key=lambda g: g["gain_bpb"]) if ok else None
        methods[f"decay={d:g}"] = {"curve": curve([g["lr"] for g in pts], ys),
                                   "summary": {"best_lr": None if top is None else top["lr"],
                                               "best_gain_bpb": None if top is None else top["gain_bpb"]}}
    rep = {"benchmark": "tune_dynamic",
           "config": {k: result.get(k) for k in ("tuned_on", "params", "max_bytes", "bytes", "episodes", "lrs",
                                                 "decays", "protocol", "model_fingerprint", "calibration")},
           "x_label": "step size lr", "y_label": f"gain over frozen (bits/byte), {result['params']}",
           "log_x": True, "methods": methods,
           **{k: result.get(k) for k in ("best", "grid", "frozen_bpb", "tuned_on", "params", "max_bytes",
                                         "model_fingerprint", "cache_path", "cached")}}
    rep["table"] = table(result)
    return rep


@dataclass
class TuneDynamicConfig(TextModelOptions):
    """Every setting of one sweep (:func:`run`): dynamic evaluation of ``params`` (``all`` or
    ``fast_W0``) over the grid ``lrs`` x ``decays`` (None: :mod:`~cl_arch.eval.lib.dyntune`'s
    defaults) on the first ``max_bytes`` of the held-out ``package``; ``tune_cache``: the sweep
    cache folder (:func:`~cl_arch.eval.lib.dyntune.tune_cache_dir`); ``recompute``: sweep again even
    if cached; ``cache_dir``, ``pretrain_seconds``, ``no_readout``, ``no_episodic``: the default
    model (:func:`~cl_arch.eval.lib.models.text_model`)."""
    package: str = "asyncio"
    max_bytes: int = 30_000
    params: str = "all"
    lrs: Optional[Tuple[float, ...]] = None
    decays: Optional[Tuple[float, ...]] = None
    chunk: int = 256
    calib_batches: Optional[int] = None
    tune_cache: Optional[str] = None
    recompute: bool = False
    progress: bool = True


HELP = "dynamic evaluation's step size x decay, swept on a held-out package never reported"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval tune-dynamic``'s options (defaults: :class:`TuneDynamicConfig`'s)."""
    add_model_options(p)
    p.add_argument("--package", default="asyncio", help="the held-out stdlib package tuned on (never json, email "
                   "or xml, the reported streams)")
    p.add_argument("--max-bytes", type=int, default=30_000, help="bytes of the tuning package")
    p.add_argument("--dyn-params", choices=["all", "fast_W0"], default="all", help="which weights dynamic "
                   "evaluation adapts (all; fast_W0: only the fast memories' W0, the sparse variant)")


def config_from_args(args: argparse.Namespace) -> TuneDynamicConfig:
    """The parsed options of :func:`add_arguments` as a :class:`TuneDynamicConfig`."""
    return options_config(TuneDynamicConfig, args, params=args.dyn_params)


def describe(rep: Dict[str, Any]) -> str:
    """The sweep's outcome in two lines, then its table."""
    return (f"dynamic evaluation ({rep['params']}) tuned on {rep['tuned_on']}, first {rep['max_bytes']} bytes; "
            f"frozen {rep['frozen_bpb']:.4f} bits/byte; best lr {rep['best']['lr']:g}, decay "
            f"{rep['best']['decay']:g}: {rep['best']['gain_bpb']:+.4f} bits/byte over frozen\n"
            f"sweep {'read from' if rep['cached'] else 'cached in'} {rep['cache_path']}\n" + rep.get("table", ""))


def run(cfg: Optional[TuneDynamicConfig] = None, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Sweep (settings: ``cfg``, default :class:`TuneDynamicConfig`; through :func:`load_or_tune`:
    cached, so ``codebase --dyn-tuned`` reuses it) and, with ``cfg.out_dir``, write ``<name>.json`` and
    ``<name>.png`` (default name ``tune_dynamic_<params>``)."""
    cfg = cfg or TuneDynamicConfig()
    model = text_model(model, cfg.cache_dir, cfg.pretrain_seconds, cfg.no_readout, cfg.no_episodic)
    model.eval()
    t0 = time.perf_counter()
    res = load_or_tune(model, package=cfg.package, max_bytes=cfg.max_bytes, params=cfg.params,
                       cache_dir=cfg.tune_cache, recompute=cfg.recompute, lrs=cfg.lrs, decays=cfg.decays,
                       chunk=cfg.chunk, calib_batches=cfg.calib_batches, seed=cfg.seed, progress=cfg.progress)
    rep = report(res)
    rep["wall_seconds"] = time.perf_counter() - t0
    rep["threads"] = torch.get_num_threads()
    if cfg.out_dir:
        write_report(rep, cfg.out_dir, cfg.name or f"tune_dynamic_{cfg.params}")
    return rep


__all__ = ["HELP", "TuneDynamicConfig", "add_arguments", "config_from_args", "describe", "table", "report",
           "run"]
