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
from cl_arch.train.data import bytes_to_tensor, random_windows, read_bytes, resolve_sources, split_files, stdlib_files

from . import metrics as M
from .baselines import DynamicEval, EpisodeLearner, RowPolicy
from .cost import flops_per_token
# re-exported: the model and stream helpers lived here before eval/models.py and eval/streams.py
from .models import (DEMO_PRETRAIN_SECONDS, default_cache_dir, default_model, demo_config,  # noqa: F401
                     demo_pretrain_overrides, stdlib_model, without_readout)
from .streams import NEWLINE, base_windows, held_out_package, line_acceptance, segment_stream, window_bpb  # noqa: F401
from .report import curve, format_table, write_report

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
               lam: Optional[float] = None, learner: Optional[EpisodeLearner] = None) -> Dict[str, Any]:
    """Read ``segments`` prequentially with every row of ``policies`` (and ``dyn``, if given).

    Returns per method: ``bits [N]`` (loss of every byte in bits), ``lines`` (list of
    ``(accepted, length)`` per non-blank line), ``seconds`` (wall time of that method's passes),
    ``rewards`` (per episode, the reward each batched row was given: its mean line acceptance);
    plus the :class:`EpisodeLearner` (its ``P``) and the DynamicEval object. ``learner``: go on
    with this one (e.g. a second session over the same stream) instead of a fresh one.
    """
    learner = learner if learner is not None else EpisodeLearner(model, policies, lam=lam)
    names = [p.name for p in policies] + (["dynamic_eval"] if dyn is not None else [])
    bits: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    lines: Dict[str, List[Tuple[int, int]]] = {n: [] for n in names}
    secs = {"batched": 0.0, "dynamic_eval": 0.0}
    ep_rewards: List[List[Optional[float]]] = []
    B = learner.B
    for seg, prev in tqdm(segments, desc=desc, unit="ep", mininterval=2.0):
        x = torch.tensor([prev] + list(seg[:-1]), dtype=torch.long)
        y = torch.tensor(list(seg), dtype=torch.long)
        ep_bits, ep_corr = [], []
        dyn_bits, dyn_corr = [], []
        for c0 in range(0, len(seg), chunk):
            xi, yi = x[c0:c0 + chunk], y[c0:c0 + chunk]
            t0 = time.perf_counter()
            logits = learner.step(xi.unsqueeze(0).expand(B, -1))
            lp = torch.log_softmax(logits.float(), -1)
            ep_bits.append((-lp.gather(-1, yi.expand(B, -1).unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
            ep_corr.append((logits.argmax(-1) == yi).numpy())
            secs["batched"] += time.perf_counter() - t0
            if dyn is not None:
                t0 = time.perf_counter()
                dl = dyn.step(xi.unsqueeze(0), yi.unsqueeze(0))
                lp = torch.log_softmax(dl.float(), -1)
                dyn_bits.append((-lp[0].gather(-1, yi.unsqueeze(-1)).squeeze(-1) / math.log(2)).numpy())
                dyn_corr.append((dl[0].argmax(-1) == yi).numpy())
                secs["dynamic_eval"] += time.perf_counter() - t0
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
        if dyn is not None:
            bits["dynamic_eval"].append(np.concatenate(dyn_bits))
            dacc = line_acceptance(np.concatenate(dyn_corr)[None], seg)
            lines["dynamic_eval"].extend((int(a[0]), n) for a, n in dacc)
            dyn.new_episode()
    return {"bits": {n: np.concatenate(v) for n, v in bits.items()}, "lines": lines, "seconds": secs,
            "learner": learner, "dyn": dyn, "names": names, "rewards": ep_rewards}


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


def summarize(out: Dict[str, Any], model: PlasticTransformer, chunk: int, episode_bytes: int,
              base: Optional[torch.Tensor]) -> Dict[str, Dict[str, Any]]:
    """Per-method curve and summary figures from :func:`run_stream`'s output."""
    bits = out["bits"]
    N = len(bits["frozen"])
    pts = log_points(N)
    fl_fwd = flops_per_token(model, context=min(chunk, model.config.attn_window or chunk))
    n_tok = N
    methods: Dict[str, Dict[str, Any]] = {}
    base_before = window_bpb(model, base) if base is not None else None
    learner, dyn = out["learner"], out["dyn"]
    for i, name in enumerate(out["names"]):
        b = bits[name]
        ys = [M.window_mean(b, n) for n in pts]
        s: Dict[str, Any] = {"bpb": float(b.mean())}
        gains = M.gain_curve(bits["frozen"], b, POINTS)
        for n in POINTS:
            s[f"gain_bpb_{_short(n)}"] = gains.get(n)
            if n in gains:
                s[f"gain_ci_{_short(n)}"] = list(gain_interval(bits["frozen"], b, n))
        rel = [(M.window_mean(bits["frozen"], n) - y) / M.window_mean(bits["frozen"], n) for n, y in zip(pts, ys)]
        s["aulc"] = M.aulc(rel, lo=0.0, hi=1.0)  # mean fraction of the frozen loss removed
        ln = out["lines"][name]
        s["tab_acceptance"] = float(np.mean([a / n for a, n in ln])) if ln else None
        if name == "dynamic_eval":
            s["sec_per_token"] = out["seconds"]["dynamic_eval"] / n_tok
            # forward + backward (2x forward) + the update (~4 flops per weight per token-chunk)
            s["flops_per_token"] = 3 * fl_fwd + 4 * model.num_parameters() / chunk
            s["weight_drift_rel"] = dyn.drift_from_start()
        else:
            s["sec_per_token"] = out["seconds"]["batched"] / (n_tok * learner.B)  # rows share the batch
            commit = 0.0
            if learner.policies[i].persist:
                # commit: ~6 flops per P entry per episode, spread over the episode's bytes
                commit = 6 * sum(P[0].numel() for P in learner.P) / episode_bytes
            s["flops_per_token"] = fl_fwd + commit
            s["P_norm"] = learner.persistent_norm()[i]
        if base is not None:
            if name == "dynamic_eval":
                after = window_bpb(dyn.model, base)
            else:
                after = window_bpb(model, base, learner.row_state(i))
            s.update(M.base_drift(base_before, after))
        methods[name] = {"curve": curve(pts, ys), "summary": s}
    return methods


def run(source: Optional[str] = None, model: Optional[PlasticTransformer] = None, max_bytes: int = 100_000,
        episode_bytes: int = 2048, chunk: int = 256, eta_s: Optional[float] = None, eta_r: Optional[float] = None,
        gamma: Optional[float] = None, dyn_lr: float = 1e-4, dyn_rule: str = "rms", dyn_eps: float = 1e-3,
        dyn_decay: float = 0.0, calib_batches: int = 4, with_dynamic_eval: bool = True, drift_windows: int = 8,
        methods: Sequence[str] = ("frozen", "adapt", "adapt+reward", "no_persist"),
        out_dir: Optional[str] = "runs/eval", name: Optional[str] = None, cache_dir: Optional[str] = None,
        pretrain_seconds: Optional[float] = None, seed: int = 0, lam: Optional[float] = None,
        second_session: bool = False) -> Dict[str, Any]:
    """Run the codebase benchmark and (with ``out_dir``) write ``<name>.json`` and ``<name>.png``.

    Args:
        source: a folder of .py files, a file or a glob; default the held-out stdlib ``json``
            package. Any unseen tree works (an installed site-packages package, a project).
        model: a trained model; default :func:`stdlib_model` (the shipped model, or with
            ``cache_dir``/``pretrain_seconds`` one loaded from or trained into the cache).
        max_bytes: bytes of the stream to read (gains are reported at 1k/10k/100k when reached).
        episode_bytes: longest episode; each file is split at line ends into episodes this long.
        eta_s, eta_r, gamma: commit settings for the adapting rows (None: the model's own).
        lam: eligibility-trace decay override (None: the model's own, 0.5 by default). It decides
            how much of an episode a commit stores: ``E_T = sum_t lam^(T-t) D_t``.
        dyn_lr, dyn_rule, dyn_eps, dyn_decay: dynamic evaluation (:class:`DynamicEval`).
        calib_batches: pretraining-corpus batches (8 x 256 bytes) that estimate dynamic
            evaluation's mean squared gradients.
        drift_windows: stdlib validation windows (512 bytes) for the base-drift figure (0: skip).
        second_session: read the stream a second time as a new session of the same user
            (:meth:`EpisodeLearner.new_session`: ``S`` dropped, ``P`` kept); its rows are in
            ``report["second_session"]``: what ``P`` carries that ``S`` (``no_persist``) cannot.
    """
    torch.manual_seed(seed)
    src = source or held_out_package("json")
    files = resolve_sources(src)
    model = model if model is not None else stdlib_model(cache_dir, seconds=pretrain_seconds)
    model.eval()
    segments = segment_stream(files, max_bytes, episode_bytes)
    n_bytes = sum(len(s) for s, _ in segments)
    policies = default_policies(eta_s, eta_r, gamma, methods)
    dyn, calib = None, {}
    if with_dynamic_eval:
        dyn = DynamicEval(model, lr=dyn_lr, rule=dyn_rule, eps=dyn_eps, decay=dyn_decay)
        if dyn_rule == "rms":
            train_files, _ = split_files(stdlib_files("train"))
            data = bytes_to_tensor(read_bytes(train_files, 2_000_000))
            g = torch.Generator().manual_seed(seed + 7)

            def batches():
                for _ in range(calib_batches):
                    x, y = random_windows(data, 8, 256, g)
                    yield torch.cat([x, y[:, -1:]], dim=1)  # [8, 257]: inputs and the last target

            calib = dyn.calibrate(batches())
    base = base_windows(drift_windows, 512, seed) if drift_windows else None
    out = run_stream(model, segments, policies, dyn, chunk, desc=f"codebase {os.path.basename(src.rstrip('/'))}",
                     lam=lam)
    methods = summarize(out, model, chunk, episode_bytes, base)
    second = None
    if second_session:
        learner = out["learner"]
        learner.new_session()
        out2 = run_stream(model, segments, policies, None, chunk, desc="second session", lam=lam, learner=learner)
        second = summarize(out2, model, chunk, episode_bytes, None)
        # What P is worth: each row's second pass against its own first pass, which started
        # without P (a new session that adapts from scratch). Frozen and no_persist read the
        # second pass exactly like the first (nothing survives a session), so their figure is 0.
        for name in second:
            a, b = out["bits"][name], out2["bits"][name]
            gains = M.gain_curve(a, b, POINTS)
            s2 = second[name]["summary"]
            for n in POINTS:
                if n in gains:
                    s2[f"gain_over_first_session_{_short(n)}"] = gains[n]
                    s2[f"gain_over_first_session_ci_{_short(n)}"] = list(gain_interval(a, b, n))
    report = {
        "benchmark": "codebase",
        "config": {"source": os.path.abspath(src), "files": len(files), "bytes": n_bytes,
                   "episodes": len(segments), "episode_bytes": episode_bytes, "chunk": chunk, "eta_s": eta_s,
                   "eta_r": eta_r, "gamma": gamma, "lam": lam, "dyn_lr": dyn_lr, "dyn_rule": dyn_rule, "dyn_eps": dyn_eps,
                   "dyn_decay": dyn_decay, "calibration": calib, "drift_windows": drift_windows,
                   "model_fingerprint": model.fingerprint(), "model_parameters": model.num_parameters(),
                   "model_config": model.config.to_dict(), "seed": seed},
        "x_label": "bytes read", "y_label": "bits/byte (local mean)", "log_x": True,
        "methods": methods,
    }
    report["table"] = table(report)
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
                    [f"{s['aulc']:+.4f}", "-" if s.get("tab_acceptance") is None else f"{s['tab_acceptance']:.3f}",
                     f"{s['sec_per_token'] * 1e3:.3f}", f"{s['flops_per_token'] / 1e6:.2f}",
                     "-" if "drift_bpb" not in s else f"{s['drift_bpb']:+.3f}"])
    return format_table(rows, ["method", "bits/byte", "gain@1k", "gain@10k", "gain@100k", "AULC",
                               "tab accept", "ms/token", "MFLOP/token", "stdlib drift"])


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
