"""Saving and loading a session's persistent state: :class:`SessionFiles`, a base of
:class:`~cl_arch.session.Session` (its ``save``, ``load``, ``to_bytes`` and ``from_bytes``), over the
state file's format in ``files.py``.

What is saved: ``P`` per fast layer, the baseline, counts, rule settings and the replay buffer;
the current episode (S, E, caches) is not, so a loaded session starts a new episode.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Any, Dict, Optional, Type, TypeVar, Union

import torch

from ..version import __version__
from .files import SCHEMA, _atomic_write, _decode_state, _encode_state, _read_file
from .records import REPLAY_FIELDS, ReplayRecord


_S = TypeVar("_S", bound="SessionFiles")


class SessionFiles:
    """The file half of :class:`~cl_arch.session.Session` (which defines every attribute used here)."""

    def _meta(self) -> Dict[str, Any]:
        return {
            "schema": SCHEMA, "cl_arch_version": __version__,
            "fingerprint": self.model.fingerprint(),
            "adapt": self.adapt, "rule": dict(self.rule), "replay_size": self.replay_size,
            "baseline": self.baseline, "episodes": self.episodes, "rewards": self.rewards,
            "reward_sum": self.reward_sum, "n_fast_layers": len(self.P),
            "replay": [asdict(r) for r in self.replay],
        }

    def to_bytes(self) -> bytes:
        """The state file's contents (see :meth:`save`)."""
        tensors = {f"P.{i}": p[0].detach().cpu().contiguous() for i, p in enumerate(self.P)}
        tensors["baseline"] = torch.tensor([self.baseline], dtype=torch.float64)
        return _encode_state(tensors, self._meta())

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the persistent state (P per layer, baseline, counts, rule settings, replay) to
        one safetensors file, atomically: temp file in the same folder, fsync, ``os.replace``.

        The current episode (S, E, caches) is not saved: a loaded session starts a new episode.
        """
        _atomic_write(os.fspath(path), self.to_bytes())

    @classmethod
    def load(cls: Type[_S], model, path: Union[str, os.PathLike], *, seed: Optional[int] = None,
             adapt: Optional[bool] = None, replay_size: Optional[int] = None, decoder: Optional[str] = "auto",
             **rule_overrides: Optional[float]) -> _S:
        """Load a state written by :meth:`save` for ``model``.

        ``adapt``, ``replay_size`` and the rule settings come from the file unless given here
        (``decoder``, a setting of this process, is not in the file);
        a smaller ``replay_size`` drops the lowest-scoring replay records (as the buffer does).

        Raises:
            FileNotFoundError: no such file.
            ValueError: truncated or corrupt file, a description edited since it was saved
                (checksum mismatch), unknown schema, a description that makes no sense (e.g.
                replay token ids outside the model's vocabulary), or a state saved for a model
                with another fingerprint (other weights or config).
        """
        path = os.fspath(path)
        data = _read_file(path)  # under the file's lock, after finishing an interrupted multi-file write of it
        return cls.from_bytes(model, data, source=path, seed=seed, adapt=adapt, replay_size=replay_size,
                              decoder=decoder, **rule_overrides)

    @classmethod
    def from_bytes(cls: Type[_S], model, data: bytes, source: str = "<bytes>", *, seed: Optional[int] = None,
                   adapt: Optional[bool] = None, replay_size: Optional[int] = None,
                   decoder: Optional[str] = "auto", **rule_overrides: Optional[float]) -> _S:
        """Parse a state file's contents; see :meth:`load`."""
        meta, tensors = _decode_state(data, source, model)
        try:
            fast = model.fast_layers()
            if meta["n_fast_layers"] != len(fast) or set(tensors) != {f"P.{i}" for i in range(len(fast))} | {"baseline"}:
                raise ValueError(f"session state {source} does not fit the model: tensors {sorted(tensors)}")
            rule = dict(meta["rule"])
            rule.update(rule_overrides)
            s = cls(model, adapt=meta["adapt"] if adapt is None else adapt, seed=seed,
                    replay_size=meta["replay_size"] if replay_size is None else replay_size, decoder=decoder, **rule)
            P = []
            for i, m in enumerate(fast):
                t = tensors[f"P.{i}"]
                want = (m.n_heads, m.head_k_dim, m.head_v_dim)
                if tuple(t.shape) != want:
                    raise ValueError(f"session state {source}: P.{i} has shape {tuple(t.shape)}, model needs {want}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"session state {source}: P.{i} holds NaN or inf")
                P.append(t.to(device=m.W0.device, dtype=m.state_dtype).unsqueeze(0))
            b = float(tensors["baseline"][0])
            if b != float(meta["baseline"]) or not math.isfinite(b):
                raise ValueError(f"session state {source}: baseline {b} disagrees with the description")
            s.P, s.baseline = P, b
            s.episodes, s.rewards, s.reward_sum = meta["episodes"], meta["rewards"], float(meta["reward_sum"])
            s.replay = [ReplayRecord(**{k: r[k] for k in REPLAY_FIELDS}) for r in meta["replay"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"session state {source} is corrupt: bad description ({e!r})") from e
        s._trim_replay()
        s._new_episode()
        return s


__all__ = ["SessionFiles"]
