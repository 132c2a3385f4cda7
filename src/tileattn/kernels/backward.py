"""FlashAttention-2 backward, recomputing probabilities from the saved LSE.

Three launches: delta = rowsum(dO * O); dQ with one program per (query tile, batch*head) that
loops over key tiles; dK/dV with one program per (key tile, batch*kv_head) that loops over every
query head of its GQA group and every query tile. Each output element has exactly one writer,
so there are no atomics and gradients are bit-identical run to run.

On sm_90+ the three launch as a programmatic-dependent-launch chain (PDL): dQ and dK/dV share
only their inputs, so dK/dV's programs may start as soon as every dQ program has started and
fill the SMs dQ's last wave leaves idle, instead of waiting for dQ's slowest program.
"""

import torch
import triton
import triton.language as tl

from ..layout import lse_shape
from .config import (
    autotuned,
    dot_precision,
    gdc_launch_dependents,
    gdc_wait,
    head_block,
    head_blocks,
    pdl_launch,
    seqlen_bucket,
)
from .forward import (
    alibi_batch_stride,
    check_offsets,
    dropout_args,
    dropout_kwargs,
    strides,
    trim_window,
    variant_args,
    variant_flags,
)
from .launch import Plans, launch_recorded, plan_key
from .tile import (
    LN2,
    LOG2E,
    alibi_slope,
    cast,
    dropout_words,
    dropped,
    kept_transposed,
    key_range,
    load_cols,
    load_rows,
    mask_scores,
    mma,
    query_range,
    query_tile,
    row_ptrs,
    score_tile,
    sequence,
)


@triton.jit
def _bwd_preprocess(
    Out, DOut, Delta,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    seqlen_q, heads, head_dim, keep_rate,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """Delta = rowsum(dO * O) * keep_rate: 1 - p with dropout, whose kernels form dS / (1 - p)
    (the kept probabilities unscaled) and scale dQ, dK and dV by 1 / (1 - p) after their loops."""
    if PDL:  # O and dO come from the kernels before this one
        gdc_wait()
        gdc_launch_dependents()
    # int64 rows: varlen runs every packed row here as one sequence
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)  # int64: batch/head offsets can pass 2**31 elements
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh * seqlen_q + offs_m, tl.sum(o * do, 1) * keep_rate, mask=offs_m < seqlen_q)


@triton.jit
def _load_row_stats(Lse, Delta, bh_offset, rows, seqlen_q, CHECK_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """LSE and delta for query rows, the LSE in the units _probs subtracts it in (natural for
    fp32, base 2 otherwise). Rows past the end, and rows that saw no key (LSE = -inf), get
    LSE = +inf so their recomputed probabilities are 0."""
    if CHECK_ROWS:
        lse = tl.load(Lse + bh_offset + rows, mask=rows < seqlen_q, other=float("inf"))
        delta = tl.load(Delta + bh_offset + rows, mask=rows < seqlen_q, other=0.0)
    else:
        lse = tl.load(Lse + bh_offset + rows)
        delta = tl.load(Delta + bh_offset + rows)
    scale = 1.0 if DOT_PRECISION == "ieee" else LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse * scale)
    return lse, delta


@triton.jit
def _probs(s, lse, DOT_PRECISION: tl.constexpr):
    """exp(score - LSE) from base-2 scores s and _load_row_stats' LSE (broadcast to s). fp32
    subtracts in natural units: converting the stored LSE to base 2 rounds it once more, which
    took dQ's fp32 error from 1.9e-6 to 3.1e-6 (test_accuracy's head dim 7, 37 x 41 case)."""
    if DOT_PRECISION == "ieee":
        p = tl.exp(s * LN2 - lse)
    else:
        p = tl.math.exp2(s - lse)
    return p


@triton.jit
def _dkdv_tile(
    dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, Lse, Delta, bh_offset, start_m, offs_m, start_n, offs_n, offs_d,
    offs_d2,
    mask_d, mask_d2, stride_qm, stride_qd, stride_dom, stride_dod, seqlen_q, seqlen_k, qk_scale, softcap, slope,
    window_left, window_right, seed, offset, bh, dropout_p,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rows = start_m + offs_m
    in_q = rows < seqlen_q
    qt, qt2 = load_cols(row_ptrs(q_base, start_m, offs_m, stride_qm, WIDE)[None, :], offs_d, offs_d2, in_q, mask_d,
                        mask_d2, stride_qd, MASKED, EVEN_D, SPLIT_D)
    do, do2 = load_rows(row_ptrs(do_base, start_m, offs_m, stride_dom, WIDE)[:, None], offs_d, offs_d2, in_q, mask_d,
                        mask_d2, stride_dod, MASKED, EVEN_D, SPLIT_D)
    lse, delta = _load_row_stats(Lse, Delta, bh_offset, rows, seqlen_q, MASKED, DOT_PRECISION)
    qk = mma(k, qt, None, DOT_PRECISION)
    dpt = mma(v, tl.trans(do), None, DOT_PRECISION)
    if SPLIT_D:
        qk = mma(k2, qt2, qk, DOT_PRECISION)
        dpt = mma(v2, tl.trans(do2), dpt, DOT_PRECISION)
    st, th, _ = score_tile(qk, rows[None, :], offs_n[:, None], seqlen_q, seqlen_k, qk_scale, softcap, slope, SOFTCAP,
                           ALIBI)  # [BLOCK_N, BLOCK_M]
    if MASKED:
        st = mask_scores(st, rows[None, :], offs_n[:, None], seqlen_q, seqlen_k, window_left, window_right, CAUSAL,
                         WINDOW)
    pt = _probs(st, lse[None, :], DOT_PRECISION)
    if DROPOUT:  # the output saw the kept p (times 1 / (1 - p), applied after the loop): so do dV and dP
        keep = kept_transposed(tl.trans(dropout_words(seed, offset, bh, rows, start_n, offs_n.shape[0])), dropout_p)
        pt_out = pt * keep
        dpt = dpt * keep  # with delta * (1 - p) (_bwd_preprocess): dS / (1 - p)
    else:
        pt_out = pt
    pt_out = cast(pt_out, do.dtype, DOT_PRECISION)
    if SOFTCAP:  # the cap's derivative, applied now so the tanh tile dies before the products
        pt = pt * (1.0 - th * th)
    dv = mma(pt_out, do, dv, DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dst = cast(dst, qt.dtype, DOT_PRECISION)
    dk = mma(dst, tl.trans(qt), dk, DOT_PRECISION)
    if SPLIT_D:
        dv2 = mma(pt_out, do2, dv2, DOT_PRECISION)
        dk2 = mma(dst, tl.trans(qt2), dk2, DOT_PRECISION)
    return dk, dk2, dv, dv2


# a fresh random seed per call must not compile a new variant (Triton specializes ints)
@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, CuSeqQ, CuSeqK, Alibi,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_lb, stride_lh, stride_ab,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale, softmax_scale, softcap, window_left, window_right,
    seed, philox_offset, dropout_p, rescale,
    SEQ_BUCKET,  # autotune key only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT_D: tl.constexpr,
    EVEN_D: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    # PDL: launched once every dQ program has started, each after the delta kernel had finished,
    # so everything read here is written; the wait before exiting makes this grid's end imply
    # dQ's, which stream order alone no longer does
    start_n = tl.program_id(0) * BLOCK_N
    pid_bhk = tl.program_id(1)
    heads_kv = heads // group
    b = (pid_bhk // heads_kv).to(tl.int64)  # int64: batch/head offsets can pass 2**31 elements
    hk = (pid_bhk % heads_kv).to(tl.int64)
    q_start, seqlen_q, k_start, seqlen_k = sequence(b, CuSeqQ, CuSeqK, seqlen_q, seqlen_k, VARLEN)
    if start_n >= seqlen_k:  # varlen: the grid covers the longest sequence
        if PDL:
            gdc_wait()
        return
    Q += b * stride_qb + q_start * stride_qm
    DOut += b * stride_dob + q_start * stride_dom
    K += b * stride_kb + k_start * stride_kn + hk * stride_kh
    V += b * stride_vb + k_start * stride_vn + hk * stride_vh
    DK += b * stride_dkb + k_start * stride_dkn + hk * stride_dkh
    DV += b * stride_dvb + k_start * stride_dvn + hk * stride_dvh
    tile_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + tile_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)  # the head dim's second part (SPLIT_D)
    mask_n = offs_n < seqlen_k
    mask_d = offs_d < head_dim
    mask_d2 = offs_d2 < head_dim

    k, k2 = load_rows(row_ptrs(K, start_n, tile_n, stride_kn, WIDE)[:, None], offs_d, offs_d2, mask_n, mask_d, mask_d2,
                      stride_kd, True, EVEN_D, SPLIT_D)
    v, v2 = load_rows(row_ptrs(V, start_n, tile_n, stride_vn, WIDE)[:, None], offs_d, offs_d2, mask_n, mask_d, mask_d2,
                      stride_vd, True, EVEN_D, SPLIT_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    # keys past seqlen_k in a ragged last tile need no mask: their dk/dv rows are never stored
    lo, full_lo, full_hi, hi = query_range(start_n, start_n + BLOCK_N - 1, seqlen_q, seqlen_k, window_left,
                                           window_right, BLOCK_M, CAUSAL, WINDOW)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + h * stride_qh
        do_base = DOut + h * stride_doh
        bh_offset = b * stride_lb + h * stride_lh + q_start
        slope = alibi_slope(Alibi, b, h, stride_ab, ALIBI)
        bh = (b * heads + h).to(tl.int32)
        if DOT_PRECISION == "ieee":
            # fp32: sum each head's contribution on its own, then across the group, as the
            # reference does; one running sum over group * seqlen_q products loses ~2x accuracy
            dk_total, dv_total, dk2_total, dv2_total = dk, dv, dk2, dv2
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
            dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        for start_m in range(lo, tl.minimum(full_lo, hi), BLOCK_M):
            dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, Lse, Delta, bh_offset,
                                          start_m, offs_m, start_n, offs_n, offs_d, offs_d2, mask_d, mask_d2, stride_qm,
                                          stride_qd, stride_dom, stride_dod, seqlen_q, seqlen_k, qk_scale, softcap,
                                          slope, window_left, window_right, seed, philox_offset, bh, dropout_p,
                                          CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT,
                                          True, EVEN_D, SPLIT_D, WIDE, DOT_PRECISION)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, Lse, Delta, bh_offset,
                                          start_m, offs_m, start_n, offs_n, offs_d, offs_d2, mask_d, mask_d2, stride_qm,
                                          stride_qd, stride_dom, stride_dod, seqlen_q, seqlen_k, qk_scale, softcap,
                                          slope, window_left, window_right, seed, philox_offset, bh, dropout_p,
                                          CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT,
                                          False, EVEN_D, SPLIT_D, WIDE, DOT_PRECISION)
        for start_m in range(tl.maximum(full_lo, full_hi), hi, BLOCK_M):
            dk, dk2, dv, dv2 = _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, q_base, do_base, Lse, Delta, bh_offset,
                                          start_m, offs_m, start_n, offs_n, offs_d, offs_d2, mask_d, mask_d2, stride_qm,
                                          stride_qd, stride_dom, stride_dod, seqlen_q, seqlen_k, qk_scale, softcap,
                                          slope, window_left, window_right, seed, philox_offset, bh, dropout_p,
                                          CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT,
                                          True, EVEN_D, SPLIT_D, WIDE, DOT_PRECISION)
        if DOT_PRECISION == "ieee":
            dk = dk_total + dk
            dv = dv_total + dv
            dk2 = dk2_total + dk2
            dv2 = dv2_total + dv2

    if DROPOUT:
        dk = dk * rescale
        dv = dv * rescale
        dk2 = dk2 * rescale
        dv2 = dv2 * rescale
    dk_rows = row_ptrs(DK, start_n, tile_n, stride_dkn, WIDE)[:, None]
    dv_rows = row_ptrs(DV, start_n, tile_n, stride_dvn, WIDE)[:, None]
    mask = mask_n[:, None] & mask_d[None, :]
    tl.store(dk_rows + offs_d[None, :] * stride_dkd, cast(dk * softmax_scale, DK.dtype.element_ty, DOT_PRECISION),
             mask=mask)
    tl.store(dv_rows + offs_d[None, :] * stride_dvd, cast(dv, DV.dtype.element_ty, DOT_PRECISION), mask=mask)
    if SPLIT_D:
        mask2 = mask_n[:, None] & mask_d2[None, :]
        tl.store(dk_rows + offs_d2[None, :] * stride_dkd,
                 cast(dk2 * softmax_scale, DK.dtype.element_ty, DOT_PRECISION), mask=mask2)
        tl.store(dv_rows + offs_d2[None, :] * stride_dvd, cast(dv2, DV.dtype.element_ty, DOT_PRECISION), mask=mask2)
    if PDL:
        gdc_wait()


@triton.jit
def _dq_tile(
    dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d, offs_d2, mask_d, mask_d2,
    stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k, qk_scale, softcap, slope, window_left, window_right,
    seed, offset, bh, dropout_p,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cols = start_n + offs_n
    in_k = cols < seqlen_k
    kt, kt2 = load_cols(row_ptrs(k_base, start_n, offs_n, stride_kn, WIDE)[None, :], offs_d, offs_d2, in_k, mask_d,
                        mask_d2, stride_kd, MASKED, EVEN_D, SPLIT_D)
    vt, vt2 = load_cols(row_ptrs(v_base, start_n, offs_n, stride_vn, WIDE)[None, :], offs_d, offs_d2, in_k, mask_d,
                        mask_d2, stride_vd, MASKED, EVEN_D, SPLIT_D)
    qk = mma(q, kt, None, DOT_PRECISION)
    dp = mma(do, vt, None, DOT_PRECISION)
    if SPLIT_D:
        qk = mma(q2, kt2, qk, DOT_PRECISION)
        dp = mma(do2, vt2, dp, DOT_PRECISION)
    s, th, _ = score_tile(qk, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, qk_scale, softcap, slope, SOFTCAP,
                          ALIBI)
    if MASKED:
        s = mask_scores(s, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, window_left, window_right, CAUSAL,
                        WINDOW)
    p = _probs(s, lse[:, None], DOT_PRECISION)
    if SOFTCAP:  # the cap's derivative, applied now so the tanh tile dies early
        p = p * (1.0 - th * th)
    if DROPOUT:  # dS / (1 - p), as in _dkdv_tile
        dp = dropped(dp, dropout_words(seed, offset, bh, offs_m, start_n, offs_n.shape[0]), dropout_p)
    ds = p * (dp - delta[:, None])
    ds = cast(ds, kt.dtype, DOT_PRECISION)
    dq = mma(ds, tl.trans(kt), dq, DOT_PRECISION)
    if SPLIT_D:
        dq2 = mma(ds, tl.trans(kt2), dq2, DOT_PRECISION)
    return dq, dq2


# a fresh random seed per call must not compile a new variant (Triton specializes ints)
@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, CuSeqQ, CuSeqK, Alibi,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh, stride_ab,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale, softmax_scale, softcap, window_left, window_right,
    seed, philox_offset, dropout_p, rescale,
    SEQ_BUCKET,  # autotune key only
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT_D: tl.constexpr,
    EVEN_D: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # delta comes from the kernel before; dK/dV may launch once every program got here
        gdc_wait()
        gdc_launch_dependents()
    start_m = query_tile(BLOCK_M, CAUSAL)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)  # int64: batch/head offsets can pass 2**31 elements
    h = (pid_bh % heads).to(tl.int64)
    q_start, seqlen_q, k_start, seqlen_k = sequence(b, CuSeqQ, CuSeqK, seqlen_q, seqlen_k, VARLEN)
    if start_m >= seqlen_q:  # varlen: the grid covers the longest sequence
        return
    Q += b * stride_qb + q_start * stride_qm + h * stride_qh
    DOut += b * stride_dob + q_start * stride_dom + h * stride_doh
    DQ += b * stride_dqb + q_start * stride_dqm + h * stride_dqh
    tile_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + tile_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)  # the head dim's second part (SPLIT_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < head_dim
    mask_d2 = offs_d2 < head_dim
    slope = alibi_slope(Alibi, b, h, stride_ab, ALIBI)

    q, q2 = load_rows(row_ptrs(Q, start_m, tile_m, stride_qm, WIDE)[:, None], offs_d, offs_d2, mask_m, mask_d, mask_d2,
                      stride_qd, True, EVEN_D, SPLIT_D)
    do, do2 = load_rows(row_ptrs(DOut, start_m, tile_m, stride_dom, WIDE)[:, None], offs_d, offs_d2, mask_m, mask_d,
                        mask_d2, stride_dod, True, EVEN_D, SPLIT_D)
    lse, delta = _load_row_stats(Lse, Delta, b * stride_lb + h * stride_lh + q_start, offs_m, seqlen_q, True,
                                 DOT_PRECISION)
    k_base = K + b * stride_kb + k_start * stride_kn + (h // group) * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + (h // group) * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    lo, full_lo, full_hi, hi = key_range(start_m, tl.minimum(start_m + BLOCK_M, seqlen_q) - 1, seqlen_q, seqlen_k,
                                         window_left, window_right, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, tl.minimum(full_lo, hi), BLOCK_N):
        dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                           offs_d2, mask_d, mask_d2, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k,
                           qk_scale, softcap, slope, window_left, window_right, seed, philox_offset, pid_bh,
                           dropout_p, CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, True, EVEN_D, SPLIT_D,
                           WIDE, DOT_PRECISION)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                           offs_d2, mask_d, mask_d2, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k,
                           qk_scale, softcap, slope, window_left, window_right, seed, philox_offset, pid_bh,
                           dropout_p, CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, False, EVEN_D, SPLIT_D,
                           WIDE, DOT_PRECISION)
    for start_n in range(tl.maximum(full_lo, full_hi), hi, BLOCK_N):
        dq, dq2 = _dq_tile(dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                           offs_d2, mask_d, mask_d2, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k,
                           qk_scale, softcap, slope, window_left, window_right, seed, philox_offset, pid_bh,
                           dropout_p, CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, True, EVEN_D, SPLIT_D,
                           WIDE, DOT_PRECISION)

    if DROPOUT:
        dq = dq * rescale
        dq2 = dq2 * rescale
    dq_rows = row_ptrs(DQ, start_m, tile_m, stride_dqm, WIDE)[:, None]
    tl.store(dq_rows + offs_d[None, :] * stride_dqd, cast(dq * softmax_scale, DQ.dtype.element_ty, DOT_PRECISION),
             mask=mask_m[:, None] & mask_d[None, :])
    if SPLIT_D:
        tl.store(dq_rows + offs_d2[None, :] * stride_dqd,
                 cast(dq2 * softmax_scale, DQ.dtype.element_ty, DOT_PRECISION), mask=mask_m[:, None] & mask_d2[None, :])


_dkdv = autotuned(_bwd_dkdv_kernel, "bwd_dkdv")
_dq = autotuned(_bwd_dq_kernel, "bwd_dq")
_PREPROCESS_BLOCK_M = 64


def backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q: int = 0, max_seqlen_k: int = 0, dq=None, dk=None, dv=None, window_size=(-1, -1),
             softcap: float = 0.0, alibi_slopes=None, dropout=(0.0, 0, 0)):
    """Launch the backward kernels; returns (dq, dk, dv) shaped and typed like (q, k, v).

    Layouts and variants as in :func:`forward` (dense or varlen); ``lse`` is the forward's float32
    output and must be contiguous. dq/dk/dv may be passed preallocated (tests poison them).
    """
    varlen = cu_seqlens_q is not None
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if q.numel() + k.numel() == 0:
        return dq, dk, dv
    # what decides the three launches but the tensors' addresses, the scale and dropout's draw
    key = plan_key((dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, cu_seqlens_q, cu_seqlens_k), dropout, causal,
                   tuple(window_size), softcap, max_seqlen_q, max_seqlen_k)
    plan = _plans.get(key)
    if plan is not None:
        _replay(plan, dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, alibi_slopes,
                dropout)
        return dq, dk, dv
    q4, k4, v4, o4, do4, dq4, dk4, dv4, l3 = (x.unsqueeze(0) if varlen else x
                                              for x in (q, k, v, out, dout, dq, dk, dv, lse))
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    seqlen_q, seqlen_k = (max_seqlen_q, max_seqlen_k) if varlen else (q.shape[1], k.shape[1])
    heads, heads_kv, head_dim = q4.shape[2], k4.shape[2], q4.shape[3]
    rows_q = q4.shape[1]  # all query rows of a batch entry (varlen: every packed row)
    window_size = trim_window(window_size, seqlen_q, seqlen_k)
    wide = check_offsets(seqlen_q, q=q4, dout=do4, dq=dq4) | check_offsets(seqlen_k, k=k4, v=v4, dk=dk4, dv=dv4)
    delta = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    common = dict(**variant_flags(causal, window_size, softcap, alibi_slopes, q), DROPOUT=dropout[0] > 0,
                  VARLEN=varlen, WIDE=wide, **head_blocks(head_dim), DOT_PRECISION=dot_precision(q.dtype))
    sizes = (seqlen_q, seqlen_k, heads, heads // heads_kv, head_dim, softmax_scale * LOG2E.value, softmax_scale,
             *variant_args(causal, window_size, softcap), *dropout_args(dropout), seqlen_bucket(seqlen_q, seqlen_k))
    tensor_strides = (*strides(q4, varlen), *strides(k4, varlen), *strides(v4, varlen), *strides(do4, varlen))
    lse_strides = (*strides(l3, varlen)[:2], alibi_batch_stride(alibi_slopes))
    # dK/dV may overlap dQ only behind it: PDL's early start is safe there and nowhere else
    pdl = pdl_launch(q.device) if rows_q > 0 else dict(PDL=False)
    if rows_q > 0:
        # delta = rowsum(dO * O), laid out like lse; packed rows are one long sequence here
        pre = launch_recorded(
            key is not None, _bwd_preprocess, (triton.cdiv(rows_q, _PREPROCESS_BLOCK_M), q4.shape[0] * heads),
            o4, do4, delta, *o4.stride(), *do4.stride(), rows_q, heads, head_dim, 1.0 - float(dropout[0]),
            BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=head_block(head_dim), **pdl,
        )
        dq_launch = _dq.recorded(
            key is not None, lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads),
            q4, k4, v4, do4, lse, delta, dq4, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *tensor_strides,
            *strides(dq4, varlen), *lse_strides, *sizes, **common, **pdl,
        )
    if k4.shape[1] > 0:
        dkdv_launch = _dkdv.recorded(
            key is not None, lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * heads_kv),
            q4, k4, v4, do4, lse, delta, dk4, dv4, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
            *tensor_strides, *strides(dk4, varlen), *strides(dv4, varlen), *lse_strides, *sizes, **common, **pdl,
        )
    if key is not None and rows_q > 0 and k4.shape[1] > 0 and None not in (pre, dq_launch, dkdv_launch):
        _plans.keep(key, (pre, dq_launch, dkdv_launch))
    return dq, dk, dv


_plans = Plans()


def _replay(plan, dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, alibi_slopes,
            dropout):
    pre, dq_launch, dkdv_launch = plan
    delta = torch.empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
    pre(Out=out, DOut=dout, Delta=delta, keep_rate=1.0 - float(dropout[0]))
    common = dict(Q=q, K=k, V=v, DOut=dout, Lse=lse, Delta=delta, CuSeqQ=cu_seqlens_q, CuSeqK=cu_seqlens_k,
                  Alibi=alibi_slopes, qk_scale=softmax_scale * LOG2E.value, softmax_scale=softmax_scale,
                  **dropout_kwargs(dropout))
    dq_launch(DQ=dq, **common)
    dkdv_launch(DK=dk, DV=dv, **common)
