"""Token-by-token plastic rule for decoding (one or a few tokens per call): two backends.

``torch_recurrent`` (:func:`recurrent_plastic_rule`) keeps the fast weights of every
(batch, head) pair as one ``[B*H, K, V]`` stack and updates it with batched matmuls, so a
decode step is a handful of kernel launches whatever the batch; it is linear in T with a
Python loop. Prefill should use the chunked path (``chunk.py``, ``chunk_triton.py``).

``triton_recurrent`` (:func:`triton_recurrent_plastic_rule`, below): the forward and
backward kernels, their autograd function and the wrapper. The helpers it shares with
the chunked Triton backend (lazy triton import, jit at launch, packed layout, argument
handling, lam's gradient) are in ``triton_utils.py``; triton stays optional.
"""
from typing import Optional, Tuple, Union

import torch

from . import triton_utils
from .triton_utils import import_triton, jit_for_env, lam_grad, pack, prepare_triton_args


def recurrent_plastic_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    rule: str = "delta",
    lam: Optional[Union[float, torch.Tensor]] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    initial_trace: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Recurrent plastic rule; same contract as :func:`naive_plastic_rule`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta, g: ``[B, T, H]``;
        states ``[B, H, K, V]``; lam None, float or ``[H]``.

    Returns:
        o ``[B, T, H, V]`` (q's dtype), S_T and E_T ``[B, H, K, V]`` (fp32 or fp64).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BH = B * H
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = K ** -0.5 if scale is None else scale

    # Row layout [B*H, T, 1, K] lets each step be a batched outer/inner product.
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).movedim(1, 2).reshape(BH, T, 1, x.shape[-1])

    qr, kr, vr = rows(q * scale), rows(k), rows(v)
    br = beta.to(dtype).movedim(1, 2).reshape(BH, T, 1, 1)
    ar = None if g is None else g.to(dtype).exp().movedim(1, 2).reshape(BH, T, 1, 1)
    S = q.new_zeros(BH, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype).reshape(BH, K, V)
    if lam is not None:
        lam_r = torch.as_tensor(lam, dtype=dtype, device=q.device).expand(H).repeat(B).reshape(BH, 1, 1)
        E = q.new_zeros(BH, K, V, dtype=dtype) if initial_trace is None else initial_trace.to(dtype).reshape(BH, K, V)

    outs = []
    for t in range(T):
        if ar is not None:
            S = S * ar[:, t]
        k_col = kr[:, t].transpose(-1, -2)  # [BH, K, 1]
        u = vr[:, t] - torch.bmm(kr[:, t], S) if rule == "delta" else vr[:, t]  # [BH, 1, V]
        D = torch.bmm(k_col * br[:, t], u)  # [BH, K, V]
        S = S + D
        outs.append(torch.bmm(qr[:, t], S))  # [BH, 1, V]
        if lam is not None:
            E = torch.addcmul(D, lam_r, E)

    o = torch.cat(outs, dim=1).reshape(B, H, T, V).movedim(1, 2).to(out_dtype)
    if not output_final_state:
        return o, None, None
    E_T = E.reshape(B, H, K, V) if lam is not None else None
    return o, S.reshape(B, H, K, V), E_T


# ---------------------------------------------------------------------------
# Triton backend ("triton_recurrent")
#
# One program owns one (sequence, head, V-block): the [K, BV] slice of S (and of
# E) lives in registers for the whole sequence. The columns of S never mix (the
# rule is column-wise in V), so V-blocks are independent in the forward; in the
# backward the K-vector gradients (dq, dk) and the scalars (dbeta, dg, the lam
# terms) are sums over V and come out as per-V-block partials summed on the host.
#
# Backward: the forward stores S at the start of every segment of CHUNK tokens.
# The backward walks segments from last to first; for each it replays the
# forward from the checkpoint, writing S_{t-1} of every token to a per-program
# scratch buffer [CHUNK, BK, BV], then walks the segment's tokens in reverse.
# Per token (S' = a S_{t-1}; u = v - S'^T k; w = beta u; S_t = S' + k w^T;
# o = S_t^T (scale q); E_t = lam E_{t-1} + k w^T), with dS the gradient flowing
# into S_t and p = lam^(T-1-t)::
#
#     dS += scale q do^T ;  dq = scale S_t do
#     dD  = dS + p dE_T                 (the trace's gradient never feeds back)
#     dw  = dD^T k ; dk = dD w ; dbeta = dw . u ; du = beta dw ; dv = du
#     delta: dS -= k du^T ; dk -= S' du
#     dg  = <dS, S'> ;  dS_{t-1} = a dS
#
# lam's gradient is closed-form on the host from c_t = <dE_T, k_t w_t^T>:
# E_T = lam^T E_0 + sum_t lam^(T-1-t) k_t w_t^T, so
# dlam = T lam^(T-1) <dE_T, E_0> + sum_t (T-1-t) lam^(T-2-t) c_t (triton_utils.lam_grad).
# ---------------------------------------------------------------------------
triton = None
tl = None
constexpr = "tl.constexpr"  # becomes tl.constexpr on the first call (see triton_utils.import_triton)


# Autotuned launch configurations of the two recurrent kernels on a GPU. At
# K = 128, BV = 32 fewer than 4 warps spill the [K, BV] state tiles (compile_check).
LAUNCH_CONFIGS = {
    "fwd": [dict(num_warps=4, num_stages=1), dict(num_warps=8, num_stages=1)],
    "bwd": [dict(num_warps=4, num_stages=1), dict(num_warps=8, num_stages=1)],
}


if True:  # kernels: plain functions, jitted at launch (jit_for_env); annotations are strings

    def _recurrent_fwd_kernel(
        q, k, v, beta, g, lam, s0, e0, o, s_out, e_out, ckpt, cu, seg_off, scale,
        H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr,
        CHUNK: constexpr, DELTA: constexpr, HAS_G: constexpr, TRACE: constexpr,
        HAS_S0: constexpr, HAS_E0: constexpr, SAVE_CKPT: constexpr, DT: constexpr,
    ):
        i_nh = tl.program_id(0)
        i_v = tl.program_id(1)
        i_n = i_nh // H
        i_h = i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        T = tl.load(cu + i_n + 1).to(tl.int64) - bos
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k = o_k < K
        m_v = o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        kv = o_k[:, None] * V + o_v[None, :]
        st = i_nh.to(tl.int64) * K * V + kv

        S = tl.zeros([BK, BV], dtype=DT)
        if HAS_S0:
            S += tl.load(s0 + st, mask=m_kv, other=0).to(DT)
        E = tl.zeros([BK, BV], dtype=DT)
        lam_h = 0.0
        if TRACE:
            lam_h = tl.load(lam + i_h).to(DT)
            if HAS_E0:
                E += tl.load(e0 + st, mask=m_kv, other=0).to(DT)
        seg0 = tl.load(seg_off + i_n).to(tl.int64)

        for t in range(0, T):
            if SAVE_CKPT:
                if t % CHUNK == 0:
                    tl.store(ckpt + ((seg0 + t // CHUNK) * H + i_h) * K * V + kv, S, mask=m_kv)
            tok = bos + t
            b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(DT)
            b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(DT) * scale
            b_v = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(DT)
            b_b = tl.load(beta + tok * H + i_h).to(DT)
            if HAS_G:
                S = S * tl.exp(tl.load(g + tok * H + i_h).to(DT))
            if DELTA:
                b_v = b_v - tl.sum(S * b_k[:, None], 0)
            b_w = b_b * b_v
            D = b_k[:, None] * b_w[None, :]
            S = S + D
            if TRACE:
                E = lam_h * E + D
            b_o = tl.sum(S * b_q[:, None], 0)
            tl.store(o + (tok * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

        tl.store(s_out + st, S, mask=m_kv)
        if TRACE:
            tl.store(e_out + st, E, mask=m_kv)

    def _recurrent_bwd_kernel(
        q, k, v, beta, g, lam, ckpt, scratch, do, dst, det,
        dq, dk, dv, dbeta, dg, dlc, ds0, cu, seg_off, scale, NTOK, SC,
        H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr,
        CHUNK: constexpr, DELTA: constexpr, HAS_G: constexpr, TRACE: constexpr,
        HAS_DST: constexpr, HAS_DET: constexpr, DT: constexpr,
    ):
        i_nh = tl.program_id(0)
        i_v = tl.program_id(1)
        NV = tl.num_programs(1)
        i_n = i_nh // H
        i_h = i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        T = tl.load(cu + i_n + 1).to(tl.int64) - bos
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k = o_k < K
        m_v = o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        kv = o_k[:, None] * V + o_v[None, :]
        st = i_nh.to(tl.int64) * K * V + kv
        # Private scratch of this program: S_{t-1} for every token of one segment.
        # SC = min(CHUNK, longest sequence) rows: no segment is longer.
        sc = scratch + (i_nh.to(tl.int64) * NV + i_v) * SC * BK * BV
        sc_kv = o_k[:, None] * BV + tl.arange(0, BV)[None, :]
        # Partial (per V-block) gradients are laid out [NV, NTOK, H, ...].
        part = i_v.to(tl.int64) * NTOK

        dS = tl.zeros([BK, BV], dtype=DT)
        if HAS_DST:
            dS += tl.load(dst + st, mask=m_kv, other=0).to(DT)
        dE = tl.zeros([BK, BV], dtype=DT)
        lam_h = 0.0
        if TRACE:
            lam_h = tl.load(lam + i_h).to(DT)
            if HAS_DET:
                dE += tl.load(det + st, mask=m_kv, other=0).to(DT)
        p = tl.full([], 1.0, DT)  # lam^(T-1-t)
        seg0 = tl.load(seg_off + i_n).to(tl.int64)
        NS = (T + CHUNK - 1) // CHUNK

        for js in range(0, NS):
            s = NS - 1 - js
            t0 = s * CHUNK
            L = tl.minimum(T - t0, CHUNK)
            # Replay the forward of this segment from its checkpoint.
            S = tl.load(ckpt + ((seg0 + s) * H + i_h) * K * V + kv, mask=m_kv, other=0).to(DT)
            for i in range(0, L):
                tl.store(sc + i * BK * BV + sc_kv, S)
                tok = bos + t0 + i
                b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(DT)
                b_v = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(DT)
                b_b = tl.load(beta + tok * H + i_h).to(DT)
                if HAS_G:
                    S = S * tl.exp(tl.load(g + tok * H + i_h).to(DT))
                if DELTA:
                    b_v = b_v - tl.sum(S * b_k[:, None], 0)
                S = S + b_k[:, None] * (b_b * b_v)[None, :]
            # The scratch is written and read back by different threads.
            tl.debug_barrier()
            for j in range(0, L):
                i = L - 1 - j
                tok = bos + t0 + i
                Sp = tl.load(sc + i * BK * BV + sc_kv)
                b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(DT)
                b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0).to(DT) * scale
                b_u = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(DT)
                b_do = tl.load(do + (tok * H + i_h) * V + o_v, mask=m_v, other=0).to(DT)
                b_b = tl.load(beta + tok * H + i_h).to(DT)
                a = tl.full([], 1.0, DT)
                if HAS_G:
                    a = tl.exp(tl.load(g + tok * H + i_h).to(DT))
                    Sp = Sp * a
                if DELTA:
                    b_u = b_u - tl.sum(Sp * b_k[:, None], 0)
                b_w = b_b * b_u
                St = Sp + b_k[:, None] * b_w[None, :]

                dS += b_q[:, None] * b_do[None, :]
                b_dq = tl.sum(St * b_do[None, :], 1) * scale
                dD = dS
                if TRACE:
                    dD = dS + p * dE
                b_dw = tl.sum(dD * b_k[:, None], 0)
                b_dk = tl.sum(dD * b_w[None, :], 1)
                b_db = tl.sum(b_dw * b_u, 0)
                b_du = b_b * b_dw
                if DELTA:
                    dS = dS - b_k[:, None] * b_du[None, :]
                    b_dk = b_dk - tl.sum(Sp * b_du[None, :], 1)
                if HAS_G:
                    tl.store(dg + (part + tok) * H + i_h, tl.sum(tl.sum(dS * Sp, 1), 0))
                    dS = dS * a
                if TRACE:
                    c = tl.sum(tl.sum(dE * b_k[:, None] * b_w[None, :], 1), 0)
                    tl.store(dlc + (part + tok) * H + i_h, c)
                    p = p * lam_h
                tl.store(dq + ((part + tok) * H + i_h) * K + o_k, b_dq, mask=m_k)
                tl.store(dk + ((part + tok) * H + i_h) * K + o_k, b_dk, mask=m_k)
                tl.store(dv + (tok * H + i_h) * V + o_v, b_du, mask=m_v)
                tl.store(dbeta + (part + tok) * H + i_h, b_db)
            tl.debug_barrier()
        tl.store(ds0 + st, dS, mask=m_kv)


def _triton_dtype(dtype: torch.dtype):
    """Accumulator dtype: fp32 state for fp32/bf16/fp16 inputs, fp64 for fp64 (tests)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(K: int, V: int, bv_cap: int) -> Tuple[int, int, int]:
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), bv_cap)
    return BK, BV, triton.cdiv(V, BV)


class _TritonRecurrentFn(torch.autograd.Function):
    """Packed-layout autograd wrapper: tensors are ``[1, NTOK, H, *]``, states ``[N, H, K, V]``."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, lam_h, s0, e0, layout, scale, delta, chunk, save):
        NTOK, H, K = q.shape[1:]
        V = v.shape[-1]
        cu, seg_off, N = layout.cu, layout.seg_off, layout.N
        acc = torch.promote_types(q.dtype, torch.float32)
        DT = _triton_dtype(acc)
        BK, BV, NV = _blocks(K, V, triton_utils.BV_CAP)
        trace = lam_h is not None
        o = torch.empty(1, NTOK, H, V, dtype=q.dtype, device=q.device)
        S_T = torch.empty(N, H, K, V, dtype=acc, device=q.device)
        E_T = torch.empty(N, H, K, V, dtype=acc, device=q.device) if trace else None
        n_seg = layout.n_seg if save else 1
        ckpt = torch.empty(n_seg, H, K, V, dtype=acc, device=q.device)
        jit_for_env(_recurrent_fwd_kernel, LAUNCH_CONFIGS["fwd"], key=["K", "V", "BV"])[(N * H, NV)](
            q, k, v, beta, g, lam_h, s0, e0, o, S_T, E_T, ckpt, cu, seg_off, scale,
            H=H, K=K, V=V, BK=BK, BV=BV, CHUNK=chunk, DELTA=delta, HAS_G=g is not None, TRACE=trace,
            HAS_S0=s0 is not None, HAS_E0=e0 is not None, SAVE_CKPT=save, DT=DT,
        )
        ctx.save_for_backward(q, k, v, beta, g, lam_h, e0, ckpt)
        ctx.layout = layout
        ctx.cfg = (scale, delta, chunk)
        ctx.has_s0 = s0 is not None
        if E_T is not None:
            return o, S_T, E_T
        return o, S_T, None

    @staticmethod
    def backward(ctx, do, dST, dET):
        q, k, v, beta, g, lam_h, e0, ckpt = ctx.saved_tensors
        cu, seg_off, N = ctx.layout.cu, ctx.layout.seg_off, ctx.layout.N
        scale, delta, chunk = ctx.cfg
        NTOK, H, K = q.shape[1:]
        V = v.shape[-1]
        acc = ckpt.dtype
        DT = _triton_dtype(acc)
        BK, BV, NV = _blocks(K, V, triton_utils.BV_CAP)
        trace = lam_h is not None
        dev = q.device
        SC = min(chunk, ctx.layout.max_len)
        scratch = torch.empty(N * H * NV * SC * BK * BV, dtype=acc, device=dev)
        dq = torch.empty(NV, NTOK, H, K, dtype=acc, device=dev)
        dk = torch.empty(NV, NTOK, H, K, dtype=acc, device=dev)
        dv = torch.empty(NTOK, H, V, dtype=acc, device=dev)
        dbeta = torch.empty(NV, NTOK, H, dtype=acc, device=dev)
        dg = torch.empty(NV, NTOK, H, dtype=acc, device=dev) if g is not None else None
        dlc = torch.empty(NV, NTOK, H, dtype=acc, device=dev) if trace else None
        ds0 = torch.empty(N, H, K, V, dtype=acc, device=dev)
        has_det = trace and dET is not None
        jit_for_env(_recurrent_bwd_kernel, LAUNCH_CONFIGS["bwd"], key=["K", "V", "BV"])[(N * H, NV)](
            q, k, v, beta, g, lam_h, ckpt, scratch, do.contiguous(), dST.contiguous() if dST is not None else None,
            dET.contiguous() if has_det else None, dq, dk, dv, dbeta, dg, dlc, ds0, cu, seg_off, scale, NTOK, SC,
            H=H, K=K, V=V, BK=BK, BV=BV, CHUNK=chunk, DELTA=delta, HAS_G=g is not None, TRACE=trace,
            HAS_DST=dST is not None, HAS_DET=has_det, DT=DT,
        )
        d_g = dg.sum(0)[None].to(g.dtype) if g is not None else None
        d_lam = d_e0 = None
        if trace:
            d_lam = lam_grad(dlc.sum(0), dET if has_det else None, e0, lam_h, cu, H).to(lam_h.dtype)
            if has_det:
                lens = (cu[1:] - cu[:-1]).to(acc)
                d_e0 = torch.pow(lam_h.to(acc)[None, :], lens[:, None])[..., None, None] * dET
            if e0 is None:
                d_e0 = None
        return (dq.sum(0)[None].to(q.dtype), dk.sum(0)[None].to(k.dtype), dv[None].to(v.dtype),
                dbeta.sum(0)[None].to(beta.dtype), d_g, d_lam, ds0 if ctx.has_s0 else None, d_e0, None, None, None, None, None)


def triton_recurrent_plastic_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    rule: str = "delta",
    lam: Optional[Union[float, torch.Tensor]] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    initial_trace: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    checkpoint_every: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-token plastic rule as one Triton kernel, with a Triton backward.

    Same contract as :func:`naive_plastic_rule`. S (and E) stay in registers;
    the forward saves S every ``checkpoint_every`` tokens and the backward
    replays each segment from its checkpoint (memory: ``ceil(T/C) * H*K*V``
    checkpoints plus a ``min(C, T)*K*V`` scratch per (sequence, head)).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (fp32, bf16, fp16 or fp64);
        beta, g: ``[B, T, H]``; lam None, float or ``[H]``.
        initial_state, initial_trace: ``[N, H, K, V]`` (N = B, or the number of
            sequences with ``cu_seqlens``) or None.
        cu_seqlens: ``[N+1]`` int offsets of packed sequences (B must be 1), or None.

    Returns:
        o ``[B, T, H, V]`` in q's dtype; S_T, E_T ``[N, H, K, V]`` fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: when Triton cannot run here (not installed, or tensors not
            on CUDA outside ``TRITON_INTERPRET=1``) or cu_seqlens is malformed.
    """
    B, T, H, K = q.shape
    import_triton(globals())
    layout, lam_h, scale, s0, e0 = prepare_triton_args(q, k, v, beta, g, lam, scale, initial_state,
                                                       initial_trace, cu_seqlens, int(checkpoint_every))
    tensors = [q, k, v, beta, g, lam_h, initial_state, initial_trace]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    o, S_T, E_T = _TritonRecurrentFn.apply(
        pack(q), pack(k), pack(v), pack(beta), pack(g), lam_h, s0, e0, layout, scale,
        rule == "delta", int(checkpoint_every), save,
    )
    o = o.reshape(B, T, H, v.shape[-1])
    if not output_final_state:
        return o, None, None
    return o, S_T, E_T
