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
``no_persist``     fast weights without persistence: ``S`` itself carries over, no ``P``
``dynamic_eval``   Krause-style online gradient steps on all weights after each chunk
=================  ==========================================================================

The first four run as rows of one batch (:class:`~cl_arch.eval.baselines.EpisodeLearner`), so
the comparison is exactly paired. Reported: gain over frozen at 1k/10k/100k bytes (local window,
:func:`~cl_arch.eval.metrics.gain_curve`), AULC of the relative gain, compute per token (measured
seconds and estimated FLOPs) and the drift of held-out stdlib bits/byte after the stream.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.train.data import resolve_sources

from . import metrics as M
from .baselines import DynamicEval, EpisodeLearner, RowPolicy, calibration_batches
from .context import FullContext
from .cost import flops_per_token, state_bytes
# re-exported: the model and stream helpers lived here before eval/models.py and eval/streams.py
from .models import (DEMO_PRETRAIN_SECONDS, default_cache_dir, default_model, demo_config,  # noqa: F401
                     demo_pretrain_overrides, stdlib_model, without_readout)
from .report import curve, format_table, write_report
from .streams import NEWLINE, anchor_windows, base_windows, held_out_package, line_acceptance, segment_stream, window_bpb  # noqa: F401
from .tune_dynamic import load_or_tune

POINTS = (1_000, 10_000, 100_000)


def default_policies(eta_s: Optional[float] = None, eta_r: Optional[float] = None, gamma: Optional[float] = None,
                     methods: Sequence[str] = ("frozen", "adapt", "adapt+reward", "no_persist")) -> List[RowPolicy]:
    """The batched methods of this benchmark (dynamic evaluation runs separately)."""
    table = {
        "frozen": RowPolicy("frozen"),
        "static": RowPolicy("static", writes=False),
        "adapt": RowPolicy("adapt", persist=True, eta_s=eta_s, eta_r=0.0, gamma=gamma),
        "adapt+reward": RowPolicy("adapt+reward", persist=True, use_reward=True, eta_s=eta_s, eta_r=eta_r,
                                  gamma=gamma),
        "no_persist": RowPolicy("no_persist", carry_context=True),
    }
    unknown = [m for m in methods if m not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(table)} (+ dynamic_eval)")
    if "frozen" not in methods:
        raise ValueError("methods must include 'frozen': every gain is measured against it")
    return [table[m] for m in methods]


def run_stream(model: PlasticTransformer, segments: Sequence[Tuple[bytes, int]], policies: Sequence[RowPolicy],
               dyn: Optional[DynamicEval] = None, chunk: int = 256, desc: str = "stream",
               lam: Optional[float] = None, learner: Optional[EpisodeLearner] = None,
               solo: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read ``segments`` prequentially with every row of ``policies`` (batched) and every reader of
    ``solo`` (one at a time: ``name -> reader`` with ``step(ids [1, T], targets [1, T]) -> logits``
    and ``new_episode()``, e.g. :class:`DynamicEval` or :class:`~cl_arch.eval.context.FullContext`;
    ``dyn`` is the same as ``solo={"dynamic_eval": dyn}``).

    Returns per method: ``bits [N]`` (loss of every byte in bits), ``lines`` (list of
    ``(accepted, length)`` per non-blank line), ``seconds`` (wall time: ``"batched"`` for all
    policy rows together, and one entry per solo reader), ``rewards`` (per episode, the reward each
    batched row was given: its mean line acceptance, None for an episode without a non-blank
    line); plus the :class:`EpisodeLearner` (its ``P``; None when ``policies`` is empty: solo
    readers only) and the solo readers. ``learner``: go on
    with this one (e.g. a second session over the same stream) instead of a fresh one.
    """
    solo = dict(solo or {})
    if dyn is not None:
        solo["dynamic_eval"] = dyn
    if learner is None and policies:
        learner = EpisodeLearner(model, policies, lam=lam)
    names = [p.name for p in policies] + list(solo)
    bits: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    lines: Dict[str, List[Tuple[int, int]]] = {n: [] for n in names}
    secs = {"batched": 0.0, **{n: 0.0 for n in solo}}
    ep_rewards: List[List[Optional[float]]] = []
    B = learner.B if learner is not None else 0
    for seg, prev in tqdm(segments, desc=desc, unit="ep", mininterval=2.0):
        x = torch.tensor([prev] + list(seg[:-1]), dtype=torch.long)
        y = torch.tensor(list(seg), dtype=torch.long)
        ep_bits, ep_corr = [], []
        solo_bits: Dict[str, List[np.ndarray]] = {n: [] for n in solo}
        solo_corr: Dict[str, List[np.ndarray]] = {n: [] for n in solo}
        for c0 in range(0, len(seg), chunk):
            xi, yi = x[c0:c0 + chunk], y[c0:c0 + chunk]
            if learner is not None:
                t0 = time.perf_counter()
                logits = learner.step(xi.unsqueeze(0).expand(B, -1))
                lp = torch.log_softmax(logits.float(), -1)
                ep_bits.append((-lp.gather(-1, yi.expand(B, -1).unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
                ep_corr.append((logits.argmax(-1) == yi).numpy())
                secs["batched"] += time.perf_counter() - t0
            for n, reader in solo.items():
                t0 = time.perf_counter()
                dl = reader.step(xi.unsqueeze(0), yi.unsqueeze(0))
                lp = torch.log_softmax(dl.float(), -1)
                solo_bits[n].append((-lp[0].gather(-1, yi.unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
                solo_corr[n].append((dl[0].argmax(-1) == yi).numpy())
                secs[n] += time.perf_counter() - t0
        if learner is not None:
            # The episode's last byte was only a target so far; a user's session observes (writes) it
            # too before the episode closes, so the learner does the same (its logits score nothing).
            t0 = time.perf_counter()
            learner.step(y[-1:].unsqueeze(0).expand(B, -1))
            secs["batched"] += time.perf_counter() - t0
            corr = np.concatenate(ep_corr, axis=1)
            b = np.concatenate(ep_bits, axis=1)
            acc = line_acceptance(corr, seg)
            rewards = []
            for i, p in enumerate(policies):
                bits[p.name].append(b[i])
                lines[p.name].extend((int(a[i]), n) for a, n in acc)
                rewards.append(float(np.mean([a[i] / n for a, n in acc])) if acc else None)
            ep_rewards.append(rewards)
            t0 = time.perf_counter()
            learner.end_episode(rewards)
            secs["batched"] += time.perf_counter() - t0
        for n, reader in solo.items():
            bits[n].append(np.concatenate(solo_bits[n]))
            sacc = line_acceptance(np.concatenate(solo_corr[n])[None], seg)
            lines[n].extend((int(a[0]), k) for a, k in sacc)
            reader.new_episode()
    return {"bits": {n: np.concatenate(v) for n, v in bits.items()}, "lines": lines, "seconds": secs,
            "learner": learner, "dyn": solo.get("dynamic_eval"), "solo": solo, "names": names,
            "rewards": ep_rewards}


def _cache_len(state) -> int:
    """Keys in the first attention cache of ``state`` (0 for none)."""
    for s in (state.layers if state is not None else []):
        if getattr(s, "k", None) is not None:
            return int(s.k.shape[2])
    return 0


def _attention_flops(cfg, cache: int, T: int) -> float:
    """``softmax(q k^T) v`` FLOPs of ``T`` new tokens over ``cache`` cached keys, all attention
    layers: ``4 * heads * head_dim`` per (query, key) pair inside the window. Counted from the
    cache length because ``torch.utils.flop_counter`` does not see the CPU SDPA kernel."""
    n_attn = sum(1 for t in cfg.layer_types if t == "attn")
    W = cfg.attn_window
    pairs = sum(min(cache + t + 1, W) if W is not None else cache + t + 1 for t in range(T))
    return 4.0 * cfg.d_model * pairs * n_attn


def time_rows(model: PlasticTransformer, segments: Sequence[Tuple[bytes, int]], policies: Sequence[RowPolicy],
              make_solo: Dict[str, Any], chunk: int = 256, repeats: int = 3, lam: Optional[float] = None
              ) -> Dict[str, Dict[str, float]]:
    """Per-row cost at batch 1, in this process and thread count: every row reads ``segments``
    (a few episodes) alone, ``repeats`` times from a fresh start; returns per row the median
    ``sec_per_token`` and the FLOPs per token counted by ``torch.utils.flop_counter`` on one chunk
    (forward, plus backward and update for a reader that learns by gradient).

    ``make_solo``: ``name -> callable`` returning a fresh solo reader (as for :func:`run_stream`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    n_bytes = sum(len(s) for s, _ in segments)
    out: Dict[str, Dict[str, float]] = {}
    rows: List[Tuple[str, Any]] = [(p.name, p) for p in policies] + list(make_solo.items())
    ids = torch.tensor(list(segments[-1][0][:chunk]), dtype=torch.long)[None]
    for name, what in rows:
        times = []
        for _ in range(repeats):
            solo, pols = ({}, [what]) if isinstance(what, RowPolicy) else ({name: what()}, [])
            res = run_stream(model, segments, pols, chunk=chunk, desc=f"timing {name}", lam=lam, solo=solo)
            times.append(res["seconds"][name] if solo else res["seconds"]["batched"])
        # FLOPs of one more chunk read after the timed episodes (a growing context costs more)
        reader = solo[name] if solo else res["learner"]
        attn = _attention_flops(reader.model.config, _cache_len(reader.state), ids.shape[1])
        counter = FlopCounterMode(display=False)
        with counter:
            if solo:
                reader.step(ids, ids)
            else:
                reader.step(ids)
        grad = 3 if isinstance(reader, DynamicEval) else 1  # its backward pass repeats attention twice
        out[name] = {"sec_per_token": float(np.median(times)) / n_bytes,
                     "flops_per_token": (counter.get_total_flops() + grad * attn) / ids.shape[1]}
    return out


def log_points(n: int, lo: int = 100, per_decade: int = 4) -> List[int]:
    """Log-spaced interaction counts ``lo .. n`` (always ending at n)."""
    if n < lo:
        return [n]
    k = int(math.floor(math.log10(n / lo) * per_decade)) + 1
    pts = sorted({int(round(lo * 10 ** (i / per_decade))) for i in range(k)} | {n})
    return [p for p in pts if p <= n]


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


def run(source: Optional[str] = None, model: Optional[PlasticTransformer] = None, max_bytes: int = 100_000,
        episode_bytes: int = 2048, chunk: int = 256, eta_s: Optional[float] = None, eta_r: Optional[float] = None,
        gamma: Optional[float] = None, dyn_lr: float = 3e-4, dyn_rule: str = "rms", dyn_eps: float = 1e-3,
        dyn_decay: float = 1e-3, sparse_lr: float = 3e-3, sparse_decay: float = 1e-2, calib_batches: int = 32, with_dynamic_eval: bool = True, drift_windows: int = 8,
        methods: Sequence[str] = ("frozen", "adapt", "adapt+reward", "no_persist"),
        out_dir: Optional[str] = "runs/eval", name: Optional[str] = None, cache_dir: Optional[str] = None,
        pretrain_seconds: Optional[float] = None, seed: int = 0, lam: Optional[float] = None,
        second_session: bool = False, dyn_tuned: bool = False, dyn_tune_package: str = "asyncio",
        full_context_window: Optional[int] = 4096, timing_episodes: int = 3,
        timing_repeats: int = 3, fold_budget: Optional[float] = None) -> Dict[str, Any]:
    """Run the codebase benchmark and (with ``out_dir``) write ``<name>.json`` and ``<name>.png``.

    Args:
        source: a folder of .py files, a file or a glob; default the held-out stdlib ``json``
            package. Any unseen tree works (an installed site-packages package, a project).
        model: a trained model; default :func:`stdlib_model` (the shipped model, or with
            ``cache_dir``/``pretrain_seconds`` one loaded from or trained into the cache).
        max_bytes: bytes of the stream to read (gains are reported at 1k/10k/100k when reached).
        episode_bytes: longest episode; each file is split at line ends into episodes this long.
        eta_s, eta_r, gamma: commit settings for the adapting rows (None: each memory's own).
        lam: eligibility-trace decay override (None: the model's own, 0.5 by default). It decides
            how much of an episode a commit stores: ``E_T = sum_t lam^(T-t) D_t``.
        methods: batched rows (:func:`default_policies`) and rows read one at a time:
            ``full_context`` (:class:`~cl_arch.eval.context.FullContext`, window
            ``full_context_window``), ``dynamic_eval`` (all weights) and ``sparse_dynamic_eval``
            (only the fast memories' ``W0``). ``with_dynamic_eval`` adds (True) or removes (False)
            ``dynamic_eval``.
        dyn_lr, dyn_rule, dyn_eps, dyn_decay: dynamic evaluation (:class:`DynamicEval`); the
            defaults are the best of ``cl-arch eval tune-dynamic`` on asyncio for the shipped model.
        sparse_lr, sparse_decay: the same for ``sparse_dynamic_eval`` (its own sweep's best).
        dyn_tuned: take both dynamic evaluations' step size and decay from the sweep on the
            held-out package ``dyn_tune_package`` (:func:`cl_arch.eval.tune_dynamic.load_or_tune`,
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
        timing_episodes, timing_repeats: the per-row cost columns come from :func:`time_rows`
            (every row alone at batch 1 on the stream's first ``timing_episodes`` episodes,
            median of ``timing_repeats``); 0 episodes: the stream's own wall time instead.
    """
    torch.manual_seed(seed)
    src = source or held_out_package("json")
    if os.path.basename(os.path.normpath(src)) == dyn_tune_package and dyn_tuned:
        raise ValueError(f"the reported stream {src} is the package dynamic evaluation is tuned on "
                         f"({dyn_tune_package}); report another one")
    files = resolve_sources(src)
    model = model if model is not None else stdlib_model(cache_dir, seconds=pretrain_seconds)
    model.eval()
    segments = segment_stream(files, max_bytes, episode_bytes)
    n_bytes = sum(len(s) for s, _ in segments)
    methods = [m for m in methods if m != "dynamic_eval" or with_dynamic_eval]
    if with_dynamic_eval and "dynamic_eval" not in methods:
        methods.append("dynamic_eval")
    solo_names = [m for m in methods if m in SOLO_METHODS]
    policies = default_policies(eta_s, eta_r, gamma, [m for m in methods if m not in SOLO_METHODS])
    dyn_settings = {"dynamic_eval": {"params": "all", "lr": dyn_lr, "decay": dyn_decay, "tuned_on": None},
                    "sparse_dynamic_eval": {"params": "fast_W0", "lr": sparse_lr, "decay": sparse_decay,
                                            "tuned_on": None}}
    for n in solo_names:
        if n in dyn_settings and dyn_tuned:
            best = load_or_tune(model, package=dyn_tune_package, params=dyn_settings[n]["params"])
            dyn_settings[n].update(lr=best["best"]["lr"], decay=best["best"]["decay"], tuned_on=best["tuned_on"])
    calib: Dict[str, Any] = {}
    calib_set = None
    if any(n in dyn_settings for n in solo_names) and dyn_rule == "rms":
        calib_set = list(calibration_batches(calib_batches, chunk, seed + 7))

    def make(n: str):
        if n == "full_context":
            return lambda: FullContext(model, full_context_window)
        cfg = dyn_settings[n]

        ms: List[torch.Tensor] = []  # calibrated once per row; the timing repeats reuse it

        def build():
            d = DynamicEval(model, lr=cfg["lr"], rule=dyn_rule, eps=dyn_eps, decay=cfg["decay"], params=cfg["params"])
            if dyn_rule == "rms" and ms:
                d.load_calibration(ms)
            elif dyn_rule == "rms":
                calib[n] = d.calibrate(iter(calib_set))
                ms.extend(d.ms)
            return d
        return build

    makers = {n: make(n) for n in solo_names}
    base = base_windows(drift_windows, 512, seed) if drift_windows else None
    out = run_stream(model, segments, policies, None, chunk, desc=f"codebase {os.path.basename(src.rstrip('/'))}",
                     lam=lam, solo={n: f() for n, f in makers.items()})
    cost = (time_rows(model, segments[:timing_episodes], policies, makers, chunk, timing_repeats, lam)
            if timing_episodes else None)
    guard = (anchor_windows(16, 512, seed), float(fold_budget)) if fold_budget is not None and base is not None else None
    methods_out = summarize(out, model, chunk, episode_bytes, base, cost, guard)
    second = None
    if second_session:
        learner = out["learner"]
        learner.new_session()
        out2 = run_stream(model, segments, policies, None, chunk, desc="second session", lam=lam, learner=learner)
        second = summarize(out2, model, chunk, episode_bytes, None, cost)
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
    without_reward = {p.name: sum(1 for ep in out["rewards"] if ep[i] is None)
                      for i, p in enumerate(policies) if p.use_reward}
    report = {
        "benchmark": "codebase",
        "config": {"source": os.path.abspath(src), "files": len(files), "bytes": n_bytes,
                   "episodes": len(segments), "episode_bytes": episode_bytes, "chunk": chunk, "eta_s": eta_s,
                   "eta_r": eta_r, "gamma": gamma, "lam": lam, "dyn_rule": dyn_rule, "dyn_eps": dyn_eps,
                   "dyn_lr": dyn_settings["dynamic_eval"]["lr"], "dyn_decay": dyn_settings["dynamic_eval"]["decay"],
                   "dyn_tuned_on": dyn_settings["dynamic_eval"]["tuned_on"],
                   "dynamic_evaluations": {n: dyn_settings[n] for n in solo_names if n in dyn_settings},
                   "calibration": calib, "calib_batches": calib_batches, "full_context_window": full_context_window,
                   "reward": REWARD_DEFINITION, "episodes_without_reward": without_reward,
                   "cost": ("every row alone at batch 1 on the first %d episodes, median of %d repeats, this process "
                            "and thread count (%d); FLOPs counted by torch.utils.flop_counter on one chunk"
                            % (timing_episodes, timing_repeats, torch.get_num_threads())) if cost else
                           "stream wall time (batched rows: divided by the batch)",
                   "drift_windows": drift_windows, "fold_budget": fold_budget,
                   "model_fingerprint": model.fingerprint(), "model_parameters": model.num_parameters(),
                   "model_config": model.config.to_dict(), "seed": seed},
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
        report["fold_table"] = format_table(folded, ["method", "drift, all of P", f"fold fraction (budget {fold_budget})",
                                                     "anchor forgetting at it", "held-out drift after the fold"])
    if second is not None:
        report["second_session"] = second
        report["second_session_table"] = table({"methods": second})
        report["second_session_vs_first_table"] = table_vs_first(second)
    if out_dir:
        write_report(report, out_dir, name or "codebase")
    return report


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


__all__ = ["table_vs_first", "demo_config", "default_model", "without_readout", "demo_pretrain_overrides",
           "default_cache_dir", "stdlib_model", "held_out_package", "segment_stream", "line_acceptance",
           "base_windows", "window_bpb", "default_policies", "run_stream", "summarize", "run", "table", "POINTS"]
