"""Benchmark reports: one JSON schema, one PNG per benchmark.

Schema (top level)::

    {
      "benchmark": "codebase",                 # name
      "config": {...},                         # every setting needed to rerun it
      "x_label": "bytes read", "y_label": "bits/byte", "log_x": true,   # how to plot the curves
      "methods": {
        "frozen": {"curve": [{"x": 1000, "y": 2.31}, ...],   # optional "lo", "hi": a 95% band
                   "summary": {"gain_bpb_1k": 0.0, "aulc": 0.0, ...}},
        ...
      },
      "plot": "runs/eval/codebase.png",        # the PNG written next to the JSON
      ...                                      # benchmark-specific extras (tables, notes)
    }

A method name ``"panel/method"`` puts its curve on the subplot ``panel`` (the games benchmark
draws bandits, preferences, ... side by side); names without a slash share one panel.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

from cl_arch.io import write_json

REQUIRED = ("benchmark", "config", "methods")


def curve(xs: Sequence[float], ys: Sequence[float]) -> List[Dict[str, float]]:
    """``[{x, y}, ...]`` from two equal-length sequences (non-finite y kept as None)."""
    if len(xs) != len(ys):
        raise ValueError(f"curve: {len(xs)} x values but {len(ys)} y values")
    out = []
    for x, y in zip(xs, ys):
        y = float(y)
        out.append({"x": float(x), "y": y if math.isfinite(y) else None})
    return out


def validate(report: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field that breaks the schema."""
    for k in REQUIRED:
        if k not in report:
            raise ValueError(f"report lacks '{k}'")
    if not isinstance(report["methods"], dict) or not report["methods"]:
        raise ValueError("report['methods'] must be a non-empty dict")
    for name, m in report["methods"].items():
        if not isinstance(m, dict) or "curve" not in m or "summary" not in m:
            raise ValueError(f"report['methods'][{name!r}] needs 'curve' and 'summary'")
        for p in m["curve"]:
            if not {"x", "y"} <= set(p) <= {"x", "y", "lo", "hi"}:
                raise ValueError(f"report['methods'][{name!r}]['curve'] entries must be {{x, y}} with an "
                                 f"optional band {{lo, hi}}, got {p}")


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if hasattr(o, "item") and callable(o.item):  # numpy / torch scalars
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def plot(report: Dict[str, Any], path: str, title: Optional[str] = None) -> str:
    """Draw every method's curve (one subplot per ``panel/`` prefix) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on servers and in CI
    import matplotlib.pyplot as plt

    panels: Dict[str, List[str]] = {}
    for name in report["methods"]:
        panel = name.split("/", 1)[0] if "/" in name else ""
        panels.setdefault(panel, []).append(name)
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    ylabels = report.get("y_labels", {})
    for ax, (panel, names) in zip(axes[0], panels.items()):
        for name in names:
            pts = [p for p in report["methods"][name]["curve"] if p["y"] is not None]
            if not pts:
                continue
            label = name.split("/", 1)[1] if "/" in name else name
            line, = ax.plot([p["x"] for p in pts], [p["y"] for p in pts], marker="o" if len(pts) < 30 else None,
                            ms=3, label=label)
            if all("lo" in p and "hi" in p for p in pts):  # a 95% band around the curve
                ax.fill_between([p["x"] for p in pts], [p["lo"] for p in pts], [p["hi"] for p in pts],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        if report.get("log_x"):
            ax.set_xscale("log")
        ax.set_xlabel(report.get("x_label", "interactions"))
        ax.set_ylabel(ylabels.get(panel, report.get("y_label", "score")))
        ax.set_title(panel or (title or report["benchmark"]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"cl_arch eval: {report['benchmark']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: Dict[str, Any], out_dir: str, name: Optional[str] = None) -> Dict[str, Any]:
    """Validate, draw ``<out_dir>/<name>.png``, then write ``<out_dir>/<name>.json``; returns the report."""
    validate(report)
    name = name or report["benchmark"]
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, f"{name}.png")
    report["plot"] = plot(report, png)
    path = os.path.join(out_dir, f"{name}.json")
    write_json(path, _jsonable(report))  # atomic: a crash never leaves half a report
    report["json"] = path
    return report


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:+.3f}" if abs(v) < 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["curve", "validate", "plot", "write_report", "format_table"]
