"""distill: move what a session's P holds into the other slow weights, so the fast memory is freed.

Teacher: the model with the session's ``P`` (every episode starts at ``S0 = W0 + P``).
Student: the same model with ``P = 0``, whose MLP and projection weights are trained.
Original: the model as it was, without P (what the anchor data must keep)::

    loss = KL(teacher || student) on replay tokens + anchor_weight * KL(original || student) on anchor tokens

Both KL terms are averaged over the positions that predict a scored token (every token unless the
data carries a ``loss_mask``), so an anchor mask such as associative recall's "value of a key seen
before" keeps the in-context skill without pinning first-occurrence guesses the session changes.

Teacher and original are fixed, so their log-probabilities are computed once; the student runs
through ``torch.func.functional_call`` with float32 master copies of the trained weights (cast to
the model's dtype for the forward), so the model itself is only written at the end. With
``rank=r`` each trained matrix ``W [out, in]`` learns a low-rank delta ``B [out, r] @ A [r, in]``
(B starts at zero, as in LoRA) that is merged into W at the end.

After training the new weights are written into the model and measured there: gain retained on
the probes and forgetting on the anchor data (bits/token, absolute and relative to the original).
The result is rolled back (the replaced weights copied back from the report's undo tensors,
bitwise, the fingerprint checked; the session's P kept; the report says ``rolled_back: true`` and
why in ``rollback_reason``) when forgetting exceeds ``budget``, and whatever the budget when the
optimisation diverged: a non-finite loss or activation during training, non-finite weights, or a
non-finite NLL or forgetting after it. An exception at any point leaves the model (weights and
training flag), the session and the report files as they were.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..training import Trainer
from .common import LN2, Batch, as_sources, check_vocab, forward_logits, gain_figures, mean_nll, to_batches
from .report import all_or_nothing, new_report, restore_params, save_params, save_session_P, write_report


def default_trainable(model) -> List[str]:
    """Names of the weights distill trains by default: every ``*_proj.weight`` (attention and
    fast-weight q/k/v/o/gate/beta/decay projections, MLP gate/up/down). Embeddings, norms, W0 and
    the plasticity settings stay fixed: W0 is fold's business, and the embedding is shared by
    every token of every task."""
    return [n for n, p in model.named_parameters() if n.endswith("_proj.weight") and p.dim() == 2]


def _select(model, params: Union[None, str, Sequence[str]]) -> List[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = default_trainable(model)
    elif params == "all":
        names = [n for n, p in named.items() if p.dtype.is_floating_point]
    elif isinstance(params, str):
        raise ValueError(f"params must be None, 'all' or a list of parameter names/substrings, got {params!r}")
    else:
        names = [n for n in named if any(n == s or s in n for s in params)]
    if not names:
        raise ValueError(f"params={params!r} selects no parameter of this model")
    return names


def _kl(p_logp: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``KL(p || q)`` over the positions whose next token is scored.

    ``p_logp [b, T, V]`` log-probs, ``q_logits [b, T, V]``, ``mask [b, T]`` (token t scored from
    position t - 1, see :class:`~cl_arch.consolidate.common.Batch`).
    """
    pos = mask[:, 1:].to(q_logits.device)
    if not bool(pos.any()):
        return q_logits.sum() * 0.0
    q_logp = F.log_softmax(q_logits[:, :-1][pos].float(), dim=-1)
    p = p_logp[:, :-1][pos]
    return (p.exp() * (p - q_logp)).sum(-1).mean()


def distill(model, session: Any, replay: Any = None, anchor: Any = None, budget: Optional[float] = None,
            steps: int = 200, lr: float = 1e-3, rank: Optional[int] = None, anchor_weight: float = 1.0,
            probes: Any = None, params: Union[None, str, Sequence[str]] = None, batch_size: int = 16,
            weight_decay: float = 0.0, seed: int = 0, out: Optional[str] = None, reset: bool = True,
            progress: bool = False) -> Dict[str, Any]:
    """Distill one session's persistent memory into the model's slow weights.

    Args:
        model: changed in place (unless rolled back).
        session: one session (see :mod:`cl_arch.consolidate.common`).
        replay: token data the teacher and student are matched on; default the session's replay
            buffer (recent episodes chosen by reward and surprise).
        anchor: token data on which the student must stay close to the original model and on
            which forgetting is measured. Required when ``budget`` is given.
        budget: most forgetting allowed, in bits/token on the anchor data (student NLL minus
            original NLL); above it the weights are restored. None: no check.
        steps, lr, weight_decay: Adam(W) optimisation of the float32 masters.
        rank: None trains the weights themselves; an int r trains rank-r deltas merged at the end.
        anchor_weight: weight of the anchor KL.
        probes: token data on which the session's gain is measured (default: ``replay``);
            give a ``loss_mask`` to score only the tokens the session's memory is about.
        params: which weights to train: None (:func:`default_trainable`), ``"all"``, or names or
            name substrings.
        batch_size: sequences per step (replay and anchor each).
        seed: for batch order and the low-rank init.
        out: path of the report JSON (undo weights next to it).
        reset: zero the session's P when the result is kept (the memory is freed).
        progress: show a tqdm bar.

    Returns:
        The report: ``gain`` (:func:`~cl_arch.consolidate.common.gain_figures` on the probes,
        with ``gain_retained`` the fraction of the session's gain that survives P reset),
        ``forgetting_bits`` and ``forgetting_relative`` on the anchor data, ``rolled_back`` and
        ``rollback_reason`` (None when the result is kept), ``steps``, ``seconds`` and the loss
        curve.

    Raises:
        ValueError: bad arguments, no replay data, a session with NaN/inf or from another
            model fingerprint, or a model whose figures are non-finite before training. Nothing
            is changed when it raises (nor when anything else raises).
    """
    t0 = time.perf_counter()
    for name, v, lo in (("steps", steps, 0), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be None or a positive integer, got {rank!r}")
    if budget is not None and not (isinstance(budget, (int, float)) and budget >= 0 and not math.isnan(budget)):
        raise ValueError(f"budget must be None or a number >= 0 (bits/token), got {budget!r}")
    if not (isinstance(anchor_weight, (int, float)) and anchor_weight >= 0):
        raise ValueError(f"anchor_weight must be >= 0, got {anchor_weight!r}")
    sources = as_sources(model, session)
    if len(sources) != 1:
        raise ValueError(f"distill takes one session, got {len(sources)}; fold or merge several first")
    src = sources[0]
    replay_b = to_batches(replay if replay is not None else src.replay(), batch_size, "replay")
    if not replay_b:
        raise ValueError("distill needs replay data: pass replay=... or a session whose replay buffer is not empty")
    anchor_b = to_batches(anchor, batch_size, "anchor")
    if budget is not None and not anchor_b:
        raise ValueError("a forgetting budget needs anchor data to measure forgetting on")
    probe_b = to_batches(probes, batch_size, "probes") if probes is not None else replay_b
    for what, b in (("replay", replay_b), ("anchor", anchor_b), ("probes", probe_b)):
        check_vocab(model, b, what)
    names = _select(model, params)
    named = dict(model.named_parameters())
    if rank is not None:
        bad = [n for n in names if named[n].dim() != 2]
        if bad:
            raise ValueError(f"rank={rank} needs matrices; {bad} are not 2-D (pass params=...)")

    was_training = model.training
    model.eval()  # deterministic teacher and student (no dropout)
    try:
        return _distill(model, src, names, named, replay_b, anchor_b, probe_b, budget, steps, lr, rank,
                        anchor_weight, weight_decay, seed, out, reset, progress, t0)
    finally:
        model.train(was_training)


class _Diverged(Exception):
    """The student's optimisation diverged (the message says where): the result is rolled back."""


class _Pairs:
    """The data part of distillation: per step a replay batch index and an anchor batch index
    (None without anchor data), drawn from one generator seeded ``seed``."""

    def __init__(self, n_replay: int, n_anchor: int, seed: int):
        self.n_replay, self.n_anchor, self.seed = n_replay, n_anchor, seed

    def __iter__(self):
        order = torch.Generator().manual_seed(self.seed)
        while True:
            i = int(torch.randint(self.n_replay, (1,), generator=order))
            yield i, (int(torch.randint(self.n_anchor, (1,), generator=order)) if self.n_anchor else None)


def _student_loss(model, effective, replay_b, anchor_b, teacher, original, anchor_weight, steps, curve):
    """The loss part of distillation: ``KL(teacher || student)`` on the replay batch plus
    ``anchor_weight * KL(original || student)`` on the anchor batch, through the student weights
    ``effective()``; raises :class:`_Diverged` on non-finite activations or loss, and appends to
    ``curve`` every 10 steps and at the last."""
    step = [0]

    def loss_fn(_, pair):
        (i, k), n = pair, step[0]
        rb = replay_b[i]
        params_now = effective()
        try:
            if k is not None and anchor_b[k].ids.shape[1] == rb.ids.shape[1]:
                # Equal lengths: one forward over both batches halves the per-step cost.
                both = Batch(torch.cat([rb.ids, anchor_b[k].ids]), torch.cat([rb.mask, anchor_b[k].mask]))
                logits = forward_logits(model, both, params=params_now)
                loss_r = _kl(teacher[i], logits[:rb.ids.shape[0]], rb.mask)
                loss_a = _kl(original[k], logits[rb.ids.shape[0]:], anchor_b[k].mask)
            else:
                loss_r = _kl(teacher[i], forward_logits(model, rb, params=params_now), rb.mask)
                loss_a = torch.zeros(())
                if k is not None:
                    loss_a = _kl(original[k], forward_logits(model, anchor_b[k], params=params_now),
                                 anchor_b[k].mask)
        except ValueError as e:
            # The data was checked above, so what the forward refuses now (NaN/inf activations)
            # comes from the student's weights: the optimisation diverged.
            raise _Diverged(f"training diverged at step {n} (non-finite activations: {e})") from e
        loss = loss_r + anchor_weight * loss_a
        if not bool(torch.isfinite(loss.detach())):
            raise _Diverged(f"training diverged at step {n}: non-finite loss ({float(loss.detach())})")
        kl_r, kl_a = float(loss_r.detach()), float(loss_a.detach())
        if n % 10 == 0 or n == steps - 1:
            curve.append({"step": n, "kl_replay": kl_r, "kl_anchor": kl_a})
        step[0] += 1
        return loss, {"kl_replay": kl_r, "kl_anchor": kl_a}

    return loss_fn


def _distill(model, src, names, named, replay_b, anchor_b, probe_b, budget, steps, lr, rank,
             anchor_weight, weight_decay, seed, out, reset, progress, t0) -> Dict[str, Any]:
    P = src.P
    with torch.no_grad():
        teacher = [F.log_softmax(forward_logits(model, b, P).float(), -1) for b in replay_b]
        original = [F.log_softmax(forward_logits(model, b).float(), -1) for b in anchor_b]
        nll_base, nll_with_P = mean_nll(model, probe_b), mean_nll(model, probe_b, P=P)
        anchor_before = mean_nll(model, anchor_b) if anchor_b else None
    before = [nll_base, nll_with_P] + ([] if anchor_before is None else [anchor_before])
    if not all(math.isfinite(x) for x in before) or not all(bool(torch.isfinite(t).all()) for t in teacher):
        raise ValueError(f"distill: the model gives non-finite figures before any training (NLL without P "
                         f"{nll_base}, with P {nll_with_P}, anchor {anchor_before}): nothing sound to distill; "
                         "nothing was changed")

    report = new_report("distill", model)
    save_params(report, model, names)
    save_session_P(report, src.index, P)

    # Float32 masters (wider if the model is float64); the forward sees them in the model's dtype.
    g = torch.Generator().manual_seed(seed)
    base = {n: named[n].detach() for n in names}
    mdt = {n: torch.promote_types(named[n].dtype, torch.float32) for n in names}
    if rank is None:
        masters = {n: base[n].to(mdt[n]).clone().requires_grad_(True) for n in names}
        trainable = list(masters.values())
    else:
        lora = {}
        for n in names:
            out_f, in_f = base[n].shape
            r = min(rank, out_f, in_f)
            A = (torch.randn(r, in_f, generator=g, dtype=mdt[n]) / math.sqrt(in_f)).to(base[n].device)
            lora[n] = (A.requires_grad_(True), torch.zeros(out_f, r, dtype=mdt[n], device=base[n].device,
                                                              requires_grad=True))
        trainable = [t for pair in lora.values() for t in pair]

    def effective() -> Dict[str, torch.Tensor]:
        if rank is None:
            return {n: masters[n].to(base[n].dtype) for n in names}
        return {n: (base[n].to(mdt[n]) + lora[n][1] @ lora[n][0]).to(base[n].dtype) for n in names}

    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    curve: List[Dict[str, float]] = []
    student_loss = _student_loss(model, effective, replay_b, anchor_b, teacher, original, anchor_weight, steps, curve)
    reason: Optional[str] = None  # why the result is not kept; None: kept
    try:
        Trainer(model, opt, _Pairs(len(replay_b), len(anchor_b) if anchor_b and anchor_weight > 0 else 0, seed + 1),
                student_loss, grad_clip=1.0, clip_params=trainable, max_steps=steps, name="distill",
                progress=progress, train_mode=lambda m: None,
                postfix=lambda mt, _: {k: f"{v:.4f}" for k, v in mt.items() if k != "loss"}).train()
    except _Diverged as e:
        reason = str(e)

    final = None
    if reason is None:
        with torch.no_grad():
            final = {n: t.detach() for n, t in effective().items()}
        bad = [n for n in names if not bool(torch.isfinite(final[n]).all())]
        if bad:
            listed = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            reason = f"training produced non-finite weights in {len(bad)} parameters ({listed})"

    # Write the result into the model and measure it there (what a caller will actually use).
    nll_after, anchor_after, forgetting = float("nan"), None, None
    with all_or_nothing(model, report, [src]):
        if reason is None:
            with torch.no_grad():
                for n in names:
                    named[n].copy_(final[n])
                try:
                    nll_after = mean_nll(model, probe_b)
                    anchor_after = mean_nll(model, anchor_b) if anchor_b else None
                except ValueError as e:  # as in training: finite weights, non-finite activations
                    reason = f"the trained weights give non-finite activations ({e})"
        if reason is None:
            forgetting = None if anchor_after is None else (anchor_after - anchor_before) / LN2
            # NaN compares False with everything: a diverged student must fail explicitly.
            if not math.isfinite(nll_after) or (forgetting is not None and not math.isfinite(forgetting)):
                reason = (f"non-finite figures after training (NLL on the probes {nll_after}, "
                          f"forgetting {forgetting} bits/token)")
            elif budget is not None and forgetting > budget:
                reason = f"forgetting {forgetting:.4g} bits/token exceeds the budget of {budget}"
        rolled_back = reason is not None
        if rolled_back:
            restore_params(model, report)
        fp_after = model.fingerprint()
        if rolled_back and fp_after != report["fingerprint_before"]:
            raise RuntimeError("distill: rollback did not restore the original weights")  # cannot happen: bitwise copy
        if reset and not rolled_back:
            src.reset_P()
        gain = gain_figures(nll_base, nll_with_P, nll_after)
        report.update({
            "session": src.name,
            "gain": gain,
            "gain_retained": gain["gain_retained"],
            "anchor_bits_before": None if anchor_before is None else anchor_before / LN2,
            "anchor_bits_after": None if anchor_after is None else anchor_after / LN2,
            "forgetting_bits": forgetting,
            "forgetting_relative": None if forgetting is None else forgetting / (anchor_before / LN2),
            "budget_bits": budget,
            "rolled_back": rolled_back,
            "rollback_reason": reason,
            "session_reset": reset and not rolled_back,
            "params_trained": names, "rank": rank, "steps": steps, "lr": lr, "anchor_weight": anchor_weight,
            "replay_sequences": sum(b.ids.shape[0] for b in replay_b),
            "anchor_sequences": sum(b.ids.shape[0] for b in anchor_b),
            "curve": curve,
            "fingerprint_after": fp_after,
            "seconds": time.perf_counter() - t0,
        })
        if out is not None:
            write_report(report, out)
    return report
