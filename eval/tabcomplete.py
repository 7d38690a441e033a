"""``tabcomplete``: the Cursor case. Does the model's next-line proposal get accepted more as it is used?

At every non-blank line of an unseen source tree the model proposes the line (greedy decoding
from the lines before); the simulated user accepts the longest correct prefix; reward = fraction
of the line's characters accepted; then the real line is observed (the model reads it, and its
fast weights write it). Greedy proposals agree with the real line exactly until their first wrong
byte, so the accepted prefix is the run of correct argmax predictions under teacher forcing
(:func:`cl_arch.eval.lib.streams.line_acceptance`): no decoding loop is needed and the figure is exact.

Two benchmarks:

* :func:`run` (``cl-arch eval tabcomplete --users 0``): one stream as written, ``adapt on`` (P
  persists; each episode's commit is modulated by its mean acceptance, plus retention ``eta_s``) vs
  ``adapt off`` (frozen). Curves: acceptance rate vs lines, and cumulative characters saved.
* :func:`run_users` (the default): tab completion as a reward task. Each simulated user writes the
  held-out code in a style drawn per user (:mod:`cl_arch.eval.lib.user_style`: indentation, quotes,
  naming) and reads its files in an order drawn per user; the user accepts a suggestion when it
  matches the styled line (:func:`accepts`), and each suggestion's reward (1 accepted, 0 or -1
  rejected, or the accepted fraction) is averaged over the episode and fed to the episode's commit.
  Rows of one batch per user: ``kept`` (P persists, reward-modulated), ``reset`` (P cleared every
  episode: nothing carries), ``yoked`` (P persists, but each commit gets the reward the ``kept`` row
  of *another* user got at the same episode: reward not contingent on its own suggestions),
  optionally ``unrewarded`` (P persists, retention only) and ``static`` (no fast-weight writes).
  Reported: acceptance over the first ``suggestions`` suggestions and over the last ``window``,
  with 95% intervals of kept - reset and yoked - reset (:func:`paired_intervals`).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from cl_arch import PlasticTransformer
from cl_arch.stats import cluster_bootstrap_ci  # re-exported: the cluster bootstrap lives with the others
from cl_arch.train.data import resolve_sources

from .lib import metrics as M
from .lib.learners import EpisodeLearner, RowPolicy
from .lib.models import text_model
from .lib.options import add_model_options, add_rate_options, add_stream_options, source_from_args
from .lib.options import TextModelOptions
from .lib.options import config_from_args as options_config
from .lib.reading import default_policies, log_points, run_stream
from .lib.report import curve, format_table, write_report
from .lib.streams import NEWLINE, held_out_package, line_acceptance, segment_stream
from .lib.user_style import Style, apply_style, draw_style

logger = logging.getLogger(__name__)


ROWS = ("kept", "reset", "yoked", "unrewarded", "static")
REWARDS = ("binary", "signed", "fraction")
TUNING_PACKAGE = "asyncio"  # settings are chosen here (or on the training corpus), never on a reported stream


@dataclass
class TabcompleteConfig(TextModelOptions):
    """Every setting of one tab-completion run (:func:`run`).

    With ``users`` > 0 (default 8), :func:`run_users`: simulated users, each with a drawn style and
    file order, reading ``suggestions`` non-blank lines in episodes of ``user_episode_bytes``
    (``style``, ``reward``, ``min_chars``, ``rows``, ``window``, ``shuffle_files`` and the commit
    overrides ``eta_s``, ``eta_r``, ``gamma``, ``lam`` apply). With ``users`` = 0,
    :func:`run_single`: one stream as written (``max_bytes``, ``episode_bytes``), adapt on vs off.
    ``source``: default the held-out stdlib ``json`` package; ``cache_dir``, ``pretrain_seconds``,
    ``no_readout``, ``no_episodic``: the default model (:func:`~cl_arch.eval.lib.models.text_model`).
    """
    source: Optional[str] = None
    users: int = 8
    suggestions: int = 500
    window: int = 100
    style: Optional[Style] = None
    reward: str = "binary"
    min_chars: int = 4
    rows: Tuple[str, ...] = ("kept", "reset", "yoked", "unrewarded")
    user_episode_bytes: int = 256
    shuffle_files: bool = True
    max_bytes: Optional[int] = 100_000
    episode_bytes: int = 2048
    chunk: int = 256
    eta_s: Optional[float] = None
    eta_r: Optional[float] = None
    gamma: Optional[float] = None
    lam: Optional[float] = None


HELP = "next-line proposals accepted by simulated users, as the model is used"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval tabcomplete``'s options (defaults: :class:`TabcompleteConfig`'s)."""
    add_model_options(p)
    add_stream_options(p)
    add_rate_options(p)
    p.add_argument("--users", type=int, default=8, help="simulated users, each with a drawn style and file order "
                   "(kept/reset/yoked rows, run_users); 0: one stream as written, adapt on vs off")
    p.add_argument("--suggestions", type=int, default=500, help="suggestions (non-blank lines) per user")
    p.add_argument("--window", type=int, default=100, help="the last window of suggestions reported")
    p.add_argument("--style", default=None, help="one style for every user, e.g. "
                   "'indent=2,quotes=double,naming=camel' (default: drawn per user)")
    p.add_argument("--reward", choices=list(REWARDS), default="binary", help="per suggestion 1/0, 1/-1 or the "
                   "accepted share of the line")
    p.add_argument("--min-chars", type=int, default=4, help="a suggestion is accepted when right through the "
                   "indentation and this many characters (or the whole line)")
    p.add_argument("--rows", default="kept,reset,yoked,unrewarded", help="rows from kept, reset, yoked, "
                   "unrewarded, static")
    p.add_argument("--user-episode-bytes", type=int, default=256, help="longest episode of a user's stream")


def config_from_args(args: argparse.Namespace) -> TabcompleteConfig:
    """The parsed options of :func:`add_arguments` as a :class:`TabcompleteConfig`."""
    return options_config(TabcompleteConfig, args, source=source_from_args(args),
                          style=Style.parse(args.style) if args.style else None,
                          rows=tuple(r.strip() for r in args.rows.split(",")))


def run(cfg: Optional[TabcompleteConfig] = None, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """The tab-completion benchmark: :func:`run_users` (``cfg.users`` > 0) or :func:`run_single`."""
    cfg = cfg or TabcompleteConfig()
    return run_users(cfg, model) if cfg.users > 0 else run_single(cfg, model)


def run_single(cfg: TabcompleteConfig, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """One stream of ``cfg.source`` as written (``cfg.max_bytes``, ``cfg.episode_bytes``), adapt on vs off."""
    source, max_bytes, episode_bytes, chunk = cfg.source, cfg.max_bytes, cfg.episode_bytes, cfg.chunk
    eta_s, eta_r, seed, out_dir, name = cfg.eta_s, cfg.eta_r, cfg.seed, cfg.out_dir, cfg.name
    src = source or held_out_package("json")
    model = text_model(model, cfg.cache_dir, cfg.pretrain_seconds, cfg.no_readout, cfg.no_episodic)
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


# ---------------------------------------------------------------------------- simulated users
def row_policies(rows: Sequence[str], eta_s: Optional[float] = None, eta_r: Optional[float] = None,
                 gamma: Optional[float] = None) -> List[RowPolicy]:
    """The batched rows of :func:`run_users` (names from :data:`ROWS`; ``kept`` and ``reset`` required)."""
    table = {"kept": RowPolicy("kept", persist=True, use_reward=True, eta_s=eta_s, eta_r=eta_r, gamma=gamma),
             "reset": RowPolicy("reset"),
             "yoked": RowPolicy("yoked", persist=True, use_reward=True, eta_s=eta_s, eta_r=eta_r, gamma=gamma),
             "unrewarded": RowPolicy("unrewarded", persist=True, eta_s=eta_s, eta_r=0.0, gamma=gamma),
             "static": RowPolicy("static", writes=False)}
    unknown = [r for r in rows if r not in table]
    if unknown or "kept" not in rows or "reset" not in rows or len(set(rows)) != len(rows):
        raise ValueError(f"rows must be distinct names from {ROWS} including kept and reset, got {list(rows)}")
    return [table[r] for r in rows]


def accepts(accepted: np.ndarray, length: int, indent: int, min_chars: int) -> np.ndarray:
    """Whether the user takes a suggestion: its correct prefix ``accepted [B]`` (bytes, from
    :func:`line_acceptance`) covers the line's indentation plus ``min_chars`` characters, or the
    whole line (``length`` bytes with its newline; ``indent`` leading blanks). Returns ``[B]`` bool."""
    return np.asarray(accepted) >= min(length, indent + min_chars)


def suggestion_rewards(accepted: np.ndarray, length: int, indent: int, kind: str = "binary",
                       min_chars: int = 8) -> np.ndarray:
    """Reward ``[B]`` of one suggestion: ``binary`` 1 accepted / 0 rejected, ``signed`` 1 / -1,
    ``fraction`` the accepted share of the line's bytes."""
    if kind == "fraction":
        return np.asarray(accepted, dtype=float) / length
    ok = accepts(accepted, length, indent, min_chars).astype(float)
    if kind == "binary":
        return ok
    if kind == "signed":
        return 2.0 * ok - 1.0
    raise ValueError(f"reward kind must be one of {REWARDS}, got {kind!r}")


def user_segments(files: Sequence[str], style: Style, order_seed: Optional[int], suggestions: int,
                  episode_bytes: int) -> List[Tuple[bytes, int]]:
    """A user's stream: ``files`` in an order drawn from ``order_seed`` (None: as given), each
    written in ``style``, cut at line ends into episodes of at most ``episode_bytes``, ending after
    the ``suggestions``-th non-blank line. Returns ``[(segment, prev_byte)]`` as
    :func:`~cl_arch.eval.lib.streams.segment_stream` (``prev_byte``: the input that predicts byte 0)."""
    order = list(files) if order_seed is None else [files[i] for i in
                                                    np.random.default_rng([order_seed, 7]).permutation(len(files))]
    out: List[Tuple[bytes, int]] = []
    left = suggestions
    for path in order:
        with open(path, "rb") as f:
            data = apply_style(f.read(), style)
        lines = data.splitlines(keepends=True)
        ep: List[bytes] = []
        prev = NEWLINE
        for line in lines:
            if ep and sum(map(len, ep)) + len(line) > episode_bytes:
                out.append((b"".join(ep), prev))
                prev, ep = out[-1][0][-1], []
            ep.append(line)
            left -= bool(line.strip())
            if left == 0:
                break
        if ep:
            out.append((b"".join(ep), prev))
        if left == 0:
            return out
    return out


@torch.no_grad()
def read_episode(learner: EpisodeLearner, seg: bytes, prev: int, chunk: int = 256) -> np.ndarray:
    """Every row reads ``seg`` (teacher forcing, scored before it is written); returns
    ``correct [B, len(seg)]``: whether each byte was the row's argmax prediction. The episode's last
    byte is then observed too, as :func:`~cl_arch.eval.lib.reading.run_stream` does; the episode is
    left open (the caller closes it with its rewards)."""
    x = torch.tensor([prev] + list(seg[:-1]), dtype=torch.long)
    y = torch.tensor(list(seg), dtype=torch.long)
    B = learner.B
    corr = [(learner.step(x[c:c + chunk].expand(B, -1)).argmax(-1) == y[c:c + chunk]).numpy()
            for c in range(0, len(seg), chunk)]
    learner.step(y[-1:].expand(B, -1))
    return np.concatenate(corr, axis=1)


def paired_intervals(per_user: Dict[str, List[np.ndarray]], episode: List[np.ndarray], a: str, b: str,
                     part: slice = slice(None), seed: int = 0) -> Dict[str, Any]:
    """``a - b`` over suggestions ``part`` of every user (``per_user[row][u]`` and ``episode[u]``:
    ``[L_u]`` per suggestion), two 95% intervals: a bootstrap over (user, episode) clusters of
    suggestions (``ci``) and a paired bootstrap over the per-user means (``ci_users``, conservative:
    ``n_users`` pairs)."""
    U = len(episode)
    d = np.concatenate([per_user[a][u][part] - per_user[b][u][part] for u in range(U)])
    cl = np.concatenate([u * 100_000 + episode[u][part] for u in range(U)])
    delta, ci = cluster_bootstrap_ci(d, cl, seed=seed)
    mu = [per_user[a][u][part].mean() for u in range(U)]
    mb = [per_user[b][u][part].mean() for u in range(U)]
    du, ciu = M.paired_bootstrap_ci(mu, mb, seed=seed)
    return {"delta": delta, "ci": list(ci), "delta_users": du, "ci_users": list(ciu),
            "users_positive": int(sum(x > y for x, y in zip(mu, mb))), "n_users": len(mu), "n": int(d.size)}


def run_users(cfg: TabcompleteConfig, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Tab completion as a reward task for ``users`` simulated users on ``source`` (default:
    held-out stdlib ``json``).

    User ``u`` has seed ``seed + u``: its style (:func:`~cl_arch.eval.lib.user_style.draw_style`, or
    ``style`` for all) and, with ``shuffle_files``, its file order. Its stream holds ``suggestions``
    non-blank lines, each one suggestion, in episodes of at most ``episode_bytes``. All users are
    read in lock step, one :class:`EpisodeLearner` of ``len(rows)`` rows each, so that at every
    episode ``k`` the ``yoked`` row of user ``u`` commits with the reward the ``kept`` row of user
    ``(u + 1) % users`` got at its episode ``k`` (cycled if that user's stream is shorter).

    Args:
        reward: per suggestion, ``binary`` (1 / 0), ``signed`` (1 / -1) or ``fraction`` (accepted
            share of the line); an episode's reward is their mean (:func:`suggestion_rewards`).
        min_chars: a suggestion is accepted when it is right through the indentation and
            ``min_chars`` more characters, or the whole line (:func:`accepts`).
        window: the last ``window`` suggestions give the "last window" figures.
        episode_bytes: an episode is a burst of a few lines (default 256 bytes, about 8 lines; chosen
            with ``min_chars`` on the tuning package asyncio): the shorter the episodes, the more
            of the stream starts without what the episode before it saw.
        eta_s, eta_r, gamma, lam: commit overrides of the persisting rows (None: the model's own).

    Returns the report: per row ``acceptance/<row>`` (acceptance rate vs suggestions, mean over
    users, trailing window of ``window``) and ``kept - reset`` curves; summaries with acceptance
    over all suggestions and the last window, the intervals (:func:`paired_intervals`), per-user
    figures in ``report["users"]``.
    """
    source, users, suggestions, window, style = cfg.source, cfg.users, cfg.suggestions, cfg.window, cfg.style
    reward, min_chars, rows, episode_bytes, chunk = cfg.reward, cfg.min_chars, cfg.rows, cfg.user_episode_bytes, cfg.chunk
    eta_s, eta_r, gamma, lam, shuffle_files, seed = cfg.eta_s, cfg.eta_r, cfg.gamma, cfg.lam, cfg.shuffle_files, cfg.seed
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
    if users < 1 or suggestions < 1 or not 1 <= window <= suggestions:
        raise ValueError(f"need users >= 1, suggestions >= 1, 1 <= window <= suggestions "
                         f"(got {users}, {suggestions}, {window})")
    src = source or held_out_package("json")
    if os.path.basename(os.path.normpath(src)) == TUNING_PACKAGE:
        logger.warning(f"{TUNING_PACKAGE} is the tuning package; report json, email or xml")
    model = text_model(model, cfg.cache_dir, cfg.pretrain_seconds, cfg.no_readout, cfg.no_episodic)
    model.eval()
    files = resolve_sources(src)
    pols = row_policies(rows, eta_s, eta_r, gamma)
    names = [p.name for p in pols]
    styles = [style if style is not None else draw_style(seed + u) for u in range(users)]
    streams = [user_segments(files, styles[u], seed + u if shuffle_files else None, suggestions, episode_bytes)
               for u in range(users)]
    learners = [EpisodeLearner(model, pols, lam=lam) for _ in range(users)]
    acc: Dict[str, List[List[float]]] = {n: [[] for _ in range(users)] for n in names}   # 1 accepted / 0
    frac: Dict[str, List[List[float]]] = {n: [[] for _ in range(users)] for n in names}  # accepted share
    episode: List[List[int]] = [[] for _ in range(users)]
    given: List[List[List[Optional[float]]]] = [[] for _ in range(users)]  # [user][episode][row]
    kept_r: List[List[Optional[float]]] = [[] for _ in range(users)]
    K = max(len(s) for s in streams)
    ki, yi = names.index("kept"), names.index("yoked") if "yoked" in names else None
    bar = tqdm(total=sum(len(s) for s in streams), desc=f"tabcomplete {users} users", unit="ep", mininterval=2.0)
    for k in range(K):
        own: List[Optional[List[Optional[float]]]] = [None] * users
        for u in range(users):
            if k >= len(streams[u]):
                continue
            seg, prev = streams[u][k]
            lines = line_acceptance(read_episode(learners[u], seg, prev, chunk), seg)
            indents = [len(t) - len(t.lstrip(b" \t")) for t in seg.split(b"\n") if t.strip()]  # as line_acceptance
            rs = []
            for (a, n), ind in zip(lines, indents):
                ok = accepts(a, n, ind, min_chars)
                for i, nm in enumerate(names):
                    acc[nm][u].append(float(ok[i]))
                    frac[nm][u].append(a[i] / n)
                episode[u].append(k)
                rs.append(suggestion_rewards(a, n, ind, reward, min_chars))
            own[u] = [float(np.mean([r[i] for r in rs])) if rs else None for i in range(len(names))]
            kept_r[u].append(own[u][ki])
            bar.update(1)
        for u in range(users):
            if own[u] is None:
                continue
            r = list(own[u])
            if yi is not None:
                partner = kept_r[(u + 1) % users]
                r[yi] = partner[k % len(partner)] if partner else None
            given[u].append(r)
            learners[u].end_episode(r)
    bar.close()
    acc_a = {n: [np.array(v) for v in acc[n]] for n in names}
    frac_a = {n: [np.array(v) for v in frac[n]] for n in names}
    ep_a = [np.array(e) for e in episode]
    return _report(src, model, styles, streams, names, acc_a, frac_a, ep_a, given, dict(
        users=users, suggestions=suggestions, window=window, reward=reward, min_chars=min_chars,
        episode_bytes=episode_bytes, chunk=chunk, eta_s=eta_s, eta_r=eta_r, gamma=gamma, lam=lam,
        shuffle_files=shuffle_files, fixed_style=None if style is None else style.describe(), seed=seed),
        cfg.out_dir, cfg.name)


PAIRS = (("kept", "reset"), ("yoked", "reset"), ("kept", "yoked"), ("unrewarded", "reset"), ("kept", "unrewarded"))


def _report(src, model, styles, streams, names, acc, frac, episode, given, cfg, out_dir, name) -> Dict[str, Any]:
    """The JSON report of :func:`run_users` (``acc``/``frac``: row -> per user ``[L_u]`` arrays)."""
    U, W = len(styles), cfg["window"]
    L = min(len(e) for e in episode)
    step = max(1, L // 50)
    xs = list(range(W, L + 1, step)) if L >= W else [L]

    def trailing(a: np.ndarray, n: int) -> float:  # mean of the window of suggestions ending at n
        return float(a[max(0, n - W):n].mean())

    methods: Dict[str, Any] = {}
    for nm in names:
        s = {"acceptance": float(np.mean([a.mean() for a in acc[nm]])),
             "acceptance_last_window": float(np.mean([a[-W:].mean() for a in acc[nm]])),
             "accepted_fraction": float(np.mean([f.mean() for f in frac[nm]])),
             "accepted_fraction_last_window": float(np.mean([f[-W:].mean() for f in frac[nm]]))}
        methods[f"acceptance/{nm}"] = {"curve": curve(xs, [np.mean([trailing(a, n) for a in acc[nm]]) for n in xs]),
                                       "summary": s}
    stats: Dict[str, Any] = {}
    for a, b in PAIRS:
        if a in names and b in names:
            for part, sl in (("all", slice(None)), ("last_window", slice(-W, None))):
                stats[f"{a} - {b}/{part}"] = paired_intervals(acc, episode, a, b, sl, seed=cfg["seed"])
                stats[f"{a} - {b}/{part}/fraction"] = paired_intervals(frac, episode, a, b, sl, seed=cfg["seed"])
            methods[f"difference/{a} - {b}"] = {
                "curve": curve(xs, [np.mean([trailing(x, n) - trailing(y, n) for x, y in zip(acc[a], acc[b])])
                                    for n in xs]),
                "summary": {"delta": stats[f"{a} - {b}/all"]["delta"], "ci": stats[f"{a} - {b}/all"]["ci"]}}
    per_user = [{"seed": cfg["seed"] + u, "style": styles[u].describe(), "episodes": len(streams[u]),
                 "suggestions": int(len(episode[u])), "bytes": int(sum(len(x) for x, _ in streams[u])),
                 "acceptance": {nm: float(acc[nm][u].mean()) for nm in names},
                 "acceptance_last_window": {nm: float(acc[nm][u][-W:].mean()) for nm in names},
                 "rewards_given": given[u]} for u in range(U)]
    report = {"benchmark": "tabcomplete_users",
              "config": {"source": os.path.abspath(src), "rows": names, "model_fingerprint": model.fingerprint(),
                         "acceptance": f"a suggestion (the greedy line) is accepted when it is right through the "
                                       f"indentation and {cfg['min_chars']} more characters, or the whole line",
                         **cfg},
              "x_label": "suggestions (non-blank lines)", "log_x": False,
              "y_label": f"acceptance (trailing {W}, mean over users)",
              "y_labels": {"difference": f"acceptance difference (trailing {W})"},
              "methods": methods, "stats": stats, "users": per_user}
    report["table"] = table(report)
    if out_dir:
        write_report(report, out_dir, name or "tabcomplete")
    return report


def table(report: Dict[str, Any]) -> str:
    """Markdown: acceptance per row (all suggestions, last window), then the paired differences."""
    cfg, W = report["config"], report["config"]["window"]
    rows = [[k.split("/", 1)[1], f"{m['summary']['acceptance']:.4f}", f"{m['summary']['acceptance_last_window']:.4f}",
             f"{m['summary']['accepted_fraction']:.4f}"]
            for k, m in report["methods"].items() if k.startswith("acceptance/")]
    out = format_table(rows, ["row", f"acceptance, {cfg['suggestions']} suggestions", f"acceptance, last {W}",
                              "accepted share of bytes"])
    diff = []
    for key, st in report["stats"].items():
        if key.endswith("/fraction"):
            continue
        pair, part = key.split("/")
        diff.append([pair, "all" if part == "all" else f"last {W}", f"{st['delta']:+.4f}",
                     f"[{st['ci'][0]:+.4f}, {st['ci'][1]:+.4f}]",
                     f"[{st['ci_users'][0]:+.4f}, {st['ci_users'][1]:+.4f}]",
                     f"{st['users_positive']}/{st['n_users']}"])
    return out + "\n\n" + format_table(diff, ["pair", "suggestions", "difference", "95% CI (user x episode clusters)",
                                              "95% CI (users)", "users where a > b"])


__all__ = ["HELP", "REWARDS", "ROWS", "TabcompleteConfig", "accepts", "add_arguments", "cluster_bootstrap_ci",
           "config_from_args", "paired_intervals", "read_episode", "row_policies", "run", "run_single", "run_users",
           "suggestion_rewards", "table", "user_segments"]
