"""Episodic memory: an output-side fast-weight memory with sharp, wide keys, whose commit carries
what a session read into the next one (docs/design.md, "The episodic memory").

The readout memory keys its writes by the unit final hidden state: 128 correlated dimensions, so
the delta rule keeps only the last few hundred associations and a snapshot of it (the state a
session saves as P) holds recency, not the text (measured: a second pass over the same 8 KB gains
nothing from it). The episodic memory writes the same pairs, ``phi(h_{t-1}) -> one-hot(x_t)``,
under keys that are nearly orthogonal for different contexts and equal for equal ones:

    phi(h) = unit(relu(R unit(h) - theta))          R [F, d_model] fixed Gaussian, F >> d_model

a thresholded random-feature map (the threshold ``theta`` is learned; at 1.5 about 7% of the F
features fire). Different contexts then overwrite each other little, so the memory holds tens of
thousands of tokens' worth of associations, and its span is long (``~1e5`` tokens at init). Its
commit is the readout's state commit (``P <- S_T - W0``): the next session starts where this one
ended. It is its own module rather than more readout heads because the two want different keys,
and because a model trained with a readout keeps its readout's weights when an episodic memory is
added beside it (``model.add_memory(EpisodicConfig(...))``, then ``scripts/train_episodic.py``).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MemoryConfig, check_choice, check_int, check_number
from .commit import StateCommit
from .output import VALUE_KINDS, OutputMemory, shifted_keys
from .write import check_write


@dataclass
class EpisodicConfig(MemoryConfig):
    """An episodic memory (docs/design.md, "The episodic memory").

    Attributes:
        name: the model attribute and state slot it lives under.
        heads: number of heads, each ``[F, V]``.
        features: ``F``, the key width.
        values: ``"onehot"`` (``V = vocab_size``) or ``"embed"`` (``V = d_model``: large vocabularies).
        threshold: initial ``theta`` (learned, >= 0); higher: sparser, sharper keys.
        beta, scale: initial write strength in (0, 1) and read scale.
        span: initial memory span in tokens (learned).
        seed: seed of the fixed projection ``R`` (saved with the model as a buffer).
        commit_span: heads whose memory span is shorter commit nothing (the state commit's).
        write: ``"delta"`` (the delta rule on the token's value) or ``"error"`` (the model's own
            prediction error, one-hot values only: :class:`~cl_arch.memory.write.ErrorWrite`).
        write_chunk: error writes only: tokens per chunk when a call reads several (1: the exact rule;
            more: each chunk's errors against its starting state's predictions, in matrix products).
    """

    kind = "episodic"
    name: str = "episodic"
    heads: int = 1
    features: int = 2048
    values: str = "onehot"
    threshold: float = 1.5
    beta: float = 0.5
    scale: float = 1.0
    span: float = 1e5
    seed: int = 0
    commit_span: float = 4096.0
    write: str = "delta"
    write_chunk: int = 1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "heads", self.heads)
        check_int(owner, "features", self.features)
        check_write(owner, self.write, self.values)
        check_int(owner, "write_chunk", self.write_chunk)
        check_int(owner, "seed", self.seed, lo=0)
        check_choice(owner, "values", self.values, VALUE_KINDS)
        # theta < 0 would make phi(0) = unit(relu(-theta)) != 0: every episode's first key (the zero
        # cache) one shared write that accumulates into P
        self.threshold = check_number(owner, "threshold", self.threshold, 0.0, math.inf)
        self.beta = check_number(owner, "beta", self.beta, 0.0, 1.0, lo_open=True, hi_open=True)
        self.scale = check_number(owner, "scale", self.scale, -math.inf, math.inf)
        self.span = check_number(owner, "span", self.span, 1.0, math.inf)
        self.commit_span = check_number(owner, "commit_span", self.commit_span, 0.0, math.inf)

    def build(self, host) -> "EpisodicMemory":
        return EpisodicMemory(self, host.d_model, host.vocab_size, host)


class EpisodicMemory(OutputMemory):
    """``forward(out: OutputContext, state, ctx) -> (logit delta [B, T, vocab], FastLayerState)``.

    ``config.heads`` heads of ``[F, V]``, the delta rule with a learned per-head write strength,
    decay toward the resting state ``W0 + P`` and read scale (:class:`OutputMemory`), and always the
    state commit. Buffers: ``R [F, d_model]`` (the fixed projection, saved with the model so a loaded
    model reads with the keys it wrote). Parameters: ``key_threshold`` (scalar ``theta``). The
    state's ``conv`` slot carries ``unit(h)`` of the last position, ``[B, 1, d_model]``.
    """

    #: one-token CPU calls without autograd take the sparse step (:func:`cl_arch.memory.write.decodes_sparsely`);
    #: False runs them through the dense rule as every other call (benchmarks compare the two)
    sparse_decode = True

    def __init__(self, config: EpisodicConfig, d_model: int, vocab_size: int, rule) -> None:
        """``rule``: the plasticity and kernel settings (a :class:`~cl_arch.memory.fast_layer.FastLayerConfig`)."""
        H, Fdim = config.heads, config.features
        V = vocab_size if config.values == "onehot" else d_model
        super().__init__(rule, H, Fdim, V, config.values, StateCommit(config.commit_span), write=config.write)
        self.config, self.d_model = config, d_model
        gen = torch.Generator().manual_seed(config.seed)
        # drawn on the CPU generator whatever the default device (transformers builds models on "meta")
        self.register_buffer("R", torch.randn(Fdim, d_model, generator=gen, device="cpu"))
        self.key_threshold = nn.Parameter(torch.tensor(float(config.threshold)))
        self.A_log = nn.Parameter(torch.full((H,), -math.log(config.span)))
        self.beta_logit = nn.Parameter(torch.full((H,), config.beta).logit())
        self.read_scale = nn.Parameter(torch.full((H,), float(config.scale)))
        # W0 would hold a learned prior over F x vocab: the readout's job. It stays zero unless a
        # fold writes a session's P into it.
        self.W0.requires_grad_(False)
        self._no_weight_decay(self.key_threshold, self.A_log, self.beta_logit, self.read_scale, self.W0)

    @property
    def state_commit(self) -> bool:
        return True

    def decode_resting_state(self, P: torch.Tensor | None = None) -> torch.Tensor | None:
        """``M = W0 + P`` (``[B, H, F, V]`` or ``[H, F, V]``) for the sparse decode step, or None when it
        is zero: ``W0`` stays zero unless a fold writes into it, so the sum (a dense pass per token) is
        skipped then. Whether ``W0`` is zero is read once per change of it (its storage and version
        counter: ``fold``, ``merge`` and ``load_state_dict`` write through the parameter and move it; a write
        through ``W0.data`` would not)."""
        key = (self.W0.data_ptr(), self.W0._version)
        if getattr(self, "_w0_zero_key", None) != key:
            self._w0_zero, self._w0_zero_key = not bool(self.W0.detach().any()), key
        if self._w0_zero:
            return None if P is None else P.to(self.state_dtype)
        return self.resting_state(P.shape[0] if P is not None else 1, P)

    def features(self, hn: torch.Tensor) -> torch.Tensor:
        """``phi [..., F]`` of unit hidden states ``hn [..., d_model]``; ``phi(0) = 0`` (no write).

        ``theta`` is used clamped at 0: the config refuses a negative one, but training (or a loaded
        file) can take the parameter below 0, where ``phi(0)`` would fire every feature and the
        zero cache of each episode's first token would write under one shared key."""
        return self.features_from_projection(hn @ self.R.to(hn.dtype).T)

    def features_from_projection(self, proj: torch.Tensor) -> torch.Tensor:
        """``phi [..., F]`` given ``proj = hn R^T [..., F]`` (a decoder computes the product once for two
        memories that hold the same ``R``)."""
        z = proj - self.key_threshold.clamp(min=0).to(proj.dtype)
        return F.normalize(F.relu(z), p=2, dim=-1)

    def cache_shape(self, batch_size: int):
        """``[B, 1, d_model]``: ``unit(h)`` of the last position read (zeros: nothing written yet);
        error writes append that position's prediction (``[B, 1, d_model + vocab]``)."""
        return (batch_size, 1, self.d_model + self.write.cache_extra(self))

    def project_qkv(self, h: torch.Tensor, cache: torch.Tensor | None = None, ids=None):
        """``q_t = phi(h_t)``, ``k_t = phi(h_{t-1})`` as ``[B, T, H, F]``; None; the new cache
        (``ids``: unused, the keys are the hidden states')."""
        B, T, _ = h.shape
        hn = F.normalize(h.to(torch.promote_types(h.dtype, torch.float32)), p=2, dim=-1)
        q = self.features(hn)
        # phi of the previous position: one new row (the cache), the rest shifted from q
        k = torch.cat([self.features(shifted_keys(hn[:, :1], cache)), q[:, :-1]], dim=1)
        H, Fdim = self.n_heads, self.head_k_dim
        return q.unsqueeze(2).expand(B, T, H, Fdim), k.unsqueeze(2).expand(B, T, H, Fdim), None, hn[:, -1:]
