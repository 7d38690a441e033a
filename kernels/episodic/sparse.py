"""The episodic memory's decode step on the rows its keys fire: O(active rows x V) per token.

The keys ``phi(h) = unit(relu(R unit(h) - theta))`` fire on 2-7% of the F = 2048 features, so a
token's write ``beta k u^T`` touches only the rows of ``k``'s non-zeros and its read ``S^T q`` only
those of ``q``'s. What is left dense is the decay toward the resting state, ``S - M <- a (S - M)``
on every row; it is kept lazily: the state holds ``U`` with

    S - M = c U                   c [B, H]: the product of the decays since ``U`` was last rescaled
    E     = c (U + Y)             Y: what the trace differed from ``S - M`` when the state was built

so a decay is a scalar product per head, and a write ``D`` adds ``D / c`` into ``U``'s rows. When
``c`` falls below ``MIN_SCALE`` it is folded into ``U`` (one dense pass, every ~1e4 spans' worth of
decay at the shipped model's span: never in practice), which keeps ``U`` in range. ``Y`` is None
when the trace equals ``S - M`` (an episode that started at rest), the case of every session.

Two steps, one per write rule (:mod:`cl_arch.memory.write`):
:func:`sparse_delta_step` (the delta rule on the token's value) and :func:`sparse_error_step` (the
model's own prediction error). Both update a :class:`SparseEpisodicState` in place, write the read
into a caller's buffer, and equal the dense rule (``naive.py``,
:func:`~cl_arch.kernels.error_write.naive.naive_error_write`) to rounding. ``from_dense`` /
``to_dense`` convert to and from the layout sessions and files use (dense ``S``, ``E``).
No autograd: decoding only.
"""
from collections.abc import Sequence

import torch

# below this the lazily kept scale c is folded into U, so U's entries stay in range
MIN_SCALE = 1e-4

Active = tuple[torch.Tensor, torch.Tensor]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a step is a few dozen tiny ops, so even a no-op .to() (one dispatch) shows in its time
    return x if x.dtype == dtype else x.to(dtype)


def active(x: torch.Tensor, n: int | None = None, nonneg: bool = False) -> Active:
    """``(idx [..., n] int64, val [..., n])``: the ``n`` entries of ``x [..., F]`` largest in magnitude.

    ``n`` None: the most non-zeros of any row (one host read), at least 1, so every non-zero is
    kept; rows with fewer carry padding entries of value 0, which read and write nothing. A fixed
    ``n`` gives static shapes, and is exact while no row has more than ``n`` non-zeros. ``nonneg``: ``x``
    is known to be ``>= 0`` (the episodic keys are), which saves two passes."""
    if n is None:
        n = max(int((x != 0).sum(-1).max()), 1) if x.numel() else 1
    if not 1 <= n <= x.shape[-1]:
        raise ValueError(f"active: n must be in [1, {x.shape[-1]}], got {n}")
    if nonneg:
        val, idx = x.topk(n, dim=-1, sorted=False)
        return idx, val
    idx = x.abs().topk(n, dim=-1, sorted=False).indices
    return idx, x.gather(-1, idx)


class SparseEpisodicState:
    """The decode state of one episodic memory for ``B`` streams: buffers allocated once, updated in place.

    Attributes:
        UM: ``[B, H, F, 2, V]`` contiguous: per feature row, ``U`` (``S - M = c U``) then ``M`` (the resting
            state, fixed within an episode), so one gather reads a row of both.
        U, M: ``[B, H, F, V]`` views into ``UM``.
        c: ``[B, H]`` the lazily kept decay.
        Y: ``[B, H, F, V]`` or None, ``E = c (U + Y)``.
        p: ``[B, V]`` the last position's prediction (the error write's; zeros: nothing predicted yet).
    """

    def __init__(self, UM: torch.Tensor, c: torch.Tensor, Y: torch.Tensor | None = None,
                 p: torch.Tensor | None = None) -> None:
        if UM.dim() != 5 or UM.shape[3] != 2 or not UM.is_contiguous():
            raise ValueError(f"UM must be a contiguous [B, H, F, 2, V] tensor, got shape {tuple(UM.shape)}")
        B, H, Fdim, _, V = UM.shape
        if tuple(c.shape) != (B, H):
            raise ValueError(f"c has shape {tuple(c.shape)}, expected {(B, H)}")
        if Y is not None and (tuple(Y.shape) != (B, H, Fdim, V) or not Y.is_contiguous()):
            raise ValueError(f"Y must be a contiguous {(B, H, Fdim, V)} tensor, got {tuple(Y.shape)}")
        if p is not None and tuple(p.shape) != (B, V):
            raise ValueError(f"p has shape {tuple(p.shape)}, expected {(B, V)}")
        self.UM, self.c, self.Y, self.p = UM, c, Y, p
        self.U, self.M = UM[:, :, :, 0], UM[:, :, :, 1]
        self.shape = (B, H, Fdim, V)
        self._rows = UM.view(-1, 2 * V)  # row r = (b, h, f): [U | M]
        self._U_rows = UM.view(-1, 2, V)[:, 0]  # U's rows, where writes go
        self._base = (torch.arange(B * H, device=UM.device) * Fdim).view(B, H, 1, 1)
        self._base3 = self._base.view(B, H, 1)
        self._c3, self._c4 = c.view(B, H, 1), c.view(B, H, 1, 1)  # views: they follow c's in-place updates
        self._one = torch.ones(B, 1, dtype=UM.dtype, device=UM.device)

    # ---------------------------------------------------------------- the dense layout
    @classmethod
    def from_dense(cls, S: torch.Tensor, M: None | torch.Tensor | Sequence[torch.Tensor] = None,
                   E: torch.Tensor | None = None, p: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> "SparseEpisodicState":
        """The state whose dense form is ``S [B, H, F, V]``, resting state ``M`` (``[B, H, F, V]`` or
        ``[H, F, V]``, a sequence of such parts summed, e.g. ``(W0, P)``, or None: zeros), trace ``E``
        (None: zeros) and prediction ``p [B, V]`` (None: no buffer). Allocates the buffers (``UM``, and
        ``Y`` only when ``E != S - M``) in ``dtype`` (default: S's, at least float32)."""
        dtype = dtype or torch.promote_types(S.dtype, torch.float32)
        B, H, Fdim, V = S.shape
        parts = () if M is None else ((M,) if isinstance(M, torch.Tensor) else tuple(M))
        UM = S.new_zeros(B, H, Fdim, 2, V, dtype=dtype)
        for i, m in enumerate(parts):
            if tuple(m.shape) not in ((H, Fdim, V), (B, H, Fdim, V)):
                raise ValueError(f"M[{i}] has shape {tuple(m.shape)}, expected {(H, Fdim, V)} or {(B, H, Fdim, V)}")
            UM[:, :, :, 1].add_(m.to(dtype))
        U = UM[:, :, :, 0]
        U.copy_(S.to(dtype) - UM[:, :, :, 1])
        Y = -U if E is None else E.to(dtype) - U
        Y = Y.contiguous() if bool(Y.any()) else None
        c = torch.ones(B, H, dtype=dtype, device=S.device)
        return cls(UM, c, Y, None if p is None else p.to(dtype).clone())

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, E)`` ``[B, H, F, V]``, new tensors: what a session holds and a file saves."""
        c = self.c[..., None, None]
        dev = c * self.U
        E = dev if self.Y is None else c * (self.U + self.Y)
        return dev.add_(self.M) if self.Y is not None else self.M + dev, E

    def renormalise(self) -> None:
        """Fold ``c`` into ``U`` (and ``Y``): one dense pass; the dense form does not change."""
        c = self.c[..., None, None]
        self.U.mul_(c)
        if self.Y is not None:
            self.Y.mul_(c)
        self.c.fill_(1.0)

    # ---------------------------------------------------------------- rows
    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B, H, m, n, 2V]``: the rows ``[U | M]`` at feature indices ``idx [B, H, m, n]``."""
        B, H, _, V = self.shape
        m, n = idx.shape[-2:]
        return self._rows.index_select(0, (self._base + idx).view(-1)).view(B, H, m, n, 2 * V)

    def apply(self, rows: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """``S^T x [B, H, m, V]`` for ``m`` sparse vectors with values ``val [B, H, m, n]`` at the gathered
        ``rows`` (:meth:`gather`)."""
        B, H, m, _, V2 = rows.shape
        r = torch.matmul(_cast(val, rows.dtype).unsqueeze(-2), rows).view(B, H, m, V2)
        return torch.addcmul(r[..., V2 // 2:], self._c4, r[..., :V2 // 2])

    def decay(self, g: torch.Tensor) -> None:
        """``S - M <- exp(g) (S - M)`` (and the trace) for ``g [B, H]``: a scalar per head."""
        self.c.mul_(_cast(g, self.c.dtype).exp())
        if float(self.c.min()) < MIN_SCALE:
            self.renormalise()

    def write(self, idx: torch.Tensor, w: torch.Tensor, u: torch.Tensor, rows: torch.Tensor) -> None:
        """``S += k u^T`` in the rows of ``k = (idx, w) [B, H, n]`` (``w``: the key times the step),
        ``u [B, H, V]``, with ``rows [B, H, n, 2V]`` the rows at ``idx`` as gathered since the last write;
        the trace follows (its difference from ``S - M`` is untouched). Indices are distinct per
        ``(b, h)`` (:func:`active`'s are), so the new rows are copied in, not accumulated (a copy is
        cheaper than ``index_add_`` on the CPU)."""
        V = self.shape[-1]
        new = torch.addcmul(rows[..., :V], (w / self._c3).unsqueeze(-1), u.unsqueeze(-2))
        self._U_rows.index_copy_(0, (self._base3 + idx).view(-1), new.view(-1, V))


def _pair(ka: Active, qa: Active) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, val) [B, H, 2, n]``: the write and read keys side by side (the shorter padded with zeros)."""
    n = max(ka[0].shape[-1], qa[0].shape[-1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-1] == n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))

    return torch.stack([pad(ka[0]), pad(qa[0])], -2), torch.stack([pad(ka[1]), pad(qa[1])], -2)


def _overlap(ka: Active, qa: Active, dtype: torch.dtype) -> torch.Tensor:
    """``k . q [B, H]`` from the two keys' active entries."""
    same = ka[0].unsqueeze(-1) == qa[0].unsqueeze(-2)  # [B, H, n_k, n_q]
    prod = _cast(ka[1], dtype).unsqueeze(-1) * _cast(qa[1], dtype).unsqueeze(-2)
    return prod.mul_(same).sum((-2, -1))


def sparse_delta_step(st: SparseEpisodicState, qa: Active, ka: Active, v: torch.Tensor, beta: torch.Tensor,
                      g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token of the delta rule (``naive.py``), in place on ``st``.

    Args:
        st: the state (updated in place).
        qa, ka: ``(idx, val) [B, H, n]`` the read and write keys' active entries (:func:`active`).
        v: ``[B, H, V]`` the value; beta, g: ``[B, H]`` write strength and log-decay.
        out: ``[B, H, V]`` buffer for the read (overwritten; None: a new tensor).

    Returns:
        ``o = S^T q [B, H, V]`` (``out`` when given).
    """
    dt = st.U.dtype
    st.decay(g)
    idx, val = _pair(ka, qa)
    rows = st.gather(idx)
    r = st.apply(rows, val)  # [B, H, 2, V]: S'^T k and S'^T q, before the write
    u = _cast(v, dt) - r[:, :, 0]
    beta = _cast(beta, dt)
    n = ka[0].shape[-1]
    st.write(ka[0], _cast(ka[1], dt) * beta.unsqueeze(-1), u, rows[:, :, 0, :n])
    # read after the write: S^T q = S'^T q + beta (k . q) u
    o = torch.addcmul(r[:, :, 1], (beta * _overlap(ka, qa, dt)).unsqueeze(-1), u)
    return o if out is None else out.copy_(o)


def sparse_error_step(st: SparseEpisodicState, qa: Active, ka: Active, target: torch.Tensor, base: torch.Tensor,
                      eta: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """One token of the error-driven write (:mod:`cl_arch.kernels.error_write`), in place on ``st``.

    Writes ``eta k (e(x_t) - p_{t-1})^T`` with ``p_{t-1} = st.p``, reads ``z = base + sum_h a_h S_h^T q_h``
    and leaves ``st.p = softmax(z)``.

    Args:
        st: the state, with a ``p [B, V]`` buffer (updated in place).
        qa, ka: ``(idx, val) [B, H, n]`` active entries of the read and write keys.
        target: ``[B]`` int64, ``x_t``; base: ``[B, V]`` the logits before this memory's read.
        eta, g: ``[B, H]`` write step and log-decay; scale: ``[H]`` read scale ``a``.
        out: ``[B, V]`` buffer for the read (overwritten; None: a new tensor).

    Returns:
        ``read [B, V]`` (``out`` when given), ``z - base``.
    """
    if st.p is None:
        raise ValueError("sparse_error_step: the state has no p buffer (from_dense(..., p=zeros) gives one)")
    B, H, _, V = st.shape
    dt = st.U.dtype
    st.decay(g)
    u = st.p.neg()
    u.scatter_add_(1, target.view(B, 1), st._one)
    eta = _cast(eta, dt)
    uh = u[:, None, :].expand(B, H, V)
    idx, val = _pair(ka, qa)
    rows = st.gather(idx)
    rq = st.apply(rows[:, :, 1:], val[:, :, 1:])[:, :, 0]  # S'^T q, before the write
    st.write(ka[0], _cast(ka[1], dt) * eta.unsqueeze(-1), uh, rows[:, :, 0, :ka[0].shape[-1]])
    # read after the write: S^T q = S'^T q + eta (k . q) u
    o = torch.addcmul(rq, (eta * _overlap(ka, qa, dt)).unsqueeze(-1), uh)
    read = torch.matmul(_cast(scale, dt), o)  # sum_h a_h o_h: [B, V]
    st.p.copy_(torch.softmax(_cast(base, dt) + read, dim=-1))
    return read if out is None else out.copy_(read)


def sparse_episodic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor,
                    initial_state: torch.Tensor | None = None, resting_state: torch.Tensor | None = None,
                    initial_trace: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~cl_arch.kernels.episodic.naive.naive_episodic`'s arguments and results, one
    :func:`sparse_delta_step` per token (from and back to the dense layout once per call)."""
    B, T, H, Fdim = q.shape
    V = v.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        M = None if resting_state is None else resting_state.to(dtype).expand(B, H, Fdim, V)
        S0 = M if initial_state is None else initial_state
        if S0 is None:
            S0 = q.new_zeros(B, H, Fdim, V, dtype=dtype)
        st = SparseEpisodicState.from_dense(S0, resting_state, initial_trace, dtype=dtype)
        o = torch.full((B, T, H, V), float("nan"), dtype=dtype, device=q.device)
        for t in range(T):
            sparse_delta_step(st, active(q[:, t].to(dtype)), active(k[:, t].to(dtype)), v[:, t], beta[:, t],
                              g[:, t], out=o[:, t])
        S, E = st.to_dense()
    return o, S, E


def sparse_error_write(q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, base: torch.Tensor,
                       eta: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, initial_state: torch.Tensor,
                       resting_state: torch.Tensor | None = None, initial_probs: torch.Tensor | None = None,
                       initial_trace: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~cl_arch.kernels.error_write.naive.naive_error_write`'s arguments (``g`` required) and
    results, plus the final trace: ``(read [B, T, V], S, p [B, V], E)``, one :func:`sparse_error_step`
    per token. ``E`` follows the state's decay from ``initial_trace`` (None: zeros)."""
    B, T, _H, _Fdim = q.shape
    V = base.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        p0 = q.new_zeros(B, V, dtype=dtype) if initial_probs is None else initial_probs
        st = SparseEpisodicState.from_dense(initial_state, resting_state, initial_trace, p=p0, dtype=dtype)
        reads = torch.full((B, T, V), float("nan"), dtype=dtype, device=q.device)
        for t in range(T):
            sparse_error_step(st, active(q[:, t].to(dtype)), active(k[:, t].to(dtype)), targets[:, t], base[:, t],
                              eta[:, t], g[:, t], scale, out=reads[:, t])
        S, E = st.to_dense()
    return reads.to(base.dtype), S, st.p, E


__all__ = ["MIN_SCALE", "SparseEpisodicState", "active", "sparse_delta_step", "sparse_episodic",
           "sparse_error_step", "sparse_error_write"]
