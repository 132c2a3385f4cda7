"""FlashAttention-2 forward: one program per (query tile, batch*head); K/V tiles stream past."""

import torch
import triton
import triton.language as tl

from ..layout import lse_shape
from .config import autotuned, desc_block_setter, dot_precision, head_blocks, host_descriptors, seqlen_bucket, use_tma
from .launch import Plans, plan_key
from .tile import (
    LOG2E,
    alibi_row_shift,
    alibi_slope,
    attend_tile,
    cast,
    desc_rows,
    finish_softmax,
    fold_sink,
    key_range,
    load_kv,
    load_rows,
    query_tile,
    row_ptrs,
    rows_desc,
    sequence,
)


@triton.jit
def _fwd_tile(
    acc, acc2, l_i, m_i, q, q2, k_src, k2_src, v_src, v2_src, b, hk, start_n, offs_m, offs_n, offs_d, offs_d2, mask_d,
    mask_d2, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_q, seqlen_k, qk_scale, softcap, slope, window_left,
    window_right, seed, offset, bh, dropout_p, alibi_ref, shift_masked,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, TMA: tl.constexpr, WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BOUNDED: tl.constexpr,
):
    """Load one K/V tile (k_src... are TMA descriptors with TMA: with TMA == 2 over the whole
    tensors, read at batch b and K/V head hk; base pointers without) and fold it in."""
    cols = start_n + offs_n
    if TMA == 2:
        kt = tl.trans(desc_rows(k_src, b, start_n, hk))
        v = desc_rows(v_src, b, start_n, hk)
        kt2 = kt
        v2 = v
    elif TMA:  # rows past seqlen_k come back as zeros; MASKED tiles mask their scores
        kt = tl.trans(k_src.load([start_n, 0]))
        v = v_src.load([start_n, 0])
        kt2 = kt
        v2 = v
        if SPLIT_D:
            kt2 = tl.trans(k2_src.load([start_n, 0]))
            v2 = v2_src.load([start_n, 0])
    else:
        kt, kt2, v, v2 = load_kv(row_ptrs(k_src, start_n, offs_n, stride_kn, WIDE)[None, :],
                                 row_ptrs(v_src, start_n, offs_n, stride_vn, WIDE)[:, None], offs_d, offs_d2,
                                 cols < seqlen_k, mask_d, mask_d2, stride_kd, stride_vd, MASKED, EVEN_D,
                                 SPLIT_D)
    return attend_tile(acc, acc2, l_i, m_i, q, q2, kt, kt2, v, v2, offs_m, start_n, cols, seqlen_q, seqlen_k, qk_scale,
                       softcap, slope, window_left, window_right, seed, offset, bh, dropout_p, alibi_ref, shift_masked,
                       CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, MASKED, SPLIT_D, DOT_PRECISION, BOUNDED)


# a fresh random seed per call must not compile a new variant (Triton specializes ints)
@triton.jit(do_not_specialize=["seed", "philox_offset"])
def _fwd_kernel(
    Q, K, V, Out, Lse, CuSeqQ, CuSeqK, Alibi, Sinks,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ab,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale, softcap, window_left, window_right,
    seed, philox_offset, dropout_p, rescale,
    SEQ_BUCKET,  # autotune key only
    KDesc, VDesc,  # with TMA == 2: host-made descriptors (keyword arguments), else None
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BOUNDED: tl.constexpr, ALIBI: tl.constexpr,
    SINK: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    SPLIT_D: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = query_tile(BLOCK_M, CAUSAL)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)  # int64: batch/head offsets can pass 2**31 elements
    h = (pid_bh % heads).to(tl.int64)
    q_start, seqlen_q, k_start, seqlen_k = sequence(b, CuSeqQ, CuSeqK, seqlen_q, seqlen_k, VARLEN)
    if start_m >= seqlen_q:  # varlen: the grid covers the longest sequence
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)  # the head dim's second part (SPLIT_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < head_dim
    mask_d2 = offs_d2 < head_dim
    slope = alibi_slope(Alibi, b, h, stride_ab, ALIBI)

    Q += b * stride_qb + q_start * stride_qm + h * stride_qh
    k_src = K + b * stride_kb + k_start * stride_kn + (h // group) * stride_kh
    v_src = V + b * stride_vb + k_start * stride_vn + (h // group) * stride_vh
    k2_src = k_src
    v2_src = v_src
    b32 = b.to(tl.int32)  # TMA coordinates are 32-bit
    hk32 = (h // group).to(tl.int32)
    if TMA == 1:
        q = rows_desc(Q, seqlen_q, head_dim, stride_qm, BLOCK_M, BLOCK_D, BLOCK_D2, False).load([start_m, 0])
        q2 = q
        if SPLIT_D:
            q2 = rows_desc(Q, seqlen_q, head_dim, stride_qm, BLOCK_M, BLOCK_D, BLOCK_D2, True).load([start_m, 0])
            k2_src = rows_desc(k_src, seqlen_k, head_dim, stride_kn, BLOCK_N, BLOCK_D, BLOCK_D2, True)
            v2_src = rows_desc(v_src, seqlen_k, head_dim, stride_vn, BLOCK_N, BLOCK_D, BLOCK_D2, True)
        k_src = rows_desc(k_src, seqlen_k, head_dim, stride_kn, BLOCK_N, BLOCK_D, BLOCK_D2, False)
        v_src = rows_desc(v_src, seqlen_k, head_dim, stride_vn, BLOCK_N, BLOCK_D, BLOCK_D2, False)
    else:  # with host descriptors too: Q and O are one tile each, not worth a descriptor's launch cost
        q, q2 = load_rows(row_ptrs(Q, start_m, tl.arange(0, BLOCK_M), stride_qm, WIDE)[:, None], offs_d, offs_d2,
                          mask_m, mask_d, mask_d2, stride_qd, True, EVEN_D, SPLIT_D)
        if TMA == 2:
            k_src = KDesc
            v_src = VDesc
            k2_src = KDesc
            v2_src = VDesc
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lo, full_lo, full_hi, hi = key_range(start_m, tl.minimum(start_m + BLOCK_M, seqlen_q) - 1, seqlen_q, seqlen_k,
                                         window_left, window_right, BLOCK_N, CAUSAL, WINDOW)
    shift_masked = full_lo < full_hi  # an unmasked tile: every row sees BLOCK_N keys or more
    for start_n in range(lo, tl.minimum(full_lo, hi), BLOCK_N):
        m_i, l_i, acc, acc2 = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_src, k2_src, v_src, v2_src, b32, hk32, start_n,
                                        offs_m, offs_n, offs_d, offs_d2, mask_d, mask_d2, stride_kn, stride_kd,
                                        stride_vn, stride_vd, seqlen_q, seqlen_k, qk_scale, softcap, slope, window_left,
                                        window_right, seed, philox_offset, pid_bh, dropout_p, start_m, shift_masked,
                                        CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, True, EVEN_D, SPLIT_D, TMA, WIDE,
                                        DOT_PRECISION, BOUNDED)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        m_i, l_i, acc, acc2 = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_src, k2_src, v_src, v2_src, b32, hk32, start_n,
                                        offs_m, offs_n, offs_d, offs_d2, mask_d, mask_d2, stride_kn, stride_kd,
                                        stride_vn, stride_vd, seqlen_q, seqlen_k, qk_scale, softcap, slope, window_left,
                                        window_right, seed, philox_offset, pid_bh, dropout_p, start_m, shift_masked,
                                        CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, False, EVEN_D, SPLIT_D, TMA, WIDE,
                                        DOT_PRECISION, BOUNDED)
    for start_n in range(tl.maximum(full_lo, full_hi), hi, BLOCK_N):
        m_i, l_i, acc, acc2 = _fwd_tile(acc, acc2, l_i, m_i, q, q2, k_src, k2_src, v_src, v2_src, b32, hk32, start_n,
                                        offs_m, offs_n, offs_d, offs_d2, mask_d, mask_d2, stride_kn, stride_kd,
                                        stride_vn, stride_vd, seqlen_q, seqlen_k, qk_scale, softcap, slope, window_left,
                                        window_right, seed, philox_offset, pid_bh, dropout_p, start_m, shift_masked,
                                        CAUSAL, WINDOW, SOFTCAP, ALIBI, DROPOUT, True, EVEN_D, SPLIT_D, TMA, WIDE,
                                        DOT_PRECISION, BOUNDED)

    if ALIBI == 2:  # back to the true scores' max (-inf stays -inf), so the LSE and a sink see them
        m_i = m_i - alibi_row_shift(slope, offs_m, start_m)
    if DROPOUT:  # the kept probabilities' 1 / (1 - p), once instead of per score
        acc = acc * rescale
        acc2 = acc2 * rescale
    if SINK:
        m_i, l_i, acc, acc2 = fold_sink(m_i, l_i, acc, acc2, tl.load(Sinks + h).to(tl.float32) * LOG2E)
    out, out2, lse = finish_softmax(m_i, l_i, acc, acc2)
    out = cast(out, Out.dtype.element_ty, DOT_PRECISION)
    out2 = cast(out2, Out.dtype.element_ty, DOT_PRECISION)
    Out += b * stride_ob + q_start * stride_om + h * stride_oh
    if TMA == 1:
        rows_desc(Out, seqlen_q, head_dim, stride_om, BLOCK_M, BLOCK_D, BLOCK_D2, False).store([start_m, 0], out)
        if SPLIT_D:
            rows_desc(Out, seqlen_q, head_dim, stride_om, BLOCK_M, BLOCK_D, BLOCK_D2, True).store([start_m, 0], out2)
    else:
        o_rows = row_ptrs(Out, start_m, tl.arange(0, BLOCK_M), stride_om, WIDE)[:, None]
        tl.store(o_rows + offs_d[None, :] * stride_od, out, mask=mask_m[:, None] & mask_d[None, :])
        if SPLIT_D:
            tl.store(o_rows + offs_d2[None, :] * stride_od, out2, mask=mask_m[:, None] & mask_d2[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=mask_m)


DESC_ROWS = dict(KDesc="BLOCK_N", VDesc="BLOCK_N")  # host descriptors' block rows


SPLIT_DEFAULT = (128, 64, 4, 3)
HOST_TMA_DEFAULT = (128, 128, 8, 3)


def _select(configs, meta: dict) -> list:
    """The forward's configs for these arguments. Triton 3.6's ptxas crashes (segfault) on every
    2-stage config with host descriptors (sm_90a, found compiling offline), so those need 3
    stages or more. A split head dim (80, 96) defaults to 4 warps: timed alone on an H100,
    (128, 64, 4, 3) beat the 128-wide default (128, 64, 8, 3) by 11-30% causal at 1k-8k for d80
    and d96 (non-causal 4k: d96 +9%, d80 equal); not with dropout, whose Philox state spills.
    With host descriptors (d128) the default is (128, 128, 8, 3), +4-12% over (128, 64, 8, 3)
    timed alone; with dropout too since its bits need no layout conversion (230 KiB of shared
    memory as without it, no spills; it needed 288 KiB before)."""
    configs = [c for c in configs if meta["TMA"] != 2 or c[3] >= 3]
    first = SPLIT_DEFAULT if meta["SPLIT_D"] else HOST_TMA_DEFAULT if meta["TMA"] == 2 else None
    if first in configs and not (meta["DROPOUT"] and meta["SPLIT_D"]):
        configs.remove(first)
        configs.insert(0, first)
    return configs


_fwd = autotuned(_fwd_kernel, "fwd", prepare=desc_block_setter(**DESC_ROWS), select=_select)


def _host_descs(tma: bool, varlen: bool, blocks: dict, k4, v4) -> dict:
    """K/V descriptors over the whole dense tensors, made once here instead of per program on
    the device (TMA == 2); varlen sequences, a split head dim and empty K/V keep the
    device-made ones (TMA == 1) or pointers."""
    if not tma or varlen or blocks["SPLIT_D"] or k4.shape[1] == 0:
        return dict(KDesc=None, VDesc=None, TMA=int(tma))
    return dict(host_descriptors(blocks["BLOCK_D"], KDesc=k4, VDesc=v4), TMA=2)


def forward(q, k, v, softmax_scale: float, causal: bool, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q: int = 0, max_seqlen_k: int = 0, out=None, lse=None, window_size=(-1, -1),
            softcap: float = 0.0, alibi_slopes=None, learnable_sink=None, dropout=(0.0, 0, 0)):
    """Launch the forward kernel; any strides.

    Dense: q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D), lse (B, H, Sq).
    Varlen (cu_seqlens_q/k int32 (B + 1,) given): q (total_q, H, D), k/v (total_k, Hkv, D)
    -> out (total_q, H, D), lse (H, total_q). lse is float32, natural log. ``out`` and ``lse``
    may be passed preallocated (tests poison them to catch unwritten elements). Variants as in
    :func:`tileattn.flash_attn_func` (window_size, softcap, alibi_slopes float32, learnable_sink
    (H,); its gradient is computed by the caller from the LSE; dropout = (dropout_p, seed,
    offset), see tileattn.dropout).
    """
    varlen = cu_seqlens_q is not None
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    key = None
    if softmax_scale > 0:
        # what decides the launch but the tensors' addresses, the scale and dropout's draw (a
        # packed batch's sequence count is cu_seqlens' shape; its longest lengths set the grid)
        key = plan_key((q, k, v, out, lse, alibi_slopes, learnable_sink, cu_seqlens_q, cu_seqlens_k), dropout, causal,
                       tuple(window_size), softcap, max_seqlen_q, max_seqlen_k)
        plan = _plans.get(key)
        if plan is not None:
            plan(Q=q, K=k, V=v, Out=out, Lse=lse, CuSeqQ=cu_seqlens_q, CuSeqK=cu_seqlens_k, Alibi=alibi_slopes,
                 Sinks=learnable_sink, qk_scale=softmax_scale * LOG2E.value, **dropout_kwargs(dropout),
                 descriptors=dict(KDesc=k, VDesc=v))
            return out, lse
    q, softmax_scale = positive_scale(q, softmax_scale)
    q4, k4, v4, o4, l3 = (x.unsqueeze(0) if varlen else x for x in (q, k, v, out, lse))
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    seqlen_q, seqlen_k = (max_seqlen_q, max_seqlen_k) if varlen else (q.shape[1], k.shape[1])
    heads, heads_kv, head_dim = q4.shape[2], k4.shape[2], q4.shape[3]
    window_size = trim_window(window_size, seqlen_q, seqlen_k)
    wide = check_offsets(seqlen_q, q=q4, out=o4) | check_offsets(seqlen_k, k=k4, v=v4)
    blocks = head_blocks(head_dim)

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)

    recorded = _fwd.recorded(
        key is not None, grid, q4, k4, v4, o4, l3, cu_seqlens_q, cu_seqlens_k, alibi_slopes, learnable_sink,
        *strides(q4, varlen), *strides(k4, varlen), *strides(v4, varlen), *strides(o4, varlen),
        *strides(l3, varlen)[:2], alibi_batch_stride(alibi_slopes),
        seqlen_q, seqlen_k, heads, heads // heads_kv, head_dim, softmax_scale * LOG2E.value,
        *variant_args(causal, window_size, softcap), *dropout_args(dropout), seqlen_bucket(seqlen_q, seqlen_k),
        **variant_flags(causal, window_size, softcap, alibi_slopes, q, per_key_alibi=True, bounded=True),
        SINK=learnable_sink is not None, DROPOUT=dropout[0] > 0, VARLEN=varlen, **blocks,
        **_host_descs(use_tma(blocks, q4, k4, v4, o4), varlen, blocks, k4, v4), WIDE=wide,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    _plans.keep(key, recorded)
    return out, lse


_plans = Plans()


def positive_scale(q, softmax_scale: float):
    """(q, softmax_scale) with the scale made positive, which the forward kernels' folded exp2
    assumes (score_tile's FOLD): a negative scale negates q instead, a zero one multiplies it by
    0 (a NaN or inf in q stays NaN, as in scale * q.k). The scores, and so out and the LSE, are
    the same."""
    if softmax_scale > 0:
        return q, softmax_scale
    return (-q, -softmax_scale) if softmax_scale < 0 else (q * 0.0, 1.0)


_UNBOUNDED = 1 << 30  # a window side of -1: farther than any sequence reaches


def window_bounds(causal: bool, window_size) -> tuple[bool, int, int]:
    """(WINDOW flag, left, right) for the kernels: -1 becomes unbounded; causal caps right at 0
    and keeps its own flag, so a causal call with no left bound needs no window."""
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    needed = left >= 0 or (right >= 0 and not causal)
    return needed, left if left >= 0 else _UNBOUNDED, right if right >= 0 else _UNBOUNDED


def trim_window(window_size, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """window_size with each side that can cut no key at these lengths made unbounded (-1), so
    a sliding window longer than the sequence (Mistral's 4096 on a shorter prompt) runs the
    plain kernels. Query i sees keys from i + (seqlen_k - seqlen_q) - left, at most 0 for every
    row once left >= seqlen_k - 1, up to i + (seqlen_k - seqlen_q) + right, past the last key
    for every row once right >= seqlen_q - 1. Varlen passes the longest lengths, decode the
    cache's capacity."""
    left, right = window_size
    return -1 if left >= seqlen_k - 1 else left, -1 if right >= seqlen_q - 1 else right


def variant_args(causal: bool, window_size, softcap: float) -> tuple:
    """Runtime (softcap, window_left, window_right) arguments, in kernel-signature order."""
    _, left, right = window_bounds(causal, window_size)
    return float(softcap) if softcap else 1.0, left, right


BOUNDED_MAX_CAP = 50.0  # tile.bounded_shift: probabilities up to 2**24.3 at this cap


def variant_flags(causal: bool, window_size, softcap: float, alibi_slopes, q, per_key_alibi: bool = False,
                  bounded: bool = False) -> dict:
    """Constexpr switches. SOFTCAP 2 (tanh.approx, one instruction instead of ~15) for fp16/bf16
    on NVIDIA GPUs, 1 (exact) for fp32 and elsewhere. ALIBI 2 (causal fp16/bf16, per_key_alibi:
    the forward kernel): the bias as one vector over each tile's keys plus a per-row constant the
    softmax ignores (see tile.score_tile) instead of slope * |i - j| per score; 1 otherwise.
    fp32 keeps the per-score form: scores offset by up to slope x a tile's rows lose a few 1e-6
    (twice fp32 attention's own error in test_variants), far below what fp16/bf16 probabilities
    round away. The backward keeps it too: in its dK/dV kernel the per-key form took the spills
    from 912 to 1032 bytes (sm_90a, d128) and the ALiBi backward from 3.63-3.86 to 4.20-4.36 ms
    (H100, 2 x 8k x 16 x 128 causal); the decode kernel's rows are heads with slopes of their own.

    bounded (kernels with an online softmax: the forward, decode) adds BOUNDED, on for a softcap
    up to BOUNDED_MAX_CAP without ALiBi in bf16 or fp32: capped scores never pass the cap, so one
    fixed shift replaces the running max in unmasked tiles (tile.bounded_shift). fp16
    probabilities lack the exponent range (2**-24 is their smallest), and ALiBi's bias has no
    lower bound. BOUNDED 2 for bf16 computes half the exponentials without the MUFU unit
    (fastmath.exp2_fma, accurate to 7.5e-5: enough for bf16 probabilities, not fp32's)."""
    half = q.dtype != torch.float32
    approx = q.is_cuda and torch.version.hip is None and half
    alibi = 0 if alibi_slopes is None else 2 if causal and half and per_key_alibi else 1
    flags = dict(CAUSAL=causal, WINDOW=window_bounds(causal, window_size)[0],
                 SOFTCAP=(2 if approx else 1) if softcap else 0, ALIBI=alibi)
    if bounded:
        flags["BOUNDED"] = 0
        if 0 < softcap <= BOUNDED_MAX_CAP and alibi_slopes is None and q.dtype in (torch.bfloat16, torch.float32):
            flags["BOUNDED"] = 2 if q.dtype == torch.bfloat16 else 1
    return flags


def dropout_args(dropout) -> tuple:
    """(seed, offset, dropout_p, 1 / (1 - dropout_p)) from (dropout_p, seed, offset)."""
    p, seed, offset = dropout
    return seed, offset, float(p), 1.0 / (1.0 - p)


def dropout_kwargs(dropout) -> dict:
    """dropout_args by the kernels' argument names, for a replayed launch (kernels.launch)."""
    return dict(zip(("seed", "philox_offset", "dropout_p", "rescale"), dropout_args(dropout)))


def alibi_batch_stride(alibi_slopes) -> int:
    """Slopes are (heads,) or (batch, heads), contiguous in heads; 0 broadcasts over batch."""
    return alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0


MAX_TILE_ROWS = 256  # no config's BLOCK_M or BLOCK_N is larger


def check_offsets(seqlen: int, **tensors) -> bool:
    """Whether one sequence of these tensors spans 2**31 elements or more (the kernels' WIDE
    switch: tile starts in 64 bits). Batch entries and heads are always 64-bit offsets, offsets
    inside one tile always 32-bit: refuse strides those cannot reach."""
    wide = False
    for name, x in tensors.items():  # (batch, rows, heads, dim)
        _, row, _, col = x.stride()
        row, width = abs(row), x.shape[3] * abs(col)
        wide |= seqlen * row + width >= 2**31
        extent = min(seqlen, MAX_TILE_ROWS) * row + width
        if extent >= 2**31:
            raise ValueError(
                f"{name}: row stride {x.stride(1)} and dim stride {x.stride(3)} make one {MAX_TILE_ROWS}-row tile span "
                f"{extent} elements, more than 32-bit offsets inside a tile reach; pass a contiguous tensor"
            )
    return wide


def strides(x, varlen: bool):
    """x's strides, with the batch stride zeroed for packed inputs (sequences are found by
    their row offset instead)."""
    return (0, *x.stride()[1:]) if varlen else x.stride()
