"""``offset``: does the fast memory carry information past the attention window?

Every held-out file is read from its start as one stream (model in eval mode, no gradients) and
each byte's loss is recorded by its offset in the file, for two variants of the same model:

=======================  ======================================================================
``model``                the model as it is: every state (fast weights, traces, short-conv
                         caches, attention KV caches) carried through the whole file
``reset_every_window``   the same, but every ``W = config.attn_window`` bytes each fast memory's
                         ``S`` and ``E`` go back to rest (``None``: ``S = W0 + P``, ``E = 0``);
                         short-conv caches, ``P``, the attention caches and the position go on
=======================  ======================================================================

Both variants feed the file in chunks of ``W`` bytes, so they do the same computation up to the
resets: the first window is identical, and any difference after it is what the fast memories
carried across a window boundary. Where the difference ``reset - model`` is positive beyond the
window, the fast memory holds information the attention window no longer sees.

What the reset does not remove: attention at position t still sees the keys and values of the
last ``W - 1`` positions, which were computed (before the reset) by layers whose fast memory had
read further back, and stacked attention layers reach ``n_attn_layers * (W - 1)`` bytes back. So
``reset_every_window`` bounds the fast memories' own reach to the current window, not the whole
model's context; the difference is a lower bound on what the fast path carries.

Statistics: per file, the per-byte losses (bits) are averaged within buckets of ``bucket`` bytes
of offset; per bucket, the two curves are the means over the files that reach it, and the paired
difference ``reset - model`` gets a 95% percentile-bootstrap interval over files
(:func:`cl_arch.eval.lib.metrics.paired_bootstrap_ci`, 2000 resamples). The headline figure is the
difference averaged over every offset ``>= W`` (per file first, then over files) with the same
bootstrap interval.
"""
from __future__ import annotations

import argparse
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.io import write_json
from cl_arch.state import FastLayerState, ModelState

from .lib import metrics as M
from .lib.models import text_model
from .lib.options import add_model_options, comma_list
from .lib.options import config_from_args as options_config
from .lib.report import curve, format_table, validate

DEFAULT_SOURCES: Tuple[str, ...] = ("json", "email", "xml")
VARIANTS: Tuple[str, ...] = ("model", "reset_every_window")
N_BOOT = 2000


# ---------------------------------------------------------------------------- per-byte losses
def reset_fast_states(model, state: ModelState) -> ModelState:
    """``state`` with every fast memory's ``S`` and ``E`` back at rest (None).

    ``P`` (persistent memory) and ``conv`` (short-conv / readout key cache) are kept, as are the
    attention caches (:class:`~cl_arch.state.AttnLayerState`) and ``state.position``. Which slots
    are fast memories comes from ``model.memories()`` (the readout memory included).
    """
    mems = model.memories()
    if len(mems) != len(state.layers):
        raise ValueError(f"state has {len(state.layers)} layers, the model {len(mems)}")
    layers = []
    for m, s in zip(mems, state.layers):
        if m is not None:
            if not isinstance(s, FastLayerState):
                raise ValueError(f"state slot of fast memory {type(m).__name__} holds {type(s).__name__}")
            layers.append(FastLayerState(S=None, E=None, P=s.P, conv=s.conv))
        else:
            layers.append(s)
    return ModelState(layers, state.position)


def stream_losses(model, ids: torch.Tensor, chunk: int, reset_fast: bool = False,
                  modulation: Optional[float] = None) -> torch.Tensor:
    """Per-byte loss in bits of one stream read in chunks, optionally resetting the fast memories.

    Args:
        model: a :class:`~cl_arch.PlasticTransformer`; call under ``torch.no_grad`` and in eval
            mode (as :func:`run` does) for evaluation figures.
        ids: ``[T]`` byte ids (any integer dtype), ``T >= 2``; one stream, batch 1.
        chunk: bytes per forward call; the state returned by each call is passed to the next.
        reset_fast: before every chunk but the first, put every fast memory's ``S``, ``E`` back
            at rest (:func:`reset_fast_states`); attention caches, conv caches and ``P`` go on.
        modulation: constant write-strength factor in [0, 1] for every token (the model's
            ``modulation`` argument); None: the model's own write strength. ``0.0`` makes the
            fast memories write nothing (tests use it: then a reset must change nothing).

    Returns:
        ``[T - 1]`` float64 tensor on the CPU: entry ``t`` is ``-log2 p(ids[t + 1] | ids[:t + 1])``.
    """
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids must be [T] with T >= 2, got shape {tuple(ids.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = next(model.parameters()).device
    x = ids.to(device=device, dtype=torch.long).unsqueeze(0)  # [1, T]
    T = x.shape[1]
    state: Optional[ModelState] = None
    out: List[torch.Tensor] = []
    for start in range(0, T - 1, chunk):  # the last byte is only a target
        end = min(start + chunk, T - 1)
        if reset_fast and state is not None:
            state = reset_fast_states(model, state)
        inp = x[:, start:end]  # [1, n]
        mod = None if modulation is None else torch.full(inp.shape, float(modulation), device=device)
        logits, state = model(inp, state=state, modulation=mod)  # [1, n, vocab]
        tgt = x[:, start + 1:end + 1]  # [1, n]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        out.append(ce.double().cpu() / M.LN2)
    return torch.cat(out)


def file_losses(model, data: bytes, window: int, modulation: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """Both variants' per-byte losses (bits) of one file: ``{"model": [T-1], "reset_every_window": [T-1]}``.

    ``data`` is the file's bytes (``T = len(data)``); both variants feed chunks of ``window``
    bytes, ``reset_every_window`` resets the fast memories between chunks (:func:`stream_losses`).
    """
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return {"model": stream_losses(model, ids, window, reset_fast=False, modulation=modulation),
            "reset_every_window": stream_losses(model, ids, window, reset_fast=True, modulation=modulation)}


# ---------------------------------------------------------------------------- files
def resolve_offset_sources(sources: Union[str, Sequence[str]]) -> List[str]:
    """Files of ``sources``: each entry an existing folder / file / glob (:func:`resolve_sources`)
    or the name of a stdlib package (:func:`~cl_arch.eval.lib.streams.held_out_package`). Sorted per
    entry, duplicates dropped."""
    from cl_arch.train.data import resolve_sources

    from .lib.streams import held_out_package

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: List[str] = []
    for src in sources:
        src = os.fspath(src)
        if os.path.exists(src) or any(c in src for c in "*?["):
            found = resolve_sources(src)
        else:
            found = resolve_sources(held_out_package(src))
        files.extend(os.path.abspath(f) for f in found)
    seen, out = set(), []
    for f in files:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


# ---------------------------------------------------------------------------- statistics
def _bucket_means(losses: np.ndarray, bucket: int) -> np.ndarray:
    """``[ceil(n / bucket)]`` means of ``losses [n]`` over consecutive buckets (the last may be partial)."""
    n = losses.size
    nb = -(-n // bucket)
    pad = np.full(nb * bucket - n, np.nan)
    return np.nanmean(np.concatenate([losses, pad]).reshape(nb, bucket), axis=1)


def _ci(a: Sequence[float], b: Sequence[float], seed: int) -> Tuple[Optional[float], Optional[List[float]]]:
    """Mean of ``a - b`` and its 95% paired-bootstrap interval over files (None, None if empty)."""
    if len(a) == 0:
        return None, None
    d, (lo, hi) = M.paired_bootstrap_ci(a, b, n_boot=N_BOOT, alpha=0.05, seed=seed)
    return d, [lo, hi]


def summarize(per_file: List[Dict[str, np.ndarray]], window: int, bucket: int, seed: int = 0) -> Dict[str, Any]:
    """Bucket and pair per-file losses.

    Args:
        per_file: one dict per file, ``{variant: [T_i - 1] bits}`` for both :data:`VARIANTS`.
        window: the attention window ``W`` (offsets ``>= W`` are "beyond the window").
        bucket: bucket width in bytes of offset.

    Returns:
        ``{"x", "bucket_start", "bucket_end", "n_files", "curves": {variant: [nb]},
        "difference": [{...}], "beyond_window": {...}, "file_means": {...}}`` (lists of floats).
    """
    nb = max(-(-f["model"].size // bucket) for f in per_file)
    buckets = {v: [_bucket_means(f[v], bucket) for f in per_file] for v in VARIANTS}
    x, starts, ends, counts = [], [], [], []
    curves: Dict[str, List[Optional[float]]] = {v: [] for v in VARIANTS}
    diff: List[Dict[str, Any]] = []
    for b in range(nb):
        rows = [i for i, f in enumerate(per_file) if f["model"].size > b * bucket]
        lo = b * bucket
        hi = min((b + 1) * bucket, max(per_file[i]["model"].size for i in rows))  # exclusive
        x.append(lo + (hi - lo) / 2.0)
        starts.append(lo)
        ends.append(hi)
        counts.append(len(rows))
        vals = {v: [float(buckets[v][i][b]) for i in rows] for v in VARIANTS}
        for v in VARIANTS:
            curves[v].append(float(np.mean(vals[v])))
        d, ci = _ci(vals["reset_every_window"], vals["model"], seed + b)
        diff.append({"x": x[-1], "start": lo, "end": hi, "n_files": len(rows), "mean": d, "ci": ci})
    beyond_rows = [i for i, f in enumerate(per_file) if f["model"].size > window]
    after = {v: [float(per_file[i][v][window:].mean()) for i in beyond_rows] for v in VARIANTS}
    d, ci = _ci(after["reset_every_window"], after["model"], seed + 10_007)
    beyond = {"mean": d, "ci": ci, "n_files": len(beyond_rows),
              "bytes": int(sum(per_file[i]["model"].size - window for i in beyond_rows)),
              "model_bpb": float(np.mean(after["model"])) if beyond_rows else None,
              "reset_every_window_bpb": float(np.mean(after["reset_every_window"])) if beyond_rows else None}
    first = {v: [float(f[v][:window].mean()) for f in per_file] for v in VARIANTS}
    whole = {v: [float(f[v].mean()) for f in per_file] for v in VARIANTS}
    return {"x": x, "bucket_start": starts, "bucket_end": ends, "n_files": counts, "curves": curves,
            "difference": diff, "beyond_window": beyond, "first_window": first, "after_window": after,
            "whole_file": whole}


# ---------------------------------------------------------------------------- plot
def plot(report: Dict[str, Any], path: str) -> str:
    """Two panels into ``path`` (PNG): both curves vs offset with the window marked (top), and the
    difference ``reset - model`` with its 95% band and a zero line (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    W = report["config"]["window"]
    fig, (top, bot) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    for name, m in report["methods"].items():
        pts = [p for p in m["curve"] if p["y"] is not None]
        top.plot([p["x"] for p in pts], [p["y"] for p in pts], marker="o", ms=3, label=name)
    for ax in (top, bot):
        ax.axvline(W, color="grey", ls="--", lw=1)
        ax.grid(alpha=0.3)
    top.text(W, 1.0, f" attn window {W}", transform=top.get_xaxis_transform(), va="top", fontsize=8,
             color="grey")
    top.set_ylabel(report["y_label"])
    top.legend(fontsize=8)
    n = report["config"]["n_files"]
    top.set_title(f"cl_arch eval: offset ({n} files, model {report['config']['model_fingerprint']})")
    pts = [p for p in report["difference"]["buckets"] if p["mean"] is not None]
    xs = [p["x"] for p in pts]
    bot.plot(xs, [p["mean"] for p in pts], marker="o", ms=3, color="C3", label="reset_every_window - model")
    bot.fill_between(xs, [p["ci"][0] for p in pts], [p["ci"][1] for p in pts], color="C3", alpha=0.2,
                     label="95% interval over files")
    bot.axhline(0.0, color="black", lw=0.8)
    bw = report["difference"]["beyond_window"]
    if bw["mean"] is not None:
        bot.set_title(f"beyond the window: {bw['mean']:+.4f} bits/byte "
                      f"[{bw['ci'][0]:+.4f}, {bw['ci'][1]:+.4f}] over {bw['n_files']} files", fontsize=9)
    bot.set_xlabel(report["x_label"])
    bot.set_ylabel("difference (bits/byte)")
    bot.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(report: Dict[str, Any]) -> str:
    """Markdown table: one row per bucket (both curves, the difference and its interval)."""
    rows = []
    curves = {m: [p["y"] for p in v["curve"]] for m, v in report["methods"].items()}
    for i, d in enumerate(report["difference"]["buckets"]):
        ci = "-" if d["ci"] is None else f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
        rows.append([f"{d['start']}-{d['end']}", d["n_files"], f"{curves['model'][i]:.4f}",
                     f"{curves['reset_every_window'][i]:.4f}", f"{d['mean']:+.4f}", ci])
    bw = report["difference"]["beyond_window"]
    if bw["mean"] is not None:
        rows.append([f">= {report['config']['window']}", bw["n_files"], f"{bw['model_bpb']:.4f}",
                     f"{bw['reset_every_window_bpb']:.4f}", f"{bw['mean']:+.4f}",
                     f"[{bw['ci'][0]:+.4f}, {bw['ci'][1]:+.4f}]"])
    return format_table(rows, ["offset", "files", "model", "reset_every_window", "reset - model", "95% CI"])


# ---------------------------------------------------------------------------- benchmark
@dataclass
class OffsetConfig:
    """Every setting of one offset run (:func:`run`, whose docstring says what each means);
    ``cache_dir``, ``pretrain_seconds``, ``no_readout``, ``no_episodic``: the default model
    (:func:`~cl_arch.eval.lib.models.text_model`)."""
    sources: Tuple[str, ...] = DEFAULT_SOURCES
    max_file_bytes: int = 4096
    min_file_bytes: int = 1024
    bucket: int = 128
    max_files: Optional[int] = None
    cache_dir: Optional[str] = None
    pretrain_seconds: Optional[float] = None
    no_readout: bool = False
    no_episodic: bool = False
    out_dir: Optional[str] = "runs/eval"
    name: str = "offset"
    seed: int = 0


HELP = "loss by byte offset within held-out files: does the fast memory carry past the attention window"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval offset``'s options (defaults: :class:`OffsetConfig`'s)."""
    add_model_options(p)
    p.add_argument("--source", default=None, help="folder, file or glob of .py files (default: the held-out "
                   "stdlib packages json, email and xml)")
    p.add_argument("--package", default=None, help="held-out stdlib packages, comma-separated (e.g. json,email,xml)")
    p.add_argument("--max-file-bytes", type=int, default=4096, help="bytes read from the start of each file")
    p.add_argument("--min-file-bytes", type=int, default=1024, help="shorter files are skipped")
    p.add_argument("--bucket", type=int, default=128, help="bucket width in bytes of file offset")
    p.add_argument("--max-files", type=int, default=None, help="at most this many files (a seeded sample)")


def config_from_args(args: argparse.Namespace) -> OffsetConfig:
    """The parsed options of :func:`add_arguments` as an :class:`OffsetConfig`."""
    sources = (comma_list(args.package) if args.package else [args.source] if args.source else DEFAULT_SOURCES)
    return options_config(OffsetConfig, args, sources=tuple(sources), name=args.report_name or "offset")


def run(cfg: Optional[OffsetConfig] = None, model: Optional[PlasticTransformer] = None,
        _modulation: Optional[float] = None) -> Dict[str, Any]:
    """Per-offset bits/byte with and without the fast memories' reach past the attention window.

    For every file of ``sources`` at least ``min_file_bytes`` long, its first ``max_file_bytes``
    bytes are read as one stream (``T`` bytes, ``T - 1`` losses: the loss at offset ``t`` is for
    predicting byte ``t + 1``) by both variants of the module docstring; losses are bucketed by
    offset ``t`` (``bucket`` bytes a bucket), averaged per file per bucket, then over files.

    Args:
        model: a :class:`~cl_arch.PlasticTransformer` with a sliding attention window
            (``config.attn_window``); put in eval mode for the run (its mode is restored after).
            None: :func:`~cl_arch.eval.lib.models.text_model` of ``cfg``.
        cfg: the settings (:class:`OffsetConfig`), each below:
        sources: stdlib package names (default the held-out ``json``, ``email``, ``xml``) and/or
            folders, files or globs of ``.py`` files (:func:`resolve_offset_sources`).
        max_file_bytes: bytes read from the start of each file.
        min_file_bytes: shorter files are skipped.
        bucket: bucket width in bytes of offset.
        max_files: read at most this many files, a random sample (``seed``) kept in path order;
            None: all.
        out_dir: where ``<name>.json`` and ``<name>.png`` go; None: write nothing.
        seed: file sample and bootstrap seed.
        _modulation: private test hook, a constant write-strength factor for both variants
            (0.0: fast memories write nothing, so the reset must change nothing).

    Returns:
        The report dict (schema of :mod:`cl_arch.eval.lib.report`): ``methods`` holds both curves
        (x = bucket centre offset, y = mean bits/byte over files); ``difference`` holds per
        bucket ``reset - model`` with its 95% bootstrap interval over files and the same over all
        offsets ``>= W`` (``beyond_window``); ``config`` the sources, files, bytes, window, bucket
        and model fingerprint.

    Raises:
        ValueError: the model has no attention window (``config.attn_window`` is None), no file
            is long enough, or a size argument is not positive.
    """
    cfg = cfg or OffsetConfig()
    sources, max_file_bytes, min_file_bytes, bucket = cfg.sources, cfg.max_file_bytes, cfg.min_file_bytes, cfg.bucket
    max_files, out_dir, name, seed = cfg.max_files, cfg.out_dir, cfg.name, cfg.seed
    model = text_model(model, cfg.cache_dir, cfg.pretrain_seconds, cfg.no_readout, cfg.no_episodic)
    W = getattr(model.config, "attn_window", None)
    if W is None:
        raise ValueError("offset: config.attn_window is None; the reset_every_window variant needs a sliding "
                         "attention window (attn_window) to reset the fast memories at")
    for k, v in (("max_file_bytes", max_file_bytes), ("min_file_bytes", min_file_bytes), ("bucket", bucket)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"offset: {k} must be a positive int, got {v!r}")
    if max_file_bytes < 2:
        raise ValueError(f"offset: max_file_bytes must be >= 2, got {max_file_bytes}")
    if max_files is not None and max_files < 1:
        raise ValueError(f"offset: max_files must be >= 1 or None, got {max_files}")
    src_list = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    files = [f for f in resolve_offset_sources(src_list) if os.path.getsize(f) >= max(min_file_bytes, 2)]
    if not files:
        raise ValueError(f"offset: no file of {src_list} has at least min_file_bytes={min_file_bytes} bytes")
    if max_files is not None and len(files) > max_files:
        keep = set(random.Random(seed).sample(range(len(files)), max_files))
        files = [f for i, f in enumerate(files) if i in keep]

    was_training = model.training
    model.eval()
    per_file: List[Dict[str, np.ndarray]] = []
    n_bytes = 0
    try:
        with torch.no_grad():
            for path in tqdm(files, desc="offset", unit="file"):
                with open(path, "rb") as f:
                    data = f.read(max_file_bytes)
                n_bytes += len(data)
                out = file_losses(model, data, W, modulation=_modulation)
                per_file.append({v: out[v].numpy() for v in VARIANTS})
    finally:
        model.train(was_training)

    s = summarize(per_file, W, bucket, seed)
    methods = {}
    for v in VARIANTS:
        methods[v] = {"curve": curve(s["x"], s["curves"][v]),
                      "summary": {"bpb": float(np.mean(s["whole_file"][v])),
                                  "bpb_first_window": float(np.mean(s["first_window"][v])),
                                  "bpb_beyond_window": s["beyond_window"][f"{v}_bpb"]}}
    bw = s["beyond_window"]
    methods["reset_every_window"]["summary"].update(delta_beyond_window=bw["mean"], delta_beyond_window_ci=bw["ci"])
    report: Dict[str, Any] = {
        "benchmark": "offset",
        "config": {"sources": [os.fspath(x) for x in src_list], "files": files, "n_files": len(files),
                   "bytes": n_bytes, "max_file_bytes": max_file_bytes, "min_file_bytes": min_file_bytes,
                   "max_files": max_files, "window": W, "bucket": bucket, "seed": seed,
                   "interval": f"95% percentile paired bootstrap over files ({N_BOOT} resamples)",
                   "modulation": _modulation, "model_fingerprint": model.fingerprint(),
                   "model_parameters": model.num_parameters(), "model_config": model.config.to_dict()},
        "x_label": "byte offset in file (bucket centre)", "y_label": "bits/byte", "log_x": False,
        "methods": methods,
        "difference": {"label": "reset_every_window - model", "buckets": s["difference"], "beyond_window": bw},
        "n_files": len(files),
    }
    report["table"] = table(report)
    validate(report)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        report["plot"] = plot(report, os.path.join(out_dir, f"{name}.png"))
        path = os.path.join(out_dir, f"{name}.json")
        write_json(path, _finite(report))
        report["json"] = path
    return report


def _finite(o: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


__all__ = ["HELP", "OffsetConfig", "add_arguments", "config_from_args", "run", "stream_losses", "file_losses", "reset_fast_states", "resolve_offset_sources", "summarize",
           "plot", "table", "DEFAULT_SOURCES", "VARIANTS"]
