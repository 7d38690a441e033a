"""Chunkwise-parallel plastic rule in Triton (training and prefill): the ``triton_chunk`` backend.

The same chunkwise algebra as the PyTorch path (``chunk.py``, whose docstring derives
it), as seven kernels over the packed layout with a chunkwise backward of their own
(the comment below lists them), plus the dot dtypes and launch configurations, the
autograd function :class:`_TritonChunkFn` and the wrapper :func:`triton_chunk_plastic_rule`.

Triton stays optional: nothing here imports it at module level. The kernels are plain
functions jitted at their first launch, and the helpers shared with the recurrent
Triton backend (lazy import, jit, packed layout, argument handling, lam's gradient)
are in ``triton_utils.py``.
"""
from typing import Optional, Tuple, Union

import torch

from . import triton_utils
from .triton_utils import import_triton, jit_for_env, lam_grad, pack, prepare_triton_args

# ---------------------------------------------------------------------------
# Triton backend ("triton_chunk")
#
# Forward, three launches over the packed layout ([1, NTOK, H, *], sequences given
# by cu_seqlens; a [B, T] batch is B sequences of length T). Only launches 2 and
# 5 are sequential over chunks, and they do the least work per chunk (as in
# flash-linear-attention's chunk_gated_delta_rule: fwd_h / bwd_dhu):
#   1. _chunk_prepare_kernel, one program per (chunk, head): G = cumsum(g) within
#      the chunk, the strictly lower A_ij = beta_i e^{G_i-G_j} k_i.k_j,
#      T = (I + A)^{-1} in 16 x 16 blocks (diagonal blocks by forward substitution,
#      all at once; the rest by block products), then U = T (beta V) and
#      Wk = T (beta e^G K) (hebb needs only U = beta V).
#   2. _chunk_state_fwd_kernel, one program per (V-block, sequence, head): S [K, BV]
#      and E stay in registers while the program walks its chunks in order,
#      storing S at each chunk start (h) and the writes W:
#          W   = U - Wk S                         (the writes beta_i u_i)
#          S  <- e^{G_L} S + (K e^{G_L-G})^T W
#          E  <- lam^L E + (K lam^{L-1-i})^T W    (the trace's masked matmul)
#   3. _chunk_out_kernel, one program per (V-block, chunk, head):
#          O   = (Q e^G) S + (mask_{i>=j} e^{G_i-G_j} Q K^T) W
# Backward, four launches (P = the masked Q K^T, p_i = lam^(T-1-t_i)):
#   4. _chunk_bwd_local_kernel, per (V-block, chunk, head): the part of dW that
#      does not depend on dS, dW_loc = P^T dO + diag(p) K dE_T, and per token
#      c_t = <dE_T, k_t w_t^T> for lam's gradient.
#   5. _chunk_bwd_dstate_kernel, per (V-block, sequence, head), chunks in reverse:
#          dW  = dW_loc + (K e^{G_L-G}) dS         (completed in place)
#          dS <- e^{G_L} dS + (Q e^G)^T dO - Wk^T dW
#      storing dS at every chunk end; its final value is d initial_state.
#   6. _chunk_bwd_wy_kernel, per (chunk, head): back through W = U - Wk S0 and
#      the two triangular solves (dX = T^T dW for X = T rhs; dA = -dX W^T, since
#      the U and Wk terms combine through W = U - Wk S0): dv, dbeta, and the
#      solve's share of dk and dG.
#   7. _chunk_bwd_kernel, per (chunk, head): dq, dk (adding 6's share) and dG
#      through O, S_end and the trace, then dg by a reverse cumsum within the chunk.
# lam's gradient is then closed-form on the host (triton_utils.lam_grad),
# d initial_trace = lam^T dE_T.
# Grids put what grows with the batch (sequences x heads, or chunks) on axis 0:
# CUDA caps axes 1 and 2 at 65535 programs, which B * H of a large decode batch exceeds.
# ---------------------------------------------------------------------------
triton = None
tl = None
constexpr = "tl.constexpr"  # becomes tl.constexpr on the first call (see triton_utils.import_triton)


def _chunk_prepare_kernel(
    k, v, beta, g, U, Wk, Gc, Ti, cu, chunk_idx,
    H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr, C: constexpr,
    DELTA: constexpr, HAS_G: constexpr, DT: constexpr, OP: constexpr, MM: constexpr, PREC: constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.load(chunk_idx + 2 * i_c).to(tl.int64)
    j_c = tl.load(chunk_idx + 2 * i_c + 1).to(tl.int64)
    seq0 = tl.load(cu + i_n).to(tl.int64)
    bos = seq0 + j_c * C
    L = tl.minimum(tl.load(cu + i_n + 1).to(tl.int64) - bos, C)
    r = tl.arange(0, C)
    m_r = r < L
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    tok = bos + r

    b_b = tl.load(beta + tok * H + i_h, mask=m_r, other=0).to(DT)
    G = tl.zeros([C], dtype=DT)
    if HAS_G:
        G = tl.cumsum(tl.load(g + tok * H + i_h, mask=m_r, other=0).to(DT), 0)
        tl.store(Gc + tok * H + i_h, G, mask=m_r)
    b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_r[:, None] & (o_v < V)[None, :],
                  other=0).to(DT)
    if DELTA:
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_r[:, None] & (o_k < K)[None, :],
                      other=0).to(DT)
        # Masking the exponent (not the product) keeps e^{G_i-G_j} of future
        # positions, which may overflow to inf, from turning 0 * inf into NaN.
        strict = r[:, None] > r[None, :]
        A = tl.dot((b_k * b_b[:, None]).to(OP).to(MM), tl.trans(b_k).to(OP).to(MM), input_precision=PREC)
        A = A * tl.exp(tl.where(strict, G[:, None] - G[None, :], float("-inf")))
        # T = (I + A)^{-1} blockwise, in 16 x 16 blocks, with Ti as this chunk's scratch
        # (A is written there, then replaced by T block by block): the diagonal blocks
        # are inverted together by forward substitution (15 steps on [C/16, 16, 16]
        # instead of C - 1 steps on [C, C]), then the blocks below them follow from
        #     T_bj = -T_bb sum_{j <= k < b} A_bk T_kj        (j < b),
        # row block by row block. The small products are exact-precision fp32 ("ieee").
        t_row = (tok[:, None] * H + i_h) * C
        tl.store(Ti + t_row + r[None, :], A, mask=m_r[:, None])
        tl.debug_barrier()
        NB: constexpr = C // 16
        rb = tl.arange(0, 16)
        bb = tl.arange(0, NB)
        row3 = bb[:, None, None] * 16 + rb[None, :, None]  # [NB, 16, 1]: row of block b
        p3 = Ti + ((bos + row3) * H + i_h) * C + bb[:, None, None] * 16 + rb[None, None, :]
        m3 = row3 < L
        D = tl.load(p3, mask=m3, other=0).to(DT)  # D[b] = A_bb, strictly lower
        Tb = tl.zeros([NB, 16, 16], dtype=DT) + tl.where(rb[:, None] == rb[None, :], 1.0, 0.0).to(DT)[None, :, :]
        for i in range(1, 16):  # row i = e_i - sum_{j<i} A_ij T_j, in every block at once
            a_i = tl.sum(tl.where(rb[None, :, None] == i, D, 0.0), 1)  # [NB, 16]
            row = tl.where(rb[None, :] == i, 1.0, 0.0) - tl.sum(a_i[:, :, None] * Tb, 1)
            Tb = tl.where(rb[None, :, None] == i, row[:, None, :], Tb)
        tl.debug_barrier()  # every thread has read the A_bb it needs before they are overwritten
        tl.store(p3, Tb, mask=m3)
        tl.debug_barrier()
        # Blocks at or past L hold no token of this chunk (their rows may belong to the
        # next sequence or lie past the end of the batch): the loop stops before them.
        for b in range(1, tl.minimum((L + 15) // 16, NB)):
            rows_b = bos + b * 16 + rb
            pb = Ti + (rows_b[:, None] * H + i_h) * C
            m_b = (b * 16 + rb < L)[:, None]
            T_bb = tl.load(pb + b * 16 + rb[None, :], mask=m_b, other=0).to(DT)
            # Ascending j: T_bj overwrites A_bj, which no later j of this row reads.
            for j in range(0, b):
                acc = tl.zeros([16, 16], dtype=DT)
                for kk in range(j, b):
                    A_bk = tl.load(pb + kk * 16 + rb[None, :], mask=m_b, other=0).to(DT)
                    T_kj = tl.load(Ti + (((bos + kk * 16 + rb)[:, None]) * H + i_h) * C + j * 16 + rb[None, :],
                                   mask=(kk * 16 + rb < L)[:, None], other=0).to(DT)
                    acc += tl.dot(A_bk, T_kj, input_precision="ieee")
                T_bj = -tl.dot(T_bb, acc, input_precision="ieee")
                tl.debug_barrier()
                tl.store(pb + j * 16 + rb[None, :], T_bj, mask=m_b)
            tl.debug_barrier()
        Tinv = tl.load(Ti + t_row + r[None, :], mask=m_r[:, None], other=0).to(DT)
        b_U = tl.dot(Tinv.to(OP).to(MM), (b_v * b_b[:, None]).to(OP).to(MM), input_precision=PREC)
        b_W = tl.dot(Tinv.to(OP).to(MM), (b_k * (b_b * tl.exp(G))[:, None]).to(OP).to(MM), input_precision=PREC)
        tl.store(Wk + (tok[:, None] * H + i_h) * K + o_k[None, :], b_W, mask=m_r[:, None] & (o_k < K)[None, :])
    else:
        b_U = b_v * b_b[:, None]
    tl.store(U + (tok[:, None] * H + i_h) * V + o_v[None, :], b_U, mask=m_r[:, None] & (o_v < V)[None, :])


def _chunk_state_fwd_kernel(
    k, U, Wk, Gc, lam, s0, e0, Wv, h, s_out, e_out, cu, seg_off,
    H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr, C: constexpr,
    DELTA: constexpr, HAS_G: constexpr, TRACE: constexpr, HAS_S0: constexpr, HAS_E0: constexpr,
    DT: constexpr, OP: constexpr, MM: constexpr, PREC: constexpr,
):
    # The sequential part of the forward: S (and E) walk the chunks in order; the
    # outputs are left to _chunk_out_kernel, which runs all chunks in parallel.
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    T = tl.load(cu + i_n + 1).to(tl.int64) - bos
    r = tl.arange(0, C)
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
    log_lam = 0.0
    if TRACE:
        # lam^n as exp(n log lam): log 0 = -inf gives 0 for n > 0; n = 0 is special-cased.
        log_lam = tl.log(tl.load(lam + i_h).to(DT))
        if HAS_E0:
            E += tl.load(e0 + st, mask=m_kv, other=0).to(DT)
    seg0 = tl.load(seg_off + i_n).to(tl.int64)
    NC = (T + C - 1) // C

    for c in range(0, NC):
        tl.store(h + ((seg0 + c) * H + i_h) * K * V + kv, S.to(h.dtype.element_ty), mask=m_kv)
        L = tl.minimum(T - c * C, C)
        m_r = r < L
        tok = bos + c * C + r
        m_rv = m_r[:, None] & m_v[None, :]
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :],
                      other=0).to(DT)
        b_W = tl.load(U + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_rv, other=0).to(DT)
        if DELTA:
            b_wk = tl.load(Wk + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :],
                           other=0)
            b_W -= tl.dot(b_wk.to(OP).to(MM), S.to(OP).to(MM), input_precision=PREC)
        tl.store(Wv + (tok[:, None] * H + i_h) * V + o_v[None, :], b_W.to(Wv.dtype.element_ty), mask=m_rv)
        G = tl.zeros([C], dtype=DT)
        if HAS_G:
            G = tl.load(Gc + tok * H + i_h, mask=m_r, other=0).to(DT)
        G_L = tl.sum(tl.where(r == L - 1, G, 0.0), 0)
        k_out = b_k * tl.where(m_r, tl.exp(G_L - G), 0.0)[:, None]
        S = S * tl.exp(G_L) + tl.dot(tl.trans(k_out).to(OP).to(MM), b_W.to(OP).to(MM), input_precision=PREC)
        if TRACE:
            # lam^(L-1-i) for the rows of this chunk; age 0 (and padded rows) must not
            # form 0 * log(0) = NaN, so they take a positive dummy age and are selected out.
            age = (L - 1 - r).to(DT)
            w_age = tl.exp(tl.where(age > 0, age, 1.0) * log_lam)
            w_age = tl.where(age == 0, 1.0, tl.where(age > 0, w_age, 0.0))
            E = E * tl.exp(L.to(DT) * log_lam) + tl.dot(tl.trans(b_k * w_age[:, None]).to(OP).to(MM),
                                                         b_W.to(OP).to(MM), input_precision=PREC)

    tl.store(s_out + st, S, mask=m_kv)
    if TRACE:
        tl.store(e_out + st, E, mask=m_kv)


def _chunk_out_kernel(
    q, k, Gc, h, Wv, o, cu, chunk_idx, seg_off, scale,
    H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr, C: constexpr,
    HAS_G: constexpr, DT: constexpr, OP: constexpr, MM: constexpr, PREC: constexpr,
):
    # O = (Q e^G) S0 + (mask_{i>=j} e^{G_i-G_j} Q K^T) W, every chunk in parallel.
    i_c = tl.program_id(0)
    i_v = tl.program_id(1)
    i_h = tl.program_id(2)
    i_n = tl.load(chunk_idx + 2 * i_c).to(tl.int64)
    j_c = tl.load(chunk_idx + 2 * i_c + 1).to(tl.int64)
    seq0 = tl.load(cu + i_n).to(tl.int64)
    bos = seq0 + j_c * C
    L = tl.minimum(tl.load(cu + i_n + 1).to(tl.int64) - bos, C)
    r = tl.arange(0, C)
    m_r = r < L
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    tok = bos + r
    m_rk = m_r[:, None] & m_k[None, :]
    m_rv = m_r[:, None] & m_v[None, :]
    # scale and e^G multiply the products, not Q: on sm_80 ptxas spilled ~5 KiB/thread
    # when one scaled fp32 copy of Q fed both dots (compile_check).
    b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_rk, other=0)
    b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_rk, other=0)
    b_W = tl.load(Wv + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_rv, other=0)
    S0 = tl.load(h + ((tl.load(seg_off + i_n).to(tl.int64) + j_c) * H + i_h) * K * V + o_k[:, None] * V
                 + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
    G = tl.zeros([C], dtype=DT)
    if HAS_G:
        G = tl.load(Gc + tok * H + i_h, mask=m_r, other=0).to(DT)
    incl = r[:, None] >= r[None, :]
    qk = tl.dot(b_q.to(OP).to(MM), tl.trans(b_k).to(OP).to(MM), input_precision=PREC)
    qk = qk * (scale * tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf"))))
    b_o = tl.dot(b_q.to(OP).to(MM), S0.to(OP).to(MM), input_precision=PREC) * (scale * tl.exp(G))[:, None]
    b_o += tl.dot(qk.to(OP).to(MM), b_W.to(OP).to(MM), input_precision=PREC)
    tl.store(o + (tok[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_rv)


def _chunk_bwd_local_kernel(
    q, k, Gc, lam, Wv, do, det, dWv, dlc, cu, chunk_idx, scale, NTOK,
    H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr, C: constexpr,
    HAS_G: constexpr, HAS_DET: constexpr, DT: constexpr, OP: constexpr, MM: constexpr, PREC: constexpr,
):
    # The parts of dW that do not depend on dS, every chunk in parallel:
    #   dW_local = P^T dO + diag(lam^age) K dE_T,   P = mask_{i>=j} e^{G_i-G_j} Q K^T
    # and, per V-block, the c_t = <dE_T, k_t w_t^T> of lam's gradient.
    i_c = tl.program_id(0)
    i_v = tl.program_id(1)
    i_h = tl.program_id(2)
    i_n = tl.load(chunk_idx + 2 * i_c).to(tl.int64)
    j_c = tl.load(chunk_idx + 2 * i_c + 1).to(tl.int64)
    seq0 = tl.load(cu + i_n).to(tl.int64)
    T = tl.load(cu + i_n + 1).to(tl.int64) - seq0
    bos = seq0 + j_c * C
    L = tl.minimum(T - j_c * C, C)
    r = tl.arange(0, C)
    m_r = r < L
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    tok = bos + r
    m_rk = m_r[:, None] & m_k[None, :]
    m_rv = m_r[:, None] & m_v[None, :]
    tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
    b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(DT) * scale
    b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_rk, other=0)
    b_do = tl.load(do + tv, mask=m_rv, other=0)
    G = tl.zeros([C], dtype=DT)
    if HAS_G:
        G = tl.load(Gc + tok * H + i_h, mask=m_r, other=0).to(DT)
    vv = (r[:, None] >= r[None, :]) & m_r[:, None] & m_r[None, :]
    P = tl.dot(b_q.to(OP).to(MM), tl.trans(b_k).to(OP).to(MM), input_precision=PREC)
    P = P * tl.exp(tl.where(vv, G[:, None] - G[None, :], float("-inf")))
    dW = tl.dot(tl.trans(P).to(OP).to(MM), b_do.to(OP).to(MM), input_precision=PREC)
    if HAS_DET:
        age = (T - 1 - (j_c * C + r)).to(DT)
        p = tl.exp(tl.where(age > 0, age, 1.0) * tl.log(tl.load(lam + i_h).to(DT)))
        p = tl.where(age == 0, 1.0, tl.where(age > 0, p, 0.0))
        dEb = tl.load(det + (i_n * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0)
        kdE = tl.dot(b_k.to(OP).to(MM), dEb.to(OP).to(MM), input_precision=PREC)
        dW += p[:, None] * kdE
        b_W = tl.load(Wv + tv, mask=m_rv, other=0).to(DT)
        tl.store(dlc + (i_v.to(tl.int64) * NTOK + tok) * H + i_h, tl.sum(b_W * kdE, 1), mask=m_r)
    tl.store(dWv + tv, dW, mask=m_rv)


def _chunk_bwd_dstate_kernel(
    q, k, Wk, Gc, do, dst, dWv, dckpt, ds0, cu, seg_off, scale,
    H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr, C: constexpr,
    DELTA: constexpr, HAS_G: constexpr, HAS_DST: constexpr,
    DT: constexpr, OP: constexpr, MM: constexpr, PREC: constexpr,
):
    # The sequential part of the backward: dS, the gradient reaching S at a chunk's
    # end, walks the chunks in reverse; it is stored per chunk and completes dW in place.
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    T = tl.load(cu + i_n + 1).to(tl.int64) - bos
    r = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv = o_k[:, None] * V + o_v[None, :]
    st = i_nh.to(tl.int64) * K * V + kv

    dS = tl.zeros([BK, BV], dtype=DT)
    if HAS_DST:
        dS += tl.load(dst + st, mask=m_kv, other=0).to(DT)
    seg0 = tl.load(seg_off + i_n).to(tl.int64)
    NC = (T + C - 1) // C
    for jc in range(0, NC):
        c = NC - 1 - jc
        tl.store(dckpt + ((seg0 + c) * H + i_h) * K * V + kv, dS.to(dckpt.dtype.element_ty), mask=m_kv)
        L = tl.minimum(T - c * C, C)
        m_r = r < L
        tok = bos + c * C + r
        m_rk = m_r[:, None] & m_k[None, :]
        m_rv = m_r[:, None] & m_v[None, :]
        tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(DT) * scale
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(DT)
        b_do = tl.load(do + tv, mask=m_rv, other=0)
        G = tl.zeros([C], dtype=DT)
        if HAS_G:
            G = tl.load(Gc + tok * H + i_h, mask=m_r, other=0).to(DT)
        G_L = tl.sum(tl.where(r == L - 1, G, 0.0), 0)
        ed = tl.where(m_r, tl.exp(G_L - G), 0.0)
        dW = tl.load(dWv + tv, mask=m_rv, other=0).to(DT)
        dW += tl.dot((b_k * ed[:, None]).to(OP).to(MM), dS.to(OP).to(MM), input_precision=PREC)
        tl.store(dWv + tv, dW, mask=m_rv)
        dS = dS * tl.exp(G_L) + tl.dot(tl.trans(b_q * tl.exp(G)[:, None]).to(OP).to(MM), b_do.to(OP).to(MM),
                                       input_precision=PREC)
        if DELTA:
            b_wk = tl.load(Wk + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_rk, other=0)
            dS -= tl.dot(tl.trans(b_wk).to(OP).to(MM), dW.to(OP).to(MM), input_precision=PREC)
    tl.store(ds0 + st, dS, mask=m_kv)


def _chunk_bwd_wy_kernel(
    k, v, beta, Gc, Ti, h, Wv, dWv, dv, dbeta, dk_wy, dG_wy, cu, chunk_idx, seg_off,
    H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr, NV: constexpr, C: constexpr,
    DELTA: constexpr, HAS_G: constexpr, DT: constexpr, OP: constexpr, MM: constexpr, PREC: constexpr,
):
    # Back through the writes W = U - Wk S0, U = T (beta V), Wk = T (beta e^G K),
    # (I + A) T = I, all chunks in parallel: dv and dbeta whole, and the K- and
    # G-gradient parts of the solve for _chunk_bwd_kernel to add.
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.load(chunk_idx + 2 * i_c).to(tl.int64)
    j_c = tl.load(chunk_idx + 2 * i_c + 1).to(tl.int64)
    seq0 = tl.load(cu + i_n).to(tl.int64)
    bos = seq0 + j_c * C
    L = tl.minimum(tl.load(cu + i_n + 1).to(tl.int64) - bos, C)
    r = tl.arange(0, C)
    m_r = r < L
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    tok = bos + r
    m_rk = m_r[:, None] & m_k[None, :]
    tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
    b_b = tl.load(beta + tok * H + i_h, mask=m_r, other=0).to(DT)
    G = tl.zeros([C], dtype=DT)
    if HAS_G:
        G = tl.load(Gc + tok * H + i_h, mask=m_r, other=0).to(DT)
    eG = tl.where(m_r, tl.exp(G), 0.0)
    b_k = tl.zeros([C, BK], dtype=OP)
    b_T = tl.zeros([C, C], dtype=OP)
    if DELTA:
        b_k = tl.load(k + tk, mask=m_rk, other=0).to(OP)
        b_T = tl.load(Ti + (tok[:, None] * H + i_h) * C + r[None, :], mask=m_r[:, None], other=0).to(OP)
    dKw = tl.zeros([C, BK], dtype=DT)
    dA = tl.zeros([C, C], dtype=DT)
    d_b = tl.zeros([C], dtype=DT)
    s_k = tl.zeros([C], dtype=DT)  # rowsum(dBk * K), dBk the gradient of beta e^G K
    st0 = ((tl.load(seg_off + i_n).to(tl.int64) + j_c) * H + i_h) * K * V
    for i_v in range(0, NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_rv = m_r[:, None] & m_v[None, :]
        tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        dW = tl.load(dWv + tv, mask=m_rv, other=0).to(DT)
        b_v = tl.load(v + tv, mask=m_rv, other=0).to(DT)
        dBv = dW
        if DELTA:
            dBv = tl.dot(tl.trans(b_T).to(MM), dW.to(OP).to(MM), input_precision=PREC)
        tl.store(dv + tv, (b_b[:, None] * dBv).to(dv.dtype.element_ty), mask=m_rv)
        d_b += tl.sum(dBv * b_v, 1)
        if DELTA:
            S0 = tl.load(h + st0 + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                         other=0).to(OP)
            b_w = tl.load(Wv + tv, mask=m_rv, other=0).to(OP)
            # dBk = -sum_v dX S0^T; it reaches dK scaled by beta e^G and its row sums
            # with K come from K S0, so no [C, K] tile of dBk itself is kept.
            dKw -= tl.dot((dBv * (b_b * eG)[:, None]).to(OP).to(MM), tl.trans(S0).to(MM), input_precision=PREC)
            s_k -= tl.sum(dBv * tl.dot(b_k.to(MM), S0.to(MM), input_precision=PREC), 1)
            # dA = -dU U^T - dWk Wk^T collapses to -dX W^T because W = U - Wk S0.
            dA -= tl.dot(dBv.to(OP).to(MM), tl.trans(b_w).to(MM), input_precision=PREC)
    if DELTA:
        vv = m_r[:, None] & m_r[None, :]
        strict = (r[:, None] > r[None, :]) & vv
        d_b += s_k * eG
        dG = s_k * b_b * eG
        b_kf = tl.load(k + tk, mask=m_rk, other=0).to(DT)
        KK = tl.dot(b_k.to(MM), tl.trans(b_k).to(MM), input_precision=PREC)
        dAm = tl.where(strict, dA * tl.exp(tl.where(strict, G[:, None] - G[None, :], float("-inf"))), 0.0)
        dKw += b_b[:, None] * tl.dot(dAm.to(OP).to(MM), b_k.to(MM), input_precision=PREC)
        dKw += tl.dot(tl.trans(dAm).to(OP).to(MM), (b_kf * b_b[:, None]).to(OP).to(MM), input_precision=PREC)
        RA = dAm * KK
        d_b += tl.sum(RA, 1)
        RA = RA * b_b[:, None]  # dA * A
        dG += tl.sum(RA, 1) - tl.sum(RA, 0)
        tl.store(dk_wy + tk, dKw, mask=m_rk)
        tl.store(dG_wy + tok * H + i_h, dG, mask=m_r)
    tl.store(dbeta + tok * H + i_h, d_b.to(dbeta.dtype.element_ty), mask=m_r)


def _chunk_bwd_kernel(
    q, k, Gc, lam, h, dckpt, Wv, do, det, dk_wy, dG_wy, dq, dk, dg, cu, chunk_idx, seg_off, scale,
    H: constexpr, K: constexpr, V: constexpr, BK: constexpr, BV: constexpr, NV: constexpr, C: constexpr,
    DELTA: constexpr, HAS_G: constexpr, HAS_DET: constexpr,
    DT: constexpr, OP: constexpr, MM: constexpr, PREC: constexpr,
):
    # dq, dk, dg, all chunks in parallel, V in blocks of BV, from S at the chunk's
    # start (h), dS at its end (dckpt), the writes W, dO and dE_T, plus the solve's
    # parts from _chunk_bwd_wy_kernel.
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.load(chunk_idx + 2 * i_c).to(tl.int64)
    j_c = tl.load(chunk_idx + 2 * i_c + 1).to(tl.int64)
    seq0 = tl.load(cu + i_n).to(tl.int64)
    T = tl.load(cu + i_n + 1).to(tl.int64) - seq0
    bos = seq0 + j_c * C
    L = tl.minimum(T - j_c * C, C)
    r = tl.arange(0, C)
    m_r = r < L
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    tok = bos + r
    m_rk = m_r[:, None] & m_k[None, :]
    incl = (r[:, None] >= r[None, :]) & m_r[:, None] & m_r[None, :]
    tk = (tok[:, None] * H + i_h) * K + o_k[None, :]
    G = tl.zeros([C], dtype=DT)
    if HAS_G:
        G = tl.load(Gc + tok * H + i_h, mask=m_r, other=0).to(DT)
    G_L = tl.sum(tl.where(r == L - 1, G, 0.0), 0)
    eG = tl.where(m_r, tl.exp(G), 0.0)
    ed = tl.where(m_r, tl.exp(G_L - G), 0.0)
    Kd = (tl.load(k + tk, mask=m_rk, other=0).to(DT) * ed[:, None]).to(OP)
    p = tl.zeros([C], dtype=DT)
    if HAS_DET:
        age = (T - 1 - (j_c * C + r)).to(DT)
        p = tl.exp(tl.where(age > 0, age, 1.0) * tl.log(tl.load(lam + i_h).to(DT)))
        p = tl.where(age == 0, 1.0, tl.where(age > 0, p, 0.0))

    dQg = tl.zeros([C, BK], dtype=DT)  # dO S0^T
    dKc = tl.zeros([C, BK], dtype=DT)  # the K-gradient through S_end and the trace
    dP = tl.zeros([C, C], dtype=DT)
    t_kd = tl.zeros([C], dtype=DT)
    dGL = tl.zeros([1], dtype=DT)
    st0 = ((tl.load(seg_off + i_n).to(tl.int64) + j_c) * H + i_h) * K * V
    for i_v in range(0, NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        m_rv = m_r[:, None] & m_v[None, :]
        kv = o_k[:, None] * V + o_v[None, :]
        tv = (tok[:, None] * H + i_h) * V + o_v[None, :]
        S0 = tl.load(h + st0 + kv, mask=m_kv, other=0).to(DT)
        dSe = tl.load(dckpt + st0 + kv, mask=m_kv, other=0).to(DT)
        b_w = tl.load(Wv + tv, mask=m_rv, other=0).to(DT)
        b_do = tl.load(do + tv, mask=m_rv, other=0).to(OP)
        dQg += tl.dot(b_do.to(MM), tl.trans(S0).to(OP).to(MM), input_precision=PREC)
        dP += tl.dot(b_do.to(MM), tl.trans(b_w).to(OP).to(MM), input_precision=PREC)
        dKc += tl.dot((b_w * ed[:, None]).to(OP).to(MM), tl.trans(dSe).to(OP).to(MM), input_precision=PREC)
        t_kd += tl.sum(b_w * tl.dot(Kd.to(MM), dSe.to(OP).to(MM), input_precision=PREC), 1)
        dGL += tl.sum(tl.sum(dSe * S0, 1), 0)
        if HAS_DET:
            dEb = tl.load(det + (i_n * H + i_h) * K * V + kv, mask=m_kv, other=0)
            dKc += tl.dot((b_w * p[:, None]).to(OP).to(MM), tl.trans(dEb).to(OP).to(MM), input_precision=PREC)

    # The epilogue stores dq before forming dk so that fewer [C, K] tiles are live at once.
    b_q = tl.load(q + tk, mask=m_rk, other=0).to(DT) * scale
    b_k = tl.load(k + tk, mask=m_rk, other=0).to(DT)
    # O = (Q e^G) S0 + P W with P = mask * e^{G_i-G_j} * Q K^T
    dPm = tl.where(incl, dP * tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf"))), 0.0)
    dG = tl.sum(dQg * b_q, 1) * eG
    dQ = dQg * eG[:, None] + tl.dot(dPm.to(OP).to(MM), b_k.to(OP).to(MM), input_precision=PREC)
    tl.store(dq + tk, (dQ * scale).to(dq.dtype.element_ty), mask=m_rk)
    R = dPm * tl.dot(b_q.to(OP).to(MM), tl.trans(b_k).to(OP).to(MM), input_precision=PREC)
    dG += tl.sum(R, 1) - tl.sum(R, 0)
    dK = dKc + tl.dot(tl.trans(dPm).to(OP).to(MM), b_q.to(OP).to(MM), input_precision=PREC)
    # S_end = e^{G_L} S0 + (K e^{G_L-G})^T W
    dG -= t_kd
    dG_L = tl.sum(dGL, 0) * tl.exp(G_L) + tl.sum(t_kd, 0)
    if DELTA:
        dK += tl.load(dk_wy + tk, mask=m_rk, other=0)
        dG += tl.load(dG_wy + tok * H + i_h, mask=m_r, other=0)
    dG = tl.where(m_r, dG + tl.where(r == L - 1, dG_L, 0.0), 0.0)
    tl.store(dk + tk, dK.to(dk.dtype.element_ty), mask=m_rk)
    if HAS_G:
        # G = cumsum(g) within the chunk: dg_i = sum_{j >= i} dG_j
        d_g = tl.sum(tl.where(r[None, :] >= r[:, None], dG[None, :], 0.0), 1)
        tl.store(dg + tok * H + i_h, d_g.to(dg.dtype.element_ty), mask=m_r)


# Matmul inputs on a GPU: bf16/fp16 operands go to the tensor cores as they are
# (fp32 accumulate, as flash-linear-attention does); fp32 inputs use tf32 (Triton's
# own default for fp32 dots: about 1e-3 relative error) and fp64 stays exact.
# Measured with python -m cl_arch.kernels.compile_check at K = V = 128: fp32 "ieee"
# dots run on the FMA units, spill 14-28 KiB of stack per thread and need more
# shared memory than an H100 block has; "tf32x3" (about fp32 accuracy) fits sm_90
# but spills 10-14 KiB on sm_80. CL_ARCH_TRITON_FP32_DOT=tf32x3 opts into it.
FP32_DOT_CHOICES = ("tf32", "tf32x3")


def _dot_types(dtype: torch.dtype):
    """Kernel dtypes for inputs of ``dtype``: (accumulator, operand rounding, matmul input, precision).

    Under TRITON_INTERPRET=1 a bf16 ``tl.dot`` multiplies the raw bit patterns
    (Triton 3.x's numpy interpreter has no bf16 type); there the operands are
    rounded to bf16 and multiplied in fp32, which is the same arithmetic.
    """
    import os

    if dtype == torch.float64:
        return tl.float64, tl.float64, tl.float64, "ieee"
    if dtype in (torch.bfloat16, torch.float16):
        op = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
        mm = tl.float32 if op == tl.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else op
        return tl.float32, op, mm, "ieee"
    prec = os.environ.get("CL_ARCH_TRITON_FP32_DOT", "tf32")
    if prec not in FP32_DOT_CHOICES:
        raise ValueError(f"CL_ARCH_TRITON_FP32_DOT must be one of {FP32_DOT_CHOICES}, got {prec!r}")
    return tl.float32, tl.float32, tl.float32, prec


# Output and local-gradient kernels are parallel over chunks and take V in wider
# blocks than the sequential kernels (fewer programs recomputing Q K^T).
BV_OUT = 64
# Launch configurations each kernel is autotuned over on a GPU (keyed by K, V, C).
# Every one fits an sm_80 and an sm_90 block at K = V = 128 with at most a few
# hundred bytes of spilled stack (python -m cl_arch.kernels.compile_check lists them;
# tests/test_compile_check.py keeps it so). Which is fastest needs a GPU to say.
def _cfgs(*pairs):
    return [dict(num_warps=w, num_stages=st) for w, st in pairs]


LAUNCH_CONFIGS = {
    "_chunk_prepare_kernel": _cfgs((4, 1), (8, 1)),
    "_chunk_state_fwd_kernel": _cfgs((4, 1), (8, 1), (8, 2)),
    "_chunk_out_kernel": _cfgs((4, 1), (8, 1), (8, 2)),
    "_chunk_bwd_local_kernel": _cfgs((4, 1), (4, 2), (8, 1)),
    "_chunk_bwd_dstate_kernel": _cfgs((4, 1), (8, 1), (8, 2)),
    "_chunk_bwd_wy_kernel": _cfgs((8, 1), (8, 2)),
    "_chunk_bwd_kernel": _cfgs((8, 1), (8, 2)),
}
# dstate completes dW in place, so the autotuner's trial runs must start from the same dW.
_RESTORE = {"_chunk_bwd_dstate_kernel": ["dWv"]}


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a chunk kernel, autotuned over its LAUNCH_CONFIGS on a GPU."""
    name = kernel.__name__
    jit_for_env(kernel, LAUNCH_CONFIGS.get(name), key=["K", "V", "C"],
                restore_value=_RESTORE.get(name))[grid](*args, **kwargs)


class _TritonChunkFn(torch.autograd.Function):
    """Packed-layout autograd wrapper: tensors ``[1, NTOK, H, *]``, states ``[N, H, K, V]``.

    Forward: prepare, state, output kernels; saves S at every chunk start (h),
    the writes W, Wk, G and (I+A)^{-1}. Backward: local, dstate and gradient
    kernels (see the comment above).
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, lam_h, s0, e0, layout, scale, delta, C, save):
        NTOK, H, K = q.shape[1:]
        V = v.shape[-1]
        cu, seg_off, chunk_idx, N = layout.cu, layout.seg_off, layout.chunk_idx, layout.N
        dev = q.device
        acc = torch.promote_types(q.dtype, torch.float32)
        DT, OP, MM, PREC = _dot_types(q.dtype)
        dots = dict(DT=DT, OP=OP, MM=MM, PREC=PREC)
        trace = lam_h is not None
        NCt = layout.n_seg
        BK = max(16, triton.next_power_of_2(K))
        BVf = max(16, triton.next_power_of_2(V))
        U = torch.empty(NTOK, H, V, dtype=acc, device=dev)
        Wk = torch.empty(NTOK, H, K, dtype=acc, device=dev) if delta else None
        Gc = torch.empty(NTOK, H, dtype=acc, device=dev) if g is not None else None
        # (I + A)^{-1} per token row: the prepare kernel's scratch, and saved for the backward.
        Ti = torch.empty(NTOK, H, C, dtype=acc, device=dev) if delta else None
        _launch(_chunk_prepare_kernel, (NCt, H),
                k, v, beta, g, U, Wk, Gc, Ti, cu, chunk_idx,
                H=H, K=K, V=V, BK=BK, BV=BVf, C=C, DELTA=delta, HAS_G=g is not None, **dots)
        BV = max(16, min(BVf, triton_utils.BV_CAP))
        S_T = torch.empty(N, H, K, V, dtype=acc, device=dev)
        E_T = torch.empty(N, H, K, V, dtype=acc, device=dev) if trace else None
        # Per-chunk states and the writes are kept in the inputs' dtype when that is
        # bf16/fp16 (as FLA keeps h and v_new): they are the largest tensors the chunk
        # path moves (h alone is T/C * H*K*V). S_T, E_T and dW stay fp32.
        sdt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else acc
        h = torch.empty(NCt, H, K, V, dtype=sdt, device=dev)
        Wv = torch.empty(NTOK, H, V, dtype=sdt, device=dev)
        _launch(_chunk_state_fwd_kernel, (N * H, triton.cdiv(V, BV)),
                k, U, Wk, Gc, lam_h, s0, e0, Wv, h, S_T, E_T, cu, seg_off,
                H=H, K=K, V=V, BK=BK, BV=BV, C=C, DELTA=delta, HAS_G=g is not None, TRACE=trace,
                HAS_S0=s0 is not None, HAS_E0=e0 is not None, **dots)
        o = torch.empty(1, NTOK, H, V, dtype=q.dtype, device=dev)
        BVo = max(16, min(BVf, BV_OUT))
        _launch(_chunk_out_kernel, (NCt, triton.cdiv(V, BVo), H),
                q, k, Gc, h, Wv, o, cu, chunk_idx, seg_off, scale,
                H=H, K=K, V=V, BK=BK, BV=BVo, C=C, HAS_G=g is not None, **dots)
        ctx.save_for_backward(q, k, v, beta, g, lam_h, e0, h, Wv, Wk, Gc, Ti)
        ctx.layout = layout
        ctx.cfg = (scale, delta, C)
        ctx.has_s0 = s0 is not None
        return o, S_T, E_T

    @staticmethod
    def backward(ctx, do, dST, dET):
        q, k, v, beta, g, lam_h, e0, h, Wv, Wk, Gc, Ti = ctx.saved_tensors
        cu, seg_off, chunk_idx, N, NCt = (ctx.layout.cu, ctx.layout.seg_off, ctx.layout.chunk_idx, ctx.layout.N,
                                          ctx.layout.n_seg)
        scale, delta, C = ctx.cfg
        NTOK, H, K = q.shape[1:]
        V = v.shape[-1]
        dev = q.device
        acc = torch.promote_types(q.dtype, torch.float32)
        DT, OP, MM, PREC = _dot_types(q.dtype)
        dots = dict(DT=DT, OP=OP, MM=MM, PREC=PREC)
        has_det = lam_h is not None and dET is not None
        BK = max(16, triton.next_power_of_2(K))
        BVf = max(16, triton.next_power_of_2(V))
        BV = max(16, min(BVf, triton_utils.BV_CAP))
        BVo = max(16, min(BVf, BV_OUT))
        do = do.contiguous()
        dST = dST.contiguous() if dST is not None else None
        dET = dET.contiguous() if has_det else None
        dWv = torch.empty(NTOK, H, V, dtype=acc, device=dev)
        dlc = torch.empty(triton.cdiv(V, BVo), NTOK, H, dtype=acc, device=dev) if has_det else None
        _launch(_chunk_bwd_local_kernel, (NCt, triton.cdiv(V, BVo), H),
                q, k, Gc, lam_h, Wv, do, dET, dWv, dlc, cu, chunk_idx, scale, NTOK,
                H=H, K=K, V=V, BK=BK, BV=BVo, C=C, HAS_G=g is not None, HAS_DET=has_det, **dots)
        dckpt = torch.empty_like(h)
        ds0 = torch.empty(N, H, K, V, dtype=acc, device=dev)
        _launch(_chunk_bwd_dstate_kernel, (N * H, triton.cdiv(V, BV)),
                q, k, Wk, Gc, do, dST, dWv, dckpt, ds0, cu, seg_off, scale,
                H=H, K=K, V=V, BK=BK, BV=BV, C=C, DELTA=delta, HAS_G=g is not None, HAS_DST=dST is not None,
                **dots)
        dq = torch.empty(1, NTOK, H, K, dtype=q.dtype, device=dev)
        dk = torch.empty(1, NTOK, H, K, dtype=k.dtype, device=dev)
        dv = torch.empty(1, NTOK, H, V, dtype=v.dtype, device=dev)
        dbeta = torch.empty(1, NTOK, H, dtype=beta.dtype, device=dev)
        dg = torch.empty(1, NTOK, H, dtype=g.dtype, device=dev) if g is not None else None
        NV = triton.cdiv(V, BV)
        dk_wy = torch.empty(NTOK, H, K, dtype=acc, device=dev) if delta else None
        dG_wy = torch.empty(NTOK, H, dtype=acc, device=dev) if delta else None
        _launch(_chunk_bwd_wy_kernel, (NCt, H),
                k, v, beta, Gc, Ti, h, Wv, dWv, dv, dbeta, dk_wy, dG_wy, cu, chunk_idx, seg_off,
                H=H, K=K, V=V, BK=BK, BV=BV, NV=NV, C=C, DELTA=delta, HAS_G=g is not None, **dots)
        _launch(_chunk_bwd_kernel, (NCt, H),
                q, k, Gc, lam_h, h, dckpt, Wv, do, dET, dk_wy, dG_wy, dq, dk, dg, cu, chunk_idx, seg_off, scale,
                H=H, K=K, V=V, BK=BK, BV=BV, NV=NV, C=C, DELTA=delta, HAS_G=g is not None, HAS_DET=has_det,
                **dots)
        d_lam = d_e0 = None
        if lam_h is not None:
            if has_det:
                d_lam = lam_grad(dlc.sum(0), dET, e0, lam_h, cu, H).to(lam_h.dtype)
                if e0 is not None:
                    lens = (cu[1:] - cu[:-1]).to(acc)
                    d_e0 = torch.pow(lam_h.to(acc)[None, :], lens[:, None])[..., None, None] * dET
            else:
                d_lam = torch.zeros_like(lam_h)
        return (dq, dk, dv, dbeta, dg, d_lam, ds0 if ctx.has_s0 else None, d_e0,
                None, None, None, None, None)


def triton_chunk_plastic_rule(
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
    chunk_size: int = 64,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Chunkwise plastic rule in Triton; same contract as :func:`naive_plastic_rule`.

    Forward and backward are chunkwise-parallel Triton kernels (see the comment
    above): only the state S (forward) and its gradient dS (backward, chunks in
    reverse) are handed on sequentially from chunk to chunk; everything else,
    including the trace and the triangular solves, is per-chunk matmuls.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (fp32, bf16, fp16 or fp64);
        beta, g: ``[B, T, H]``; lam None, float or ``[H]``.
        initial_state, initial_trace: ``[N, H, K, V]`` or None; N = B, or the
            number of sequences when ``cu_seqlens`` is given.
        chunk_size: tokens per chunk, a power of two in [16, 128].
        cu_seqlens: ``[N+1]`` offsets of sequences packed along T (B must be 1).

    Returns:
        o ``[B, T, H, V]`` in q's dtype; S_T, E_T ``[N, H, K, V]`` fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: when Triton cannot run here, chunk_size is not a power of two
            in [16, 128], or cu_seqlens is malformed.
    """
    if not isinstance(chunk_size, int) or chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be a power of two in [16, 128] for triton_chunk, got {chunk_size!r}")
    B, T, H, K = q.shape
    import_triton(globals())
    layout, lam_h, scale, s0, e0 = prepare_triton_args(q, k, v, beta, g, lam, scale, initial_state,
                                                       initial_trace, cu_seqlens, chunk_size)
    tensors = [q, k, v, beta, g, lam_h, initial_state, initial_trace]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    pk = pack
    o, S_T, E_T = _TritonChunkFn.apply(pk(q), pk(k), pk(v), pk(beta), pk(g), lam_h, s0, e0, layout, scale,
                                       rule == "delta", chunk_size, save)
    o = o.reshape(B, T, H, v.shape[-1])
    if not output_final_state:
        return o, None, None
    return o, S_T, E_T
