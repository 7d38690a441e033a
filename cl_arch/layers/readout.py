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
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import PlasticConfig
from ..state import FastLayerState, StepContext
from .plasticity import PlasticMemory


class ReadoutMemory(PlasticMemory):
    """``forward(h [B, T, d], ids [B, T], state) -> (logit delta [B, T, vocab], FastLayerState)``.

    Keys and queries are the unit final hidden states (``K = d_model``, every head reads the same
    ones); values are one-hot tokens (``readout_values="onehot"``, ``V = vocab_size``) or token
    embeddings (``"embed"``, ``V = d_model``, read back through the tied head). Per head it learns
    a write strength ``beta = sigmoid(beta_logit)`` (times the per-token modulation, so a reward
    writes harder), a decay ``g = -exp(A_log)`` toward the resting state ``W0 + P``, and a read
    scale ``a``. The state's ``conv`` slot carries ``unit(h)`` of the last position, the key of
    the next call's first write.
    """

    def __init__(self, config: PlasticConfig):
        super().__init__()
        self.config = config
        H = config.readout_heads
        self.key_kind = config.readout_keys
        K = config.d_model if self.key_kind == "hidden" else config.d_model + config.vocab_size
        self.value_kind = config.readout_values
        V = config.vocab_size if self.value_kind == "onehot" else config.d_model
        self._init_memory(config, H, K, V)
        # Heads start at different time scales (memory of ~100 to ~10k tokens), like FLA's A init.
        span = torch.logspace(2, 4, H) if H > 1 else torch.tensor([1000.0])
        self.A_log = torch.nn.Parameter(torch.log(1.0 / span))
        self.beta_logit = torch.nn.Parameter(torch.full((H,), config.readout_beta).logit())
        self.read_scale = torch.nn.Parameter(torch.full((H,), float(config.readout_scale)))
        self.A_log._no_weight_decay = True
        self.beta_logit._no_weight_decay = True
        self.read_scale._no_weight_decay = True
        self.W0._no_weight_decay = True

    # ------------------------------------------------------------------ the state commit
    @property
    def decay(self) -> torch.Tensor:
        """Per-token retention ``exp(g)`` per head ``[H]``; the memory span is ``1 / -g`` tokens."""
        return torch.exp(-self.A_log.exp())

    @property
    def state_commit(self) -> bool:
        return self.config.readout_commit == "state"

    @property
    def trace_follows_state(self) -> bool:
        return self.state_commit

    @property
    def lam(self) -> Optional[torch.Tensor]:
        """Trace decay ``[H]``. Under the state commit it is the memory's own decay: the trace then
        sums exactly what the episode changed, ``E_T = S_T - M`` (constant gate, ``S_0 = M``)."""
        return self.decay if self.state_commit else super().lam

    def commit_rates(self):
        """Under the state commit: ``gamma = 1``, ``eta_s = 1`` on heads whose memory span
        (``1 / -g``, learned) reaches ``config.readout_commit_span`` and 0 on faster heads,
        ``eta_r = 0`` (rewards act on the writes through ``beta``, not on the commit). The next
        episode then starts where the slow heads ended, ``P_new = S_T - W0``, and keeps it: a
        fast head's content is stale a few hundred tokens later, and made permanent it only adds
        noise (measured on the held-out asyncio package)."""
        if not self.state_commit:
            return super().commit_rates()
        span = 1.0 / self.A_log.exp()
        keep = (span >= self.config.readout_commit_span).to(self.eta_s.dtype)
        return {"gamma": torch.ones_like(self.eta_s), "eta_s": keep, "eta_r": torch.zeros_like(self.eta_r)}

    def plasticity_parameters(self):
        """None under the state commit: its rates are fixed by construction, and what decides
        which heads commit is their span (``A_log``), trained with the network."""
        return {} if self.state_commit else super().plasticity_parameters()

    @property
    def commit_clip(self):
        return None if self.state_commit else self.config.commit_clip

    def cache_shape(self, batch_size: int):
        """``[B, 1, d_model]``: ``unit(h)`` of the last position read (zeros: nothing written yet)."""
        return (batch_size, 1, self.head_k_dim)

    def project_qkv(self, h: torch.Tensor, cache: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None):
        """Read and write keys of ``h [B, T, d_model]``: ``q_t = unit(h_t)``, ``k_t = unit(h_{t-1})``.

        With ``readout_keys="hidden+token"`` the key is ``[unit(h_t), one-hot(x_t)] / sqrt(2)``
        (``K = d_model + vocab_size``; ``ids [B, T]`` required): contexts whose hidden states agree
        but whose last tokens differ (a recall model after ``BOS cue``: cosine 0.999 across cues)
        get keys at most 0.5 alike. Meant for small vocabularies (the state is ``K x V``).

        Returns ``q, k [B, T, H, K]``, None (the values come from the tokens) and the new cache.
        """
        B, T, _ = h.shape
        cdt = torch.promote_types(h.dtype, torch.float32)
        hn = F.normalize(h.to(cdt), p=2, dim=-1)
        if self.key_kind == "hidden+token":
            if ids is None:
                raise ValueError("readout_keys='hidden+token' needs the input ids")
            # One-hot, not the embedding: a recall model's key embeddings are themselves nearly
            # parallel (cosine 0.99), and one-hot token parts make any two tokens' keys 0.5 apart at most.
            en = F.one_hot(ids, self.config.vocab_size).to(cdt)
            hn = torch.cat([hn, en], dim=-1) / math.sqrt(2.0)
        K = hn.shape[-1]
        prev = hn.new_zeros(B, 1, K) if cache is None else cache.to(hn.dtype)
        k = torch.cat([prev, hn[:, :-1]], dim=1)
        H = self.n_heads
        return (hn.unsqueeze(2).expand(B, T, H, K), k.unsqueeze(2).expand(B, T, H, K), None, hn[:, -1:])

    def values(self, ids: torch.Tensor, embed: torch.nn.Embedding, dtype: torch.dtype) -> torch.Tensor:
        """``[B, T, H, V]`` values of the observed tokens ``ids [B, T]``."""
        if self.value_kind == "onehot":
            v = F.one_hot(ids, self.head_v_dim).to(dtype)
        else:
            v = F.normalize(embed(ids).to(dtype), p=2, dim=-1) * math.sqrt(self.head_v_dim)
        return v.unsqueeze(2).expand(*ids.shape, self.n_heads, self.head_v_dim)

    def forward(
        self,
        h: torch.Tensor,
        ids: torch.Tensor,
        embed: torch.nn.Embedding,
        head: torch.nn.Module,
        state: Optional[FastLayerState] = None,
        ctx: Optional[StepContext] = None,
    ) -> Tuple[torch.Tensor, Optional[FastLayerState]]:
        """
        Args:
            h: ``[B, T, d_model]`` final hidden states (after the last norm).
            ids: ``[B, T]`` the input tokens (``x_t`` is what ``h_{t-1}`` should have predicted).
            embed, head: the model's embedding and output head (values and their read-back).
            state, ctx: as :class:`FastWeightLayer`.

        Returns:
            ``[B, T, vocab_size]`` to add to the logits, and the new state.
        """
        ctx = ctx if ctx is not None else StepContext()
        modulation, output_final_state, lam = ctx.modulation, ctx.need_state, ctx.lam
        B, T, _ = h.shape
        state = state if state is not None else FastLayerState()
        cdt = torch.promote_types(h.dtype, torch.float32)
        q, k, _, cache = self.project_qkv(h, state.conv, ids=ids)
        v = self.values(ids, embed, cdt)
        beta = torch.sigmoid(self.beta_logit.to(cdt)).expand(B, T, self.n_heads)
        if modulation is not None:
            beta = beta * modulation.to(cdt).unsqueeze(-1)
        g = (-self.A_log.to(cdt).exp()).expand(B, T, self.n_heads)
        if self.trace_follows_state:
            lam = None  # the trace must follow the memory's own decay (E_T = S_T - M); no override
        o, S_T, E_T = self.run_rule(q, k, v, beta, g, state, lam, output_final_state, scale=1.0)
        read = torch.einsum("bthv,h->btv", o.to(cdt), self.read_scale.to(cdt))
        if self.value_kind != "onehot":
            read = head(read.to(h.dtype))
        read = read.to(h.dtype)
        if not output_final_state:
            return read, None
        return read, FastLayerState(S=S_T, E=E_T, P=state.P, conv=cache)
