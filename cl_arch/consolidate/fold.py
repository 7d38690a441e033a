"""fold: ``W0 <- W0 + P``, ``P <- 0``. The exact consolidation.

Every episode starts from ``S0 = W0 + P`` (``FastWeightLayer.initial_state``), so adding a
session's P into W0 and zeroing P leaves ``S0`` and hence every output unchanged: in float32 the
sum is formed by the same single addition either way, so the logits agree bitwise. (A W0 stored
in bf16/fp16 cannot hold the float32 sum; the rounding is reported as ``max_rounding``.)

With a forgetting ``budget`` the fold is guarded: W0 is what every session without this P starts
from, so fold moves only the largest fraction ``c`` of P whose forgetting on ``anchor`` data (the
base model's NLL with ``c P`` in W0, minus without) stays within the budget, and the session keeps
the rest, ``(1 - c) P``. The session still computes exactly what it computed before
(``W0 + c P + (1 - c) P``); what is bounded is the drift everyone else sees.
"""
from __future__ import annotations

import time
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .common import LN2, Batch, as_sources, check_storable, check_vocab, mean_nll, to_batches
from .report import all_or_nothing, new_report, save_w0_and_sessions, write_report


def fold_fraction(model, P: Sequence[torch.Tensor], anchor: List[Batch], budget: float,
                  iters: int = 8) -> Tuple[float, Dict[str, float]]:
    """Largest ``c`` in [0, 1] (to ``2**-iters``) with ``forgetting(c) <= budget`` by bisection.

    ``forgetting(c)``: mean NLL on ``anchor`` (bits/token) of the model whose episodes start from
    ``W0 + c P``, minus that from ``W0``. Forgetting is 0 at ``c = 0``, so ``c = 0`` always fits.

    Args:
        P: one ``[H, K, V]`` tensor per fast layer (the summed sessions' memories).
        anchor: batches (:func:`~cl_arch.consolidate.common.to_batches`) of data the model must
            keep predicting, e.g. its training distribution; never the stream being reported.
    Returns:
        ``(c, {"forgetting_bits_full", "forgetting_bits", "anchor_bits", "evaluations"})``.
    """
    base = mean_nll(model, anchor)
    evals = [0]

    def forgetting(c: float) -> float:
        evals[0] += 1
        return (mean_nll(model, anchor, P=[c * p for p in P]) - base) / LN2

    full = forgetting(1.0)
    if not math.isfinite(full):
        raise ValueError("forgetting with the whole P is not finite; refusing to fold")
    c, at_c = 1.0, full
    if full > budget:
        lo, hi, at_lo = 0.0, 1.0, 0.0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            d = forgetting(mid)
            if d <= budget:
                lo, at_lo = mid, d
            else:
                hi = mid
        c, at_c = lo, at_lo
    return c, {"forgetting_bits_full": full, "forgetting_bits": at_c, "anchor_bits": base / LN2,
               "evaluations": evals[0]}


def fold(model, sessions: Any, out: Optional[str] = None, reset: bool = True, anchor: Any = None,
         budget: Optional[float] = None, batch_size: int = 16) -> Dict[str, Any]:
    """Add the persistent memories of one or more sessions into the base memory W0.

    For each fast layer ``j`` (``W0_j [H, K, V]``, each session's ``P_j [H, K, V]`` or
    ``[1, H, K, V]``): ``W0_j <- W0_j + sum_u P_{u,j}``, summed in float32 (or wider) master
    precision and stored in W0's dtype. Then each session's P is reset to zero (``reset=True``),
    because keeping it would count it twice on top of the new W0.

    With ``budget`` (bits/token of forgetting on ``anchor``), only the fraction ``c`` of the summed
    P that :func:`fold_fraction` finds is added, and each session keeps ``(1 - c)`` of its own P
    (``reset`` then zeroes nothing more): the sessions compute what they computed before, and the
    model without them drifts at most ``budget`` on the anchor data.

    With one session the model without P now computes exactly what it computed with P. With
    several, the base memory holds the sum of their memories (use :func:`merge` to average,
    weight or resolve conflicts).

    Args:
        model: a :class:`~cl_arch.PlasticTransformer`; changed in place.
        sessions: one session or a list (see :mod:`cl_arch.consolidate.common`).
        out: if given, path of the report JSON (undo weights written next to it).
        reset: zero the sessions' P afterwards (with a budget: keep only what was not folded).
        anchor: token data forgetting is measured on (required with ``budget``; see
            :mod:`cl_arch.consolidate.common` for the forms it takes).
        budget: most forgetting allowed on ``anchor``, bits/token; None folds all of P.
        batch_size: anchor sequences per forward pass.

    Returns:
        The report: ``per_layer`` norms of W0 before/after and of the added P, ``max_rounding``,
        ``seconds``, fingerprints, and the replaced W0s for :func:`~cl_arch.consolidate.undo`;
        with a budget also ``fold_fraction`` (c), ``forgetting_bits`` (at c) and
        ``forgetting_bits_full`` (had all of P been folded), measured on the anchor.

    Raises:
        ValueError: a session holds NaN/inf, has wrong shapes, or was recorded for another model
            fingerprint; or a new W0 would not be finite in its dtype (a float16 W0 overflows
            at 65504). Nothing is changed when it raises: every new W0 is computed and checked
            before the first is written, and a failure afterwards (the report file included)
            puts the weights and sessions back.
    """
    t0 = time.perf_counter()
    if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                                   and budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be None or a finite number >= 0 (bits/token), got {budget!r}")
    sources = as_sources(model, sessions)  # all checked before anything changes
    if budget is not None and reset:
        paths = [s.loaded_from for s in sources if s.loaded_from is not None]
        if paths:
            # A path is read into a copy that this call drops: the (1 - c) P the guarded fold leaves to
            # the session would be lost, and the file, still tied to the old weights, no longer loads.
            raise ValueError(f"fold with a budget keeps (1 - c) P in each session, and a session given as a path "
                             f"({paths[0]}) is a copy this call would drop; pass Session.load(model, path) and "
                             "save it after the fold (cl-arch consolidate does), or fold without a budget")
    anchor_b = to_batches(anchor, batch_size, "anchor")
    if budget is not None and not anchor_b:
        raise ValueError("a forgetting budget needs anchor data to measure forgetting on (anchor=...)")
    check_vocab(model, anchor_b, "anchor")
    layers = model.fast_layers()
    totals = []
    for j, m in enumerate(layers):
        total = sources[0].P[j].to(m.state_dtype)
        for s in sources[1:]:
            total = total + s.P[j].to(m.state_dtype)
        totals.append(total)
    c, guard = 1.0, {}
    if budget is not None:
        was_training = model.training
        model.eval()
        try:
            c, guard = fold_fraction(model, totals, anchor_b, float(budget))
        finally:
            model.train(was_training)
    report = new_report("fold", model)
    w0_names = save_w0_and_sessions(report, model, sources)

    per_layer, new_W0 = [], []
    with torch.no_grad():
        for j, m in enumerate(layers):
            master = m.W0.detach().to(m.state_dtype)  # same promotion initial_state uses
            total = totals[j] if c == 1.0 else c * totals[j]
            new = master + total
            stored = new.to(m.W0.dtype)
            check_storable(w0_names[j], new, stored)
            per_layer.append({
                "param": w0_names[j],
                "W0_norm_before": float(master.norm()),
                "P_norm": float(total.norm()),
                "W0_norm_after": float(new.norm()),
                "max_rounding": float((stored.to(new.dtype) - new).abs().max()),
            })
            new_W0.append(stored)
    with all_or_nothing(model, report, sources):
        with torch.no_grad():
            for m, stored in zip(layers, new_W0):
                m.W0.copy_(stored)
        if reset:
            for s in sources:
                if c < 1.0:
                    s.set_P([(1.0 - c) * p for p in s.P])  # what was not folded stays the session's
                else:
                    s.reset_P()
        report.update({
            "sessions": [{"name": s.name, "P_norm": [float(p.norm()) for p in s.P]} for s in sources],
            "sessions_reset": reset,
            "budget": budget,
            "fold_fraction": c,
            **guard,
            "per_layer": per_layer,
            "max_rounding": max(r["max_rounding"] for r in per_layer) if per_layer else 0.0,
            "fingerprint_after": model.fingerprint(),
            "seconds": time.perf_counter() - t0,
        })
        if out is not None:
            write_report(report, out)
    return report
