"""Task generators shared by meta-training (``train/``) and evaluation (``eval/``).

Every task speaks byte tokens (vocabulary 256) with reserved, non-overlapping ranges, so one
model can be trained on one task and played on another without token collisions:

=============  ===========  ==============================================================
range          constant     use
=============  ===========  ==============================================================
0              ``PAD``      padding (never a target)
1              ``BOS``      start of an episode / sequence
2              ``SEP``      separator (e.g. between the write and read parts)
3              ``ASK``      bandit prompt: "pick an arm"
4, 5           ``POS/NEG``  reward tokens of the cue-reward association task
16..31         ``ARMS``     bandit arms (up to 16)
32..95         ``KEYS``     associative-recall keys; preference-game and cue-reward cues
96..159        ``VALUES``   associative-recall values; preference-game answers
=============  ===========  ==============================================================

The preference game uses keys as cues and values as answers on purpose: a model pretrained on
associative recall (key -> value read from fast memory) then only has to learn *which* value
its persistent memory should hold for a cue, which is what a reward-driven commit can teach.

All generators are seeded (an int seed or a ``torch.Generator``) and deterministic on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

PAD, BOS, SEP, ASK, POS, NEG = 0, 1, 2, 3, 4, 5
ARMS = range(16, 32)
KEYS = range(32, 96)
VALUES = range(96, 160)
VOCAB_SIZE = 256

_RANGES = {"special": range(0, 6), "arms": ARMS, "keys": KEYS, "values": VALUES}
# Checked at import: a change that makes two ranges overlap fails loudly, not silently.
_seen = set()
for _name, _r in _RANGES.items():
    if _seen & set(_r):
        raise AssertionError(f"train.tasks: token range {_name} overlaps another range")
    _seen |= set(_r)
del _seen

SeedLike = Union[int, torch.Generator, None]


def _gen(seed: SeedLike) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def _check_count(name: str, n: int, hi: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= hi:
        raise ValueError(f"{name} must be an integer in [1, {hi}], got {n!r}")


def _distinct_tokens(name: str, tokens: Sequence[int]) -> List[int]:
    out = [int(t) for t in tokens]
    if len(set(out)) != len(out) or not all(0 <= t < VOCAB_SIZE for t in out):
        raise ValueError(f"{name} must be distinct token ids in [0, {VOCAB_SIZE}), got {list(tokens)}")
    return out


def key_tokens(n: int) -> List[int]:
    """The first ``n`` key tokens (cues)."""
    _check_count("n_keys", n, len(KEYS))
    return list(KEYS[:n])


def value_tokens(n: int) -> List[int]:
    """The first ``n`` value tokens (answers)."""
    _check_count("n_values", n, len(VALUES))
    return list(VALUES[:n])


# ---------------------------------------------------------------------- associative recall
def recall_episodes(
    batch_size: int,
    n_episodes: int = 2,
    n_pairs: int = 12,
    n_keys: int = 16,
    n_values: int = 16,
    seed: SeedLike = None,
) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Associative recall across episode boundaries: ``n_episodes`` streams of ``key value`` pairs
    drawn from one hidden map, each starting with ``BOS``.

    Each row draws a hidden map key -> value (keys from the first ``n_keys`` key tokens, values
    from the first ``n_values`` value tokens) and every episode shows ``n_pairs`` random pairs
    from it, so keys repeat within and across episodes. The model must predict a pair's value at
    its key position whenever the key was already shown, in this episode *or an earlier one*:
    it has to write ``key -> value`` into fast memory at value positions and read it back at key
    positions, also right after ``BOS`` from a memory carried over from the previous episode
    (what a persistent memory ``S0 = W0 + P`` offers). First occurrences carry no loss (the
    value is unknowable there), so nothing rewards a prior over values.

    Returns:
        One ``(inputs [B, T], targets [B, T] long, mask [B, T] bool)`` per episode, with
        ``T = 2 * n_pairs``; mask is True where the target is a recallable value.
    """
    _check_count("batch_size", batch_size, 1 << 20)
    _check_count("n_episodes", n_episodes, 1 << 10)
    _check_count("n_pairs", n_pairs, 1 << 16)
    g = _gen(seed)
    keys_t = torch.tensor(key_tokens(n_keys))
    vals_t = torch.tensor(value_tokens(n_values))
    mapping = torch.randint(0, n_values, (batch_size, n_keys), generator=g)  # key index -> value index
    kidx = torch.randint(0, n_keys, (batch_size, n_episodes * n_pairs), generator=g)
    vidx = torch.gather(mapping, 1, kidx)
    # seen[b, j]: the key of pair j occurred in an earlier pair (any episode) of row b.
    onehot = torch.nn.functional.one_hot(kidx, n_keys)
    seen = (torch.cumsum(onehot, dim=1) - onehot).gather(2, kidx.unsqueeze(-1)).squeeze(-1) > 0
    out = []
    for e in range(n_episodes):
        sl = slice(e * n_pairs, (e + 1) * n_pairs)
        seq = torch.empty(batch_size, 2 * n_pairs + 1, dtype=torch.long)
        seq[:, 0] = BOS
        seq[:, 1::2] = keys_t[kidx[:, sl]]
        seq[:, 2::2] = vals_t[vidx[:, sl]]
        mask = torch.zeros(batch_size, 2 * n_pairs, dtype=torch.bool)
        mask[:, 1::2] = seen[:, sl]  # input 2j+1 is pair j's key; its target is pair j's value
        out.append((seq[:, :-1], seq[:, 1:], mask))
    return out


def recall_batch(
    batch_size: int,
    n_pairs: int = 24,
    n_keys: int = 16,
    n_values: int = 16,
    seed: SeedLike = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-context associative recall in one episode: :func:`recall_episodes` with one episode.

    Returns:
        ``inputs [B, T]`` long (starting with ``BOS``), ``targets [B, T]`` long (inputs shifted by
        one) and ``mask [B, T]`` bool (True where the target is a recallable value),
        ``T = 2 * n_pairs``.
    """
    return recall_episodes(batch_size, 1, n_pairs, n_keys, n_values, seed)[0]



# ---------------------------------------------------------------------- fixed associations
# One fixed key -> value map a session learns over many episodes (what consolidation moves
# into slow weights), as opposed to recall's fresh random map per sequence.
def association(keys: Sequence[int], seed: int, n_values: int = 16) -> dict:
    """A fixed map key token -> value token (values among the first ``n_values`` of VALUES)."""
    vals = torch.randint(0, n_values, (len(keys),), generator=_gen(seed))
    return {int(k): VALUES[int(v)] for k, v in zip(keys, vals)}


def association_episode(assoc: dict, n_pairs: int, generator: torch.Generator) -> List[int]:
    """``[BOS, k, v, k, v, ...]`` with ``n_pairs`` random pairs of the association (the layout
    of :func:`recall_episodes`' cross-episode phase, which the recall model learned to read)."""
    keys = list(assoc)
    ids = [BOS]
    for i in torch.randint(0, len(keys), (n_pairs,), generator=generator).tolist():
        ids += [keys[i], assoc[keys[i]]]
    return ids


def association_probes(assoc: dict, n: int, seed: int) -> dict:
    """``n`` sequences holding each key once (random order) with its value.

    Returns ``{"input_ids": [n, 1 + 2 * len(assoc)] long, "loss_mask": same shape bool}``; the mask
    scores the values, which only a memory of the association can predict at first sight.
    """
    g = _gen(seed)
    keys = list(assoc)
    ids, mask = [], []
    for _ in range(n):
        seq, m = [BOS], [False]
        for i in torch.randperm(len(keys), generator=g).tolist():
            seq += [keys[i], assoc[keys[i]]]
            m += [False, True]
        ids.append(seq)
        mask.append(m)
    return {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask)}


def recall_anchor(n: int, n_pairs: int, seed: int) -> dict:
    """In-context recall with fresh random maps as anchor data (the skill consolidation must keep).

    Returns ``{"input_ids": [n, 2 * n_pairs + 1] long, "loss_mask": same shape bool}`` scoring the
    values of keys already seen in the sequence.
    """
    x, y, m = recall_batch(n, n_pairs, seed=seed)
    ids = torch.cat([x, y[:, -1:]], dim=1)
    return {"input_ids": ids, "loss_mask": torch.cat([torch.zeros(n, 1, dtype=torch.bool), m], dim=1)}

# ---------------------------------------------------------------------- hidden preference game
@dataclass
class PreferenceGame:
    """Reward-only hidden-preference game (the Sutton test of docs/design.md, "Measuring learning").

    There are ``n_cues`` cues (key tokens) and ``n_answers`` answers (value tokens); each cue has
    one hidden preferred answer, drawn from ``seed``. An episode shows ``prompt(cue) = [BOS, cue]``,
    the player answers one token, and :meth:`reward` pays 1.0 for the preferred answer, else 0.0.
    Nothing in the token stream reveals the preference: only reward can teach it. Chance level is
    ``1 / n_answers``. ``cue_tokens`` / ``answer_tokens`` play the game on other tokens (default
    the first keys and values), e.g. token sets held out from meta-training.
    """

    n_cues: int = 8
    n_answers: int = 8
    seed: int = 0
    cue_tokens: Optional[Sequence[int]] = None
    answer_tokens: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        _check_count("n_cues", self.n_cues, len(KEYS) if self.cue_tokens is None else len(self.cue_tokens))
        _check_count("n_answers", self.n_answers, len(VALUES) if self.answer_tokens is None else len(self.answer_tokens))
        g = _gen(self.seed)
        self.cues: List[int] = key_tokens(self.n_cues) if self.cue_tokens is None else \
            _distinct_tokens("cue_tokens", self.cue_tokens)[:self.n_cues]
        self.answers: List[int] = value_tokens(self.n_answers) if self.answer_tokens is None else \
            _distinct_tokens("answer_tokens", self.answer_tokens)[:self.n_answers]
        if set(self.cues) & set(self.answers) or {BOS} & set(self.cues) | {BOS} & set(self.answers):
            raise ValueError("cue and answer tokens must be distinct from each other and from BOS")
        pref = torch.randint(0, self.n_answers, (self.n_cues,), generator=g)
        self.preferred = {c: self.answers[int(i)] for c, i in zip(self.cues, pref)}

    @property
    def chance(self) -> float:
        return 1.0 / self.n_answers

    def prompt(self, cue: int) -> List[int]:
        """Token ids shown before the answer: ``[BOS, cue]``."""
        if cue not in self.preferred:
            raise ValueError(f"{cue} is not a cue of this game ({self.cues[0]}..{self.cues[-1]})")
        return [BOS, cue]

    def cue_sequence(self, n_episodes: int, seed: SeedLike = None) -> List[int]:
        """Cues of ``n_episodes`` episodes, uniformly at random (seeded)."""
        _check_count("n_episodes", n_episodes, 1 << 24)
        g = _gen(seed)
        idx = torch.randint(0, self.n_cues, (n_episodes,), generator=g)
        return [self.cues[int(i)] for i in idx]

    def reward(self, cue: int, answer: int) -> float:
        """1.0 if ``answer`` is the hidden preferred answer of ``cue``, else 0.0."""
        if cue not in self.preferred:
            raise ValueError(f"{cue} is not a cue of this game")
        return 1.0 if int(answer) == self.preferred[cue] else 0.0


# ---------------------------------------------------------------------- cue-reward association
def cue_reward_batch(
    batch_size: int,
    n_pairs: int = 24,
    n_cues: int = 16,
    p_positive: float = 0.5,
    seed: SeedLike = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cue -> reward-token association: ``cue POS|NEG`` pairs with a hidden sign per cue.

    Like :func:`recall_batch` with the two reward tokens as values: each sequence draws a hidden
    sign per cue (positive with probability ``p_positive``); the loss mask marks the reward
    token of cues already seen. Used to meta-train reading a reward signal out of fast memory.

    Returns:
        ``inputs [B, T]``, ``targets [B, T]`` long and ``mask [B, T]`` bool, ``T = 2 * n_pairs``.
    """
    if not isinstance(p_positive, (int, float)) or isinstance(p_positive, bool) or not 0.0 <= p_positive <= 1.0:
        raise ValueError(f"p_positive must be a float in [0, 1], got {p_positive!r}")
    _check_count("batch_size", batch_size, 1 << 20)
    _check_count("n_pairs", n_pairs, 1 << 16)
    g = _gen(seed)
    cues_t = torch.tensor(key_tokens(n_cues))
    sign = torch.rand(batch_size, n_cues, generator=g) < p_positive
    cidx = torch.randint(0, n_cues, (batch_size, n_pairs), generator=g)
    rew = torch.where(torch.gather(sign, 1, cidx), torch.tensor(POS), torch.tensor(NEG))
    seq = torch.empty(batch_size, 2 * n_pairs + 1, dtype=torch.long)
    seq[:, 0] = BOS
    seq[:, 1::2] = cues_t[cidx]
    seq[:, 2::2] = rew
    onehot = torch.nn.functional.one_hot(cidx, n_cues)
    seen = (torch.cumsum(onehot, dim=1) - onehot).gather(2, cidx.unsqueeze(-1)).squeeze(-1) > 0
    mask = torch.zeros(batch_size, 2 * n_pairs, dtype=torch.bool)
    mask[:, 1::2] = seen
    return seq[:, :-1], seq[:, 1:], mask


# ---------------------------------------------------------------------- k-armed bandit
@dataclass
class Bandit:
    """Bernoulli k-armed bandit over the arm tokens.

    Arm ``i`` (token ``ARMS[i]``, or ``arm_tokens[i]``) pays 1 with probability ``probs[i]``, drawn uniformly in
    [0, 1] from ``seed`` unless given. An episode is ``prompt() = [BOS, ASK]``, one arm token,
    then :meth:`pull`.
    """

    k: int = 4
    seed: int = 0
    probs: Optional[Sequence[float]] = None
    arm_tokens: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        _check_count("k", self.k, len(ARMS) if self.arm_tokens is None else len(self.arm_tokens))
        if self.probs is None:
            self.probs = torch.rand(self.k, generator=_gen(self.seed)).tolist()
        self.probs = [float(p) for p in self.probs]
        if len(self.probs) != self.k or not all(0.0 <= p <= 1.0 for p in self.probs):
            raise ValueError(f"probs must be {self.k} probabilities in [0, 1], got {self.probs}")
        self.arms: List[int] = list(ARMS[:self.k]) if self.arm_tokens is None else \
            _distinct_tokens("arm_tokens", self.arm_tokens)[:self.k]
        if {BOS, ASK} & set(self.arms):
            raise ValueError("arm tokens must differ from BOS and ASK (the prompt)")
        # Pay-out draws have their own stream, so pulls are reproducible from ``seed`` alone.
        self._rng = torch.Generator().manual_seed(int(self.seed) + 1_000_003)

    @property
    def best(self) -> int:
        """Token of the arm with the highest pay-out probability."""
        return self.arms[max(range(self.k), key=lambda i: self.probs[i])]

    def prompt(self) -> List[int]:
        return [BOS, ASK]

    def pull(self, arm: int, generator: Optional[torch.Generator] = None) -> float:
        """1.0 with the arm's probability, else 0.0; a token that is not an arm pays 0.0.

        Draws from ``generator`` or, by default, the bandit's own stream seeded from ``seed``.
        """
        if int(arm) not in self.arms:
            return 0.0
        u = torch.rand((), generator=generator if generator is not None else self._rng)
        return 1.0 if float(u) < self.probs[self.arms.index(int(arm))] else 0.0


__all__ = ["PAD", "BOS", "SEP", "ASK", "POS", "NEG", "ARMS", "KEYS", "VALUES", "VOCAB_SIZE",
           "key_tokens", "value_tokens", "recall_batch", "recall_episodes", "association",
           "association_episode", "association_probes", "recall_anchor", "PreferenceGame", "cue_reward_batch", "Bandit"]
