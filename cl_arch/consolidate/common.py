"""What every consolidation shares: reading sessions' persistent memories, refusing bad ones,
and turning token data into batches and scores.

A *session* here is anything holding one persistent memory ``P`` per fast layer:

- a :class:`cl_arch.session.Session` (its ``P``; reset and restore write back into it and
  start a new episode),
- the path of a saved session (loaded with ``Session.load(model, path)``, which checks the
  fingerprint; resetting it changes only the loaded copy: the file keeps the P that is now part
  of the weights and stays tied to the old ones, so it no longer loads into the new model;
  :func:`~cl_arch.consolidate.undo` given the path writes the restored session back into it),
- a :class:`~cl_arch.state.ModelState` (its ``persistent()`` memories; reset replaces them),
- a list with one tensor (or None) per fast layer, each ``[H, K, V]`` or ``[1, H, K, V]``
  (reset zeroes the tensors in place).

Token data (replay, anchor, probes) is any of: an integer tensor ``[N, T]``; a list of 1-D
integer tensors or lists (episodes of any length); a dict ``{"input_ids": [N, T], "loss_mask":
[N, T] bool}``; or a list of such dicts. ``loss_mask[n, t]`` marks the tokens that are scored:
token ``t`` is predicted from the logits at ``t - 1``, so ``loss_mask[:, 0]`` is ignored.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..state import ModelState

Tensor = torch.Tensor


# ---------------------------------------------------------------------- sessions
class Source:
    """One session's persistent memories, read once and checked.

    Attributes:
        P: one ``[H, K, V]`` tensor per fast layer (float32 or wider; zeros where the session had
            none), a private copy.
        name: for reports.
        episodes, reward: committed episodes and summed reward when the session records them
            (for ``merge(weights="count" | "reward")``), else None.
    """

    def __init__(self, model, obj: Any, index: int, check_fingerprint: bool = True):
        from ..session import Session  # lazy: the session module is optional for tensor inputs

        self.index = index
        self.name = f"session {index}"
        self.episodes: Optional[int] = None
        self.reward: Optional[float] = None
        self.loaded_from: Optional[str] = None  # the file a path argument was read from (a copy: see above)
        other_model = None
        if isinstance(obj, (str, os.PathLike)):
            self.name = self.loaded_from = os.fspath(obj)
            obj = Session.load(model, obj)  # checks fingerprint, shapes and finiteness itself
        self.obj = obj
        layers = model.fast_layers()
        shapes = [(m.n_heads, m.head_k_dim, m.head_v_dim) for m in layers]

        raw: Sequence[Optional[Tensor]]
        if isinstance(obj, Session):
            raw = list(obj.P)
            self.episodes, self.reward = obj.episodes, obj.reward_sum
            other_model = obj.model if obj.model is not model else None
        elif isinstance(obj, ModelState):
            raw = obj.persistent()
        elif isinstance(obj, (list, tuple)):
            raw = list(obj)
        else:
            raise ValueError(f"{self.name}: cannot read persistent memories from a {type(obj).__name__}; "
                             "pass a Session, a saved-session path, a ModelState or a list of P tensors")

        if len(raw) != len(layers):
            raise ValueError(f"{self.name}: has {len(raw)} persistent memories, the model "
                             f"{len(layers)} fast layers (another model?)")
        P: List[Tensor] = []
        for j, (p, m, shape) in enumerate(zip(raw, layers, shapes)):
            if p is None:
                P.append(torch.zeros(shape, dtype=m.state_dtype, device=m.W0.device))
                continue
            if not isinstance(p, Tensor):
                raise ValueError(f"{self.name}: P[{j}] is a {type(p).__name__}, not a tensor")
            if p.dim() == 4:
                if p.shape[0] != 1:
                    raise ValueError(f"{self.name}: P[{j}] holds {p.shape[0]} rows; consolidate one "
                                     "session per row (split the batch with ModelState.select)")
                p = p[0]
            if tuple(p.shape) != shape:
                raise ValueError(f"{self.name}: P[{j}] has shape {tuple(p.shape)}, the model's fast "
                                 f"layer {j} needs {shape} (another model?)")
            if not p.dtype.is_floating_point:
                raise ValueError(f"{self.name}: P[{j}] has dtype {p.dtype}, expected floating point")
            if not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise ValueError(f"{self.name}: P[{j}] holds {bad} NaN/inf entries; refusing to consolidate it")
            P.append(p.detach().to(device=m.W0.device,
                                   dtype=torch.promote_types(p.dtype, m.state_dtype)).clone())
        self.P = P

        if check_fingerprint and other_model is not None:
            # A session bound to another model object is acceptable only if the weights match:
            # P is relative to the W0 (and projections) it was learned with.
            theirs, ours = other_model.fingerprint(), model.fingerprint()
            if theirs != ours:
                raise ValueError(f"{self.name}: belongs to a model with fingerprint {theirs}, this model is "
                                 f"{ours}; its P means nothing for these weights, refusing to consolidate")

    def set_P(self, P: Sequence[Tensor]) -> None:
        """Write ``P`` (one ``[H, K, V]`` per fast layer) back into the session.

        A :class:`~cl_arch.Session` also starts a new episode: its current episode's ``S`` was
        built from the old ``W0 + P`` and would carry the old memory on.
        """
        from ..session import Session

        obj = self.obj
        if isinstance(obj, Session):
            obj.P = [p.detach().to(old.dtype).reshape(old.shape).clone() for p, old in zip(P, obj.P)]
            obj.reset(persistent=False)
        elif isinstance(obj, ModelState):
            fast = obj.fast()
            for s, p in zip(fast, P):
                old = s.P
                if old is not None and old.dim() == 4:
                    s.P = p.detach().to(old.dtype).unsqueeze(0).expand_as(old).clone()
                else:
                    s.P = p.detach().clone() if old is None else p.detach().to(old.dtype).clone()
        else:
            for t, p in zip(obj, P):
                if t is None:
                    continue  # nothing was there: zeros are what None already means
                with torch.no_grad():
                    t.copy_(p.reshape(t.shape))

    def snapshot(self) -> Any:
        """What :meth:`restore` needs to put the session back exactly as it is now."""
        from ..session import Session

        obj = self.obj
        if isinstance(obj, Session):
            return obj.snapshot()  # the episode in progress too: set_P starts a new one
        if isinstance(obj, ModelState):
            # set_P rebinds each layer's P to a new tensor: keeping the old references suffices.
            return [(s, s.P) for s in obj.fast()]
        return [None if t is None else t.detach().clone() for t in obj]

    def restore(self, snap: Any) -> None:
        """Undo every :meth:`set_P` / :meth:`reset_P` since ``snap = self.snapshot()``."""
        from ..session import Session

        obj = self.obj
        if isinstance(obj, Session):
            obj.rollback(snap)
        elif isinstance(obj, ModelState):
            for s, P in snap:
                s.P = P
        else:
            with torch.no_grad():
                for t, saved in zip(obj, snap):
                    if t is not None:
                        t.copy_(saved)

    def reset_P(self) -> None:
        """Set the session's persistent memories to zero (their content now lives in slow weights)."""
        self.set_P([torch.zeros_like(p) for p in self.P])

    def replay(self) -> Any:
        """The session's replay buffer (recent episodes chosen by reward and surprise), or None."""
        return getattr(self.obj, "replay", None)


def as_source(model, obj: Any, index: int = 0, check_fingerprint: bool = True) -> Source:
    return obj if isinstance(obj, Source) else Source(model, obj, index, check_fingerprint)


def session_items(sessions: Any) -> List[Any]:
    """``sessions`` as a list of sessions: one session or a list of them; a list whose items are
    all tensors (or None) is one session's P, one per fast layer."""
    if sessions is None:
        raise ValueError("no sessions given")
    single = not isinstance(sessions, (list, tuple)) or \
        (len(sessions) > 0 and all(isinstance(x, Tensor) or x is None for x in sessions))
    items = [sessions] if single else list(sessions)
    if not items:
        raise ValueError("no sessions given")
    return items


def as_sources(model, sessions: Any, check_fingerprint: bool = True) -> List[Source]:
    """Read and check every session before anything is changed (all-or-nothing refusal).

    ``sessions``: see :func:`session_items`.
    """
    items = session_items(sessions)
    seen: Dict[Any, int] = {}
    for i, s in enumerate(items):
        key = _identity(s)
        if key in seen:
            # folding or merging one P twice would add it twice into W0 and then zero it once
            raise ValueError(f"session {i} is session {seen[key]} again ({_describe(s)}); each session may be "
                             "consolidated once per call")
        seen[key] = i
    return [as_source(model, s, i, check_fingerprint) for i, s in enumerate(items)]


def _identity(obj: Any) -> Any:
    """What makes two session arguments the same session: one file (by real path), one object, or one
    list of P tensors (by their storage)."""
    if isinstance(obj, Source):
        return _identity(obj.obj if obj.loaded_from is None else obj.loaded_from)
    if isinstance(obj, (str, os.PathLike)):
        return ("path", os.path.realpath(os.fspath(obj)))
    if isinstance(obj, (list, tuple)):
        ptrs = tuple((t.untyped_storage().data_ptr(), t.storage_offset()) for t in obj if isinstance(t, Tensor))
        return ("tensors", ptrs) if ptrs else ("object", id(obj))
    return ("object", id(obj))


def _describe(obj: Any) -> str:
    return os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else f"the same {type(obj).__name__}"


def check_storable(name: str, value: Tensor, stored: Tensor) -> None:
    """Refuse a new weight that is not finite, in its master precision or once cast to the
    dtype it is stored in (float16 overflows to inf above 65504)."""
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: the new value holds {bad} non-finite (NaN/inf) entries; refusing to write it")
    if not bool(torch.isfinite(stored).all()):
        bad = int((~torch.isfinite(stored)).sum())
        top = float(value.abs().max())
        raise ValueError(f"{name}: the new value (max |x| = {top:.4g}) overflows {stored.dtype} in {bad} "
                         f"entries; refusing to store inf (keep the model in float32 while consolidating)")


# ---------------------------------------------------------------------- token data
@dataclass
class Batch:
    """``ids [b, T]`` long; ``mask [b, T]`` bool, True where token t is scored (from logits t-1)."""

    ids: Tensor
    mask: Tensor


def _as_ids(x: Any, what: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be integers, got {t.dtype}")
    return t.long()


def to_batches(data: Any, batch_size: int = 32, what: str = "data") -> List[Batch]:
    """Normalise token data (see the module docstring) into batches of equal-length sequences.

    Sequences shorter than 2 tokens are dropped (nothing to predict). Order is kept within a length.
    """
    if data is None:
        return []
    seqs: List[Tuple[Tensor, Tensor]] = []

    def add(ids: Any, mask: Any = None) -> None:
        ids = _as_ids(ids, what)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"{what}: input_ids must be [N, T] or [T], got shape {tuple(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != ids.shape:
            raise ValueError(f"{what}: loss_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
        for n in range(ids.shape[0]):
            if ids.shape[1] >= 2:
                seqs.append((ids[n], mask[n]))

    if isinstance(data, Tensor):
        add(data)
    elif isinstance(data, dict):
        add(data["input_ids"], data.get("loss_mask"))
    elif isinstance(data, (list, tuple)):
        for item in data:
            if isinstance(item, dict):
                add(item["input_ids"], item.get("loss_mask"))
            elif hasattr(item, "ids") and not isinstance(item, Tensor):  # a session's ReplayRecord
                add(item.ids)
            elif hasattr(item, "input_ids"):
                add(item.input_ids, getattr(item, "loss_mask", None))
            elif hasattr(item, "tokens"):
                add(item.tokens, getattr(item, "loss_mask", None))
            else:
                add(item)
    elif hasattr(data, "batches") and callable(data.batches):
        return to_batches(list(data.batches()), batch_size, what)
    else:
        try:
            items = list(data)
        except TypeError:
            raise ValueError(f"{what}: cannot read token data from a {type(data).__name__}") from None
        return to_batches(items, batch_size, what)

    by_len: Dict[int, List[Tuple[Tensor, Tensor]]] = {}
    for ids, mask in seqs:
        by_len.setdefault(ids.shape[0], []).append((ids, mask))
    out: List[Batch] = []
    for _, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            part = group[i:i + batch_size]
            out.append(Batch(torch.stack([p[0] for p in part]), torch.stack([p[1] for p in part])))
    return out


def check_vocab(model, batches: List[Batch], what: str) -> None:
    V = model.config.vocab_size
    for b in batches:
        if int(b.ids.min()) < 0 or int(b.ids.max()) >= V:
            raise ValueError(f"{what}: token ids must lie in [0, {V})")


def state_with(model, B: int, P: Optional[Sequence[Tensor]]) -> Optional[ModelState]:
    """Fresh-episode state for ``B`` rows starting from ``S0 = W0 + P`` (None: no P)."""
    if P is None:
        return None
    return model.init_state(B, list(P))


def forward_logits(model, batch: Batch, P: Optional[Sequence[Tensor]] = None,
                   params: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """Logits ``[b, T, vocab]`` of one fresh episode per row, with ``P`` and optionally the
    parameters in ``params`` substituted (``torch.func.functional_call``; the model is untouched)."""
    ids = batch.ids.to(model.device)
    state = state_with(model, ids.shape[0], P)
    if params is None:
        logits, _ = model(ids, state=state, return_state=False)
    else:
        logits, _ = torch.func.functional_call(model, params, (ids,), {"state": state, "return_state": False},
                                               tie_weights=True, strict=False)
    return logits


@torch.no_grad()
def mean_nll(model, batches: List[Batch], P: Optional[Sequence[Tensor]] = None,
             params: Optional[Dict[str, Tensor]] = None) -> float:
    """Mean negative log-likelihood (nats/token) over the scored tokens of ``batches``."""
    total, count = 0.0, 0
    for b in batches:
        logits = forward_logits(model, b, P, params).float()
        tgt = b.ids[:, 1:].to(logits.device)
        m = b.mask[:, 1:].to(logits.device)
        if not bool(m.any()):
            continue
        nll = F.cross_entropy(logits[:, :-1][m], tgt[m], reduction="sum")
        total += float(nll)
        count += int(m.sum())
    if count == 0:
        raise ValueError("no scored tokens in the data (loss_mask is all False)")
    return total / count


LN2 = math.log(2.0)


def gain_figures(nll_base: float, nll_with_P: float, nll_after: float) -> Dict[str, float]:
    """What P adds and how much of it the consolidated model keeps without P.

    ``gain = nll_base - nll_with_P`` (nats/token the session's P saves on its own data);
    ``retained = (nll_base - nll_after) / gain``: 1.0 keeps all of it, 0 none, < 0 made it worse.
    """
    gain = nll_base - nll_with_P
    kept = nll_base - nll_after
    return {
        "nll_without_P": nll_base, "nll_with_P": nll_with_P, "nll_after": nll_after,
        "gain_nats": gain, "gain_bits": gain / LN2, "kept_nats": kept,
        "gain_retained": kept / gain if gain > 0 else float("nan"),
    }
