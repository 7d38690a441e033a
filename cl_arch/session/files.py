"""The session state file: format, checksums, safetensors header parser, atomic write.

A state file is one safetensors file (``P.<i>`` per fast layer, ``baseline``) whose header
metadata holds the JSON description (schema, model fingerprint, rule settings, counts,
baseline, replay, a sha256 of the tensors, and a sha256 of the rest of the description in its
canonical JSON form), so no part of the file can change unnoticed: a file whose tensors or
description (a rule setting, a count, a replay record) were edited or damaged is refused.
(One metadata entry only, ``METADATA_KEY``: safetensors writes its metadata map in no fixed
order, and a saved state must be the same bytes every time.) Files of schema 1 (written
before the description checksum) still load, with only their tensors checksummed; every
file's description is also checked for sense (types, counts, token ids inside the model's
vocabulary). The file is written to a temporary name in the same folder, fsynced and
renamed, so a crash leaves either the old or the new file whole.

:func:`_encode_state` makes the bytes, :func:`_decode_state` checks them before a session is
built from them, :func:`_read_metadata` parses the header alone, :func:`_read_file` reads a file (under its
lock, after any interrupted journaled write of it is finished), and :func:`_atomic_write`
(through :func:`_bytes_writer`, which writes in ``_WRITE_CHUNK`` pieces via the test seam
:func:`_write_chunk`) puts them on disk.
"""
import hashlib
import json
import math
import os
import struct
from typing import Any, Dict, Tuple

import torch

from ..io import atomic_write, reading
from .records import REPLAY_FIELDS

SCHEMA = "cl_arch.session/2"
LEGACY_SCHEMAS = ("cl_arch.session/1",)  # no description checksum; still read
METADATA_KEY = "cl_arch_session"
CHECKSUM_FIELD = "description_sha256"  # sha256 of the canonical JSON of every other field
_WRITE_CHUNK = 1 << 20  # bytes per write() call while saving


def _description_digest(meta: Dict[str, Any]) -> str:
    """sha256 of every field but the checksum itself, as canonical JSON (sorted keys, the writer's
    own formatting): ``json.loads`` then ``json.dumps`` gives back the same text, floats included."""
    rest = {k: v for k, v in meta.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, allow_nan=True).encode("utf-8")).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_description(meta: Dict[str, Any], vocab_size: int, source: str) -> None:
    """Refuse a description that no session could have written (schema 1 files carry no
    description checksum, and a checksum cannot vouch for what a writer got wrong)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"session state {source} is corrupt: {what}")

    fields = {"adapt": bool, "rule": dict, "replay": list}
    for name, kind in fields.items():
        if not isinstance(meta.get(name), kind):
            raise bad(f"{name} must be a {kind.__name__}, got {meta.get(name)!r}")
    for name in ("replay_size", "episodes", "rewards", "n_fast_layers"):
        if not _is_int(meta.get(name)) or meta[name] < 0:
            raise bad(f"{name} must be an integer >= 0, got {meta.get(name)!r}")
    for name in ("baseline", "reward_sum"):
        if not _is_real(meta.get(name)) or not math.isfinite(meta[name]):
            raise bad(f"{name} must be a finite number, got {meta.get(name)!r}")
    if meta["rewards"] > meta["episodes"]:
        raise bad(f"{meta['rewards']} rewarded episodes out of {meta['episodes']}")
    for j, r in enumerate(meta["replay"]):
        if not isinstance(r, dict) or set(r) != set(REPLAY_FIELDS):
            raise bad(f"replay[{j}] must hold exactly {list(REPLAY_FIELDS)}, got {r!r}")
        ids = r["ids"]
        if not isinstance(ids, list) or not all(_is_int(x) for x in ids):
            raise bad(f"replay[{j}].ids must be a list of integers")
        out = [x for x in ids if not 0 <= x < vocab_size]
        if out:
            raise ValueError(f"session state {source}: replay[{j}].ids hold token {out[0]}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
        for name in ("reward", "advantage"):
            if r[name] is not None and not (_is_real(r[name]) and math.isfinite(r[name])):
                raise bad(f"replay[{j}].{name} must be None or a finite number, got {r[name]!r}")
        if not _is_real(r["surprise"]):
            raise bad(f"replay[{j}].surprise must be a number (NaN: no prediction), got {r['surprise']!r}")
        if not _is_int(r["episode"]) or r["episode"] < 0:
            raise bad(f"replay[{j}].episode must be an integer >= 0, got {r['episode']!r}")


def _tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_metadata(data: bytes, source: str) -> Dict[str, Any]:
    """The JSON description from a safetensors header, with clear errors for bad files."""
    if len(data) < 8:
        raise ValueError(f"session state {source} is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"session state {source} is truncated: header says {n} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"session state {source} is corrupt or not a cl_arch session file: {e!r}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"session state {source} is corrupt: description is not an object")
    # The header also records where each tensor ends: a file cut short inside the data fails here.
    ends = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if offsets is None:
            raise ValueError(f"session state {source} is corrupt: the safetensors header gives tensor {k!r} "
                             "no data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"session state {source} is corrupt: tensor {k!r} has invalid data_offsets {offsets!r}")
        ends.append(offsets[1])
    if ends and 8 + n + max(ends) != len(data):
        raise ValueError(f"session state {source} is truncated or has trailing bytes "
                         f"({len(data)} bytes, header implies {8 + n + max(ends)})")
    return meta


def _write_chunk(f, chunk: memoryview) -> None:
    """One write() while saving (a seam that tests slow down to kill a save half-way)."""
    f.write(chunk)


def _bytes_writer(data: bytes):
    """A ``write(tmp)`` for :func:`~cl_arch.io.atomic_write`: ``data`` in chunks, then fsync."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            view = memoryview(data)
            for off in range(0, len(data), _WRITE_CHUNK):
                _write_chunk(f, view[off:off + _WRITE_CHUNK])
            f.flush()
            os.fsync(f.fileno())
    return write


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The rename happens under the file's lock, after finishing any journaled multi-file write of it
    that a crash interrupted (``undo`` writes session files that way): otherwise that stale
    journal could later replay the older content over this newer file."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"folder {directory} does not exist")
    atomic_write(path, _bytes_writer(data), sync_dir=True, lock=True)


def _read_file(path: str) -> bytes:
    """A state file's bytes, read under its lock after finishing any journaled write of it that a
    crash interrupted (:func:`cl_arch.io.reading`), so a reader sees the version that write left.

    Raises:
        FileNotFoundError: no such file.
    """
    with reading(path):
        with open(path, "rb") as f:
            return f.read()


def _encode_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> bytes:
    """A state file's bytes: ``tensors`` and the description ``meta`` (changed in place: it gains
    the tensor checksum, then the description checksum)."""
    from safetensors.torch import save

    meta["tensors_sha256"] = _tensors_digest(tensors)
    meta[CHECKSUM_FIELD] = _description_digest(meta)
    return save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True, allow_nan=True)})


def _decode_state(data: bytes, source: str, model) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The description and tensors of a state file written for ``model``, every check passed.

    Checks, in order: the safetensors header, the schema, the description checksum, the model
    fingerprint, the tensors and their checksum, the description's sense (see
    :meth:`Session.load <cl_arch.session.Session.load>` for the errors). Whether the tensors fit
    the model's layers is left to the caller.
    """
    from safetensors.torch import load

    meta = _read_metadata(data, source)
    schema = meta.get("schema")
    if schema != SCHEMA and schema not in LEGACY_SCHEMAS:
        raise ValueError(f"session state {source}: unknown schema {schema!r} "
                         f"(this version reads {[SCHEMA, *LEGACY_SCHEMAS]})")
    checksum = meta.get(CHECKSUM_FIELD)
    if schema == SCHEMA and checksum is None:
        raise ValueError(f"session state {source} is corrupt: its description lacks the checksum "
                         f"({CHECKSUM_FIELD}) that schema {SCHEMA!r} carries")
    if checksum is not None and checksum != _description_digest(meta):
        raise ValueError(f"session state {source} was edited or is corrupt: description checksum mismatch "
                         "(a rule setting, count, replay record or other field differs from what was saved); "
                         "refusing to load it")
    fp = model.fingerprint()
    if meta.get("fingerprint") != fp:
        raise ValueError(f"session state {source} belongs to another model: fingerprint "
                         f"{meta.get('fingerprint')!r}, this model's is {fp!r}")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"session state {source} is truncated or corrupt: {e}") from e
    if _tensors_digest(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"session state {source} is corrupt: tensor checksum mismatch")
    _check_description(meta, model.config.vocab_size, source)
    return meta, tensors
