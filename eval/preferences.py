"""``preferences``: rewards that teach what reading cannot (issue 25; docs/results/preferences.md).

Every simulated user reads the same text, a held-out package whose quote convention is mixed at
random, and users differ only in which suggestions they accept: each has a hidden quote for string
literals inside brackets and another for those elsewhere (:mod:`cl_arch.eval.lib.preferences`).
At every plain string literal the model proposes up to ``max_len`` bytes (first byte one of the two
quotes: a string opens here); the user keeps the suggestion's longest prefix that agrees with their
version of the text, accepts when that includes the quote (reward 1, else 0), and characters saved
are the bytes kept. Rows per user, on one reading of the text:

* ``rewarded``: the verdict memory learns from the user's verdicts on its own suggestions;
* ``unrewarded``: the same reading, no verdict (Q = 0): what reading alone gives;
* ``yoked``: the verdict memory learns from another user's verdicts (same points): rewards that are
  not about this user;
* ``reset``: as rewarded, with Q cleared at every new file.

Reported per package (json, email, xml by default) and pooled: acceptance and characters saved per
suggestion per row, paired differences over users with 95% bootstrap intervals
(:func:`cl_arch.stats.paired_bootstrap_ci`), and curves of acceptance against suggestions seen (mean
over users, 95% bootstrap band over users). Settings (eta, scale, threshold) were chosen on the
training-corpus package ``logging`` (``--packages logging``), never on a reported one.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.memory import VerdictConfig
from cl_arch.stats import paired_bootstrap_ci
from cl_arch.train.data import resolve_sources

from .lib import preferences as PR
from .lib.options import ReportOptions, comma_list
from .lib.options import config_from_args as options_config
from .lib.report import format_table, write_report
from .lib.streams import held_out_package

logger = logging.getLogger(__name__)

TUNING_PACKAGE = "logging"  # training corpus: where eta, scale and threshold were chosen
PAIRS = (("rewarded", "unrewarded"), ("yoked", "unrewarded"), ("rewarded", "yoked"), ("reset", "unrewarded"))
HELP = "hidden preferences: users read the same text and differ only in what they accept (verdict memory)"


@dataclass
class PreferencesConfig(ReportOptions):
    """Every setting of one run (:func:`run`).

    ``packages``: stdlib packages read (held-out ones for the report); ``users`` per package (a
    multiple of 4 keeps the four kinds of user in equal shares); ``suggestions`` per user;
    ``max_len``: bytes per suggestion; ``window``: suggestions per point of the curves; ``eta``,
    ``scale``, ``threshold``: the verdict memory's settings (None: the model's own, or
    :class:`~cl_arch.memory.VerdictConfig`'s defaults when the model has none); ``decode_tokens``:
    the decode timing's length, verdict memory on vs off (0: none). ``seed`` draws the
    mixed quotes (``seed``), the users and the yoke (:func:`user_seed`)."""

    packages: Tuple[str, ...] = ("json", "email", "xml")
    users: int = 8
    suggestions: int = 500
    max_len: int = 6
    window: int = 50
    eta: Optional[float] = None
    scale: Optional[float] = None
    threshold: Optional[float] = None
    decode_tokens: int = 128


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval preferences``' options (defaults: :class:`PreferencesConfig`'s)."""
    p.add_argument("--packages", type=comma_list, default=["json", "email", "xml"],
                   help=f"stdlib packages (held out: json, email, xml; settings were tuned on {TUNING_PACKAGE})")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--suggestions", type=int, default=500, help="suggestions per user and package")
    p.add_argument("--max-len", type=int, default=6, help="bytes per suggestion")
    p.add_argument("--window", type=int, default=50, help="suggestions per point of the curves")
    p.add_argument("--eta", type=float, default=None, help="verdict commit step (default: the model's)")
    p.add_argument("--scale", type=float, default=None, help="verdict read scale (default: the model's)")
    p.add_argument("--threshold", type=float, default=None, help="verdict key threshold (default: the model's)")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens of the decode timing, verdict memory on "
                   "vs off (0: skip it)")


def config_from_args(args: argparse.Namespace) -> PreferencesConfig:
    """The parsed options of :func:`add_arguments` as a :class:`PreferencesConfig`."""
    return options_config(PreferencesConfig, args, packages=tuple(args.packages))


def _verdict_model(model: Optional[PlasticTransformer], cfg: PreferencesConfig) -> PlasticTransformer:
    """The model with its verdict memory set as ``cfg`` asks (a copy when a setting differs)."""
    import cl_arch

    model = cl_arch.load_default() if model is None else model
    have = model.config.memories[[m.name for m in model.config.memories].index("verdict")] \
        if model.memory("verdict") is not None else None
    base = have or VerdictConfig()
    want = VerdictConfig(**{**dataclasses.asdict(base), **{k: getattr(cfg, k) for k in ("eta", "scale", "threshold")
                                                        if getattr(cfg, k) is not None}})
    if have == want:
        return model.eval()
    m = copy.deepcopy(model)
    if have is not None:
        m.remove_memory("verdict")
    m.add_memory(want)
    return m.eval()


def _curve(acc: np.ndarray, window: int, seed: int):
    """Mean acceptance per window of suggestions over users, with a 95% bootstrap band over users."""
    U, N = acc.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, U, size=(1000, U))
    pts = []
    for end in range(window, N + 1, window):
        per_user = acc[:, end - window:end].mean(1)
        boots = per_user[idx].mean(1)
        pts.append({"x": float(end), "y": float(per_user.mean()), "lo": float(np.percentile(boots, 2.5)),
                    "hi": float(np.percentile(boots, 97.5))})
    return pts


def user_seed(seed: int, pkg: str) -> int:
    """The seed of a package's users and yoke: ``seed + 1 + crc32(package) % 10000`` (the same whichever
    packages run together, so per-package runs merge into the run of all: :func:`merge`)."""
    return seed + 1 + zlib.crc32(pkg.encode()) % 10_000


def _package(model: PlasticTransformer, pkg: str, cfg: PreferencesConfig) -> Dict[str, Any]:
    files = resolve_sources(held_out_package(pkg))  # any stdlib package's folder (the tuning one too)
    text, points = PR.shared_text(files, cfg.suggestions, cfg.seed)
    users, yoke = PR.draw_users(cfg.users, user_seed(cfg.seed, pkg))
    bar = tqdm(total=len(points), desc=f"preferences {pkg}", unit="sugg", mininterval=5.0)
    t0 = time.perf_counter()
    out = PR.simulate(model, text, points, users, cfg.max_len, yoke=yoke, progress=lambda n: bar.update(1))
    bar.close()
    return {"out": out, "seconds": time.perf_counter() - t0, "bytes": len(text),
            "files": len({p.file for p in points}),
            "users": [[chr(q) for q in u] for u in users], "yoke": yoke,
            "kinds": float(np.mean([p.kind == 0 for p in points]))}


def _contrasts(per_user: Dict[str, Dict[str, List[float]]], seed: int) -> Dict[str, Any]:
    """Paired differences over users (per package and pooled) of acceptance and characters saved;
    ``per_user[package][row]``: each user's mean."""
    out: Dict[str, Any] = {}
    for scope, runs in list(per_user.items()) + [("pooled", None)]:
        for a, b in PAIRS:
            for metric, sfx in (("acceptance", ""), ("chars", "_chars")):
                if runs is None:
                    xa = np.concatenate([r[a + sfx] for r in per_user.values()])
                    xb = np.concatenate([r[b + sfx] for r in per_user.values()])
                else:
                    xa, xb = np.asarray(runs[a + sfx]), np.asarray(runs[b + sfx])
                d, (lo, hi) = paired_bootstrap_ci(xa, xb, seed=seed)
                out[f"{scope}/{a}-{b}/{metric}"] = {"delta": d, "lo": lo, "hi": hi, "pairs": int(xa.size)}
    return out


def run(cfg: Optional[PreferencesConfig] = None, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Every package's rows (:func:`cl_arch.eval.lib.preferences.simulate`); returns the report."""
    cfg = cfg or PreferencesConfig()
    if cfg.users < 2 or cfg.suggestions < cfg.window or cfg.max_len < 1:
        raise ValueError(f"need users >= 2, suggestions >= window, max_len >= 1; got {cfg.users}, "
                         f"{cfg.suggestions} < {cfg.window}?, {cfg.max_len}")
    model = _verdict_model(model, cfg)
    runs, info = {}, {}
    for pkg in cfg.packages:
        r = _package(model, pkg, cfg)
        runs[pkg], info[pkg] = r.pop("out"), r
    methods = {}
    rows = []
    for pkg, out in runs.items():
        for row in PR.ROWS:
            summary = {"acceptance": float(out[row].mean()), "chars_per_suggestion": float(out[row + "_chars"].mean()),
                       "acceptance_last_half": float(out[row][:, out[row].shape[1] // 2:].mean())}
            methods[f"{pkg}/{row}"] = {"curve": _curve(out[row], cfg.window, cfg.seed), "summary": summary}
            rows.append([pkg, row, summary["acceptance"], summary["acceptance_last_half"],
                         summary["chars_per_suggestion"]])
    per_user = {pkg: {k: v.mean(1).tolist() for k, v in out.items()} for pkg, out in runs.items()}
    contrasts = _contrasts(per_user, cfg.seed)
    decode = PR.decode_speed(model, cfg.decode_tokens, seed=cfg.seed) if cfg.decode_tokens > 0 else None
    vc = next(m for m in model.config.memories if m.name == "verdict")
    report = {"benchmark": "preferences",
              "config": {"packages": list(cfg.packages), "users": cfg.users, "suggestions": cfg.suggestions,
                         "max_len": cfg.max_len, "window": cfg.window, "seed": cfg.seed, "verdict": vc.to_dict(),
                         "tuning_package": TUNING_PACKAGE, "threads": torch.get_num_threads(),
                         "model_fingerprint": model.fingerprint()},
              "x_label": "suggestions seen", "y_label": "acceptance", "methods": methods,
              "contrasts": contrasts, "packages": info, "decode": decode,
              "per_user": per_user}
    report["table"] = _tables(report)
    if cfg.out_dir:
        write_report(report, cfg.out_dir, cfg.name)
    return report


def _tables(report: Dict[str, Any]) -> str:
    rows = [[name.split("/")[0], name.split("/")[1], m["summary"]["acceptance"], m["summary"]["acceptance_last_half"],
             m["summary"]["chars_per_suggestion"]] for name, m in report["methods"].items()]
    text = format_table(rows, ["package", "row", "acceptance", "last half", "chars/suggestion"])
    text += "\n\n" + format_table([[k, v["delta"], f"[{v['lo']:+.3f}, {v['hi']:+.3f}]", v["pairs"]]
                                   for k, v in report["contrasts"].items()], ["contrast", "delta", "95% CI", "pairs"])
    decode = report.get("decode") or {}
    for where, d in ([("", decode)] if "slowdown" in decode else list(decode.items())):
        if d:
            text += (f"\n\ndecode{' (' + where + ')' if where else ''}: {d['on_tokens_per_s']:.1f} tokens/s with the "
                     f"verdict memory, {d['off_tokens_per_s']:.1f} without ({d['slowdown']:.3f}x)")
    return text


def merge(paths: List[str], out_dir: Optional[str], name: str = "preferences") -> Dict[str, Any]:
    """One report from per-package reports of the same settings (e.g. run in parallel processes):
    their methods, packages, per-user means and decode timings; contrasts recomputed, pooled included."""
    import json

    reps = [json.load(open(p)) for p in paths]
    keep = ("users", "suggestions", "max_len", "window", "seed", "verdict", "model_fingerprint")
    for r in reps[1:]:
        if any(r["config"][k] != reps[0]["config"][k] for k in keep):
            raise ValueError(f"merge: reports of different settings ({[r['config'][k] for k in keep]})")
    report = {**{k: v for k, v in reps[0].items() if k not in ("plot", "json", "table")},
              "config": {**reps[0]["config"], "packages": [p for r in reps for p in r["config"]["packages"]]},
              "methods": {k: v for r in reps for k, v in r["methods"].items()},
              "packages": {k: v for r in reps for k, v in r["packages"].items()},
              "per_user": {k: v for r in reps for k, v in r["per_user"].items()},
              "decode": {p: r["decode"] for r in reps for p in r["config"]["packages"] if r.get("decode")},
              "merged_from": list(paths)}
    report["contrasts"] = _contrasts(report["per_user"], report["config"]["seed"])
    report["table"] = _tables(report)
    if out_dir:
        write_report(report, out_dir, name)
    return report





__all__ = ["PreferencesConfig", "HELP", "add_arguments", "config_from_args", "run", "merge", "user_seed", "main",
           "PAIRS", "TUNING_PACKAGE"]


def main(argv=None) -> int:
    """``python -m cl_arch.eval.preferences [options]``: the run, its tables, JSON + PNG under ``--out``."""
    p = argparse.ArgumentParser(prog="python -m cl_arch.eval.preferences", description=HELP,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/eval", help="folder for the JSON and PNG")
    p.add_argument("--report-name", default=None, help="file stem of the report (default: preferences)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge these per-package reports "
                   "into one (no run)")
    add_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rep = merge(args.merge, args.out, args.report_name or "preferences") if args.merge else run(config_from_args(args))
    print(rep["table"])
    print(f"report: {rep.get('json')}  plot: {rep.get('plot')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
