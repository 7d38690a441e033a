"""Readout memory: a fast-weight head after the last block, written with the model's own
prediction error (docs/design.md, "The readout memory").

At every position the final hidden state ``h_t`` predicts token ``t + 1``. One step later that
token is known, so the memory writes the pair ``unit(h_{t-1}) -> e(x_t)`` with the delta rule
and reads at ``unit(h_t)``; the read is added to the logits. Read after write stays causal: the
write at position t uses only ``h_{t-1}`` and the observed input ``x_t``. Its relatives are the
neural cache (Grave et al. 2017) and fast weight layers (Clark et al. 2022). Unlike the fast
layers inside the network, nothing has to be learned for it to help: the first repeated context
of a new stream already retrieves what followed it last time.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import MemoryConfig, check_choice, check_int, check_number
from .commit import StateCommit, TraceCommit
from .output import VALUE_KINDS, OutputMemory, shifted_keys
from .write import check_write

KEY_KINDS = ("hidden", "hidden+token")
COMMITS = ("state", "trace")


@dataclass
class ReadoutConfig(MemoryConfig):
    """A readout memory (docs/design.md, "The readout memory").

    Attributes:
        name: the model attribute and state slot it lives under.
        heads: number of heads (each ``[K, V]``).
        values: ``"onehot"`` (``V = vocab_size``) or ``"embed"`` (``V = d_model``, read back through the tied head).
        keys: ``"hidden"``: ``unit(h)``; ``"hidden+token"``: ``[unit(h), one-hot(x)] / sqrt(2)``
            (``K = d_model + vocab_size``), for models whose final hidden state does not tell the last
            token apart (a recall model after a cue).
        beta: initial write strength in (0, 1). scale: initial read scale (logits added per unit read).
        commit: ``"state"`` (:class:`StateCommit`: keep what the slow heads hold) or ``"trace"``
            (:class:`TraceCommit`: the fast layers' three-factor commit).
        commit_span: under the state commit, heads whose memory span is shorter commit nothing.
        span: initial memory span of the heads in tokens; None spreads them over 100 to 10k tokens
            (one head: 1000), like FLA's ``A`` init.
        write: ``"delta"`` or ``"error"`` (the model's own prediction error; one-hot values and the
            state commit only: :class:`~cl_arch.memory.write.ErrorWrite`).
        write_chunk: error writes only: tokens per chunk when a call reads several (1: the exact rule;
            more: each chunk's errors against its starting state's predictions, in matrix products).
    """

    kind = "readout"
    name: str = "readout"
    heads: int = 2
    values: str = "onehot"
    keys: str = "hidden"
    beta: float = 0.5
    scale: float = 2.0
    commit: str = "state"
    commit_span: float = 4096.0
    span: Optional[float] = None
    write: str = "delta"
    write_chunk: int = 1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "heads", self.heads)
        check_choice(owner, "values", self.values, VALUE_KINDS)
        check_choice(owner, "keys", self.keys, KEY_KINDS)
        check_choice(owner, "commit", self.commit, COMMITS)
        check_write(owner, self.write, self.values)
        check_int(owner, "write_chunk", self.write_chunk)
        if self.write == "error" and self.commit != "state":
            raise ValueError(f"{owner}.write: 'error' keeps its trace as S_T - M and needs commit='state', "
                             f"got commit={self.commit!r}")
        self.beta = check_number(owner, "beta", self.beta, 0.0, 1.0, lo_open=True, hi_open=True)
        self.scale = check_number(owner, "scale", self.scale, -math.inf, math.inf)
        self.commit_span = check_number(owner, "commit_span", self.commit_span, 0.0, math.inf)
        if self.span is not None:
            self.span = check_number(owner, "span", self.span, 1.0, math.inf)

    def build(self, host) -> "ReadoutMemory":
        return ReadoutMemory(self, host.d_model, host.vocab_size, host)


class ReadoutMemory(OutputMemory):
    """``forward(out: OutputContext, state, ctx) -> (logit delta [B, T, vocab], FastLayerState)``.

    Keys and queries are the unit final hidden states (``K = d_model``, every head reads the same
    ones), or with ``keys="hidden+token"`` those and the token's one-hot. The state's ``conv`` slot
    carries the last position's key part, ``[B, 1, K]``.
    """

    def __init__(self, config: ReadoutConfig, d_model: int, vocab_size: int, rule) -> None:
        """``rule``: the plasticity and kernel settings (a :class:`~cl_arch.memory.fast_layer.FastLayerConfig`)."""
        H = config.heads
        K = d_model if config.keys == "hidden" else d_model + vocab_size
        V = vocab_size if config.values == "onehot" else d_model
        commit = StateCommit(config.commit_span) if config.commit == "state" else TraceCommit()
        super().__init__(rule, H, K, V, config.values, commit, write=config.write)
        self.config = config
        self.key_kind, self.vocab_size = config.keys, vocab_size
        if config.span is not None:
            A_log = torch.full((H,), -math.log(config.span))
        else:  # heads start at different time scales (~100 to ~10k tokens), like FLA's A init
            A_log = torch.log(1.0 / (torch.logspace(2, 4, H) if H > 1 else torch.tensor([1000.0])))
        self.A_log = torch.nn.Parameter(A_log)
        self.beta_logit = torch.nn.Parameter(torch.full((H,), config.beta).logit())
        self.read_scale = torch.nn.Parameter(torch.full((H,), float(config.scale)))
        self._no_weight_decay(self.A_log, self.beta_logit, self.read_scale, self.W0)

    @property
    def state_commit(self) -> bool:
        return isinstance(self.commit_strategy, StateCommit)

    def cache_shape(self, batch_size: int):
        """``[B, 1, K]``: the key part of the last position read (zeros: nothing written yet); error
        writes append that position's prediction (``[B, 1, K + vocab]``)."""
        return (batch_size, 1, self.head_k_dim + self.write.cache_extra(self))

    def project_qkv(self, h: torch.Tensor, cache: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None):
        """Read and write keys of ``h [B, T, d_model]``: ``q_t = unit(h_t)``, ``k_t = unit(h_{t-1})``.

        With ``keys="hidden+token"`` the key is ``[unit(h_t), one-hot(x_t)] / sqrt(2)``
        (``ids [B, T]`` required): contexts whose hidden states agree but whose last tokens differ
        (a recall model after ``BOS cue``: cosine 0.999 across cues) get keys at most 0.5 alike.
        Meant for small vocabularies (the state is ``K x V``).

        Returns ``q, k [B, T, H, K]``, None (the values come from the tokens) and the new cache.
        """
        B, T, _ = h.shape
        cdt = torch.promote_types(h.dtype, torch.float32)
        hn = F.normalize(h.to(cdt), p=2, dim=-1)
        if self.key_kind == "hidden+token":
            if ids is None:
                raise ValueError("readout keys='hidden+token' need the input ids")
            # One-hot, not the embedding: a recall model's key embeddings are themselves nearly
            # parallel (cosine 0.99), and one-hot token parts make any two tokens' keys 0.5 apart at most.
            en = F.one_hot(ids, self.vocab_size).to(cdt)
            hn = torch.cat([hn, en], dim=-1) / math.sqrt(2.0)
        K = hn.shape[-1]
        k = shifted_keys(hn, cache)
        H = self.n_heads
        return (hn.unsqueeze(2).expand(B, T, H, K), k.unsqueeze(2).expand(B, T, H, K), None, hn[:, -1:])
