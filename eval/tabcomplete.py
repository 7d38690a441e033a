"""``tabcomplete``: the Cursor case. Does the model's next-line proposal get accepted more as it is used?

At every non-blank line of an unseen source tree the model proposes the line (greedy decoding
from the lines before); the simulated user accepts the longest correct prefix; reward = fraction
of the line's characters accepted; then the real line is observed (the model reads it, and its
fast weights write it). Greedy proposals agree with the real line exactly until their first wrong
byte, so the accepted prefix is the run of correct argmax predictions under teacher forcing
(:func:`cl_arch.eval.codebase.line_acceptance`): no decoding loop is needed and the figure is exact.

Methods: ``adapt on`` (P persists; each episode's commit is modulated by its mean acceptance,
plus retention ``eta_s``) vs ``adapt off`` (frozen). Curves: acceptance rate vs interactions
(lines), and cumulative characters saved.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

from cl_arch import PlasticTransformer
from cl_arch.train.data import resolve_sources

from . import metrics as M
from .codebase import default_policies, held_out_package, log_points, run_stream, segment_stream, stdlib_model
from .report import curve, format_table, write_report


def run(source: Optional[str] = None, model: Optional[PlasticTransformer] = None, max_bytes: int = 100_000,
        episode_bytes: int = 2048, chunk: int = 256, eta_s: Optional[float] = None, eta_r: Optional[float] = None,
        out_dir: Optional[str] = "runs/eval", name: Optional[str] = None, cache_dir: Optional[str] = None,
        pretrain_seconds: Optional[float] = None, seed: int = 0) -> Dict[str, Any]:
    """Run the tab-completion benchmark on ``source`` (default: held-out stdlib ``json``)."""
    src = source or held_out_package("json")
    model = model if model is not None else stdlib_model(cache_dir, seconds=pretrain_seconds)
    model.eval()
    segments = segment_stream(resolve_sources(src), max_bytes, episode_bytes)
    pols = default_policies(eta_s, eta_r, None, ("frozen", "adapt+reward"))
    out = run_stream(model, segments, pols, None, chunk, desc="tabcomplete")
    labels = {"frozen": "adapt off", "adapt+reward": "adapt on"}
    methods: Dict[str, Any] = {}
    n_lines = len(out["lines"]["frozen"])
    pts = log_points(n_lines, lo=10)
    frac = {k: np.array([a / n for a, n in v]) for k, v in out["lines"].items()}
    for key, label in labels.items():
        f = frac[key]
        saved = np.cumsum([a for a, _ in out["lines"][key]])
        methods[f"acceptance/{label}"] = {
            "curve": curve(pts, [M.window_mean(f, n) for n in pts]),
            "summary": {"acceptance": float(f.mean()), "chars_saved": int(saved[-1]),
                        "chars_total": int(sum(n for _, n in out["lines"][key])),
                        "acceptance_last_quarter": float(f[-max(1, n_lines // 4):].mean())}}
        methods[f"chars saved/{label}"] = {"curve": curve(pts, [int(saved[n - 1]) for n in pts]),
                                           "summary": {"chars_saved": int(saved[-1])}}
    d, ci = M.paired_bootstrap_ci(frac["adapt+reward"], frac["frozen"], seed=seed)
    s = methods["acceptance/adapt on"]["summary"]
    s.update(gain_acceptance=d, gain_acceptance_ci=list(ci))
    report = {"benchmark": "tabcomplete",
              "config": {"source": os.path.abspath(src), "bytes": sum(len(x) for x, _ in segments), "lines": n_lines,
                         "episodes": len(segments), "episode_bytes": episode_bytes, "eta_s": eta_s, "eta_r": eta_r,
                         "model_fingerprint": model.fingerprint(), "seed": seed},
              "x_label": "lines (interactions)", "y_label": "acceptance (local mean)", "log_x": True,
              "y_labels": {"chars saved": "characters saved (cumulative)"}, "methods": methods}
    off, on = methods["acceptance/adapt off"]["summary"], methods["acceptance/adapt on"]["summary"]
    report["table"] = format_table(
        [["adapt off", f"{off['acceptance']:.4f}", f"{off['acceptance_last_quarter']:.4f}", off["chars_saved"]],
         ["adapt on", f"{on['acceptance']:.4f}", f"{on['acceptance_last_quarter']:.4f}", on["chars_saved"]]],
        ["method", "acceptance", "acceptance, last quarter", f"chars saved of {off['chars_total']}"])
    report["table"] += f"\n\nacceptance gain (on - off, paired over {n_lines} lines): {d:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    if out_dir:
        write_report(report, out_dir, name or "tabcomplete")
    return report


__all__ = ["run"]
