"""One decode token of each kind of state slot, in place on buffers allocated once (:class:`~cl_arch.decode.Decoder`).

Each slot holds the buffers of one entry of ``ModelState.layers``, converts to and from that entry
(``load`` copies into the buffers, ``dump`` returns new tensors) and runs one token (``step``) with
in-place updates only, no host read, and the same arithmetic as the model's forward on one token:

* :class:`FastSlot`: a block's :class:`~cl_arch.memory.FastWeightLayer` (the rule of
  ``kernels/plastic/naive.py``, its short-conv cache, ``target="next"`` keys);
* :class:`AttnSlot`: attention over a ring buffer of the window's keys (or ``max_len`` of them);
* :class:`DenseOutSlot`: an output memory with a small dense state (the readout), either write rule;
* :class:`EpisodicSlot`: the episodic memory on a lazily decayed
  :class:`~cl_arch.kernels.episodic.SparseEpisodicState`, its keys' active features a fixed number
  ``n`` (static shapes for ``torch.compile``; exact while no key fires more than ``n``, which each step
  records in ``overflow`` without reading it);
* :class:`VerdictSlot`: the verdict memory's read ``phi^T (W0 + P)`` on the rows ``phi`` fires.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.episodic import (
    MIN_SCALE,
    SparseEpisodicState,
    sparse_delta_step,
    sparse_error_step,
)
from ..layers.rotary import apply_rotary
from ..memory.output import OutputContext
from ..state import AttnLayerState, FastLayerState, StepContext


def _rest(memory, B: int, P: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``M = W0 + P`` as a new ``[B, H, K, V]`` buffer."""
    return memory.resting_state(B, P).detach().to(dtype).expand(B, *memory.W0.shape).contiguous()


def _split(x: torch.Tensor | None, B: int) -> list:
    """A loaded ``[B, ...]`` tensor (or None, or one row for every row) as one entry per row, each ``[1, ...]``
    or None; with ``B = 1`` the tensor itself, so a one-row decoder hands back the object it was given."""
    if x is None:
        return [None] * B
    if B == 1:
        return [x]
    if x.shape[0] == 1:
        return [x] * B
    return [x[b:b + 1] for b in range(B)]


def _join(rows: list, fill) -> torch.Tensor | None:
    """The entries of :func:`_split` as one ``[B, ...]`` tensor (None rows from ``fill(b)``), None when all are."""
    if all(r is None for r in rows):
        return None
    if len(rows) == 1:
        return rows[0]
    return torch.cat([r if r is not None else fill(b) for b, r in enumerate(rows)])


def _set_Y(Y: torch.Tensor | None, r: slice, value: torch.Tensor, shape) -> torch.Tensor | None:
    """Rows ``r`` of a lazily kept trace offset ``Y`` (None: zero everywhere) set to ``value``; allocated on
    the first rows that need it. Returns the (possibly new) ``Y``."""
    if bool(value.any()):
        if Y is None:
            Y = value.new_zeros(shape)
        Y[r].copy_(value)
    elif Y is not None:
        Y[r].zero_()
    return Y


class _RowSlot:
    """``load`` / ``dump`` of every row and ``load_row`` / ``dump_row`` of one, on one body each: a slot writes
    ``_load(r, n, s, raw)`` (rows ``r``, ``n`` of them, from the materialised slot ``s`` and the same before
    materialising, ``raw``) and ``_dump(r)``, and keeps each row's ``P`` as loaded in ``P_rows``."""

    B: int
    P_rows: list

    def load(self, s: FastLayerState, raw: FastLayerState | None = None) -> None:
        """Copy a materialised slot (``S``, ``E`` or None, ``P``, ``conv``) of every row into the buffers."""
        self._load(slice(None), self.B, s, s if raw is None else raw)

    def load_row(self, b: int, s: FastLayerState, raw: FastLayerState | None = None) -> None:
        """:meth:`load` of a one-row slot into row ``b`` (the other rows untouched)."""
        self._load(slice(b, b + 1), 1, s, s if raw is None else raw)

    def dump(self) -> FastLayerState:
        """Every row as a slot of new tensors (``P`` as loaded)."""
        return self._dump(slice(None))

    def dump_row(self, b: int) -> FastLayerState:
        """Row ``b`` as a one-row slot of new tensors (``P`` as loaded)."""
        return self._dump(slice(b, b + 1))

    def _P(self, r: slice, like: torch.Tensor) -> torch.Tensor | None:
        """The ``P`` of rows ``r`` as loaded (rows loaded without one: zeros shaped like ``like[:1]``)."""
        return _join(self.P_rows[r], lambda i: torch.zeros_like(like[:1]))

    def _load(self, r: slice, n: int, s: FastLayerState, raw: FastLayerState) -> None:
        raise NotImplementedError

    def _dump(self, r: slice) -> FastLayerState:
        raise NotImplementedError


class LazyEpisodicState(SparseEpisodicState):
    """A :class:`SparseEpisodicState` whose decay reads nothing back: the decay of the episodic memory
    is the same every token (``g = -exp(A_log)``), so the decoder folds ``c`` on a host-side count of
    steps (:attr:`EpisodicSlot.fold_every`) instead of comparing ``c`` with ``MIN_SCALE`` each token."""

    def decay(self, g: torch.Tensor) -> None:
        self.c.mul_(g.to(self.c.dtype).exp())

    def write(self, idx: torch.Tensor, w: torch.Tensor, u: torch.Tensor, rows: torch.Tensor) -> None:
        """As :meth:`SparseEpisodicState.write`, but whole ``[U | M]`` rows go back into the one 2-D buffer the
        step reads (``M``'s half as gathered): a compiled step then mutates a single input in place, where a
        write through the ``U`` view made inductor copy the whole state back every token."""
        V = self.shape[-1]
        new = torch.addcmul(rows[..., :V], (w / self._c3).unsqueeze(-1), u.unsqueeze(-2))
        full = torch.cat([new, rows[..., V:]], dim=-1)
        self._rows.index_copy_(0, (self._base3 + idx).view(-1), full.view(-1, 2 * V))


class FastSlot(_RowSlot):
    """Buffers ``S``, ``E`` (when the layer keeps a trace), ``M``, ``conv`` of one fast-weight layer."""

    def __init__(self, layer, B: int, lam) -> None:
        self.layer, self.B = layer, B
        H, K, V = layer.n_heads, layer.head_k_dim, layer.head_v_dim
        dt = layer.state_dtype
        lam_t = layer.lam if lam is None else torch.as_tensor(lam, dtype=dt)
        self.lam = None if lam_t is None else lam_t.detach().to(dt).expand(H).reshape(1, H, 1, 1).clone()
        self.rest = layer.config.fast_rest == "resting"
        self.S = torch.zeros(B, H, K, V, dtype=dt)
        self.E = None if self.lam is None else torch.zeros(B, H, K, V, dtype=dt)
        self.M = torch.zeros(B, H, K, V, dtype=dt)
        shape = layer.cache_shape(B)
        self.conv = None if shape is None else torch.zeros(shape, dtype=layer.W0.dtype)
        self.P_rows: list = [None] * B  # each row's P as loaded ([1, H, K, V] or None), handed back by dump
        self.scale = K ** -0.5

    def _load(self, r: slice, n: int, s: FastLayerState, raw: FastLayerState) -> None:
        self.P_rows[r] = _split(s.P, n)
        if self.rest:
            self.M[r].copy_(_rest(self.layer, n, s.P, self.S.dtype))
        self.S[r].copy_(s.S)
        if self.E is not None:
            self.E[r].copy_(s.E) if s.E is not None else self.E[r].zero_()
        if self.conv is not None:
            self.conv[r].copy_(s.conv)

    def _dump(self, r: slice) -> FastLayerState:
        return FastLayerState(S=self.S[r].clone(), E=None if self.E is None else self.E[r].clone(),
                              P=self._P(r, self.S), conv=None if self.conv is None else self.conv[r].clone())

    def step(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """``x [B, d]`` (normed) and ``mod [B]`` -> ``y [B, d]``; S, E and the conv cache advance."""
        m = self.layer
        B, H, K, V = self.S.shape
        qkv = torch.cat([m.q_proj(x), m.k_proj(x), m.v_proj(x)], dim=-1)
        if m.conv is not None:
            xx = torch.cat([self.conv, qkv.unsqueeze(1)], dim=1)  # [B, cache_len + 1, C]
            # the depthwise conv's one or two output positions as a weighted sum: a conv1d call on
            # a few rows costs more in dispatch than its arithmetic
            w = m.conv.conv.weight[:, 0].t()  # [kernel, C]
            ks = w.shape[0]
            y = torch.stack([(xx[:, j:j + ks] * w).sum(1) for j in range(xx.shape[1] - ks + 1)], dim=1)
            y = F.silu(y)  # [B, lookback + 1, C]
            self.conv.copy_(xx[:, 1:])
        else:
            y = F.silu(qkv).unsqueeze(1)
        q, k, v = y[:, -1].split([H * K, H * K, H * V], dim=-1)
        if m.next_target:
            k = y[:, 0, H * K:2 * H * K]
        dt = self.S.dtype
        q = F.normalize(q.reshape(B, H, K), p=2, dim=-1).to(dt)
        k = F.normalize(k.reshape(B, H, K), p=2, dim=-1).to(dt)
        v = v.reshape(B, H, V).to(dt)
        cdt = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(m.b_proj(x).to(cdt)) * mod.to(cdt).unsqueeze(-1)
        g = -m.A_log.to(cdt).exp() * F.softplus(m.a_proj(x).to(cdt) + m.dt_bias.to(cdt))
        a = g.to(dt).exp()[..., None, None]
        if self.rest:
            self.S.sub_(self.M).mul_(a).add_(self.M)
        else:
            self.S.mul_(a)
        u = v - torch.einsum("bhkv,bhk->bhv", self.S, k) if m.config.rule == "delta" else v
        D = beta.to(dt)[..., None, None] * (k.unsqueeze(-1) * u.unsqueeze(-2))
        self.S.add_(D)
        if self.E is not None:
            self.E.mul_(self.lam).add_(D)
        o = torch.einsum("bhkv,bhk->bhv", self.S, q * self.scale).to(x.dtype)
        o = m.o_norm(o, m.g_proj(x).view(B, H, V)) if m.g_proj is not None else m.o_norm(o)
        return m.o_proj(o.reshape(B, H * V))


class AttnSlot:
    """A ring buffer of ``L`` keys and values: the window's ``attn_window`` or, without a window, ``max_len``."""

    def __init__(self, layer, B: int, L: int, dtype: torch.dtype) -> None:
        self.layer, self.L = layer, L
        nh, hd = layer.n_heads, layer.head_dim
        self.k = torch.zeros(B, nh, L, hd, dtype=dtype)
        self.v = torch.zeros(B, nh, L, hd, dtype=dtype)
        self.slots = torch.arange(L)

    def load(self, s: AttnLayerState, position: int, row: int | None = None) -> None:
        """The cache holds positions ``position - n .. position - 1`` in order; each goes to slot ``p % L``
        (of every row, or of ``row`` alone from a one-row ``s``)."""
        if s.k is None:
            return
        n = s.k.shape[2]
        if n > self.L - 1 or (self.layer.window is not None and n > self.layer.window - 1):
            raise ValueError(f"the attention cache holds {n} positions, this decoder's buffer {self.L - 1}")
        idx = torch.arange(position - n, position) % self.L
        k, v = (self.k, self.v) if row is None else (self.k[row:row + 1], self.v[row:row + 1])
        k.index_copy_(2, idx, s.k.to(k.dtype))
        v.index_copy_(2, idx, s.v.to(v.dtype))

    def dump(self, position: int, row: int | None = None) -> AttnLayerState:
        """The cache at ``position`` as a :class:`AttnLayerState` of new tensors (every row, or ``row``)."""
        k, v = (self.k, self.v) if row is None else (self.k[row:row + 1], self.v[row:row + 1])
        keep = position if self.layer.window is None else min(position, self.layer.window - 1)
        if keep == 0 and position == 0:
            return AttnLayerState(k[:, :, :0].clone(), v[:, :, :0].clone())
        idx = torch.arange(position - keep, position) % self.L
        return AttnLayerState(k.index_select(2, idx), v.index_select(2, idx))

    def step(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [B, d]`` (normed), each row at its position ``pos [B]`` (int64), ``cos, sin [B, 1, 1, head_dim]``."""
        m = self.layer
        B, C = x.shape
        q, k, v = (t.view(B, m.n_heads, 1, m.head_dim) for t in m.qkv_proj(x).split(C, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        slot = torch.remainder(pos, self.L).view(B, 1, 1, 1).expand(B, m.n_heads, 1, m.head_dim)
        self.k.scatter_(2, slot, k)
        self.v.scatter_(2, slot, v)
        # slot i holds a position of the window once written: all of them from position L - 1 on
        allowed = (self.slots.view(1, self.L) <= pos.view(B, 1)).view(B, 1, 1, self.L)
        y = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=allowed)
        return m.o_proj(y.reshape(B, C))


class DenseOutSlot(_RowSlot):
    """An output memory with a dense ``[B, H, K, V]`` state (the readout), delta or error write."""

    def __init__(self, memory, B: int, lam) -> None:
        self.mem, self.B = memory, B
        H, K, V = memory.n_heads, memory.head_k_dim, memory.head_v_dim
        dt = memory.state_dtype
        self.error = memory.write.name == "error"
        lam_t = memory.lam if (lam is None or memory.trace_follows_state) else torch.as_tensor(lam, dtype=dt)
        self.lam = None if lam_t is None else lam_t.detach().to(dt).expand(H).reshape(1, H, 1, 1).clone()
        self.S = torch.zeros(B, H, K, V, dtype=dt)
        self.E = None if self.lam is None else torch.zeros(B, H, K, V, dtype=dt)
        self.M = torch.zeros(B, H, K, V, dtype=dt)
        self.key = torch.zeros(B, K, dtype=dt)
        self.p = torch.zeros(B, V, dtype=dt) if self.error else None
        self.P_rows: list = [None] * B

    def _load(self, r: slice, n: int, s: FastLayerState, raw: FastLayerState) -> None:
        self.P_rows[r] = _split(s.P, n)
        self.M[r].copy_(_rest(self.mem, n, s.P, self.S.dtype))
        self.S[r].copy_(s.S)
        if self.E is not None:
            self.E[r].copy_(s.E) if s.E is not None else self.E[r].zero_()
        self._load_conv(r, s)

    def _load_conv(self, r: slice, s: FastLayerState) -> None:
        K = self.key.shape[1]
        self.key[r].copy_(s.conv[:, 0, :K])
        if self.p is not None:
            self.p[r].copy_(s.conv[:, 0, K:])

    def _conv(self, r: slice) -> torch.Tensor:
        conv = self.key[r] if self.p is None else torch.cat([self.key[r], self.p[r]], dim=-1)
        return conv.unsqueeze(1).clone()

    def _dump(self, r: slice) -> FastLayerState:
        return FastLayerState(S=self.S[r].clone(), E=None if self.E is None else self.E[r].clone(),
                              P=self._P(r, self.M), conv=self._conv(r))

    def step(self, h: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, mod: torch.Tensor,
             embed, head) -> torch.Tensor:
        """``h [B, d]`` (after the last norm), ``ids [B]``, ``logits [B, vocab]`` before this read -> read ``[B, vocab]``."""
        m = self.mem
        dt = self.S.dtype
        hn = F.normalize(h.to(dt), p=2, dim=-1)
        if m.key_kind == "hidden+token":
            hn = torch.cat([hn, F.one_hot(ids, m.vocab_size).to(dt)], dim=-1) / math.sqrt(2.0)
        beta = torch.sigmoid(m.beta_logit.to(dt)) * mod.to(dt).unsqueeze(-1)  # [B, H]
        a = (-m.A_log.to(dt).exp()).exp()[None, :, None, None]
        self.S.sub_(self.M).mul_(a).add_(self.M)
        k = self.key[:, None, :]  # every head reads the same keys
        if self.error:
            u = (F.one_hot(ids, m.head_v_dim).to(dt) - self.p).unsqueeze(1)  # [B, 1, V]
        else:
            v = m.values(ids[:, None], embed, dt)[:, 0]  # [B, H, V]
            u = v - torch.einsum("bhkv,bk->bhv", self.S, self.key)
        D = beta[..., None, None] * (k.unsqueeze(-1) * u.unsqueeze(-2))
        self.S.add_(D)
        if self.E is not None:
            self.E.mul_(self.lam).add_(D)
        o = torch.einsum("bhkv,bk->bhv", self.S, hn)
        return self._finish(m, o, logits, head, h, hn, dt)


    def _finish(self, m, o, logits, head, h, hn, dt):
        """The read ``o [B, H, V]`` as the memory adds it to the logits; keeps ``p`` (error writes) and
        this position's key for the next write."""
        read = torch.einsum("bhv,h->bv", o, m.read_scale.to(dt))
        if self.error:
            self.p.copy_(torch.softmax(logits.to(dt) + read, dim=-1))
        elif m.value_kind != "onehot":
            read = head(read.to(h.dtype))
        self.key.copy_(hn)
        return read.to(h.dtype)


class LazyOutSlot(DenseOutSlot):
    """A dense output memory under the state commit (the shipped readout): its decay is the same every
    token and its trace follows the state, so the state is kept as ``S = M + c U``, ``E = c (U + Y)`` with
    ``c [H]`` the decay since the last fold (``SparseEpisodicState``'s form, dense rows). A token then
    reads ``M`` and ``U`` once each for both keys and adds the write into ``U``: three passes over a
    ``[B, H, K, V]`` state instead of about fourteen (the decay, the trace and the new ``D``)."""

    def __init__(self, memory, B: int, lam) -> None:
        super().__init__(memory, B, None)
        self.U, self.E = self.S, None  # S's buffer holds U
        self.Y = None
        self.c = torch.ones(memory.n_heads, dtype=self.U.dtype)
        g = -float(memory.A_log.detach().exp().max())
        self.fold_every = max(1, int(math.log(MIN_SCALE) / g) - 1) if g < 0 else 1 << 62
        self.steps = 0

    def _load(self, r: slice, n: int, s: FastLayerState, raw: FastLayerState) -> None:
        dt = self.U.dtype
        if n == self.B:  # every row: the buffer starts over
            self.c.fill_(1.0)
            self.Y, self.steps = None, 0
        else:  # c is one per head for every row: folded in before one row changes
            self._fold_now()
        self.P_rows[r] = _split(s.P, n)
        self.M[r].copy_(_rest(self.mem, n, s.P, dt))
        self.U[r].copy_(s.S.to(dt) - self.M[r])
        Y = (torch.zeros_like(self.U[r]) if s.E is None else s.E.to(dt)) - self.U[r]
        self.Y = _set_Y(self.Y, r, Y, self.U.shape)
        self._load_conv(r, s)

    def _dump(self, r: slice) -> FastLayerState:
        c = self.c[None, :, None, None]
        dev = c * self.U[r]
        E = dev.clone() if self.Y is None else c * (self.U[r] + self.Y[r])
        return FastLayerState(S=dev.add_(self.M[r]), E=E, P=self._P(r, self.M), conv=self._conv(r))

    def fold(self) -> None:
        """Fold ``c`` into ``U`` and ``Y`` (one pass; the state it stands for is unchanged)."""
        self.steps += 1
        if self.steps >= self.fold_every:
            self._fold_now()

    def _fold_now(self) -> None:
        c = self.c[None, :, None, None]
        self.U.mul_(c)
        if self.Y is not None:
            self.Y.mul_(c)
        self.c.fill_(1.0)
        self.steps = 0

    def step(self, h: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, mod: torch.Tensor,
             embed, head) -> torch.Tensor:
        m = self.mem
        dt = self.U.dtype
        B, H, K, V = self.U.shape
        hn = F.normalize(h.to(dt), p=2, dim=-1)
        if m.key_kind == "hidden+token":
            hn = torch.cat([hn, F.one_hot(ids, m.vocab_size).to(dt)], dim=-1) / math.sqrt(2.0)
        beta = torch.sigmoid(m.beta_logit.to(dt)) * mod.to(dt).unsqueeze(-1)  # [B, H]
        self.c.mul_((-m.A_log.to(dt).exp()).exp())
        c = self.c[None, :, None]
        kq = torch.stack([self.key, hn], dim=1)  # [B, 2, K]: the write key, then the read key
        kq = kq.unsqueeze(1).expand(B, H, 2, K)  # matmul over (b, h) reads M and U in place (einsum would permute them)
        r = torch.addcmul(torch.matmul(kq, self.M), c.unsqueeze(-1), torch.matmul(kq, self.U))  # [B, H, 2, V]
        if self.error:
            u = (F.one_hot(ids, V).to(dt) - self.p).unsqueeze(1).expand(B, H, V)
        else:
            u = m.values(ids[:, None], embed, dt)[:, 0] - r[:, :, 0]
        w = (beta / c[..., 0]).reshape(B * H, 1, 1)
        self.U.view(B * H, K, V).baddbmm_(self.key.repeat_interleave(H, 0).unsqueeze(-1) * w,
                                          u.reshape(B * H, 1, V))
        o = r[:, :, 1] + (beta * (self.key * hn).sum(-1, keepdim=True)).unsqueeze(-1) * u  # read after the write
        return self._finish(m, o, logits, head, h, hn, dt)


def _topk(phi: torch.Tensor, n: int, H: int):
    """Active entries ``(idx, val) [B, H, n]`` of ``phi [B, F]`` (every head reads the same key)."""
    val, idx = phi.topk(n, dim=-1, sorted=False)
    return idx.unsqueeze(1).expand(-1, H, -1), val.unsqueeze(1).expand(-1, H, -1)


class EpisodicSlot(_RowSlot):
    """The episodic memory on a lazily decayed sparse state; ``n`` active features per key."""

    def __init__(self, memory, B: int, n: int) -> None:
        self.mem, self.B, self.n = memory, B, n
        H, Fdim, V = memory.n_heads, memory.head_k_dim, memory.head_v_dim
        dt = memory.state_dtype
        self.error = memory.write.name == "error"
        self.st = LazyEpisodicState(torch.zeros(B, H, Fdim, 2, V, dtype=dt), torch.ones(B, H, dtype=dt),
                                    None, torch.zeros(B, V, dtype=dt) if self.error else None)
        self.key = torch.zeros(B, memory.d_model, dtype=dt)
        self.ka_idx = torch.zeros(B, H, n, dtype=torch.long)  # the write key's active set: the last read key's
        self.ka_val = torch.zeros(B, H, n, dtype=dt)
        self.overflow = torch.zeros((), dtype=torch.long)  # the most features any key fired
        self.proj = torch.zeros(B, Fdim, dtype=dt)  # hn R^T of the last step: a verdict memory with the same R reads it
        g = -float(memory.A_log.detach().exp().max())
        # fold c into U before it falls below MIN_SCALE: c = exp(g * steps) for the fastest head
        self.fold_every = max(1, int(math.log(MIN_SCALE) / g) - 1) if g < 0 else 1 << 62
        self.P_rows: list = [None] * B
        self.shares_projection = False  # set by the decoder when a verdict slot reads self.proj

    def _load(self, r: slice, n: int, s: FastLayerState, raw: FastLayerState) -> None:
        """Rows ``r`` from a materialised slot; their decay ``c`` restarts at 1."""
        d, dt, st = self.key.shape[1], self.key.dtype, self.st
        if n == self.B:
            st.Y = None
        self.P_rows[r] = _split(s.P, n)
        st.M[r].copy_(_rest(self.mem, n, s.P, dt))
        st.U[r].copy_(s.S.to(dt) - st.M[r])
        st.c[r].fill_(1.0)
        Y = (torch.zeros_like(st.U[r]) if s.E is None else s.E.to(dt)) - st.U[r]
        st.Y = _set_Y(st.Y, r, Y, st.shape)
        if st.p is not None:
            st.p[r].copy_(s.conv[:, 0, d:])
        self.key[r].copy_(s.conv[:, 0, :d])
        idx, val = self._keys(self.key[r])
        self.ka_idx[r].copy_(idx)
        self.ka_val[r].copy_(val)

    def _dump(self, r: slice) -> FastLayerState:
        st = self.st
        c = st.c[r][..., None, None]
        dev = c * st.U[r]
        E = dev.clone() if st.Y is None else c * (st.U[r] + st.Y[r])
        conv = self.key[r] if st.p is None else torch.cat([self.key[r], st.p[r]], dim=-1)
        return FastLayerState(S=dev.add_(st.M[r]), E=E, P=self._P(r, st.M), conv=conv.unsqueeze(1).clone())

    def _keys(self, hn: torch.Tensor, keep: bool = False):
        if keep:
            self.proj.copy_(hn @ self.mem.R.to(hn.dtype).T)
            phi = self.mem.features_from_projection(self.proj)
        else:
            phi = self.mem.features(hn)
        self.overflow.copy_(torch.maximum(self.overflow, (phi > 0).sum(-1).max()))
        return _topk(phi, self.n, self.mem.n_heads)

    def step(self, h: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, mod: torch.Tensor,
             embed, head) -> torch.Tensor:
        m, st = self.mem, self.st
        B, H, _, _V = st.shape
        dt = self.key.dtype
        hn = F.normalize(h.to(dt), p=2, dim=-1)
        qa = self._keys(hn, keep=self.shares_projection)
        beta = (torch.sigmoid(m.beta_logit.to(dt)) * mod.to(dt).unsqueeze(-1)).contiguous()
        g = (-m.A_log.to(dt).exp()).expand(B, H)
        ka = (self.ka_idx, self.ka_val)
        if self.error:
            read = sparse_error_step(st, qa, ka, ids, logits, beta, g, m.read_scale.to(dt))
        else:
            v = m.values(ids[:, None], embed, dt)[:, 0]
            o = sparse_delta_step(st, qa, ka, v, beta, g)
            read = torch.einsum("bhv,h->bv", o, m.read_scale.to(dt))
            if m.value_kind != "onehot":
                read = head(read.to(h.dtype))
        self.ka_idx.copy_(qa[0])
        self.ka_val.copy_(qa[1])
        self.key.copy_(hn)
        return read.to(h.dtype)


def _verdict_caches_phi(memory) -> bool:
    """Whether the verdict memory's state ``conv`` holds the last key ``phi(h)`` (``[B, 1, F]``) rather than
    ``unit(h)`` (``[B, 1, d_model]``): read off one forward of the memory, so either layout is followed."""
    with torch.no_grad():
        h = torch.randn(1, 1, memory.d_model, generator=torch.Generator().manual_seed(0)).to(memory.W0.dtype)
        out = OutputContext(h, torch.zeros(1, 1, dtype=torch.long), None, None)
        conv = memory(out, FastLayerState(), StepContext())[1].conv
    return conv.shape[-1] == memory.head_k_dim and conv.shape[-1] != memory.d_model or \
        bool(torch.equal(conv[:, -1], memory.features(F.normalize(h[:, -1].to(conv.dtype), p=2, dim=-1))))


DEFER_LIMIT = 256  # trace steps a VerdictSlot queues before it adds them to E


class VerdictSlot(_RowSlot):
    """The verdict memory: ``scale * phi(h)^T (W0 + P)`` on ``phi``'s active rows; ``E`` changes only by
    :meth:`reinforce`, ``S`` never."""

    def __init__(self, memory, B: int, n: int) -> None:
        self.mem, self.B, self.n = memory, B, n
        H, Fdim, V = memory.n_heads, memory.head_k_dim, memory.head_v_dim
        dt = memory.state_dtype
        self.Q = torch.zeros(B * H * Fdim, V, dtype=dt)  # W0 + P, rows (b, h, f)
        self.base = (torch.arange(B * H) * Fdim).view(B, H, 1)
        self.key_is_phi = _verdict_caches_phi(memory)
        self.key = torch.zeros(B, Fdim if self.key_is_phi else memory.d_model, dtype=dt)
        self.E = torch.zeros(B, H, Fdim, V, dtype=dt)
        self.overflow = torch.zeros((), dtype=torch.long)
        self.S_rows: list = [None] * B  # each row's S as loaded: nothing writes it, so None (W0 + P) stays None
        self.P_rows: list = [None] * B
        self.E_none = [True] * B  # per row: no trace yet (dump hands back None)
        self.zero = True  # W0 + P is zero (every session before its first verdict): the read is skipped
        self.projection = None  # an EpisodicSlot whose proj is hn R^T with this memory's R (set by the decoder)
        self.pending: list = []  # (key [B, K], tokens [B], logits [B, V]) of trace steps not yet in E (defer)

    def _load(self, r: slice, n: int, s: FastLayerState, raw: FastLayerState) -> None:
        """Rows ``r``; ``raw``'s ``S`` and ``E`` are None where the state holds none, and dump hands them back so."""
        if n == self.B:  # the loaded trace replaces whatever was queued for the old one
            self.pending.clear()
            self.zero = True
        else:  # the queued trace steps of every row go into E first
            self.flush()
        self.S_rows[r], self.P_rows[r] = _split(raw.S, n), _split(s.P, n)
        Q = self.Q.view(self.E.shape)[r]
        Q.copy_(_rest(self.mem, n, s.P, self.Q.dtype))
        # one scan per load, a host flag, so the step holds no branch on data; a row that left keeps it
        # False (reading zeros is exact)
        self.zero = self.zero and not bool(Q.any())
        self.E_none[r] = [raw.E is None] * n
        self.E[r].copy_(s.E) if s.E is not None else self.E[r].zero_()
        self.key[r].copy_(s.conv[:, 0])

    def _dump(self, r: slice) -> FastLayerState:
        self.flush()
        P_rows = self.P_rows[r]
        rest = lambda i: _rest(self.mem, 1, P_rows[i], self.Q.dtype)  # noqa: E731 - S of a row loaded as None
        return FastLayerState(S=_join(self.S_rows[r], rest), E=None if all(self.E_none[r]) else self.E[r].clone(),
                              P=self._P(r, self.E), conv=self.key[r].unsqueeze(1).clone())

    def step(self, h: torch.Tensor) -> torch.Tensor | None:
        """The read ``[B, V]`` for the final hidden state ``h [B, d]``, or None while ``W0 + P`` is zero;
        the key is kept either way (the trace of a generated token needs it)."""
        m = self.mem
        dt = self.key.dtype
        B, H, _Fdim, V = self.E.shape
        hn = F.normalize(h.to(dt), p=2, dim=-1)
        if self.projection is not None:  # the episodic slot already computed hn R^T this step
            phi = m.features_from_projection(self.projection.proj)
        elif self.key_is_phi or not self.zero:
            phi = m.features(hn)
        self.key.copy_(phi if self.key_is_phi else hn)
        if self.zero:
            return None
        self.overflow.copy_(torch.maximum(self.overflow, (phi > 0).sum(-1).max()))
        idx, val = _topk(phi, self.n, H)
        rows = self.Q.index_select(0, (self.base + idx).reshape(-1)).view(B, H, self.n, V)
        o = torch.matmul(val.unsqueeze(-2), rows)[:, :, 0]  # [B, H, V]
        return torch.einsum("bhv,h->bv", o, m.read_scale.to(dt)).to(h.dtype)

    def defer(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """:meth:`reinforce` for ``tokens [B]`` drawn from ``logits [B, V]`` (kept by reference: pass a tensor
        nobody overwrites) at the key held now, queued: :meth:`flush` adds the queue to ``E`` in one product.
        No step reads ``E`` (the read is ``W0 + P``), so only :meth:`dump` needs it current; a queue of one
        product per token cost a session about a tenth of its decode time in small-tensor launches."""
        self.pending.append((self.key.clone(), tokens, logits))
        self.E_none = [False] * self.B
        if len(self.pending) >= DEFER_LIMIT:  # bounds the keys held ([B, K] each) on long generations
            self.flush()

    def flush(self) -> None:
        """Add the queued trace steps to ``E``: ``E += sum_t phi_t g_t^T`` with ``(phi_t, g_t)`` the memory's own
        :meth:`~cl_arch.memory.verdict.VerdictMemory.policy_gradient` of each (the sum in another order than
        one step at a time: equal to float rounding), on the rows where some key fires."""
        if not self.pending:
            return
        keys, tokens, logits = zip(*self.pending)
        self.pending = []
        T, B, V = len(keys), self.B, self.E.shape[-1]
        key = torch.stack(keys, 1).reshape(B * T, 1, -1)  # row-major by session: [B, T] flattened
        phi, g = self.mem.policy_gradient(FastLayerState(conv=key), torch.stack(tokens, 1).reshape(B * T),
                                          torch.stack(logits, 1).reshape(B * T, V))
        E = self.mem.add_trace(FastLayerState(E=self.E), phi.view(B, T, -1), g.view(B, T, V)).E
        if E is not self.E:  # add_trace writes in place into a contiguous trace of its dtype: the buffer is one
            self.E.copy_(E)

    def reinforce(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """``E += phi(h) (e(a) - softmax(logits))^T`` for ``tokens [B]`` generated from ``logits [B, V]``
        at the last position read (:meth:`~cl_arch.memory.verdict.VerdictMemory.reinforce`), in place."""
        self.flush()
        phi, g = self.mem.policy_gradient(FastLayerState(conv=self.key.unsqueeze(1)), tokens, logits)
        B, H, Fdim, V = self.E.shape
        self.E.view(B * H, Fdim, V).baddbmm_(phi.repeat_interleave(H, 0)[:, :, None],
                                              g.repeat_interleave(H, 0)[:, None, :])
        self.E_none = [False] * self.B


__all__ = ["AttnSlot", "DenseOutSlot", "EpisodicSlot", "FastSlot", "LazyEpisodicState", "LazyOutSlot", "VerdictSlot"]
