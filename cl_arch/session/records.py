"""What a session keeps besides its memory: replay records and snapshots.

:class:`ReplayRecord` is one finished episode in the replay buffer (``REPLAY_FIELDS`` are
its fields, as a state file stores them); :class:`SessionSnapshot` is an opaque copy of a
session's whole state for :meth:`Session.rollback <cl_arch.session.Session.rollback>`.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

REPLAY_FIELDS = ("ids", "reward", "advantage", "surprise", "episode")


@dataclass(frozen=True)
class ReplayRecord:
    """One finished episode kept for replay.

    Attributes:
        ids: every token the episode read or wrote, in order.
        reward: the reward it got (None: ended by :meth:`Session.end_episode`).
        advantage: ``r - b`` at commit time (None without reward).
        surprise: mean negative log-likelihood (nats/token) of the episode's tokens under the
            session's model as they arrived (NaN if no token had a prediction).
        episode: index of the episode in the session's history.
    """

    ids: List[int]
    reward: Optional[float]
    advantage: Optional[float]
    surprise: float
    episode: int

    @property
    def score(self) -> float:
        """How informative the episode is: ``|r - b| + surprise / ln(256)``; the buffer drops
        the lowest score first (oldest among ties). Both terms are O(1) for byte models."""
        s = 0.0 if math.isnan(self.surprise) else self.surprise / math.log(256)
        return abs(self.advantage or 0.0) + s

    def __getitem__(self, key: str):  # record["ids"] as well as record.ids
        return getattr(self, key)


class SessionSnapshot:
    """Opaque copy of a session's full state (P, baseline, counts, replay, episode, RNG)."""

    def __init__(self, owner: str, data: Dict[str, Any]):
        self._owner = owner
        self._data = data
