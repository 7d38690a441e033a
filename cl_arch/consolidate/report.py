"""Consolidation reports: the dict every consolidation returns, its JSON file, and undo.

A report is a plain dict. Besides the figures it records the model fingerprint before and after,
the names of the parameters that were replaced, and (under the private key ``"_undo"``) the
replaced tensors themselves plus the sessions' ``P`` as they were before the call. Writing the
report with :func:`write_report` puts the JSON at ``path`` and the tensors in a safetensors file
next to it (``<stem>.undo.safetensors``), named in the JSON as ``"undo_file"`` (relative to the
JSON's folder, so the pair can be moved together). :func:`undo` restores from either form.

Undo tensor names: ``"param/<parameter name>"`` for model weights (saved in their own dtype, so
the restore is bitwise) and ``"session/<i>/P/<j>"`` for fast layer ``j`` of session ``i``.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..io import atomic_write, write_json

UNDO_KEY = "_undo"
PARAM_PREFIX = "param/"
SESSION_PREFIX = "session/"


def new_report(method: str, model) -> Dict[str, Any]:
    """Start a report for ``method`` on ``model`` (records the fingerprint before any change)."""
    from .. import __version__

    return {
        "method": method,
        "cl_arch_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint_before": model.fingerprint(),
        "fingerprint_after": None,
        "params_replaced": [],
        "rolled_back": False,
        "undo_file": None,
        UNDO_KEY: {},
    }


def save_params(report: Dict[str, Any], model, names: Sequence[str]) -> None:
    """Copy the current values of parameters ``names`` into the report (before replacing them)."""
    params = dict(model.named_parameters())
    for name in names:
        report[UNDO_KEY][PARAM_PREFIX + name] = params[name].detach().clone()
    report["params_replaced"] = sorted(set(report["params_replaced"]) | set(names))


def save_session_P(report: Dict[str, Any], index: int, P: Sequence[torch.Tensor]) -> None:
    """Keep session ``index``'s persistent memories (one ``[H, K, V]`` per fast layer)."""
    for j, p in enumerate(P):
        report[UNDO_KEY][f"{SESSION_PREFIX}{index}/P/{j}"] = p.detach().clone()


def save_w0_and_sessions(report: Dict[str, Any], model, sources) -> List[str]:
    """Before writing into W0: keep every fast layer's W0 and each source session's P for undo.

    Returns the parameter names of the W0s, in fast-layer order.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    w0_names = [names[id(m.W0)] for m in model.fast_layers()]
    save_params(report, model, w0_names)
    for s in sources:
        save_session_P(report, s.index, s.P)
    return w0_names


def _jsonable(x: Any) -> Any:
    """Figures to JSON: tensors to lists, non-finite floats to strings (JSON has no NaN/inf)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def undo_path_for(json_path: Union[str, os.PathLike]) -> str:
    """``dir/name.json -> dir/name.undo.safetensors``."""
    json_path = os.fspath(json_path)
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    return stem + ".undo.safetensors"


def write_report(report: Dict[str, Any], path: Union[str, os.PathLike]) -> str:
    """Write ``report`` as JSON at ``path`` and its undo tensors next to it; returns ``path``.

    The undo file goes first and the JSON last, so a JSON on disk always has its tensors.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in report.get(UNDO_KEY, {}).items()}
    undo_file = undo_path_for(path)
    atomic_write(undo_file, lambda p: save_file(tensors, p, metadata={
        "fingerprint_before": str(report.get("fingerprint_before")),
        "fingerprint_after": str(report.get("fingerprint_after"))}))
    report["undo_file"] = os.path.basename(undo_file)
    public = {k: v for k, v in report.items() if k != UNDO_KEY}
    return write_json(path, _jsonable(public), sort_keys=True)


def load_report(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a report written by :func:`write_report`, with its undo tensors under ``"_undo"``."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    with open(path) as f:
        report = json.load(f)
    if not isinstance(report, dict) or "fingerprint_before" not in report:
        raise ValueError(f"{path} is not a consolidation report")
    undo_file = report.get("undo_file")
    if undo_file is None:
        raise ValueError(f"report {path} names no undo file")
    undo_file = os.path.join(os.path.dirname(os.path.abspath(path)), undo_file)
    if not os.path.isfile(undo_file):
        raise FileNotFoundError(f"undo weights of report {path} are missing: {undo_file}")
    report[UNDO_KEY] = load_file(undo_file)
    return report


def undo(model, report: Union[Dict[str, Any], str, os.PathLike], sessions: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """Put back the weights a consolidation replaced, bitwise; optionally the sessions' ``P`` too.

    Args:
        model: the model the consolidation changed, in its current state (its fingerprint must
            be the report's ``fingerprint_after``, so an undo never lands on another model).
        report: the dict a consolidation returned, or the path of its JSON file.
        sessions: the sessions passed to the consolidation, in the same order. fold and merge
            reset each session's ``P`` to zero (it now lives in W0; keeping it would count it
            twice); distill resets it when it succeeds. Passing the sessions here restores their
            ``P`` as well; without them only the model is restored.

    Returns:
        ``{"fingerprint": ..., "params_restored": [...], "sessions_restored": n}``.

    Raises:
        ValueError: the model is not the one the report left behind, or the report lacks the
            tensors it needs. Nothing is changed when it raises.
    """
    from .common import as_source

    if not isinstance(report, dict):
        report = load_report(report)
    tensors = report.get(UNDO_KEY)
    if tensors is None:
        if report.get("undo_file") is None:
            raise ValueError("report holds no undo tensors and names no undo file")
        raise ValueError("report was read without its undo tensors; pass the JSON path to undo()")
    current = model.fingerprint()
    if current != report.get("fingerprint_after"):
        raise ValueError(f"undo: model fingerprint {current} is not the one this {report.get('method')} "
                         f"left ({report.get('fingerprint_after')}); refusing to restore onto another model")

    params = dict(model.named_parameters())
    restore = {}
    for key, t in tensors.items():
        if not key.startswith(PARAM_PREFIX):
            continue
        name = key[len(PARAM_PREFIX):]
        if name not in params:
            raise ValueError(f"undo: report replaced {name!r}, which this model does not have")
        if params[name].shape != t.shape or params[name].dtype != t.dtype:
            raise ValueError(f"undo: saved {name} is {t.dtype}{tuple(t.shape)}, the model's "
                             f"{params[name].dtype}{tuple(params[name].shape)}")
        restore[name] = t
    sources = []
    if sessions is not None:
        for i, s in enumerate(sessions):
            P = [tensors.get(f"{SESSION_PREFIX}{i}/P/{j}") for j in range(len(model.fast_layers()))]
            if any(p is None for p in P):
                raise ValueError(f"undo: report holds no saved P for session {i}")
            sources.append((as_source(model, s, check_fingerprint=False), P))

    with torch.no_grad():
        for name, t in restore.items():
            params[name].copy_(t.to(params[name].device))
    for src, P in sources:
        src.set_P(P)
    fp = model.fingerprint()
    if fp != report["fingerprint_before"]:
        # Only possible if the report was edited: the copy above is exact.
        raise RuntimeError(f"undo: restored model has fingerprint {fp}, expected {report['fingerprint_before']}")
    return {"fingerprint": fp, "params_restored": sorted(restore), "sessions_restored": len(sources)}
