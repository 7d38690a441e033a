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
import struct
import time
import uuid
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Union

import torch

from ..io import atomic_write_many, reading, text_writer

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

    Both files are prepared first and then moved into place as one journaled commit
    (:func:`cl_arch.io.atomic_write_many`); if anything raises, a report pair already at ``path``
    is left as it was, and a kill -9 at any moment leaves the old pair or the new one
    (tests/test_faults.py). Both also carry one ``undo_pair_id``, which :func:`load_report`
    checks, so a pair assembled by hand from two writes is refused.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in report.get(UNDO_KEY, {}).items()}
    undo_file = undo_path_for(path)
    public = {k: v for k, v in report.items() if k != UNDO_KEY}
    public["undo_file"] = os.path.basename(undo_file)
    # Both files carry the same random id, so load_report can tell (and refuse) a JSON paired with
    # another write's undo weights (copied by hand) instead of undoing with the wrong weights.
    public["undo_pair_id"] = uuid.uuid4().hex
    text = json.dumps(_jsonable(public), indent=2, sort_keys=True) + "\n"  # fails before any file is touched

    atomic_write_many([
        (undo_file, lambda p: save_file(tensors, p, metadata={
            "fingerprint_before": str(report.get("fingerprint_before")),
            "fingerprint_after": str(report.get("fingerprint_after")),
            "undo_pair_id": public["undo_pair_id"]})),
        (path, text_writer(text)),
    ])
    report["undo_file"] = public["undo_file"]
    return path


def load_report(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a report written by :func:`write_report`, with its undo tensors under ``"_undo"``.

    Both files are read in one hold of the report's lock (:func:`cl_arch.io.reading`, after
    finishing a write_report that a crash interrupted), and the undo file once, its pair id and
    tensors from the same bytes: a concurrent ``write_report`` is seen whole or not at all.

    Raises:
        FileNotFoundError: the report or its undo weights are missing.
        ValueError: not a report, corrupt undo weights, or a report and undo weights of two
            different writes (the files are named).
    """
    from safetensors.torch import load as load_tensors

    path = os.fspath(path)
    with reading(path):
        with open(path) as f:
            report = json.load(f)
        if not isinstance(report, dict) or "fingerprint_before" not in report:
            raise ValueError(f"{path} is not a consolidation report")
        undo_file = report.get("undo_file")
        if undo_file is None:
            raise ValueError(f"report {path} names no undo file")
        if not isinstance(undo_file, str) or os.path.basename(undo_file) != undo_file or undo_file in ("", ".", ".."):
            # the report is untrusted input: its undo weights sit beside it, nowhere else
            raise ValueError(f"report {path}: undo_file must be a file name beside the report, got {undo_file!r}")
        undo_file = os.path.join(os.path.dirname(os.path.abspath(path)), undo_file)
        if not os.path.isfile(undo_file):
            raise FileNotFoundError(f"undo weights of report {path} are missing: {undo_file}")
        with open(undo_file, "rb") as f:
            data = f.read()
    pair = report.get("undo_pair_id")
    if pair is not None:  # reports written before the pair id have none to check
        found = _safetensors_metadata(data, undo_file).get("undo_pair_id")
        if found != pair:
            raise ValueError(f"report {path} and its undo weights {undo_file} come from different writes "
                             f"(pair id {pair} vs {found}; a crash between their two renames?): refusing "
                             "to undo with weights that are not this report's")
    try:
        report[UNDO_KEY] = load_tensors(data)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"corrupt undo weights {undo_file}: {e}") from e
    return report


def _safetensors_metadata(data: bytes, source: str) -> Dict[str, str]:
    """The ``__metadata__`` map of a safetensors file's bytes."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise ValueError(f"header of {n} bytes in a file of {len(data)}")
        meta = json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise TypeError("__metadata__ is not an object")
        return meta
    except (struct.error, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"corrupt undo weights {source}: unreadable safetensors header ({e})") from e


def restore_params(model, report: Dict[str, Any]) -> None:
    """Copy every parameter the report replaced back from its undo tensors (bitwise)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in report[UNDO_KEY].items():
            if key.startswith(PARAM_PREFIX):
                p = params[key[len(PARAM_PREFIX):]]
                p.copy_(t.to(p.device))


@contextmanager
def all_or_nothing(model, report: Dict[str, Any], sources) -> Iterator[None]:
    """The changing part of a consolidation: if it raises, the replaced weights (from the
    report's undo tensors, saved before any change) and every session (as it was on entry,
    episode in progress included) are put back before the exception propagates."""
    snaps = [s.snapshot() for s in sources]
    try:
        yield
    except BaseException:
        restore_params(model, report)
        for s, snap in zip(sources, snaps):
            s.restore(snap)
        raise


def undo(model, report: Union[Dict[str, Any], str, os.PathLike], sessions: Any = None) -> Dict[str, Any]:
    """Put back the weights a consolidation replaced, bitwise; optionally the sessions' ``P`` too.

    Args:
        model: the model the consolidation changed, in its current state (its fingerprint must
            be the report's ``fingerprint_after``, so an undo never lands on another model).
        report: the dict a consolidation returned, or the path of its JSON file.
        sessions: the sessions passed to the consolidation, in the same order (one session or a
            list, as the consolidation took them). fold and merge reset each session's ``P`` to
            zero (it now lives in W0; keeping it would count it twice); distill resets it when
            it succeeds. Passing the sessions here restores their ``P`` as well; without them
            only the model is restored. A saved-session path is read, given back its ``P`` and
            written back (atomically) tied to the restored weights: the file may be the one the
            consolidation read (still tied to the old weights) or one saved since with the
            consolidated model; a file tied to any other model is refused.

    Returns:
        ``{"fingerprint": ..., "params_restored": [...], "sessions_restored": n,
        "session_files_written": [...]}``.

    Raises:
        ValueError: the model is not the one the report left behind, the report lacks the
            tensors it needs, or a session does not fit. All or nothing: when anything raises
            (a session file that cannot be written included), the model, the sessions and their
            files are as they were.
    """
    from ..session import Session
    from ..session.files import _bytes_writer, _read_file, _read_metadata
    from .common import as_source, session_items

    if not isinstance(report, dict):
        report = load_report(report)
    tensors = report.get(UNDO_KEY)
    if tensors is None:
        if report.get("undo_file") is None:
            raise ValueError("report holds no undo tensors and names no undo file")
        raise ValueError("report was read without its undo tensors; pass the JSON path to undo()")
    current = model.fingerprint()
    fp_before, fp_after = report.get("fingerprint_before"), report.get("fingerprint_after")
    if current != fp_after:
        raise ValueError(f"undo: model fingerprint {current} is not the one this {report.get('method')} "
                         f"left ({fp_after}); refusing to restore onto another model")

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

    # Read and check every session before anything changes. A file tied to the old weights can
    # only be loaded once they are back, so it waits (as raw bytes) until then.
    n_fast = len(model.fast_layers())
    live, files, seen = [], [], set()
    none = sessions is None or (isinstance(sessions, (list, tuple)) and len(sessions) == 0)
    for i, item in enumerate([] if none else session_items(sessions)):
        P = [tensors.get(f"{SESSION_PREFIX}{i}/P/{j}") for j in range(n_fast)]
        if any(p is None for p in P):
            raise ValueError(f"undo: report holds no saved P for session {i}")
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            key = os.path.realpath(path)
            if key in seen:
                raise ValueError(f"undo: session file {path} is given twice")
            seen.add(key)
            data = _read_file(path)  # after finishing an interrupted earlier undo of this file
            fp = _read_metadata(data, path).get("fingerprint")
            if fp == current:
                files.append((path, Session.from_bytes(model, data, source=path), P))
            elif fp == fp_before:
                files.append((path, data, P))
            else:
                raise ValueError(f"undo: session file {path} belongs to a model with fingerprint {fp!r}, neither "
                                 f"the one this {report.get('method')} left ({fp_after}) nor the one it "
                                 f"replaced ({fp_before}); refusing to write into it")
        else:
            live.append((as_source(model, item, i, check_fingerprint=False), P))

    snaps = [src.snapshot() for src, _ in live]
    current_values = {name: params[name].detach().clone() for name in restore}
    try:
        with torch.no_grad():
            for name, t in restore.items():
                params[name].copy_(t.to(params[name].device))
        fp = model.fingerprint()
        if fp != fp_before:
            # Only possible if the report was edited: the copy above is exact.
            raise RuntimeError(f"undo: restored model has fingerprint {fp}, expected {fp_before}")
        loaded = []
        for path, obj, P in files:
            s = obj if isinstance(obj, Session) else Session.from_bytes(model, obj, source=path)
            as_source(model, s, check_fingerprint=False).set_P(P)
            loaded.append((path, s))
        for src, P in live:
            src.set_P(P)
        atomic_write_many([(path, _bytes_writer(s.to_bytes())) for path, s in loaded], sync_dir=True)
    except BaseException:
        with torch.no_grad():
            for name, t in current_values.items():
                params[name].copy_(t)
        for (src, _), snap in zip(live, snaps):
            src.restore(snap)
        raise
    return {"fingerprint": fp, "params_restored": sorted(restore), "sessions_restored": len(live) + len(files),
            "session_files_written": [path for path, _ in loaded]}
