"""Sessions: inference with adaptation on, reward commits, persistence (docs/design.md, "Public API").

A :class:`Session` is one user's (or task's) running copy of a model's fast memory:

* ``P`` per fast layer, ``[1, H, K, V]`` in the layer's state dtype (float32, or float64 for a
  double model): the persistent fast weight, kept across episodes and saved to disk;
* ``b``: the running reward baseline;
* the current episode's :class:`~cl_arch.state.ModelState` (``S`` starts at ``W0 + P``, ``E`` at
  0, caches empty), updated by every token the session reads or writes;
* counts and a bounded replay buffer of recent episodes (token ids, reward, surprise) that
  consolidation (``cl_arch.consolidate.distill``) uses as its default replay data.

The model's weights are never modified: several sessions can share one model and never see each
other's memories. A reward ends the episode with the three-factor commit::

    P <- gamma * P + (eta_s + eta_r * (r - b)) * clip(E_T)        # per fast layer and head
    b <- b + rho * (r - b)

The package, each module importing only those above it:

* ``inputs.py``: checks of token ids, rewards, rule settings, sampling arguments and logits;
* ``sampling.py``: drawing one token from the next-token logits;
* ``records.py``: :class:`ReplayRecord` and :class:`SessionSnapshot`;
* ``files.py``: the state file (one safetensors file, checksummed description), its header
  parser and the atomic write;
* ``batching.py``: eval-mode forwards and :meth:`Session.batch_generate`;
* ``persistence.py``: ``save`` / ``load`` / ``to_bytes`` / ``from_bytes`` (a base of :class:`Session`);
* ``core.py``: the :class:`Session` class;
* ``stream.py``: :class:`~cl_arch.session.stream.BatchStream`, a server's continuous batch kept in one decoder;
* ``store.py``: :class:`SessionStore`, saved sessions by id.
"""
# Re-exported: the public names of the former single module, and the private helpers tests use.
from .core import Session
from .files import CHECKSUM_FIELD, LEGACY_SCHEMAS, METADATA_KEY, SCHEMA, _tensors_digest  # noqa: F401
from .inputs import MAX_ABS_REWARD, RULE_KEYS  # noqa: F401
from .records import REPLAY_FIELDS, ReplayRecord, SessionSnapshot  # noqa: F401
from .sampling import _sample  # noqa: F401
from .store import SessionStore

__all__ = ["Session", "SessionStore", "SessionSnapshot", "ReplayRecord", "SCHEMA"]
