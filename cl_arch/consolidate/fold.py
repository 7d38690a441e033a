"""fold: ``W0 <- W0 + P``, ``P <- 0``. The exact consolidation.

Every episode starts from ``S0 = W0 + P`` (``FastWeightLayer.initial_state``), so adding a
session's P into W0 and zeroing P leaves ``S0`` and hence every output unchanged: in float32 the
sum is formed by the same single addition either way, so the logits agree bitwise. (A W0 stored
in bf16/fp16 cannot hold the float32 sum; the rounding is reported as ``max_rounding``.)
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch

from .common import as_sources, check_storable
from .report import all_or_nothing, new_report, save_w0_and_sessions, write_report


def fold(model, sessions: Any, out: Optional[str] = None, reset: bool = True) -> Dict[str, Any]:
    """Add the persistent memories of one or more sessions into the base memory W0.

    For each fast layer ``j`` (``W0_j [H, K, V]``, each session's ``P_j [H, K, V]`` or
    ``[1, H, K, V]``): ``W0_j <- W0_j + sum_u P_{u,j}``, summed in float32 (or wider) master
    precision and stored in W0's dtype. Then each session's P is reset to zero (``reset=True``),
    because keeping it would count it twice on top of the new W0.

    With one session the model without P now computes exactly what it computed with P. With
    several, the base memory holds the sum of their memories (use :func:`merge` to average,
    weight or resolve conflicts).

    Args:
        model: a :class:`~cl_arch.PlasticTransformer`; changed in place.
        sessions: one session or a list (see :mod:`cl_arch.consolidate.common`).
        out: if given, path of the report JSON (undo weights written next to it).
        reset: zero the sessions' P afterwards.

    Returns:
        The report: ``per_layer`` norms of W0 before/after and of the added P, ``max_rounding``,
        ``seconds``, fingerprints, and the replaced W0s for :func:`~cl_arch.consolidate.undo`.

    Raises:
        ValueError: a session holds NaN/inf, has wrong shapes, or was recorded for another model
            fingerprint; or a new W0 would not be finite in its dtype (a float16 W0 overflows
            at 65504). Nothing is changed when it raises: every new W0 is computed and checked
            before the first is written, and a failure afterwards (the report file included)
            puts the weights and sessions back.
    """
    t0 = time.perf_counter()
    sources = as_sources(model, sessions)  # all checked before anything changes
    report = new_report("fold", model)
    layers = model.fast_layers()
    w0_names = save_w0_and_sessions(report, model, sources)

    per_layer, new_W0 = [], []
    with torch.no_grad():
        for j, m in enumerate(layers):
            master = m.W0.detach().to(m.state_dtype)  # same promotion initial_state uses
            total = sources[0].P[j].to(m.state_dtype)
            for s in sources[1:]:
                total = total + s.P[j].to(m.state_dtype)
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
                s.reset_P()
        report.update({
            "sessions": [{"name": s.name, "P_norm": [float(p.norm()) for p in s.P]} for s in sources],
            "sessions_reset": reset,
            "per_layer": per_layer,
            "max_rounding": max(r["max_rounding"] for r in per_layer) if per_layer else 0.0,
            "fingerprint_after": model.fingerprint(),
            "seconds": time.perf_counter() - t0,
        })
        if out is not None:
            write_report(report, out)
    return report
