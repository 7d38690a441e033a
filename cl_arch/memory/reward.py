"""The reward memory: a readout memory with the three-factor trace commit, for learning from rewards
on any tokens (docs/design.md, "The reward memory"; settings fitted by
:func:`cl_arch.eval.reward_fit.fit_reward_memory`).

Its keys are the unit final hidden states and (by default) the token they follow; its values are
one-hot tokens read straight into the logits, so they mean "this token" whatever the token. With a
trace decay ``lam`` near 0 the trace holds the last write only (the generated answer under its
prompt's key), and the commit ``P <- gamma P + eta_r (r - b) clip(E)`` moves the read at that key
toward the answer when it paid more than the running baseline and away from it when it paid less.
"""
import dataclasses
import math
from dataclasses import dataclass

from .base import check_number
from .readout import ReadoutConfig, ReadoutMemory


@dataclass
class RewardMemoryConfig(ReadoutConfig):
    """A reward memory: :class:`ReadoutConfig`'s fields with the reward memory's defaults (one head,
    ``hidden+token`` keys, the trace commit, a long span) and its own commit settings.

    Attributes (beyond :class:`ReadoutConfig`'s):
        lam: trace decay in (0, 1); near 0 the trace holds the generated answer's write only.
        gamma: retention of P per commit in (0, 1) (near 1: a stationary world).
        eta_r: commit step on the reward surprise ``r - b`` (> 0); the retention rate ``eta_s`` is 0.
    """

    kind = "reward"
    name: str = "reward"
    heads: int = 1
    keys: str = "hidden+token"
    scale: float = 8.0
    commit: str = "trace"
    span: float = 1e6
    lam: float = 1e-3
    gamma: float = 0.9999
    eta_r: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.commit != "trace":
            raise ValueError(f"{owner}.commit: a reward memory commits its trace, got {self.commit!r}")
        self.lam = check_number(owner, "lam", self.lam, 0.0, 1.0, lo_open=True, hi_open=True)
        self.gamma = check_number(owner, "gamma", self.gamma, 0.0, 1.0, lo_open=True, hi_open=True)
        self.eta_r = check_number(owner, "eta_r", self.eta_r, 0.0, math.inf, lo_open=True)

    def build(self, host) -> ReadoutMemory:
        rule = dataclasses.replace(host.fast_layer(), lam=self.lam, gamma=self.gamma, eta_s=0.0, eta_r=self.eta_r)
        return ReadoutMemory(self, host.d_model, host.vocab_size, rule)


__all__ = ["RewardMemoryConfig"]
