"""``codebase``: does reading an unseen source tree make the model better at it?

A byte-level model pretrained on the standard library minus its held-out parts reads an unseen
tree file after file. Every byte is scored *before* anything learns from it (prequential
bits/byte). Files are cut into episodes of at most ``episode_bytes`` (at line ends); within an
episode every method has the same in-context memory (fast weights ``S`` and attention caches);
methods differ only in what survives an episode boundary:

=================  ==========================================================================
``static``         no fast-memory writes at all (the weights alone: no learning at inference)
``frozen``         nothing: every episode starts from the pretrained model
``adapt``          the episode's eligibility trace is committed into the persistent fast
                   weight ``P`` (retention only, ``r = None``, rate ``eta_s``); P persists
``adapt+reward``   as ``adapt`` plus the reward-modulated term, reward = the episode's mean
                   tab-completion acceptance (:mod:`cl_arch.eval.tabcomplete`)
``adapt+surprise`` as ``adapt+reward``, reward = the bits/byte the episode's adaptation saved over
                   ``frozen`` (a reward the text gives itself: the surprise-gated commit)
``no_persist``     fast weights without persistence: ``S`` itself carries over, no ``P``
``dynamic_eval``   Krause-style online gradient steps on all weights after each chunk
=================  ==========================================================================

The first four run as rows of one batch (:class:`~cl_arch.eval.lib.learners.EpisodeLearner`), so
the comparison is exactly paired. Reported: gain over frozen at 1k/10k/100k bytes (local window,
:func:`~cl_arch.eval.lib.metrics.gain_curve`), AULC of the relative gain, compute per token (measured
seconds and estimated FLOPs) and the drift of held-out stdlib bits/byte after the stream.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cl_arch import PlasticTransformer
from cl_arch.train.data import resolve_sources

from .lib import metrics as M
from .lib.compute import flops_per_token, state_bytes, time_rows
from .lib.context import FullContext
from .lib.dyntune import load_or_tune
from .lib.learners import DynamicEval, calibration_batches
from .lib.models import text_model
from .lib.options import add_model_options, add_rate_options, add_stream_options, comma_list, source_from_args
from .lib.options import TextModelOptions
from .lib.options import config_from_args as options_config
from .lib.reading import default_policies, log_points, run_stream
from .lib.report import curve, format_table, write_report
from .lib.streams import anchor_windows, base_windows, held_out_package, segment_stream, window_bpb

POINTS = (1_000, 10_000, 100_000)


def gain_interval(frozen: np.ndarray, adapted: np.ndarray, n: int, block: int = 256,
                  seed: int = 0) -> Tuple[float, float]:
    """95% interval of ``gain_curve``'s figure at ``n``: a paired bootstrap over ``block``-byte
    blocks of the bytes ``(n - ceil(n/2), n]`` (the window the gain is read in). Whole blocks
    are resampled because neighbouring bytes' losses are correlated; single bytes would
    understate the spread."""
    w = int(math.ceil(n / 2))
    f, a = frozen[n - w:n], adapted[n - w:n]
    block = max(1, min(block, w // 8))  # at least 8 blocks, so short windows get an interval too
    nb = max(1, len(f) // block)
    cut = nb * block if len(f) >= block else len(f)
    fb = f[len(f) - cut:].reshape(nb, -1).mean(1)
    ab = a[len(a) - cut:].reshape(nb, -1).mean(1)
    _, (lo, hi) = M.paired_bootstrap_ci(fb, ab, seed=seed)
    return lo, hi


def _short(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def guarded_fold_drift(model: PlasticTransformer, P: Sequence[torch.Tensor], anchor: torch.Tensor,
                       budget: float, base: torch.Tensor, base_before: Sequence[float]) -> Dict[str, Any]:
    """What a budgeted ``fold`` of one row's ``P`` (one ``[H, K, V]`` per fast layer) would do.

    The fold fraction ``c`` is chosen on ``anchor`` windows ``[n, L+1]`` (training corpus,
    :func:`~cl_arch.consolidate.fold.fold_fraction`); the drift is then measured with ``c P`` in
    place on the held-out ``base`` windows, the same figure as ``drift_bpb`` for the whole P.
    """
    from cl_arch.consolidate.common import to_batches
    from cl_arch.consolidate.fold import fold_fraction

    c, guard = fold_fraction(model, P, to_batches(anchor, 16, "anchor"), budget)
    cP = [c * p for p in P]
    st = model.init_state(1, [p.unsqueeze(0) for p in cP])
    d = M.base_drift(base_before, window_bpb(model, base, st))
    return {"fold_budget": budget, "fold_fraction": c, "fold_anchor_bits_full": guard["forgetting_bits_full"],
            "fold_anchor_bits": guard["forgetting_bits"], "folded_drift_bpb": d["drift_bpb"],
            "folded_drift_ci": d["drift_ci"]}


def summarize(out: Dict[str, Any], model: PlasticTransformer, chunk: int, episode_bytes: int,
              base: Optional[torch.Tensor], cost: Optional[Dict[str, Dict[str, float]]] = None,
              fold_guard: Optional[Tuple[torch.Tensor, float]] = None) -> Dict[str, Dict[str, Any]]:
    """Per-method curve and summary figures from :func:`run_stream`'s output.

    Curves are the gain over ``frozen`` (bits/byte, local mean, :func:`M.gain_curve`) at
    log-spaced byte counts, each point with its 95% block-bootstrap interval (``lo``, ``hi``).
    ``cost``: :func:`time_rows`' per-row figures (batch 1); without it the cost columns are the
    stream's own wall time (batched rows share one batch, so theirs is divided by the batch).
    ``fold_guard = (anchor windows, budget)``: every row that commits P also reports
    :func:`guarded_fold_drift` (needs ``base``).
    """
    bits = out["bits"]
    N = len(bits["frozen"])
    pts = log_points(N)
    methods: Dict[str, Dict[str, Any]] = {}
    base_before = window_bpb(model, base) if base is not None else None
    learner, solo = out["learner"], out.get("solo", {})
    after_first = [n for n in pts if n > episode_bytes]
    for i, name in enumerate(out["names"]):
        b = bits[name]
        s: Dict[str, Any] = {"bpb": float(b.mean())}
        gains = M.gain_curve(bits["frozen"], b, POINTS)
        for n in POINTS:
            s[f"gain_bpb_{_short(n)}"] = gains.get(n)
            if n in gains:
                s[f"gain_ci_{_short(n)}"] = list(gain_interval(bits["frozen"], b, n))
        frozen_at = {n: M.window_mean(bits["frozen"], n) for n in pts}
        rel = {n: (frozen_at[n] - M.window_mean(b, n)) / frozen_at[n] for n in pts}
        s["aulc"] = M.aulc([rel[n] for n in pts], lo=0.0, hi=1.0)  # mean fraction of the frozen loss removed
        # Points inside the first episode are equal for every episode-level method by construction.
        s["aulc_after_first_episode"] = (M.aulc([rel[n] for n in after_first], lo=0.0, hi=1.0)
                                         if after_first else None)
        ln = out["lines"][name]
        s["tab_acceptance"] = float(np.mean([a / n for a, n in ln])) if ln else None
        if cost is not None and name in cost:
            s["sec_per_token"] = cost[name]["sec_per_token"]
            s["flops_per_token"] = cost[name]["flops_per_token"]
            s["cost_measured"] = "batch 1, median of repeats (time_rows)"
        else:
            sec = out["seconds"][name] if name in solo else out["seconds"]["batched"] / learner.B
            s["sec_per_token"] = sec / N
            s["cost_measured"] = "stream wall time" + ("" if name in solo else " / batch rows")
            s["flops_per_token"] = (None if name in solo else
                                    flops_per_token(model, context=min(chunk, model.config.attn_window or chunk)))
        # Memory a user of this row holds beside the shared weights at the end of the stream: the
        # row's state (fast memories, attention caches) and P, or dynamic evaluation's adapted weights.
        if name in solo:
            reader = solo[name]
            held = state_bytes(reader.state) if reader.state is not None else 0
            if isinstance(reader, DynamicEval):
                held += sum(p.numel() * p.element_size() for p in reader.params)
            s["state_bytes"] = held
        else:
            s["state_bytes"] = (state_bytes(learner.row_state(i)) +
                                (sum(P[i].numel() * P[i].element_size() for P in learner.P)
                                 if learner.policies[i].persist else 0))
        if name in solo:
            reader = solo[name]
            if isinstance(reader, DynamicEval):
                s["weight_drift_rel"] = reader.drift_from_start()
                if base is not None:
                    s.update(M.base_drift(base_before, window_bpb(reader.model, base)))
            elif isinstance(reader, FullContext):
                s["context_window"] = reader.window
        else:
            s["P_norm"] = learner.persistent_norm()[i]
            if base is not None:
                s.update(M.base_drift(base_before, window_bpb(model, base, learner.row_state(i))))
                if fold_guard is not None and learner.policies[i].persist:
                    s.update(guarded_fold_drift(model, [P[i] for P in learner.P], fold_guard[0], fold_guard[1],
                                                base, base_before))
        band = {n: gain_interval(bits["frozen"], b, n) for n in pts}
        crv = curve(pts, [frozen_at[n] - M.window_mean(b, n) for n in pts])
        for p_, n in zip(crv, pts):
            p_["lo"], p_["hi"] = float(band[n][0]), float(band[n][1])
        methods[name] = {"curve": crv, "summary": s}
    return methods


SOLO_METHODS = ("full_context", "dynamic_eval", "sparse_dynamic_eval")
REWARD_DEFINITION = ("mean over the episode's non-blank lines of the accepted fraction of the line under greedy "
                     "tab completion (line_acceptance); an episode without a non-blank line has no reward and "
                     "the adapt+reward row commits it with retention only (r = None), counted in "
                     "episodes_without_reward")


@dataclass
class CodebaseConfig(TextModelOptions):
    """Every setting of one codebase run (:func:`run`).

    Attributes:
        source: a folder of .py files, a file or a glob; default the held-out stdlib ``json``
            package. Any unseen tree works (an installed site-packages package, a project).
        max_bytes: bytes of the stream to read (gains are reported at 1k/10k/100k when reached).
        episode_bytes: longest episode; each file is split at line ends into episodes this long.
        chunk: bytes per step of every reader.
        eta_s, eta_r, gamma: commit settings for the adapting rows (None: each memory's own).
        lam: eligibility-trace decay override (None: the model's own, 0.5 by default). It decides
            how much of an episode a commit stores: ``E_T = sum_t lam^(T-t) D_t``.
        methods: batched rows (:func:`~cl_arch.eval.lib.reading.default_policies`) and rows read one
            at a time: ``full_context`` (:class:`~cl_arch.eval.lib.context.FullContext`, window
            ``full_context_window``), ``dynamic_eval`` (all weights) and ``sparse_dynamic_eval``
            (only the fast memories' ``W0``). ``with_dynamic_eval`` adds (True) or removes (False)
            ``dynamic_eval``.
        dyn_lr, dyn_rule, dyn_eps, dyn_decay: dynamic evaluation (:class:`DynamicEval`); the
            defaults are the best of ``cl-arch eval tune-dynamic`` on asyncio for the shipped model.
        sparse_lr, sparse_decay: the same for ``sparse_dynamic_eval`` (its own sweep's best).
        dyn_tuned: take both dynamic evaluations' step size and decay from the sweep on the
            held-out package ``dyn_tune_package`` (:func:`cl_arch.eval.lib.dyntune.load_or_tune`,
            cached per model); the report's config records what was used and where it was tuned.
        calib_batches: training-corpus windows ``[1, chunk + 1]`` (the step's own shape) that
            estimate dynamic evaluation's mean squared gradients.
        drift_windows: stdlib validation windows (512 bytes) for the base-drift figure (0: skip).
        fold_budget: also report, for every row that commits P, the drift after a ``fold`` guarded
            by this forgetting budget (bits/byte, measured on 16 training-corpus windows,
            :func:`guarded_fold_drift`): ``fold_fraction`` and ``folded_drift_bpb``.
        second_session: read the stream a second time as a new session of the same user
            (:meth:`EpisodeLearner.new_session`: ``S`` dropped, ``P`` kept); its rows are in
            ``report["second_session"]``, each also against its own first session.
        timing_episodes, timing_repeats: the per-row cost columns come from
            :func:`~cl_arch.eval.lib.compute.time_rows` (every row alone at batch 1 on the stream's
            first ``timing_episodes`` episodes, median of ``timing_repeats``); 0 episodes: the
            stream's own wall time instead.
        cache_dir, pretrain_seconds, no_readout, no_episodic: the default model
            (:func:`~cl_arch.eval.lib.models.text_model`) and the memories removed from the model.
        out_dir, name, seed: with ``out_dir``, ``<name>.json`` and ``<name>.png`` are written there.
    """
    source: Optional[str] = None
    max_bytes: Optional[int] = 100_000
    episode_bytes: int = 2048
    chunk: int = 256
    eta_s: Optional[float] = None
    eta_r: Optional[float] = None
    gamma: Optional[float] = None
    lam: Optional[float] = None
    methods: Tuple[str, ...] = ("frozen", "adapt", "adapt+reward", "no_persist")
    with_dynamic_eval: bool = True
    dyn_lr: float = 3e-4
    dyn_rule: str = "rms"
    dyn_eps: float = 1e-3
    dyn_decay: float = 1e-3
    sparse_lr: float = 3e-3
    sparse_decay: float = 1e-2
    dyn_tuned: bool = False
    dyn_tune_package: str = "asyncio"
    calib_batches: int = 32
    full_context_window: Optional[int] = 4096
    drift_windows: int = 8
    fold_budget: Optional[float] = None
    second_session: bool = False
    timing_episodes: int = 3
    timing_repeats: int = 3


HELP = "bits/byte reading an unseen source tree: memories off, adapting, committing, dynamic evaluation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval codebase``'s options (defaults: :class:`CodebaseConfig`'s)."""
    add_model_options(p)
    add_stream_options(p)
    add_rate_options(p)
    p.add_argument("--dyn-lr", type=float, default=3e-4, help="dynamic evaluation step size (default: the best "
                   "of tune-dynamic on asyncio for the shipped model)")
    p.add_argument("--dyn-rule", choices=["rms", "sgd"], default="rms")
    p.add_argument("--dyn-decay", type=float, default=1e-3, help="dynamic evaluation's pull toward the "
                   "pretrained weights per step (default: tune-dynamic's best on asyncio for the shipped model)")
    p.add_argument("--full-context-window", type=int, default=4096, help="attention window of the full_context "
                   "row (bytes)")
    p.add_argument("--dyn-params", choices=["all", "fast_W0"], default=None, help="also run that dynamic "
                   "evaluation (all: dynamic_eval, fast_W0: sparse_dynamic_eval)")
    p.add_argument("--dyn-tuned", action="store_true", help="take dynamic evaluation's step size and decay from "
                   "the sweep on asyncio (cl-arch eval tune-dynamic; cached per model, run if missing)")
    p.add_argument("--no-dynamic-eval", action="store_true", help="skip dynamic evaluation")
    p.add_argument("--methods", default="frozen,adapt,adapt+reward,no_persist", help="rows, comma-separated, from "
                   "static, frozen, adapt, adapt+reward, adapt+surprise, no_persist (batched) and full_context, sparse_dynamic_eval, "
                   "dynamic_eval (one at a time)")
    p.add_argument("--second-session", action="store_true", help="read the stream again as a new session "
                   "(S dropped, P kept): what the committed P carries that S cannot")
    p.add_argument("--fold-budget", type=float, default=None, help="also report the held-out drift after a fold "
                   "guarded by this forgetting budget (bits/byte on training-corpus windows)")


def config_from_args(args: argparse.Namespace) -> CodebaseConfig:
    """The parsed options of :func:`add_arguments` as a :class:`CodebaseConfig`."""
    methods = comma_list(args.methods)
    extra = {"all": "dynamic_eval", "fast_W0": "sparse_dynamic_eval"}.get(args.dyn_params)
    if extra and extra not in methods:
        methods.append(extra)
    return options_config(CodebaseConfig, args, source=source_from_args(args), methods=tuple(methods),
                          with_dynamic_eval=not args.no_dynamic_eval)


def describe(report: Dict[str, Any]) -> str:
    """The tables the command line prints: the rows, the guarded fold and the second session."""
    text = report.get("table", "")
    if "fold_table" in report:
        text += ("\n\nfold guarded by a forgetting budget (fraction chosen on training-corpus windows):\n"
                 + report["fold_table"])
    if "second_session_table" in report:
        text += ("\n\nsecond session over the same stream (S dropped, P kept):\n" + report["second_session_table"]
                 + "\n\neach row's second session against its own first (what the saved P is worth):\n"
                 + report["second_session_vs_first_table"])
    return text


def _dynamic_settings(cfg: CodebaseConfig, model: PlasticTransformer, solo_names: Sequence[str]
                      ) -> Dict[str, Dict[str, Any]]:
    """Each dynamic evaluation's params, step size and decay: the config's, or the sweep's with ``dyn_tuned``."""
    settings = {"dynamic_eval": {"params": "all", "lr": cfg.dyn_lr, "decay": cfg.dyn_decay, "tuned_on": None},
                "sparse_dynamic_eval": {"params": "fast_W0", "lr": cfg.sparse_lr, "decay": cfg.sparse_decay,
                                        "tuned_on": None}}
    for n in solo_names:
        if n in settings and cfg.dyn_tuned:
            best = load_or_tune(model, package=cfg.dyn_tune_package, params=settings[n]["params"])
            settings[n].update(lr=best["best"]["lr"], decay=best["best"]["decay"], tuned_on=best["tuned_on"])
    return settings


def _solo_makers(cfg: CodebaseConfig, model: PlasticTransformer, solo_names: Sequence[str],
                 dyn_settings: Dict[str, Dict[str, Any]], calib: Dict[str, Any]) -> Dict[str, Any]:
    """``name -> callable`` building a fresh reader for every row read one at a time; dynamic
    evaluation calibrates on the first build (recorded in ``calib``) and the later builds reuse it."""
    calib_set = None
    if any(n in dyn_settings for n in solo_names) and cfg.dyn_rule == "rms":
        calib_set = list(calibration_batches(cfg.calib_batches, cfg.chunk, cfg.seed + 7))

    def make(n: str):
        if n == "full_context":
            return lambda: FullContext(model, cfg.full_context_window)
        s = dyn_settings[n]
        ms: List[torch.Tensor] = []  # calibrated once per row; the timing repeats reuse it

        def build():
            d = DynamicEval(model, lr=s["lr"], rule=cfg.dyn_rule, eps=cfg.dyn_eps, decay=s["decay"], params=s["params"])
            if cfg.dyn_rule == "rms" and ms:
                d.load_calibration(ms)
            elif cfg.dyn_rule == "rms":
                calib[n] = d.calibrate(iter(calib_set))
                ms.extend(d.ms)
            return d
        return build

    return {n: make(n) for n in solo_names}


def _second_session(cfg: CodebaseConfig, model: PlasticTransformer, segments, policies, out: Dict[str, Any],
                    cost) -> Dict[str, Any]:
    """The stream read again by the same learner as a new session, each row against its own first pass."""
    learner = out["learner"]
    learner.new_session()
    out2 = run_stream(model, segments, policies, None, cfg.chunk, desc="second session", lam=cfg.lam, learner=learner)
    second = summarize(out2, model, cfg.chunk, cfg.episode_bytes, None, cost)
    # What P is worth: each row's second pass against its own first pass, which started
    # without P (a new session that adapts from scratch). Frozen and no_persist read the
    # second pass exactly like the first (nothing survives a session), so their figure is 0.
    for row in second:
        a, b = out["bits"][row], out2["bits"][row]
        gains = M.gain_curve(a, b, POINTS)
        s2 = second[row]["summary"]
        for n in POINTS:
            if n in gains:
                s2[f"gain_over_first_session_{_short(n)}"] = gains[n]
                s2[f"gain_over_first_session_ci_{_short(n)}"] = list(gain_interval(a, b, n))
    return second


def run(cfg: Optional[CodebaseConfig] = None, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Run the codebase benchmark (settings: ``cfg``, default :class:`CodebaseConfig`) on ``model``
    (default :func:`~cl_arch.eval.lib.models.text_model`: the shipped model, or with ``cache_dir`` /
    ``pretrain_seconds`` one loaded from or trained into the cache) and, with ``cfg.out_dir``, write
    ``<name>.json`` and ``<name>.png``. Returns the report (schema: :mod:`cl_arch.eval.lib.report`)."""
    cfg = cfg or CodebaseConfig()
    torch.manual_seed(cfg.seed)
    src = cfg.source or held_out_package("json")
    if os.path.basename(os.path.normpath(src)) == cfg.dyn_tune_package and cfg.dyn_tuned:
        raise ValueError(f"the reported stream {src} is the package dynamic evaluation is tuned on "
                         f"({cfg.dyn_tune_package}); report another one")
    files = resolve_sources(src)
    model = text_model(model, cfg.cache_dir, cfg.pretrain_seconds, cfg.no_readout, cfg.no_episodic)
    model.eval()
    segments = segment_stream(files, cfg.max_bytes, cfg.episode_bytes)
    methods = [m for m in cfg.methods if m != "dynamic_eval" or cfg.with_dynamic_eval]
    if cfg.with_dynamic_eval and "dynamic_eval" not in methods:
        methods.append("dynamic_eval")
    solo_names = [m for m in methods if m in SOLO_METHODS]
    policies = default_policies(cfg.eta_s, cfg.eta_r, cfg.gamma, [m for m in methods if m not in SOLO_METHODS])
    dyn_settings = _dynamic_settings(cfg, model, solo_names)
    calib: Dict[str, Any] = {}
    makers = _solo_makers(cfg, model, solo_names, dyn_settings, calib)
    base = base_windows(cfg.drift_windows, 512, cfg.seed) if cfg.drift_windows else None
    out = run_stream(model, segments, policies, None, cfg.chunk, desc=f"codebase {os.path.basename(src.rstrip('/'))}",
                     lam=cfg.lam, solo={n: f() for n, f in makers.items()})
    cost = (time_rows(model, segments[:cfg.timing_episodes], policies, makers, cfg.chunk, cfg.timing_repeats, cfg.lam)
            if cfg.timing_episodes else None)
    guard = ((anchor_windows(16, 512, cfg.seed), float(cfg.fold_budget))
             if cfg.fold_budget is not None and base is not None else None)
    methods_out = summarize(out, model, cfg.chunk, cfg.episode_bytes, base, cost, guard)
    second = _second_session(cfg, model, segments, policies, out, cost) if cfg.second_session else None
    without_reward = {p.name: sum(1 for ep in out["rewards"] if ep[i] is None)
                      for i, p in enumerate(policies) if p.use_reward}
    report = {
        "benchmark": "codebase",
        "config": _config_record(cfg, model, src, files, segments, solo_names, dyn_settings, calib, without_reward,
                                 cost is not None),
        "x_label": "bytes read", "y_label": "gain over frozen (bits/byte, local mean, 95% band)", "log_x": True,
        "methods": methods_out,
    }
    report["table"] = table(report)
    folded = [[n, f"{m['summary']['drift_bpb']:+.3f}", f"{m['summary']['fold_fraction']:.3f}",
               f"{m['summary']['fold_anchor_bits']:+.4f}",
               f"{m['summary']['folded_drift_bpb']:+.3f} [{m['summary']['folded_drift_ci'][0]:+.3f}, "
               f"{m['summary']['folded_drift_ci'][1]:+.3f}]"]
              for n, m in methods_out.items() if "fold_fraction" in m["summary"]]
    if folded:
        report["fold_table"] = format_table(folded, ["method", "drift, all of P",
                                                     f"fold fraction (budget {cfg.fold_budget})",
                                                     "anchor forgetting at it", "held-out drift after the fold"])
    if second is not None:
        report["second_session"] = second
        report["second_session_table"] = table({"methods": second})
        report["second_session_vs_first_table"] = table_vs_first(second)
    if cfg.out_dir:
        write_report(report, cfg.out_dir, cfg.name or "codebase")
    return report


def _config_record(cfg: CodebaseConfig, model: PlasticTransformer, src: str, files, segments, solo_names,
                   dyn_settings, calib, without_reward, timed: bool) -> Dict[str, Any]:
    """The report's ``config``: what was read, with which settings, by which model."""
    return {"source": os.path.abspath(src), "files": len(files), "bytes": sum(len(s) for s, _ in segments),
            "episodes": len(segments), "episode_bytes": cfg.episode_bytes, "chunk": cfg.chunk, "eta_s": cfg.eta_s,
            "eta_r": cfg.eta_r, "gamma": cfg.gamma, "lam": cfg.lam, "dyn_rule": cfg.dyn_rule, "dyn_eps": cfg.dyn_eps,
            "dyn_lr": dyn_settings["dynamic_eval"]["lr"], "dyn_decay": dyn_settings["dynamic_eval"]["decay"],
            "dyn_tuned_on": dyn_settings["dynamic_eval"]["tuned_on"],
            "dynamic_evaluations": {n: dyn_settings[n] for n in solo_names if n in dyn_settings},
            "calibration": calib, "calib_batches": cfg.calib_batches, "full_context_window": cfg.full_context_window,
            "reward": REWARD_DEFINITION, "episodes_without_reward": without_reward,
            "cost": ("every row alone at batch 1 on the first %d episodes, median of %d repeats, this process "
                     "and thread count (%d); FLOPs counted by torch.utils.flop_counter on one chunk"
                     % (cfg.timing_episodes, cfg.timing_repeats, torch.get_num_threads())) if timed else
                    "stream wall time (batched rows: divided by the batch)",
            "drift_windows": cfg.drift_windows, "fold_budget": cfg.fold_budget,
            "model_fingerprint": model.fingerprint(), "model_parameters": model.num_parameters(),
            "model_config": model.config.to_dict(), "seed": cfg.seed}


def table(report: Dict[str, Any]) -> str:
    """Markdown table of a codebase report: one row per method."""
    rows = []
    for name, m in report["methods"].items():
        s = m["summary"]
        g = [(s.get(f"gain_bpb_{_short(n)}"), s.get(f"gain_ci_{_short(n)}")) for n in POINTS]
        rows.append([name, f"{s['bpb']:.3f}"] +
                    ["-" if v is None else (f"{v:+.3f}" if ci is None or name == "frozen"
                                            else f"{v:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]") for v, ci in g] +
                    [f"{s['aulc']:+.4f}",
                     "-" if s.get("aulc_after_first_episode") is None else f"{s['aulc_after_first_episode']:+.4f}",
                     "-" if s.get("tab_acceptance") is None else f"{s['tab_acceptance']:.3f}",
                     f"{s['sec_per_token'] * 1e3:.3f}",
                     "-" if s.get("flops_per_token") is None else f"{s['flops_per_token'] / 1e6:.2f}",
                     "-" if s.get("state_bytes") is None else f"{s['state_bytes'] / 2 ** 20:.2f}",
                     "-" if "drift_bpb" not in s else f"{s['drift_bpb']:+.3f}"])
    return format_table(rows, ["method", "bits/byte", "gain@1k", "gain@10k", "gain@100k", "AULC",
                               "AULC after ep. 1", "tab accept", "ms/token", "MFLOP/token", "MiB held", "stdlib drift"])


def table_vs_first(second: Dict[str, Any]) -> str:
    """Markdown table: each row's second session against its own first (what the saved P is worth)."""
    rows = []
    for name, m in second.items():
        s = m["summary"]
        cells = []
        for n in POINTS:
            v, ci = s.get(f"gain_over_first_session_{_short(n)}"), s.get(f"gain_over_first_session_ci_{_short(n)}")
            cells.append("-" if v is None else f"{v:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
        rows.append([name] + cells)
    return format_table(rows, ["method", "2nd vs 1st session @1k", "@10k", "@100k"])


__all__ = ["HELP", "POINTS", "SOLO_METHODS", "CodebaseConfig", "add_arguments", "config_from_args", "describe",
           "gain_interval", "guarded_fold_drift", "run", "summarize", "table", "table_vs_first"]
