"""merge: many sessions' persistent memories into W0 at once, with conflicts resolved.

Two rules, both on the per-layer task vectors ``P_u [H, K, V]`` (one per session u) with
non-negative weights ``w_u``:

``"mean"`` (weighted task arithmetic)::

    W0 <- W0 + scale * sum_u w_u P_u / sum_u w_u

``"ties"`` (TIES-merging, Yadav et al. 2023)::

    t_u   = P_u where |P_u| is in the top ``density`` fraction of its own entries, else 0   # trim
    sign  = sign(sum_u w_u t_u)                                                           # elect by mass
    A_u   = (t_u != 0) & (sign(t_u) == sign)                                             # agreeing entries
    W0   <- W0 + scale * sum_u w_u t_u A_u / sum_u w_u A_u   (0 where no session agrees)  # disjoint mean

``"regmean"`` (RegMean, Jin et al. 2023, on the memory read ``o = S^T q``): per layer and head,
the delta whose reads agree best, in least squares, with each session's own P on the queries that
session's data makes (``Q_u``: read queries of its replay, or ``data[u]``, run with its own P)::

    G_u  = w_u Q_u^T Q_u                                      # [H, K, K]
    W0  <- W0 + (sum_u G_u + ridge * mean diag(sum_u G_u) I)^-1 sum_u G_u P_u

Keys of different sessions share directions of the 32-dim key space, so a plain sum lets one
session's memory answer another's queries; RegMean solves for all sessions' reads at once.

The mean dilutes each session by its share of the weight; TIES keeps an entry's full size where
only agreeing sessions wrote it, and drops the minority side of a sign conflict, so disjoint
associations interfere less. Each session's gain before and after is reported (interference).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .common import as_sources, check_storable, check_vocab, forward_logits, gain_figures, mean_nll, to_batches
from .report import all_or_nothing, new_report, save_w0_and_sessions, write_report

METHODS = ("mean", "ties", "regmean")


def _weights(sources, weights) -> List[float]:
    n = len(sources)
    if weights is None:
        return [1.0] * n
    if isinstance(weights, str):
        if weights not in ("count", "reward"):
            raise ValueError(f"weights must be None, 'count', 'reward' or a list of {n} numbers, got {weights!r}")
        attr = "episodes" if weights == "count" else "reward"
        vals = [getattr(s, attr) for s in sources]
        missing = [s.name for s, v in zip(sources, vals) if v is None]
        if missing:
            raise ValueError(f"weights={weights!r}: {missing} do not record their {attr}")
        # A session that lost reward on balance should not be merged with negative weight
        # (that would unlearn its P in everyone's model): it gets weight 0.
        w = [max(float(v), 0.0) for v in vals]
    else:
        w = [float(v) for v in weights]
        if len(w) != n:
            raise ValueError(f"weights has {len(w)} entries for {n} sessions")
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    if sum(w) <= 0:
        raise ValueError(f"weights sum to zero ({w}); nothing to merge")
    return w


def _trim(p: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries of ``p`` largest in magnitude, zero the rest."""
    k = max(1, int(round(density * p.numel())))
    if k >= p.numel():
        return p.clone()
    thresh = p.abs().flatten().kthvalue(p.numel() - k + 1).values
    return torch.where(p.abs() >= thresh, p, torch.zeros_like(p))


def read_grams(model, batches, P) -> List[torch.Tensor]:
    """Per fast layer, ``sum_t q_t q_t^T`` ``[H, K, K]`` (float64) of the unit read queries of every
    position of ``batches`` (positions whose next token is scored when the data has a loss_mask),
    each row run as a fresh episode from ``S0 = W0 + P``."""
    layers = model.fast_layers()
    grams = [torch.zeros(m.n_heads, m.head_k_dim, m.head_k_dim, dtype=torch.float64, device=m.W0.device)
             for m in layers]
    weight: Dict[str, torch.Tensor] = {}

    def recording(j, project):
        # The queries each memory reads with, taken from its own projection as its forward runs:
        # nothing recomputed, and no knowledge of how each kind of memory is called.
        def wrapped(*args, **kwargs):
            out = project(*args, **kwargs)
            q = out[0].double()
            grams[j] += torch.einsum("bt,bthk,bthl->hkl", weight["w"].to(q.device), q, q)
            return out
        return wrapped

    for j, m in enumerate(layers):
        m.project_qkv = recording(j, m.project_qkv)  # an instance attribute, deleted below
    try:
        with torch.no_grad():
            for b in batches:
                w = torch.zeros(b.ids.shape, dtype=torch.float64)
                w[:, :-1] = b.mask[:, 1:].double()  # the read at t predicts token t + 1
                weight["w"] = w
                forward_logits(model, b, P)
    finally:
        for m in layers:
            del m.project_qkv
    return grams


def regmean_delta(Ps: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], w: Sequence[float],
                  ridge: float = 1e-3) -> torch.Tensor:
    """One layer's RegMean delta from task vectors ``Ps`` (``[H, K, V]``) and read Grams ``[H, K, K]``."""
    G = [wu * g.double() for wu, g in zip(w, grams)]
    Gsum = sum(G)
    rhs = sum(g @ p.double() for g, p in zip(G, Ps))
    K = Gsum.shape[-1]
    reg = ridge * Gsum.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
    eye = torch.eye(K, dtype=torch.float64, device=Gsum.device)
    return torch.linalg.solve(Gsum + reg * eye, rhs).to(Ps[0].dtype)


def merge_tensors(Ps: Sequence[torch.Tensor], w: Sequence[float], method: str = "mean",
                  density: float = 0.2, scale: float = 1.0) -> Dict[str, Any]:
    """Merge one layer's task vectors ``Ps`` (each ``[H, K, V]``) -> ``{"delta", figures...}``."""
    wt = torch.tensor(list(w), dtype=Ps[0].dtype, device=Ps[0].device).view(-1, 1, 1, 1)
    stack = torch.stack(list(Ps))  # [U, H, K, V]
    if method == "mean":
        delta = scale * (wt * stack).sum(0) / wt.sum()
        return {"delta": delta}
    trimmed = torch.stack([_trim(p, density) for p in Ps])
    elected = torch.sign((wt * trimmed).sum(0))
    nonzero = trimmed != 0
    agree = nonzero & (torch.sign(trimmed) == elected.unsqueeze(0))
    wa = wt * agree
    num = (wa * trimmed).sum(0)
    den = wa.sum(0)
    delta = scale * torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    written = nonzero.sum(0)
    conflicted = (written > agree.sum(0))  # some session wrote the losing sign here
    return {
        "delta": delta,
        "trimmed_mass": float(1 - trimmed.abs().sum() / stack.abs().sum().clamp_min(1e-30)),
        "conflict_fraction": float(conflicted.sum() / (written > 0).sum().clamp_min(1)),
        "overlap_fraction": float((written > 1).sum() / (written > 0).sum().clamp_min(1)),
    }


def merge(model, sessions: Any, weights: Union[None, str, Sequence[float]] = None, method: str = "mean",
          density: float = 0.2, scale: float = 1.0, probes: Optional[Sequence[Any]] = None,
          out: Optional[str] = None, reset: bool = True, batch_size: int = 32, data: Optional[Sequence[Any]] = None,
          ridge: float = 1e-3) -> Dict[str, Any]:
    """Merge the persistent memories of several sessions into W0.

    Args:
        model: changed in place (each fast layer's ``W0 [H, K, V]``).
        sessions: a list of sessions (see :mod:`cl_arch.consolidate.common`).
        weights: None (equal), ``"count"`` (episodes per session), ``"reward"`` (summed reward,
            negatives count as 0) or one non-negative number per session.
        method: ``"mean"``, ``"ties"`` or ``"regmean"`` (see the module docstring).
        density: fraction of each session's entries TIES keeps (0, 1].
        scale: multiplies the merged task vector (task arithmetic's lambda).
        probes: per session, token data on which its gain is measured (see
            :func:`~cl_arch.consolidate.common.to_batches`); default each session's replay
            buffer. Sessions with neither get no gain figures.
        out: path of the report JSON (undo weights next to it).
        reset: zero the sessions' P afterwards (their content now lives in W0).
        data: for ``"regmean"``, per session, the token data whose read queries its P must keep
            answering (every position, or those before a scored token); default each session's
            replay buffer. The probes are kept for measuring.
        ridge: ``"regmean"``'s ridge, relative to the mean diagonal of the summed Gram.

    Returns:
        The report. ``sessions[u]`` holds ``weight``, ``gain_nats`` (NLL without P minus with P,
        on the original model), ``nll_after`` (merged model, P = 0) and ``gain_retained``
        (kept / gain; 1 - retained is the interference this merge cost that session);
        ``cosine`` is the matrix of cosine similarities between the sessions' flattened P.

    Raises:
        ValueError: bad arguments, a session with NaN/inf or from another model fingerprint, or a
            merged W0 that is not finite (in float32 or in W0's own dtype). Nothing is changed when
            it raises: every layer's new W0 is computed and checked before the first is written,
            and a failure afterwards (measuring, the report file) puts the weights, the sessions
            and the model's training flag back.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not (isinstance(ridge, (int, float)) and ridge > 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a positive number, got {ridge!r}")
    sources = as_sources(model, sessions)
    w = _weights(sources, weights)
    fit_batches = None
    if method == "regmean":
        if data is not None and len(data) != len(sources):
            raise ValueError(f"data must hold one entry per session ({len(sources)}), got {len(data)}")
        fit_batches = []
        for u, s in enumerate(sources):
            b = to_batches(data[u] if data is not None else s.replay(), batch_size, what=f"data[{u}]")
            if not b:
                raise ValueError(f"regmean: session {u} has no data to take read queries from "
                                 "(pass data=... or sessions with a replay buffer)")
            check_vocab(model, b, f"data[{u}]")
            fit_batches.append(b)
    if probes is not None and len(probes) != len(sources):
        raise ValueError(f"probes must hold one entry per session ({len(sources)}), got {len(probes)}")
    probe_batches = []
    for u, s in enumerate(sources):
        b = to_batches(probes[u] if probes is not None else s.replay(), batch_size, what=f"probes[{u}]")
        check_vocab(model, b, f"probes[{u}]")
        probe_batches.append(b)

    was_training = model.training
    model.eval()
    try:
        return _merge(model, sources, w, method, density, scale, ridge, reset, out, fit_batches, probe_batches, t0)
    finally:
        model.train(was_training)


def _merge(model, sources, w, method, density, scale, ridge, reset, out, fit_batches, probe_batches, t0):
    # Gains before: the original model without P and with each session's own P.
    before = []
    for s, b in zip(sources, probe_batches):
        before.append(None if not b else (mean_nll(model, b), mean_nll(model, b, P=s.P)))

    report = new_report("merge", model)
    layers = model.fast_layers()
    w0_names = save_w0_and_sessions(report, model, sources)

    # Every layer's new W0 is computed and checked before the first is written: a merge that
    # fails half-way must not leave some layers merged.
    per_layer, new_W0 = [], []
    grams = None
    if method == "regmean":  # every session's read queries, on the original weights with its own P
        grams = [read_grams(model, b, s.P) for s, b in zip(sources, fit_batches)]
    with torch.no_grad():
        for j, m in enumerate(layers):
            Ps = [s.P[j].to(m.state_dtype) for s in sources]
            if method == "regmean":
                res = {"delta": scale * regmean_delta(Ps, [g[j] for g in grams], w, ridge)}
            else:
                res = merge_tensors(Ps, w, method, density, scale)
            delta = res.pop("delta")
            if not bool(torch.isfinite(delta).all()):
                raise ValueError(f"{w0_names[j]}: the merged delta ({method}, scale={scale}) holds "
                                 f"{int((~torch.isfinite(delta)).sum())} non-finite entries; nothing was changed")
            new = m.W0.detach().to(m.state_dtype) + delta
            stored = new.to(m.W0.dtype)
            check_storable(w0_names[j], new, stored)
            res.update({"param": w0_names[j], "delta_norm": float(delta.norm()),
                        "max_rounding": float((stored.to(new.dtype) - new).abs().max())})
            per_layer.append(res)
            new_W0.append(stored)
        flat = torch.stack([torch.cat([p.flatten().double() for p in s.P]) for s in sources])
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cosine = (unit @ unit.T).tolist()

    with all_or_nothing(model, report, sources):
        with torch.no_grad():
            for m, stored in zip(layers, new_W0):
                m.W0.copy_(stored)
        per_session = []
        for u, (s, b, bf) in enumerate(zip(sources, probe_batches, before)):
            entry: Dict[str, Any] = {"name": s.name, "weight": w[u], "P_norm": [float(p.norm()) for p in s.P]}
            if bf is not None:
                entry.update(gain_figures(bf[0], bf[1], mean_nll(model, b)))
            per_session.append(entry)
        if reset:
            for s in sources:
                s.reset_P()

        retained = [e["gain_retained"] for e in per_session if "gain_retained" in e]
        report.update({
            "merge_method": method, "density": density if method == "ties" else None, "scale": scale,
            "ridge": ridge if method == "regmean" else None,
            "weights": w, "sessions": per_session, "sessions_reset": reset, "per_layer": per_layer,
            "cosine": cosine,
            "min_gain_retained": min(retained) if retained else None,
            "mean_gain_retained": sum(retained) / len(retained) if retained else None,
            "fingerprint_after": model.fingerprint(),
            "seconds": time.perf_counter() - t0,
        })
        if out is not None:
            write_report(report, out)
    return report
