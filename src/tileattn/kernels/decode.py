"""Attention over a KV cache (flash-decoding): split the keys across programs, then merge.

Decoding attends one or a few new queries to a long cache, so it is bound by reading K and V.
The kernel packs the query heads that share a K/V head into the rows of one tile (row r is
query r // group of head kv_head * group + r % group), so every K/V byte is read once per
group, and splits each sequence's keys into ``num_splits`` contiguous ranges run by different
programs. Each split writes its normalized partial output and LSE; ``_combine_kernel`` merges
them weighted by exp(lse_split - lse). With one split the kernel writes the result directly.

The cache is dense (batch_cache, capacity, heads_kv, head_dim), optionally indexed through
``cache_batch_idx``, or paged (num_blocks, page_size, heads_kv, head_dim) through
``block_table`` (batch, max_blocks). Sequence b holds keys [leftpad[b], seqlens_k[b]); keys are
numbered from leftpad inside the kernel, so causal alignment and masking are the dense ones.

With ``cu_seqlens_q`` (``VARLEN``) the queries are packed as in flash_attn_varlen_func:
sequence b's are rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of one (total_q, heads, dim) tensor
and its keys the first cu_seqlens_k[b + 1] - cu_seqlens_k[b] positions of its pages (how
flash_attn_varlen_func serves a paged cache); programs past a sequence's rows exit.

Prefill chunks over a cache (many query rows) take 128-row tiles with the forward's configs
and, where each key tile lies in one page, K/V through TMA descriptors over the whole cache.
"""

import functools

import torch
import triton
import triton.language as tl

from ..layout import lse_shape
from .config import (
    TALL_ROWS,
    autotuned,
    autotuning,
    configs,
    desc_block_setter,
    dot_precision,
    gdc_launch_dependents,
    gdc_wait,
    graph_bench,
    head_block,
    head_blocks,
    host_descriptors,
    pdl_launch,
    seqlen_bucket,
    tile_width,
    use_tma,
)
from .forward import (
    alibi_batch_stride,
    check_offsets,
    positive_scale,
    strides,
    trim_window,
    variant_args,
    variant_flags,
)
from .tile import LOG2E, attend_tile, cast, desc_rows, finish_softmax, fold_sink, key_range, load_kv, load_rows


@triton.jit
def _rows64(rows, WIDE: tl.constexpr):
    if WIDE:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def _cache_rows(BlockTableRow, pos, valid, page_size, PAGED: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr):
    """(page, row in page) of cache positions pos; a dense cache is one page. WIDE: the cache
    (a paged one as a whole) spans 2**31 elements or more, so offsets are 64-bit; otherwise
    they stay 32-bit, and gathered rows cost a 32-bit offset each, not a 64-bit pointer."""
    if PAGED:
        if MASKED:
            page = tl.load(BlockTableRow + pos // page_size, mask=valid, other=0)
        else:
            page = tl.load(BlockTableRow + pos // page_size)
        row = pos % page_size
    else:
        page = pos * 0
        row = pos
    return _rows64(page, WIDE), _rows64(row, WIDE)


@triton.jit
def _decode_tile(
    acc, acc2, l_i, m_i, q, q2, K, V, BlockTableRow, start_n, offs_n, offs_d, offs_d2, mask_d, mask_d2, q_idx, k_lo,
    seqlen_q, seqlen_k, page_size, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, qk_scale, softcap,
    slope, window_left, window_right,
    KDesc, VDesc, kb, hk,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr,
    PAGED: tl.constexpr, EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr, WIDE: tl.constexpr, TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BOUNDED: tl.constexpr,
):
    cols = start_n + offs_n  # counted from the sequence's first key (leftpad)
    if TMA:  # the tile's rows lie in one page (the launcher's condition), read as one block
        pos = start_n + k_lo
        if PAGED:
            page = tl.load(BlockTableRow + pos // page_size)
            pos = pos % page_size
        else:
            page = kb
        kt = tl.trans(desc_rows(KDesc, page, pos, hk))
        v = desc_rows(VDesc, page, pos, hk)
        if MASKED:  # slots past the sequence hold whatever the cache holds; p = 0 times NaN is NaN
            v = tl.where((cols < seqlen_k)[:, None], v, 0.0)
        kt2 = kt
        v2 = v
    else:
        page, row = _cache_rows(BlockTableRow, cols + k_lo, cols < seqlen_k, page_size, PAGED, MASKED, WIDE)
        k_cols = K + (page * stride_kb + row * stride_kn)[None, :]
        v_rows = V + (page * stride_vb + row * stride_vn)[:, None]
        kt, kt2, v, v2 = load_kv(k_cols, v_rows, offs_d, offs_d2, cols < seqlen_k, mask_d, mask_d2, stride_kd,
                                 stride_vd, MASKED, EVEN_D, SPLIT_D)
    # BOUNDED's masked tiles take the shift too (shift_masked True): no backward reads this output,
    # and the choice per program cost one-warp programs 168 -> 254 registers (sm_90a, d80 softcap)
    return attend_tile(acc, acc2, l_i, m_i, q, q2, kt, kt2, v, v2, q_idx, start_n, cols, seqlen_q, seqlen_k,
                       qk_scale, softcap, slope, window_left, window_right, 0, 0, 0, 0.0,  # no dropout here
                       0, True, CAUSAL, WINDOW, SOFTCAP, ALIBI, False, MASKED, SPLIT_D, DOT_PRECISION, BOUNDED)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse, SeqlensK, BatchIdx, LeftPad, BlockTable, Alibi, Sinks, CuSeqQ,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_os, stride_ob, stride_om, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh,
    stride_btb, stride_ab,
    seqlen_q, heads_kv, group, head_dim, page_size, num_splits, qk_scale, softcap, window_left, window_right,
    SEQ_BUCKET,  # autotune key only
    KDesc, VDesc,  # with TMA: host-made descriptors over the whole caches (keyword arguments), else None
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BOUNDED: tl.constexpr, ALIBI: tl.constexpr,
    SINK: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT_D: tl.constexpr, EVEN_D: tl.constexpr, WIDE: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # q, the lengths and the newest cache rows come from the kernels before this one
        gdc_wait()
    start_r = tl.program_id(0) * BLOCK_M  # packed rows (query, head in group)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // heads_kv).to(tl.int64)
    hk = (pid_bh % heads_kv).to(tl.int64)
    k_lo = 0
    if HAS_LEFTPAD:
        k_lo = tl.load(LeftPad + b)
    if VARLEN:  # SeqlensK holds cu_seqlens_k; seqlen_q was the longest sequence's length
        seqlen_k = tl.load(SeqlensK + b + 1) - tl.load(SeqlensK + b)
        q_start = tl.load(CuSeqQ + b).to(tl.int64)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start.to(tl.int32)
        if start_r >= seqlen_q * group:
            return
        Q += q_start * stride_qm
        Out += q_start * stride_om
        Lse += q_start
    else:
        seqlen_k = tl.load(SeqlensK + b) - k_lo

    offs_r = start_r + tl.arange(0, BLOCK_M)
    mask_r = offs_r < seqlen_q * group
    q_idx = offs_r // group
    head = hk * group + offs_r % group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    mask_d = offs_d < head_dim
    mask_d2 = offs_d2 < head_dim
    q, q2 = load_rows(Q + b * stride_qb + (_rows64(q_idx, WIDE) * stride_qm + head * stride_qh)[:, None], offs_d,
                      offs_d2, mask_r, mask_d, mask_d2, stride_qd, True, EVEN_D, SPLIT_D)
    slope = 0.0
    if ALIBI:  # per row: the rows of a tile are different heads
        slope = tl.load(Alibi + b * stride_ab + head, mask=mask_r, other=0.0)[:, None] * LOG2E

    kb = b
    if PAGED:
        BlockTableRow = BlockTable + b * stride_btb
    else:
        BlockTableRow = BlockTable
        if HAS_BATCH_IDX:
            kb = tl.load(BatchIdx + b).to(tl.int64)
        K += kb * stride_kb
        V += kb * stride_vb
    K += hk * stride_kh
    V += hk * stride_vh
    kb32 = kb.to(tl.int32)  # TMA coordinates are 32-bit
    hk32 = hk.to(tl.int32)

    last_q = (tl.minimum(start_r + BLOCK_M, seqlen_q * group) - 1) // group
    lo, full_lo, full_hi, hi = key_range(start_r // group, last_q, seqlen_q, seqlen_k, window_left, window_right,
                                         BLOCK_N, CAUSAL, WINDOW)
    # this program's split: a contiguous run of the key tiles in [lo, hi)
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    split_lo = tl.minimum(lo + split * tiles_per_split * BLOCK_N, hi)
    split_hi = tl.minimum(split_lo + tiles_per_split * BLOCK_N, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    for start_n in range(split_lo, tl.minimum(full_lo, split_hi), BLOCK_N):
        m_i, l_i, acc, acc2 = _decode_tile(acc, acc2, l_i, m_i, q, q2, K, V, BlockTableRow, start_n, offs_n, offs_d,
                                           offs_d2, mask_d, mask_d2, q_idx, k_lo, seqlen_q, seqlen_k, page_size,
                                           stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, qk_scale,
                                           softcap, slope, window_left, window_right, KDesc, VDesc, kb32, hk32, CAUSAL,
                                           WINDOW, SOFTCAP, ALIBI, True, PAGED, EVEN_D, SPLIT_D, WIDE, TMA,
                                           DOT_PRECISION, BOUNDED)
    for start_n in range(tl.maximum(full_lo, split_lo), tl.minimum(full_hi, split_hi), BLOCK_N):
        m_i, l_i, acc, acc2 = _decode_tile(acc, acc2, l_i, m_i, q, q2, K, V, BlockTableRow, start_n, offs_n, offs_d,
                                           offs_d2, mask_d, mask_d2, q_idx, k_lo, seqlen_q, seqlen_k, page_size,
                                           stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, qk_scale,
                                           softcap, slope, window_left, window_right, KDesc, VDesc, kb32, hk32, CAUSAL,
                                           WINDOW, SOFTCAP, ALIBI, False, PAGED, EVEN_D, SPLIT_D, WIDE, TMA,
                                           DOT_PRECISION, BOUNDED)
    for start_n in range(tl.maximum(tl.maximum(full_lo, full_hi), split_lo), split_hi, BLOCK_N):
        m_i, l_i, acc, acc2 = _decode_tile(acc, acc2, l_i, m_i, q, q2, K, V, BlockTableRow, start_n, offs_n, offs_d,
                                           offs_d2, mask_d, mask_d2, q_idx, k_lo, seqlen_q, seqlen_k, page_size,
                                           stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, qk_scale,
                                           softcap, slope, window_left, window_right, KDesc, VDesc, kb32, hk32, CAUSAL,
                                           WINDOW, SOFTCAP, ALIBI, True, PAGED, EVEN_D, SPLIT_D, WIDE, TMA,
                                           DOT_PRECISION, BOUNDED)

    if PDL:  # the merge may start launching; it waits for this grid to finish before reading
        gdc_launch_dependents()
    if SINK:  # the sink joins split 0's partial only, so the merge counts it once
        sink = tl.load(Sinks + head, mask=mask_r, other=0.0).to(tl.float32) * LOG2E
        m_i, l_i, acc, acc2 = fold_sink(m_i, l_i, acc, acc2, tl.where(split == 0, sink, float("-inf")))
    out, out2, lse = finish_softmax(m_i, l_i, acc, acc2)
    Out += split * stride_os + b * stride_ob
    o_rows = Out + (_rows64(q_idx, WIDE) * stride_om + head * stride_oh)[:, None]
    tl.store(o_rows + offs_d[None, :] * stride_od, cast(out, Out.dtype.element_ty, DOT_PRECISION),
             mask=mask_r[:, None] & mask_d[None, :])
    if SPLIT_D:
        tl.store(o_rows + offs_d2[None, :] * stride_od, cast(out2, Out.dtype.element_ty, DOT_PRECISION),
                 mask=mask_r[:, None] & mask_d2[None, :])
    tl.store(Lse + split * stride_ls + b * stride_lb + head * stride_lh + q_idx, lse, mask=mask_r)


@triton.jit
def _combine_kernel(
    OutSplit, LseSplit, Out, Lse,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_qs, stride_qb, stride_qh,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh,
    seqlen_q, heads, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s), one (b, query, head)
    row per program; splits that saw no key carry lse_s = -inf and weigh 0."""
    if PDL:
        gdc_wait()
        # a few tens of programs: the next kernel (an output projection's GEMV) may take the
        # other SMs now and stream what it can read before its own wait. Past this one's wait,
        # as in every tileattn kernel: such early reads rely on the kernels before this having
        # finished (tileattn.kernels.gemv's x_ready)
        gdc_launch_dependents()
    pid = tl.program_id(0)
    b = (pid // seqlen_q).to(tl.int64)
    m = (pid % seqlen_q).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    lse_s = tl.load(LseSplit + offs_s * stride_qs + b * stride_qb + h * stride_qh + m, mask=mask_s,
                    other=float("-inf")) * LOG2E
    lse_max = tl.max(lse_s, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.math.exp2(lse_s - lse_max)
    total = tl.sum(w, 0)
    parts = tl.load(OutSplit + offs_s[:, None] * stride_ps + b * stride_pb + m * stride_pm + h * stride_ph
                    + offs_d[None, :], mask=mask_s[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    safe_total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(parts * w[:, None], 0) / safe_total
    lse = tl.where(total == 0.0, float("-inf"), (lse_max + tl.math.log2(safe_total)) / LOG2E)
    tl.store(Out + b * stride_ob + m * stride_om + h * stride_oh + offs_d * stride_od,
             cast(out, Out.dtype.element_ty, DOT_PRECISION), mask=offs_d < head_dim)
    tl.store(Lse + b * stride_lb + h * stride_lh + m, lse)


def _select(listed, meta: dict) -> list:
    """Tall tiles (prefill chunks) take the forward's tile shapes: 8 warps for 128 rows. One-warp
    configs are for 16-row tiles (a few decode rows), whose warps would otherwise all compute
    the same tile; taller tiles split among warps."""
    if meta["BLOCK_M"] >= TALL_ROWS:
        return configs("decode_tall", tile_width(meta), meta["DOT_PRECISION"])
    if meta["BLOCK_M"] > 16:
        return [c for c in listed if c[2] > 1]
    return listed


_decode = autotuned(_decode_kernel, "decode", prepare=desc_block_setter(KDesc="BLOCK_N", VDesc="BLOCK_N"),
                    select=_select)


def _cache_descs(block_m: int, blocks: dict, k_cache, v_cache, page_size: int, paged: bool, leftpad) -> dict:
    """Tall tiles read K/V through TMA descriptors over the whole caches (made here, once per
    launch) where use_tma allows it and each key tile lies in one page: pages a multiple of 128
    rows (the tall configs' largest key tile), no left padding. Decode steps' few rows keep
    pointer tiles: their TMA trial read less bandwidth (BENCHMARKS.md)."""
    tall = block_m >= TALL_ROWS and not blocks["SPLIT_D"]
    if tall and (not paged or (page_size % 128 == 0 and leftpad is None)) and use_tma(blocks, k_cache, v_cache):
        return dict(host_descriptors(blocks["BLOCK_D"], KDesc=k_cache, VDesc=v_cache), TMA=True)
    return dict(KDesc=None, VDesc=None, TMA=False)


MAX_SPLITS = 128


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    """The GPU's SM count; the CPU stands in for 8."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(programs: int, capacity: int, device: torch.device, paged: bool = False) -> int:
    """Split while the batch's programs leave SMs idle. A dense cache fills at most one wave
    (sms // programs; a few programs over a wave leave a tail that cost 4% at batch 1 x 64k, and
    9 splits instead of 8 cost 13% at 2 x 16k on an H100) with at least 192 keys per split (1 x
    2.3k, 8 K/V heads: 5 splits of >= 512 keys 0.77 TB/s, 12 splits 1.03, cuDNN 1.05); 50+
    programs already stream at 2.9 TB/s, while each split adds partial-result traffic and a
    merge. A paged cache waits on a page-table load before each K/V load, so it wants up to two
    programs per SM (splits 32 vs 16: 2.71 vs 2.56 TB/s at 1 x 64k), with 512 keys per split.

    Decided from the cache capacity, not the actual lengths, so choosing never reads a device
    tensor (no host sync; CUDA-graph capturable)."""
    sms = _sms(device)
    if paged:
        if programs >= 2 * sms:
            return 1
        return max(1, min(2 * sms // programs, triton.cdiv(capacity, 512), MAX_SPLITS))
    if programs * 8 >= sms * 3:
        return 1
    return max(1, min(sms // programs, triton.cdiv(capacity, 192), MAX_SPLITS))


_TUNED_SPLITS: dict = {}


def tuned_splits(key, heuristic: int, time_splits) -> int:
    """The fastest of the heuristic split count, half, twice and four times it, timed per key by
    time_splits(num_splits) -> ms and remembered: each candidate's best of two rounds, the
    rounds one after the other, so that a burst of other work on the GPU during one timing does
    not pick the count for the rest of the process. (A process that tuned while another
    process's prefill shared an H200 ran its Phi-2 16k steps at 4.63 ms instead of 3.08-3.28;
    whether its split count or its tile shape was the bad pick was not recorded.)

    The heuristic cannot see what the measurements show: on an H100, batch 1 x 16k keys, 32 heads
    of dim 80, its 4 splits read 2.25 TB/s from transformers' (batch, heads, seqlen, dim) cache
    and 16 splits 2.52, while the same heads in flash-attn's (batch, seqlen, heads, dim) layout
    peak at 4 splits (2.61, 16 splits 2.31); 4k keys in the transformers layout want 8 (2.82 vs
    2.31). (In the 16640-slot cache generate allocates for a 16k prompt, 4 splits read 2.73 and
    16 splits 2.50: BENCHMARKS.md.) Inside a CUDA-graph capture nothing can be timed: the
    heuristic stands (not remembered), so a warm-up call outside the capture decides."""
    if key in _TUNED_SPLITS:
        return _TUNED_SPLITS[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return heuristic
    candidates = sorted({max(1, heuristic // 2), heuristic, *(min(f * heuristic, MAX_SPLITS) for f in (2, 4))})
    times = {splits: time_splits(splits) for splits in candidates}
    times = {splits: min(times[splits], time_splits(splits)) for splits in candidates}
    _TUNED_SPLITS[key] = min(candidates, key=times.__getitem__)
    return _TUNED_SPLITS[key]


def _split_key(q, k_cache, capacity, paged, *flags):
    """What the best split count depends on: shapes, dtype, the cache's dim order (not its
    strides, which change with capacity), capacity's power-of-two bucket, the variant."""
    order = tuple(sorted(range(4), key=lambda i: -k_cache.stride(i)))
    return (q.device, q.dtype, *q.shape, *k_cache.shape[2:], order, paged, paged and k_cache.shape[1],
            seqlen_bucket(q.shape[1], capacity), *flags)


def decode(q, k_cache, v_cache, seqlens_k, softmax_scale: float, causal: bool, cache_batch_idx=None,
           cache_leftpad=None, block_table=None, num_splits: int = 0, out=None, lse=None, window_size=(-1, -1),
           softcap: float = 0.0, alibi_slopes=None, learnable_sink=None, cu_seqlens_q=None, max_seqlen_q: int = 0):
    """Launch attention of q (B, Sq, H, D) over a KV cache; returns out (B, Sq, H, D) and lse
    (B, H, Sq) float32.

    seqlens_k (B,) int32: keys [cache_leftpad[b], seqlens_k[b]) of sequence b are attended.
    Dense cache (B_cache, capacity, Hkv, D) with optional cache_batch_idx (B,) int32; paged cache
    (num_blocks, page_size, Hkv, D) with block_table (B, max_blocks) int32. Arguments are
    assumed checked (see tileattn.kvcache). num_splits=0 picks the split count. Variants as in
    :func:`tileattn.kernels.forward.forward`.

    Packed queries (cu_seqlens_q int32 (B + 1,) given, max_seqlen_q the longest): q (total_q, H,
    D) -> out (total_q, H, D), lse (H, total_q), and seqlens_k is cu_seqlens_k: sequence b's keys
    are its first cu_seqlens_k[b + 1] - cu_seqlens_k[b] cache positions. The split count is then
    the rule's, untimed (each packing is a new shape).
    """
    varlen = cu_seqlens_q is not None
    heads, head_dim = q.shape[-2:]
    batch, seqlen_q = (cu_seqlens_q.shape[0] - 1, max_seqlen_q) if varlen else q.shape[:2]
    heads_kv = k_cache.shape[2]
    group = heads // heads_kv
    paged = block_table is not None
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else page_size
    window_size = trim_window(window_size, seqlen_q, capacity)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, softmax_scale = positive_scale(q, softmax_scale)
    block_m = _block_rows(seqlen_q * group, batch * heads_kv, head_dim, q)
    m_tiles = triton.cdiv(seqlen_q * group, block_m)
    if num_splits <= 0:
        num_splits = choose_splits(batch * heads_kv * m_tiles, capacity, q.device, paged)
        if q.is_cuda and autotuning() and not varlen:
            args = (q, k_cache, v_cache, seqlens_k, softmax_scale, causal, cache_batch_idx, cache_leftpad, block_table)
            variant = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                           learnable_sink=learnable_sink)
            key = _split_key(q, k_cache, capacity, paged, causal, tuple(window_size), softcap, alibi_slopes is None,
                             learnable_sink is None, cache_batch_idx is None, cache_leftpad is None)
            num_splits = tuned_splits(key, num_splits, lambda splits: graph_bench(
                lambda: decode(*args, num_splits=splits, out=out, lse=lse, **variant)))
    # packed rows are one batch entry to the output side (the kernel offsets each sequence's rows)
    q4, o4, l3 = (x.unsqueeze(0) for x in (q, out, lse)) if varlen else (q, out, lse)
    num_splits = min(num_splits, MAX_SPLITS)
    if num_splits > 1:
        out_split = torch.empty((num_splits, *q4.shape), dtype=torch.float32, device=q.device)
        lse_split = torch.empty((num_splits, *l3.shape), dtype=torch.float32, device=q.device)
    else:
        out_split, lse_split = o4.unsqueeze(0), l3.unsqueeze(0)
    precision = dot_precision(q.dtype)
    # a dense cache's rows are addressed from its batch entry, a paged cache's from its start
    wide = check_offsets(seqlen_q, q=q4, out=o4) | check_offsets(page_size, k_cache=k_cache, v_cache=v_cache)
    wide |= paged and max(k_cache.shape[0] * abs(k_cache.stride(0)), v_cache.shape[0] * abs(v_cache.stride(0))) >= 2**31
    dummy = seqlens_k  # unused pointer arguments
    pdl = pdl_launch(q.device)
    blocks = head_blocks(head_dim)
    _decode[(m_tiles, batch * heads_kv, num_splits)](
        q, k_cache, v_cache, out_split, lse_split, seqlens_k,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        cache_leftpad if cache_leftpad is not None else dummy,
        block_table if paged else dummy, alibi_slopes, learnable_sink, cu_seqlens_q,
        *strides(q4, varlen), *k_cache.stride(), *v_cache.stride(), *_split_strides(out_split, varlen),
        *_split_strides(lse_split, varlen)[:3],
        block_table.stride(0) if paged else 0, alibi_batch_stride(alibi_slopes),
        seqlen_q, heads_kv, group, head_dim, page_size, num_splits, softmax_scale * LOG2E.value,
        *variant_args(causal, window_size, softcap), seqlen_bucket(seqlen_q, capacity),
        **variant_flags(causal, window_size, softcap, alibi_slopes, q, bounded=True),
        SINK=learnable_sink is not None, PAGED=paged,
        HAS_BATCH_IDX=cache_batch_idx is not None and not paged, HAS_LEFTPAD=cache_leftpad is not None,
        VARLEN=varlen, **blocks, **_cache_descs(block_m, blocks, k_cache, v_cache, page_size, paged, cache_leftpad),
        WIDE=wide, DOT_PRECISION=precision, BLOCK_M=block_m, **pdl,
    )
    if num_splits > 1:
        rows = q4.shape[1]  # packed: every query row of the one batch entry
        _combine_kernel[(q4.shape[0] * rows, heads)](
            out_split, lse_split, o4, l3,
            *out_split.stride()[:4], *lse_split.stride()[:3], *o4.stride(), *l3.stride()[:2],
            rows, heads, head_dim, num_splits,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=head_block(head_dim), DOT_PRECISION=precision,
            **pdl,
        )
    return out, lse


def _block_rows(rows: int, programs: int, head_dim: int, q) -> int:
    """(query, head) rows a tile: decode steps' few rows in one tile of >= 16 (tl.dot's least),
    up to 64; TALL_ROWS for prefill chunks over a cache (rows per sequence and K/V head; programs
    tiles of them fill a wave), the forward's tile height: K/V tiles are re-read once per row
    tile. On an H200, 64-row tiles ran such chunks at about half the forward kernel's speed, and
    tall tiles that left SMs idle (2 x 256 queries of 32/8 heads over 2048 keys, 128 programs)
    lost to the 64-row grid's 256. fp32 (FMA dots) and head dims over 128 keep 64 rows, as
    their forward configs do (tall tiles not tried there)."""
    tall = q.dtype != torch.float32 and head_dim <= 128 and rows >= TALL_ROWS and \
        programs * triton.cdiv(rows, TALL_ROWS) >= _sms(q.device)
    return max(16, min(TALL_ROWS if tall else 64, triton.next_power_of_2(rows)))


def _split_strides(x, varlen: bool):
    """A per-split output's strides (split, batch, ...), the batch stride zeroed for packed rows."""
    return (x.stride(0), 0, *x.stride()[2:]) if varlen else x.stride()
