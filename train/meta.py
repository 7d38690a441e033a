"""Meta-training: learning how the fast weights learn from reward.

The inner loop is the model's own plasticity, exactly as a :class:`~cl_arch.Session` runs it: an
episode shows ``[BOS, cue]``, the model answers, the answer is fed back (the fast layers write
``cue -> answer`` and the eligibility trace ``E`` keeps it), and the episode's reward commits the
trace into the persistent memory::

    P <- gamma P + (eta_s + eta_r (r - b)) clip(E),      b <- b + rho (r - b)

The outer loop trains, by gradient descent *through* K such commits, the parameters that decide
what is written and kept: ``eta_s, eta_r, lam, gamma`` per head and the write path (``W0``, the
k/v/beta/decay projections and the short conv; ``meta.trainable``). The task is the hidden-
preference game of :mod:`cl_arch.train.tasks` (reward only; nothing in the tokens reveals the
preferred answer).

Outer objective (``meta.objective``):

``"expected"`` (exact, the default): the game's simulator is known, so nothing is sampled. With
    ``pi_t`` the policy over the answers at episode t (softmax of the answer logits at the cue),
    the expected reward is ``R_t = pi_t(a*)``, and P follows its expected commit
    ``P_{t+1} = sum_a pi_t(a) [gamma P_t + (eta_s + eta_r (r(a) - b_t)) clip(E_t(a))]`` (all answers
    are played in one batched forward), with ``b`` following the expected reward. The loss is
    ``-mean_t R_t``: a deterministic, differentiable function of the parameters.
``"reinforce"``: answers are sampled as at test time and committed with their actual reward and
    the running baseline. The loss is ``-mean_t pi_t(a*_t)`` (pathwise through P) plus the score
    term ``-log pi_t(a_t) * (G_t - mean G_t)`` for how a sampled answer shapes later memories
    (``G_t``: the expected rewards of the later episodes, batch mean as baseline).

Plus ``meta.lm_weight`` times the next-token loss on associative recall
(:func:`cl_arch.train.tasks.recall_batch`), so the read-out that turns a memory into a prediction
is kept. Backprop runs through ``meta.tbptt`` episodes at a time (P detached between windows);
``train.activation_checkpointing`` recomputes each block in the backward pass.

The Sutton test (:func:`play_preference`) plays fresh games with sampled answers, once with P
kept across episodes and once with P reset every episode (same cues, same random draws), and
reports each game's mean expected reward after its first episode under both.

On several processes (``accelerate launch``, DDP or FSDP: :mod:`cl_arch.train.distributed`) every
process draws the same ``meta.games_per_step`` games and recall rows and plays its contiguous
share; the losses are scaled so that averaging the gradients over processes gives one process's
gradient, and a step's logged reward is the mean over all games. So N processes give one
process's result up to float reduction order (``tests/test_distributed.py``).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cl_arch import PlasticConfig, PlasticTransformer
from cl_arch.stats import sutton_delta

from . import distributed as dist_utils
from .config import ConfigError, OptimConfig, TrainConfig, config_to_dict
from .finetune import commit_persistent, episode_state, select_trainable
from .pretrain import enable_activation_checkpointing, make_accelerator
from .tasks import BOS, PreferenceGame, recall_batch, value_tokens
from .trainer import MetricsLog, Parallel, Trainer, WarmupCosine, param_groups

logger = logging.getLogger(__name__)

OBJECTIVES = ("expected", "reinforce")


# ============================================================================ config
@dataclass
class MetaSection:
    """The meta-learning problem (see the module docstring).

    n_cues, n_answers: preference-game size (chance = 1 / n_answers).
    games_per_step: independent games (fresh hidden preferences) per outer step.
    episodes: K, episodes each game is played for in one outer step (P carried across them).
    tbptt: episodes per backward window.
    objective: "expected" (exact) or "reinforce".
    lm_weight: weight of the associative-recall next-token loss.
    recall_batch, recall_pairs: its batch size and pairs per sequence.
    trainable: "plasticity" | "fast" | "all" (as :func:`cl_arch.train.finetune.select_trainable`).
    temperature: policy softmax temperature (training and test).
    base_recall_steps: with no ``train.init_from``, steps of recall pretraining that make the base
        model (:func:`cl_arch.train.recall.train_recall_model`).
    eval_games, eval_episodes, eval_seed: the Sutton test run before and after (games seeded from
        eval_seed upward, disjoint from the training games, which are drawn from ``train.seed``).
    """

    n_cues: int = 8
    n_answers: int = 8
    games_per_step: int = 8
    episodes: int = 16
    tbptt: int = 8
    objective: str = "expected"
    lm_weight: float = 0.5
    recall_batch: int = 16
    recall_pairs: int = 24
    trainable: str = "fast"
    temperature: float = 1.0
    base_recall_steps: int = 200
    eval_games: int = 32
    eval_episodes: int = 48
    eval_seed: int = 1_000_000


@dataclass
class MetaRunConfig:
    """``cl-arch meta-train`` config: model (only for a fresh base), meta, optim, train."""

    model: Dict[str, Any] = field(default_factory=dict)
    meta: MetaSection = field(default_factory=MetaSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0,
                                                                   grad_clip=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, max_minutes=None, eval_every=0,
                                                                   log_every=5, output_dir="runs/meta"))


def _build_model_config(self) -> PlasticConfig:
    """The base model's config when it is trained here: ``recall_config`` updated by ``model``."""
    from .recall import recall_config

    return recall_config(**self.model)


MetaRunConfig.build_model_config = _build_model_config


def validate_meta(cfg: MetaRunConfig) -> None:
    """Checks of the ``meta`` section (raises ConfigError naming the field)."""
    m = cfg.meta
    for name in ("n_cues", "n_answers", "games_per_step", "episodes", "tbptt", "recall_batch",
                 "recall_pairs", "eval_games", "eval_episodes"):
        if getattr(m, name) < 1:
            raise ConfigError(f"meta.{name}: must be >= 1, got {getattr(m, name)!r}")
    if m.n_answers < 2:
        raise ConfigError(f"meta.n_answers: must be >= 2, got {m.n_answers}")
    if m.eval_episodes < 2:
        raise ConfigError(f"meta.eval_episodes: the Sutton test needs >= 2 episodes, got {m.eval_episodes}")
    if m.objective not in OBJECTIVES:
        raise ConfigError(f"meta.objective: must be one of {list(OBJECTIVES)}, got {m.objective!r}")
    if m.trainable not in ("all", "plasticity", "fast"):
        raise ConfigError(f"meta.trainable: must be 'all', 'plasticity' or 'fast', got {m.trainable!r}")
    if m.lm_weight < 0:
        raise ConfigError(f"meta.lm_weight: must be >= 0, got {m.lm_weight}")
    if not m.temperature > 0:
        raise ConfigError(f"meta.temperature: must be > 0, got {m.temperature}")
    if m.base_recall_steps < 0:
        raise ConfigError(f"meta.base_recall_steps: must be >= 0, got {m.base_recall_steps}")
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum: meta-training takes one optimizer step per batch of games (raise "
                          f"meta.games_per_step instead), got {cfg.train.grad_accum}")


MetaRunConfig.validate_section = validate_meta  # called by config.validate (config never imports meta)


# ============================================================================ games as tensors
def make_games(n: int, n_cues: int, n_answers: int, episodes: int, seed0: int):
    """``n`` preference games seeded ``seed0 ..``: ``(cues [n, E] token ids, best [n, E] answer index)``."""
    cues, best = [], []
    for i in range(n):
        g = PreferenceGame(n_cues=n_cues, n_answers=n_answers, seed=seed0 + i)
        seq = g.cue_sequence(episodes, seed=seed0 + i + 7_777_777)
        cues.append(seq)
        best.append([g.answers.index(g.preferred[c]) for c in seq])
    return torch.tensor(cues, dtype=torch.long), torch.tensor(best, dtype=torch.long)


def _repeat(P: List[Optional[torch.Tensor]], n: int) -> List[Optional[torch.Tensor]]:
    return [None if p is None else p.repeat_interleave(n, dim=0) for p in P]


def _zeros_P(model: PlasticTransformer, batch: int) -> List[torch.Tensor]:
    return [torch.zeros(batch, m.n_heads, m.head_k_dim, m.head_v_dim, dtype=m.state_dtype, device=m.W0.device)
            for m in model.fast_layers()]


# ============================================================================ one episode, batched
def expected_episode(model: PlasticTransformer, P: List[torch.Tensor], b: torch.Tensor, cues: torch.Tensor,
                     best: torch.Tensor, answers: torch.Tensor, temperature: float):
    """Exact expected step of ``G`` games: every answer played in one ``[G * A, 3]`` forward.

    Args:
        P: per fast layer ``[G, H, K, V]``; b: ``[G]`` expected running baseline.
        cues: ``[G]`` cue tokens; best: ``[G]`` index of the preferred answer; answers: ``[A]`` tokens.

    Returns:
        ``(R [G] expected reward, P_next (list of [G, H, K, V]), b_next [G], pi [G, A])``.
    """
    G, A = cues.shape[0], answers.shape[0]
    seq = torch.stack([torch.full((G, A), BOS, device=cues.device), cues[:, None].expand(G, A),
                       answers[None, :].expand(G, A)], dim=-1).reshape(G * A, 3)
    logits, state = model(seq, state=episode_state(model, _repeat(P, A)))
    pol = logits.view(G, A, 3, -1)[:, 0, 1, :].index_select(-1, answers).float() / temperature  # [G, A]
    pi = torch.softmax(pol, dim=-1)
    R = pi.gather(1, best[:, None]).squeeze(1)
    rew = F.one_hot(best, A).to(pi.dtype)  # r(a) = 1 for the preferred answer
    adv = (rew - b[:, None]).reshape(G * A)  # advantage of each answer against the running baseline
    P_rows = commit_persistent(model, state, advantage=adv)  # per (game, answer): [G * A, H, K, V]
    w = pi.reshape(G, A, 1, 1, 1)
    P_next = [(pr.view(G, A, *pr.shape[1:]) * w.to(pr.dtype)).sum(1) for pr in P_rows]
    rho = model.config.baseline_rho
    return R, P_next, b + rho * (R - b), pi


def sampled_episode(model: PlasticTransformer, P: List[torch.Tensor], b: torch.Tensor, cues: torch.Tensor,
                    best: torch.Tensor, answers: torch.Tensor, temperature: float, u: torch.Tensor,
                    commit: bool = True):
    """Test-time step of ``G`` games: sample an answer by inverse CDF of ``u [G]``, feed it, commit
    the actual reward (``commit=False``: P untouched, the reset arm).

    Returns:
        ``(R [G] expected reward pi(a*), P_next, b_next [G], logp [G] of the sampled answer,
        reward [G])``.
    """
    G = cues.shape[0]
    prompt = torch.stack([torch.full((G,), BOS, device=cues.device), cues], dim=-1)
    logits, state = model(prompt, state=episode_state(model, P))
    pi = torch.softmax(logits[:, -1].index_select(-1, answers).float() / temperature, dim=-1)
    R = pi.gather(1, best[:, None]).squeeze(1)
    idx = torch.searchsorted(torch.cumsum(pi.detach(), -1), u[:, None].contiguous()).squeeze(1).clamp(max=answers.numel() - 1)
    logp = torch.log(pi.gather(1, idx[:, None]).squeeze(1) + 1e-12)
    reward = (idx == best).to(pi.dtype)
    if not commit:
        return R, P, b, logp, reward
    _, state = model(answers[idx][:, None], state=state)  # feed the answer: the write of cue -> answer
    P_next = commit_persistent(model, state, advantage=reward - b)
    rho = model.config.baseline_rho
    return R, P_next, b + rho * (reward - b), logp, reward


# ============================================================================ the Sutton test
@torch.no_grad()
def play_preference(model: PlasticTransformer, n_games: int, episodes: int, n_cues: int = 8, n_answers: int = 8,
                    seed: int = 1_000_000, temperature: float = 1.0) -> Dict[str, Any]:
    """Play ``n_games`` fresh games for ``episodes`` episodes with P kept and with P reset.

    Both arms see the same cues and the same uniform draws for sampling (paired). Returns
    ``kept`` / ``reset``: per game, the mean expected reward ``pi(a*)`` over episodes 2..E
    (attempt k+1 after k); ``kept_curve`` / ``reset_curve``: mean over games per episode.
    """
    was_training = model.training
    model.eval()
    cues, best = make_games(n_games, n_cues, n_answers, episodes, seed)
    answers = torch.tensor(value_tokens(n_answers))
    u = torch.rand(episodes, n_games, generator=torch.Generator().manual_seed(seed))
    curves = {}
    for arm in ("kept", "reset"):
        P, b = _zeros_P(model, n_games), torch.zeros(n_games)
        Rs = []
        for t in range(episodes):
            R, P, b, _, _ = sampled_episode(model, P, b, cues[:, t], best[:, t], answers, temperature, u[t],
                                            commit=(arm == "kept"))
            Rs.append(R)
        curves[arm] = torch.stack(Rs, 1)  # [G, E]
    model.train(was_training)
    return {"kept": curves["kept"][:, 1:].mean(1).tolist(), "reset": curves["reset"][:, 1:].mean(1).tolist(),
            "kept_curve": curves["kept"].mean(0).tolist(), "reset_curve": curves["reset"].mean(0).tolist(),
            "chance": 1.0 / n_answers}


def sutton_test(model: PlasticTransformer, m: MetaSection) -> Dict[str, Any]:
    """:func:`play_preference` with the config's sizes plus the delta and its paired bootstrap interval
    over games (:func:`cl_arch.stats.sutton_delta`, the one the evaluations use)."""
    out = play_preference(model, m.eval_games, m.eval_episodes, m.n_cues, m.n_answers, m.eval_seed, m.temperature)
    st = sutton_delta(out["kept"], out["reset"])
    out.update(sutton_delta=st["sutton_delta"], sutton_ci=st["sutton_ci"], mean_kept=float(np.mean(out["kept"])),
               mean_reset=float(np.mean(out["reset"])))
    return out


# ============================================================================ meta-training
def meta_loss_window(model, P, b, cues, best, answers, m: MetaSection, u: Optional[torch.Tensor]):
    """Loss of one TBPTT window of episodes (``cues, best [G, W]``) from memories ``P``.

    Returns ``(loss, mean expected reward, P_end, b_end)``.
    """
    W = cues.shape[1]
    Rs, logps = [], []
    for t in range(W):
        if m.objective == "expected":
            R, P, b, _ = expected_episode(model, P, b, cues[:, t], best[:, t], answers, m.temperature)
        else:
            R, P, b, logp, _ = sampled_episode(model, P, b.detach(), cues[:, t], best[:, t], answers,
                                               m.temperature, u[:, t])
            logps.append(logp)
        Rs.append(R)
    Rs_t = torch.stack(Rs, 1)  # [G, W]
    loss = -Rs_t.mean()
    if m.objective == "reinforce":
        # G_t: expected rewards after episode t in this window; the batch mean is the baseline.
        future = Rs_t.detach().flip(1).cumsum(1).flip(1) - Rs_t.detach()
        adv = future - future.mean(0, keepdim=True)
        loss = loss - (torch.stack(logps, 1) * adv).mean()
    return loss, float(Rs_t.detach().mean()), P, b


def build_base_model(cfg: MetaRunConfig, log: Optional[Callable[[str], None]] = None) -> PlasticTransformer:
    """``train.init_from`` if given, else a recall-pretrained model (``meta.base_recall_steps``)."""
    if cfg.train.init_from:
        return PlasticTransformer.from_pretrained(cfg.train.init_from)
    from .recall import train_recall_model

    config = cfg.build_model_config()
    if cfg.meta.base_recall_steps == 0:
        torch.manual_seed(cfg.train.seed)
        return PlasticTransformer(config)
    return train_recall_model(config, steps=cfg.meta.base_recall_steps, seed=cfg.train.seed, log=log or logger.info)


def meta_train(cfg: MetaRunConfig, base: Optional[PlasticTransformer] = None) -> Dict[str, Any]:
    """Run meta-training (see the module docstring) and the Sutton test before and after.

    Args:
        base: the pretrained-only model (default :func:`build_base_model`); it is copied, so the
            caller's model is left as it was.

    Returns:
        ``{"before": sutton_test, "after": sutton_test, "rewards": [...], "plasticity": {...},
        "steps", "seconds"}``; also written to ``train.output_dir/results.json`` with the final
        model in ``train.output_dir/final``. ``results["model"]`` is the trained module itself (under
        FSDP each process's sharded copy; ``final/`` holds the gathered weights).

    Raises:
        ValueError: ``meta.games_per_step`` (or ``meta.recall_batch``) not divisible by the number of
            processes, or a parallel plan that does not fit (:func:`cl_arch.train.distributed.resolve_plan`).
    """
    validate_meta(cfg)
    from cl_arch.kernels import checks

    # Thousands of tiny commits: the kernels' NaN/range checks (a host sync each) would cost a
    # third of the time. The loss is checked for finiteness instead (below).
    saved_checks, checks.VALUE_CHECKS = checks.VALUE_CHECKS, False
    try:
        return _meta_train(cfg, base)
    finally:
        checks.VALUE_CHECKS = saved_checks


def _meta_train(cfg: MetaRunConfig, base: Optional[PlasticTransformer]) -> Dict[str, Any]:
    import copy

    from accelerate.utils import set_seed

    m, t, o = cfg.meta, cfg.train, cfg.optim
    accelerator = make_accelerator(cfg, t.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    plan = dist_utils.resolve_plan(t.parallel, t.checkpoint_format, world)
    games = dist_utils.split_rows(m.games_per_step, rank, world, "meta.games_per_step")
    recall_rows = dist_utils.split_rows(m.recall_batch, rank, world, "meta.recall_batch") if m.lm_weight > 0 else None
    set_seed(t.seed)
    log = _main_info(accelerator)
    if base is None:
        base = build_base_model(cfg, log=log)
    model = copy.deepcopy(base).float()
    model.train()
    model.check_inputs = False  # generated games: no host read per step (restored at the end)
    if model.config.lam is None:
        raise ValueError("meta-training commits eligibility traces: the model needs config.lam (not None)")
    if t.activation_checkpointing or plan.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable = select_trainable(model, m.trainable)
    before = sutton_test(model, m)
    log(f"meta-train: before: reward kept {before['mean_kept']:.3f} vs reset {before['mean_reset']:.3f}, "
        f"Sutton delta {before['sutton_delta']:+.3f} [{before['sutton_ci'][0]:+.3f}, {before['sutton_ci'][1]:+.3f}]")

    # No DDP wrapper: a meta step runs dozens of forwards per backward (DDP expects one), so the
    # replicated model's gradients are averaged with one all-reduce; FSDP shards it and averages
    # only the replicated per-head vectors by hand (distributed.py).
    model = dist_utils.shard_model(model.to(accelerator.device), plan)
    raw = model
    parallel = Parallel(accelerator, plan, wrapped=False,
                        synced=dist_utils.replicated_parameters(raw) if plan.fsdp else list(raw.parameters()))
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    answers = torch.tensor(value_tokens(m.n_answers), device=accelerator.device)
    if accelerator.is_main_process:
        os.makedirs(t.output_dir, exist_ok=True)

    trainer = Trainer(raw, optimizer, MetaGames(m, t.seed, games, recall_rows), meta_step_loss(raw, m, answers, parallel),
                      schedule=WarmupCosine(optimizer, o.lr, o.warmup_steps, o.min_lr_ratio), parallel=parallel,
                      grad_clip=o.grad_clip, clip_params=[p for p in raw.parameters() if p.requires_grad],
                      max_steps=t.max_steps, budget_s=t.max_minutes * 60 if t.max_minutes else None,
                      metrics_log=MetricsLog(t.output_dir, parallel), log_every=t.log_every,
                      log_entry=lambda mt, lr, norm: {"expected_reward": mt["expected_reward"],
                                                      "recall_loss": mt["recall_loss"], "lr": lr,
                                                      **plasticity_summary(raw)},
                      name="meta-train", progress=t.progress, autocast=False, reduce_sum=("recall_loss",),
                      postfix=lambda mt, lr: {"reward": f"{mt['expected_reward']:.3f}",
                                              "recall_loss": f"{mt['recall_loss']:.3f}"},
                      diverged_hint="lower optim.lr")
    run = trainer.train()
    step, seconds = run["steps"], run["seconds"]
    raw.eval()
    after = sutton_test(raw, m)
    log(f"meta-train: after {step} steps ({seconds:.0f}s): reward kept {after['mean_kept']:.3f} vs reset "
        f"{after['mean_reset']:.3f}, Sutton delta {after['sutton_delta']:+.3f} "
        f"[{after['sutton_ci'][0]:+.3f}, {after['sutton_ci'][1]:+.3f}]")
    results = {"before": before, "after": after, "rewards": [h["expected_reward"] for h in run["history"]],
               "steps": step, "seconds": seconds, "processes": world, "parallel": plan.mode,
               "plasticity": plasticity_summary(raw), "plasticity_before": plasticity_summary(base),
               "trainable_parameters": trainable, "config": config_to_dict(cfg)}
    dist_utils.save_final(raw, os.path.join(t.output_dir, "final"), rank)  # gathers under FSDP
    if accelerator.is_main_process:
        with open(os.path.join(t.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    results["model"] = raw
    model.check_inputs = True
    return results


def _main_info(accelerator) -> Callable[[str], None]:
    """``logger.info`` on the main process only (the others would repeat every line)."""
    def info(text: str) -> None:
        if accelerator.is_main_process:
            logger.info(text)
    return info


class MetaGames:
    """The data part of meta-training: per step, ``games_per_step`` fresh games (this process's
    ``games`` rows of them: ``cues, best [G, episodes]``, sampling draws ``u [G, episodes]``) and,
    with ``lm_weight > 0``, a recall batch (its ``recall_rows``: ``x, y, mask [b, T]`` and
    ``n_targets``, the whole batch's count). One generator seeded from ``seed`` on every process,
    so all draw the same games; training seeds never reach the Sutton test's ``eval_seed`` range."""

    def __init__(self, m: MetaSection, seed: int, games: slice, recall_rows: Optional[slice]):
        self.m, self.seed, self.games, self.recall_rows = m, seed, games, recall_rows

    def __iter__(self):
        m = self.m
        gen = torch.Generator().manual_seed(self.seed * 7919)
        while True:
            seed0 = int(torch.randint(0, 2 ** 30, (1,), generator=gen))
            cues, best = make_games(m.games_per_step, m.n_cues, m.n_answers, m.episodes, seed0 % (m.eval_seed // 2))
            u = torch.rand(m.games_per_step, m.episodes, generator=gen)[self.games]
            batch = {"cues": cues[self.games], "best": best[self.games], "u": u}
            if m.lm_weight > 0:
                x, y, mask = recall_batch(m.recall_batch, m.recall_pairs, seed=gen)
                batch.update(x=x[self.recall_rows], y=y[self.recall_rows], mask=mask[self.recall_rows],
                             n_targets=mask.sum().clamp(min=1))
            yield batch


def meta_step_loss(raw, m: MetaSection, answers: torch.Tensor, parallel: Parallel):
    """The loss part of meta-training: ``(model, batch) -> (None, metrics)``; it runs its own
    backward passes (one per TBPTT window, then the recall loss) through ``parallel``.

    The recall loss is this share's sum over its targets divided by the whole batch's count, so the
    processes' averaged gradients are exactly the whole batch's mean-loss gradient; its metric is
    summed over processes (``Trainer(reduce_sum=("recall_loss",))``).
    """
    def loss_fn(model, batch):
        cues, best, u = batch["cues"], batch["best"], batch["u"]
        n_local = cues.shape[0]
        P, b = _zeros_P(raw, n_local), torch.zeros(n_local, device=parallel.device)
        step_R = []
        n_windows = math.ceil(m.episodes / m.tbptt)
        for w0 in range(0, m.episodes, m.tbptt):
            sl = slice(w0, w0 + m.tbptt)
            with parallel.autocast():
                loss, R, P, b = meta_loss_window(raw, P, b, cues[:, sl], best[:, sl], answers, m, u[:, sl])
            parallel.backward(loss / n_windows)
            P, b = [p.detach() for p in P], b.detach()  # truncated backprop between windows
            step_R.append(R)
        lm = torch.zeros((), device=parallel.device)
        if m.lm_weight > 0:
            x, y, mask = batch["x"], batch["y"], batch["mask"]
            with parallel.autocast():
                logits, _ = raw(x, return_state=False)
                lm = F.cross_entropy(logits.float()[mask], y[mask], reduction="sum") / batch["n_targets"].to(logits.device)
            parallel.backward(m.lm_weight * parallel.world * lm)
        return None, {"expected_reward": float(np.mean(step_R)), "recall_loss": lm.detach()}

    return loss_fn


def plasticity_summary(model: PlasticTransformer) -> Dict[str, List[float]]:
    """Per fast layer and head: ``eta_s, eta_r, lam, gamma`` as plain lists (for logs)."""
    out: Dict[str, List[float]] = {}
    for i, layer in enumerate(model.fast_layers()):
        out[f"L{i}.eta_s"] = [round(float(v), 4) for v in layer.eta_s]
        out[f"L{i}.eta_r"] = [round(float(v), 4) for v in layer.eta_r]
        out[f"L{i}.gamma"] = [round(float(v), 4) for v in layer.gamma]
        if layer.lam is not None:
            out[f"L{i}.lam"] = [round(float(v), 4) for v in layer.lam]
    return out
