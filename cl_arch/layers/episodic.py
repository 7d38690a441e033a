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
added beside it (``scripts/train_episodic.py``).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PlasticConfig
from .readout import ReadoutMemory


class EpisodicMemory(ReadoutMemory):
    """``forward(h [B, T, d_model], ids [B, T], ...) -> (logit delta [B, T, vocab], FastLayerState)``.

    ``config.episodic_heads`` heads of ``[F, V]`` (``F = config.episodic_features``), one-hot
    values (``episodic_values="onehot"``, ``V = vocab_size``) or unit token embeddings read back
    through the output head (``"embed"``, ``V = d_model``: for large vocabularies), the delta rule
    with a learned per-head write strength, decay toward the resting state ``W0 + P`` and read
    scale (as :class:`ReadoutMemory`, whose ``forward`` it runs), and always the state commit. Buffers: ``R [F, d_model]`` (the fixed projection, saved with the model so a loaded
    model reads with the keys it wrote). Parameters: ``key_threshold`` (scalar ``theta``). The
    state's ``conv`` slot carries ``unit(h)`` of the last position, ``[B, 1, d_model]``.
    """

    def __init__(self, config: PlasticConfig):
        nn.Module.__init__(self)
        self.config = config
        H, Fdim = config.episodic_heads, config.episodic_features
        self.value_kind = config.episodic_values
        self._init_memory(config, H, Fdim, config.vocab_size if self.value_kind == "onehot" else config.d_model)
        gen = torch.Generator().manual_seed(config.episodic_seed)
        # drawn on the CPU generator whatever the default device (transformers builds models on "meta")
        self.register_buffer("R", torch.randn(Fdim, config.d_model, generator=gen, device="cpu"))
        self.key_threshold = nn.Parameter(torch.tensor(float(config.episodic_threshold)))
        self.A_log = nn.Parameter(torch.full((H,), -math.log(config.episodic_span)))
        self.beta_logit = nn.Parameter(torch.full((H,), config.episodic_beta).logit())
        self.read_scale = nn.Parameter(torch.full((H,), float(config.episodic_scale)))
        # W0 would hold a learned prior over F x vocab: the readout's job. It stays zero unless a
        # fold writes a session's P into it.
        self.W0.requires_grad_(False)
        for p in (self.key_threshold, self.A_log, self.beta_logit, self.read_scale, self.W0):
            p._no_weight_decay = True

    @property
    def state_commit(self) -> bool:
        return True

    def features(self, hn: torch.Tensor) -> torch.Tensor:
        """``phi [..., F]`` of unit hidden states ``hn [..., d_model]``; ``phi(0) = 0`` (no write).

        ``theta`` is used clamped at 0: the config refuses a negative one, but training (or a loaded
        file) can take the parameter below 0, where ``phi(0)`` would fire every feature and the
        zero cache of each episode's first token would write under one shared key."""
        z = hn @ self.R.to(hn.dtype).T - self.key_threshold.clamp(min=0).to(hn.dtype)
        return F.normalize(F.relu(z), p=2, dim=-1)

    def cache_shape(self, batch_size: int):
        """``[B, 1, d_model]``: ``unit(h)`` of the last position read (zeros: nothing written yet)."""
        return (batch_size, 1, self.config.d_model)

    def project_qkv(self, h: torch.Tensor, cache: Optional[torch.Tensor] = None, ids=None):
        """``q_t = phi(h_t)``, ``k_t = phi(h_{t-1})`` as ``[B, T, H, F]``; None; the new cache
        (``ids``: unused, the keys are the hidden states')."""
        B, T, D = h.shape
        hn = F.normalize(h.to(torch.promote_types(h.dtype, torch.float32)), p=2, dim=-1)
        prev = hn.new_zeros(B, 1, D) if cache is None else cache.to(hn.dtype)
        q = self.features(hn)
        # phi of the previous position: one new row (the cache), the rest shifted from q
        k = torch.cat([self.features(prev), q[:, :-1]], dim=1)
        H, Fdim = self.n_heads, self.head_k_dim
        return q.unsqueeze(2).expand(B, T, H, Fdim), k.unsqueeze(2).expand(B, T, H, Fdim), None, hn[:, -1:]
