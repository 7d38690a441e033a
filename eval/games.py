"""``games``: reward-only learning in synthetic games (tasks from :mod:`cl_arch.train.tasks`).

Every episode shows a prompt, the model answers one token sampled from its softmax restricted to
the legal actions (temperature ``temperature``), the answer is fed back (so the fast layers write
it and the eligibility trace holds ``prompt -> answer``), and the episode's reward commits the
trace into the persistent memory ``P`` (three-factor rule, ``eta_s = 0``: reward only). Nothing
in the tokens reveals what pays: only reward can teach it.

Games:
* ``bandit``: Bernoulli k-armed bandits; cumulative expected regret of the model vs UCB1,
  Thompson sampling (Beta(1, 1) prior) and uniform random play on the same bandits.
* ``preference``: hidden preferences, cue -> preferred answer (chance ``1 / n_answers``).
* ``cue_reward``: cue -> POS/NEG, a binary preference spoken in the reward tokens.
* ``shift``: the preference game whose preferences are redrawn halfway; reported: reward just
  before the shift, just after, at the end, and how often the *old* answer is still given.

Methods per game: ``adapt`` (P persists, reward-modulated) and ``reset`` (P cleared every episode:
the same model, learning nothing across episodes). The curve is the expected reward (probability
of the paying action under the policy), averaged over seeds, smoothed over a trailing window.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cl_arch import PlasticTransformer
from cl_arch.train.tasks import NEG, POS, Bandit, PreferenceGame

from .lib import metrics as M
from .lib.learners import RowPolicy
from .lib.models import recall_model
from .lib.options import add_recall_options
from .lib.options import ReportOptions
from .lib.options import config_from_args as options_config
from .lib.play import BanditEnv, PreferenceEnv, play
from .lib.report import curve, format_table, write_report

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- bandit baselines
def ucb1(bandit_probs: Sequence[float], episodes: int, seed: int) -> List[int]:
    """UCB1 (Auer et al.): play each arm once, then ``argmax_a mean_a + sqrt(2 ln t / n_a)``."""
    rng = np.random.default_rng(seed)
    k = len(bandit_probs)
    n, s, acts = np.zeros(k), np.zeros(k), []
    for t in range(episodes):
        a = t if t < k else int(np.argmax(s / n + np.sqrt(2 * math.log(t) / n)))
        r = float(rng.random() < bandit_probs[a])
        n[a] += 1
        s[a] += r
        acts.append(a)
    return acts


def thompson(bandit_probs: Sequence[float], episodes: int, seed: int) -> List[int]:
    """Thompson sampling with Beta(1, 1) priors: play ``argmax_a theta_a``, ``theta_a ~ Beta(1+s, 1+f)``."""
    rng = np.random.default_rng(seed)
    k = len(bandit_probs)
    s, f, acts = np.zeros(k), np.zeros(k), []
    for _ in range(episodes):
        a = int(np.argmax(rng.beta(1 + s, 1 + f)))
        r = rng.random() < bandit_probs[a]
        s[a] += r
        f[a] += 1 - r
        acts.append(a)
    return acts


# ---------------------------------------------------------------------------- the benchmark
def _policies(seeds: int, eta_r: Optional[float], gamma: Optional[float], yoked: bool) -> List[RowPolicy]:
    adapt = RowPolicy("adapt", persist=True, use_reward=True, eta_s=0.0, eta_r=eta_r, gamma=gamma)
    return [adapt] * seeds + [RowPolicy("reset")] * seeds + ([adapt] * seeds if yoked else [])


def _yoke(seeds: int, yoked: bool) -> Optional[List[Optional[int]]]:
    """Row ``2S + i`` (yoked) gets the reward of row ``i`` (kept) of the same game."""
    return [None] * (2 * seeds) + list(range(seeds)) if yoked else None


def _smooth_curve(expected: np.ndarray, window: int, points: int = 40):
    mean = np.asarray(M.running_mean(expected.mean(0), window))
    xs = np.unique(np.linspace(1, len(mean), min(points, len(mean))).astype(int))
    return xs.tolist(), mean[xs - 1].tolist()


def reward_memory_model(base: PlasticTransformer, cache_root: str = "runs", fit_seed: int = 0,
                        log=None, fit: str = "search") -> PlasticTransformer:
    """``base`` with a reward memory (:func:`cl_arch.train.reward_memory.with_reward_memory`) whose
    settings were chosen on the training token sets, cached per base model in ``cache_root``.

    Args:
        fit: ``"search"`` (:func:`~cl_arch.eval.reward_fit.fit_reward_memory`, cached as
            ``reward-memory-<fingerprint>-<seed>.json``) or ``"meta"``
            (:func:`~cl_arch.eval.reward_fit.meta_train_reward_memory`, gradient through the
            commits, ``reward-memory-meta-<fingerprint>-<seed>.json``).
    """
    import json

    from cl_arch.train.reward_memory import RewardMemorySettings, with_reward_memory

    from .reward_fit import fit_reward_memory, meta_train_reward_memory

    if fit not in ("search", "meta"):
        raise ValueError(f"fit must be 'search' or 'meta', got {fit!r}")
    tag = "" if fit == "search" else "meta-"
    path = os.path.join(cache_root, f"reward-memory-{tag}{base.fingerprint()}-{fit_seed}.json")
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
    else:
        logger = log or _log.info
        result = (fit_reward_memory(base, seed=fit_seed, log=logger) if fit == "search"
                  else meta_train_reward_memory(base, seed=fit_seed, log=logger))
        os.makedirs(cache_root, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
    model = with_reward_memory(base, RewardMemorySettings(**result["best"]))
    model.reward_memory_fit = result  # recorded in the report
    return model


@dataclass
class GamesConfig(ReportOptions):
    """Every setting of one games run (:func:`run`): ``seeds`` independent instances of each game of
    ``games``, ``episodes`` episodes each; the other fields as :func:`run` describes."""
    episodes: int = 300
    seeds: int = 8
    games: Tuple[str, ...] = ("bandit", "preference", "cue_reward", "shift")
    n_cues: int = 8
    n_answers: int = 8
    k_arms: int = 4
    temperature: float = 1.0
    eta_r: Optional[float] = None
    gamma: Optional[float] = None
    reward_memory: bool = False
    reward_fit: str = "search"
    tokens: str = "default"
    yoked: bool = True
    delay: int = 0
    credit: str = "stored"
    close: Optional[int] = None
    recall_steps: int = 600
    cache_root: str = "runs"


HELP = "reward-only learning in synthetic games"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``cl-arch eval games``'s options (defaults: :class:`GamesConfig`'s)."""
    add_recall_options(p, episodes=300, seeds=8)
    p.add_argument("--reward-memory", action="store_true", help="add a reward memory to the model, its settings "
                   "fitted on the training token sets (cl_arch.train.reward_memory; cached in runs/)")
    p.add_argument("--tokens", choices=["default", "held_out"], default="default", help="play on the default "
                   "token sets or on those reward-memory fitting never sees")
    p.add_argument("--reward-fit", choices=["search", "meta"], default="search", help="how the reward memory's "
                   "settings are chosen on the training token sets: grid search, or meta-gradient through the commits")
    p.add_argument("--reward-delay", type=int, default=0, help="rewards arrive this many episodes late")
    p.add_argument("--credit", choices=["stored", "current"], default="stored", help="a late reward is committed "
                   "with the trace of the episode that earned it (stored) or of the one just ended")
    p.add_argument("--no-yoked", action="store_true", help="leave out the yoked control rows")


def config_from_args(args: argparse.Namespace) -> GamesConfig:
    """The parsed options of :func:`add_arguments` as a :class:`GamesConfig`."""
    return options_config(GamesConfig, args, delay=args.reward_delay, yoked=not args.no_yoked)


def _summarize_game(game: str, res: Dict[str, np.ndarray], chance: float, cfg: GamesConfig, groups: Sequence[str],
                    window: int, methods: Dict[str, Any]) -> List[str]:
    """Curves and summaries of one game's rows (``res["expected"] [groups x seeds, E]``) into ``methods``;
    returns its table row (first and last window, the Sutton deltas kept - reset and yoked - reset)."""
    S, E, seed = cfg.seeds, cfg.episodes, cfg.seed
    for j, label in enumerate(groups):
        ex = res["expected"][j * S:(j + 1) * S]
        xs, ys = _smooth_curve(ex, window)
        first, last = ex[:, :window].mean(), ex[:, -window:].mean()
        methods[f"{game}/{label}"] = {"curve": curve(xs, ys), "summary": {
            "reward_first": float(first), "reward_last": float(last), "chance": chance,
            "aulc": M.aulc(ex.mean(0)[np.linspace(0, E - 1, 10).astype(int)], lo=chance, hi=1.0)}}
    kept, reset = res["expected"][:S, -window:].mean(1), res["expected"][S:2 * S, -window:].mean(1)
    st = M.sutton_delta(kept, reset, seed=seed)
    methods[f"{game}/adapt"]["summary"].update(sutton_delta=st["sutton_delta"], sutton_ci=st["sutton_ci"])
    s = methods[f"{game}/adapt"]["summary"]
    row = [game, f"{chance:.3f}", f"{s['reward_first']:.3f}", f"{s['reward_last']:.3f}",
           f"{methods[f'{game}/reset']['summary']['reward_last']:.3f}",
           f"{st['sutton_delta']:+.3f} [{st['sutton_ci'][0]:+.3f}, {st['sutton_ci'][1]:+.3f}]"]
    if cfg.yoked:
        yk = M.sutton_delta(res["expected"][2 * S:, -window:].mean(1), reset, seed=seed)
        methods[f"{game}/yoked"]["summary"].update(yoked_delta=yk["sutton_delta"], yoked_ci=yk["sutton_ci"])
        row += [f"{methods[f'{game}/yoked']['summary']['reward_last']:.3f}",
                f"{yk['sutton_delta']:+.3f} [{yk['sutton_ci'][0]:+.3f}, {yk['sutton_ci'][1]:+.3f}]"]
    return row


def _bandit_regret(res: Dict[str, np.ndarray], bandits: Sequence[Bandit], cfg: GamesConfig,
                   methods: Dict[str, Any]) -> float:
    """Cumulative expected regret of the model's rows and of UCB1, Thompson sampling and random play
    on the same bandits into ``methods``; returns the adapting row's final regret over Thompson's."""
    S, E, seed = cfg.seeds, cfg.episodes, cfg.seed
    best = np.array([max(b.probs) for b in bandits])
    # the model's expected per-step regret is max mu - E_pi[mu]
    reg = {"adapt": np.cumsum(best[:, None] - res["expected"][:S], 1),
           "reset": np.cumsum(best[:, None] - res["expected"][S:2 * S], 1),
           "ucb1": np.array([M.cumulative_regret(b.probs, ucb1(b.probs, E, seed + 10 + i))
                             for i, b in enumerate(bandits)]),
           "thompson": np.array([M.cumulative_regret(b.probs, thompson(b.probs, E, seed + 20 + i))
                                 for i, b in enumerate(bandits)]),
           "random": np.cumsum(np.repeat((best - np.array([np.mean(b.probs) for b in bandits]))[:, None], E, 1), 1)}
    if cfg.yoked:
        reg["yoked"] = np.cumsum(best[:, None] - res["expected"][2 * S:], 1)
    xs = np.unique(np.linspace(1, E, 30).astype(int))
    for k_, r in reg.items():
        methods[f"regret/{k_}"] = {"curve": curve(xs, r.mean(0)[xs - 1]),
                                   "summary": {"regret_final": float(r[:, -1].mean()),
                                               "regret_final_sd": float(r[:, -1].std())}}
    return float(reg["adapt"][:, -1].mean() / max(reg["thompson"][:, -1].mean(), 1e-9))


def _shift_figures(res: Dict[str, np.ndarray], old: Sequence[PreferenceGame], new: Sequence[PreferenceGame],
                   envs_new: Sequence[PreferenceEnv], S: int, E: int, window: int) -> Dict[str, Any]:
    """The adapting rows' reward before the shift, just after, at the end, and how often they still
    give the old preferred answer after it (where the old and new rules differ)."""
    half = E // 2
    acts = res["action"][:S]
    old_rate = []
    for i in range(S):
        cues = envs_new[i].cues
        differ = [t for t in range(half, E) if old[i].preferred[cues[t]] != new[i].preferred[cues[t]]]
        if differ:
            old_rate.append(np.mean([old[i].answers[int(acts[i, t])] == old[i].preferred[cues[t]] for t in differ]))
    ex = res["expected"][:S]
    return dict(reward_before_shift=float(ex[:, half - window:half].mean()),
                reward_after_shift=float(ex[:, half:half + window].mean()),
                reward_end=float(ex[:, -window:].mean()),
                old_answer_rate_after_shift=float(np.mean(old_rate)) if old_rate else None)


def run(cfg: Optional[GamesConfig] = None, model: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Run the games (settings: ``cfg``, default :class:`GamesConfig`) for ``cfg.seeds`` independent
    instances each on ``model`` (default: the recall model of ``cfg.recall_steps``); returns (and with
    ``cfg.out_dir`` writes) the report.

    Config fields:
        reward_memory: play with a reward memory added to ``model`` (:func:`reward_memory_model`,
            settings fitted on the training token sets by ``reward_fit`` (``"search"`` or ``"meta"``),
            cached in ``cache_root``).
        tokens: ``"default"`` (arms ``ARMS``, cues ``KEYS``, answers ``VALUES``, as the recall
            model was trained on) or ``"held_out"`` (the token sets reward-memory fitting never
            plays: :data:`cl_arch.train.reward_memory.HELD_OUT_TOKENS`).
        yoked: add the yoked control rows (each gets its kept partner's rewards).
        delay, credit: rewards arrive ``delay`` episodes late, committed with the trace of the
            episode that earned them (``"stored"``) or of the one just ended (``"current"``); see
            :func:`~cl_arch.eval.lib.play.play`.
        close: a token read after every answer before the commit (None: episodes end on the answer;
            see :func:`~cl_arch.eval.lib.play.play`).
    """
    from cl_arch.train.reward_memory import HELD_OUT_TOKENS

    cfg = cfg or GamesConfig()
    if cfg.tokens not in ("default", "held_out"):
        raise ValueError(f"tokens must be 'default' or 'held_out', got {cfg.tokens!r}")
    model = model if model is not None else recall_model(cfg.recall_steps, cfg.cache_root)
    if cfg.reward_memory:
        model = reward_memory_model(model, cfg.cache_root, fit=cfg.reward_fit)
    model.eval()
    held = cfg.tokens == "held_out"
    tok = {"arm_tokens": HELD_OUT_TOKENS["arms"]} if held else {}
    ptok = ({"cue_tokens": HELD_OUT_TOKENS["cues"], "answer_tokens": HELD_OUT_TOKENS["answers"]} if held else {})
    S, E, seed, n_cues, n_answers = cfg.seeds, cfg.episodes, cfg.seed, cfg.n_cues, cfg.n_answers
    pols, yoke = _policies(S, cfg.eta_r, cfg.gamma, cfg.yoked), _yoke(S, cfg.yoked)
    groups = ("adapt", "reset", "yoked") if cfg.yoked else ("adapt", "reset")
    n_groups, window = len(groups), max(5, E // 10)
    methods: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    rows = []

    def play_rows(envs, play_seed, desc, **kw):
        return play(model, envs, pols, E, cfg.temperature, play_seed, desc=desc, yoke=yoke, delay=cfg.delay,
                    credit=cfg.credit, close=cfg.close, **kw)

    if "bandit" in cfg.games:
        bandits = [Bandit(k=cfg.k_arms, seed=seed + i, **tok) for i in range(S)]
        # every group plays its own copy (same pay-outs, same pay-out stream)
        res = play_rows([BanditEnv(Bandit(k=cfg.k_arms, seed=seed + i, **tok)) for _ in range(n_groups)
                         for i in range(S)], seed, "bandit")
        rows.append(_summarize_game("bandit", res, float(np.mean([np.mean(b.probs) for b in bandits])), cfg, groups,
                                    window, methods))
        extra["regret_vs_thompson"] = _bandit_regret(res, bandits, cfg, methods)
    if "preference" in cfg.games:
        envs = [PreferenceEnv(PreferenceGame(n_cues, n_answers, seed=seed + i, **ptok), E, seed=seed + 100 + i)
                for i in range(S)]
        res = play_rows(envs * n_groups, seed + 1, "preference")
        rows.append(_summarize_game("preference", res, 1.0 / n_answers, cfg, groups, window, methods))
    if "cue_reward" in cfg.games:
        cue_tok = {"cue_tokens": HELD_OUT_TOKENS["cues"]} if held else {}
        envs = [PreferenceEnv(PreferenceGame(16, 2, seed=seed + 200 + i, **cue_tok), E, seed=seed + 300 + i,
                              answer_tokens=[POS, NEG]) for i in range(S)]
        res = play_rows(envs * n_groups, seed + 2, "cue_reward")
        rows.append(_summarize_game("cue_reward", res, 0.5, cfg, groups, window, methods))
    if "shift" in cfg.games:
        old = [PreferenceGame(n_cues, n_answers, seed=seed + 400 + i, **ptok) for i in range(S)]
        new = [PreferenceGame(n_cues, n_answers, seed=seed + 500 + i, **ptok) for i in range(S)]
        envs_old = [PreferenceEnv(g_, E, seed=seed + 600 + i) for i, g_ in enumerate(old)]
        envs_new = [PreferenceEnv(g_, E, seed=seed + 600 + i) for i, g_ in enumerate(new)]
        res = play_rows(envs_old * n_groups, seed + 3, "shift", switch={E // 2: envs_new * n_groups})
        rows.append(_summarize_game("shift", res, 1.0 / n_answers, cfg, groups, window, methods))
        methods["shift/adapt"]["summary"].update(_shift_figures(res, old, new, envs_new, S, E, window))
    return _report(cfg, model, methods, extra, rows, window)


def _report(cfg: GamesConfig, model: PlasticTransformer, methods: Dict[str, Any], extra: Dict[str, Any],
            rows: List[List[str]], window: int) -> Dict[str, Any]:
    """The games report (written with ``cfg.out_dir``): config, curves and summaries, the tables."""
    report = {"benchmark": "games",
              "config": {"episodes": cfg.episodes, "seeds": cfg.seeds, "n_cues": cfg.n_cues, "n_answers": cfg.n_answers,
                         "k_arms": cfg.k_arms, "temperature": cfg.temperature, "eta_r": cfg.eta_r, "gamma": cfg.gamma,
                         "games": list(cfg.games), "tokens": cfg.tokens, "yoked": cfg.yoked, "delay": cfg.delay,
                         "credit": cfg.credit, "close": cfg.close,
                         "reward_memory": getattr(model, "reward_memory_fit", None),
                         "smoothing_window": window, "model_fingerprint": model.fingerprint(), "seed": cfg.seed},
              "x_label": "episodes", "y_label": "expected reward", "log_x": False,
              "y_labels": {"regret": "cumulative expected regret"},
              "methods": methods, **extra}
    report["table"] = format_table(rows, ["game", "chance", "adapt first", "adapt last", "reset last",
                                          "Sutton delta (last window) [95% CI]"] +
                                   (["yoked last", "yoked - reset [95% CI]"] if cfg.yoked else []))
    if "regret_vs_thompson" in extra:
        report["table"] += "\n\n" + format_table(
            [[k.split("/")[1], f"{v['summary']['regret_final']:.1f}"] for k, v in methods.items()
             if k.startswith("regret/")],
            [f"bandit policy (k={cfg.k_arms}, {cfg.episodes} pulls)", "final cumulative regret"])
    if cfg.out_dir:
        write_report(report, cfg.out_dir, cfg.name or "games")
    return report


__all__ = ["HELP", "GamesConfig", "add_arguments", "config_from_args", "reward_memory_model", "ucb1", "thompson",
           "run"]
