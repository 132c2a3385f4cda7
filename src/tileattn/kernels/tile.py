"""The tile step every kernel shares: score masking, the online-softmax fold, tile ranges.

Scores live in the base-2 domain inside kernels: ``s = q.k * softmax_scale * log2(e)`` so the
softmax uses ``exp2``. LSE crosses kernel boundaries in natural log, as the API promises.

Causal masks are bottom-right aligned: query i sees key j iff ``j <= i + seqlen_k - seqlen_q``.
Each loop over tiles is split in two: tiles that every row of the block sees completely run
with ``MASKED=False`` (no index arithmetic, no bound checks), the rest with ``MASKED=True``.
"""

import triton
import triton.language as tl

# constexpr so kernels may read them; launchers use LOG2E.value
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_tile(ptrs, mask_rows, mask_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, checking only the dimensions that can run past the tensor."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=mask_rows & mask_cols, other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=mask_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=mask_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


# DOT_PRECISION is tl.dot's input_precision, or "interpreter_bf16": bf16 inputs under Triton's
# interpreter, whose bf16 support is wrong in two ways that mma() and cast() work around.


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; every tl.dot of the kernels goes through here."""
    if DOT_PRECISION == "interpreter_bf16":
        # the interpreter multiplies bf16's raw uint16 storage; widening to fp32 is exact and
        # gives the tensor cores' bf16 x bf16 -> fp32 products
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Cast fp32 x to dtype rounding to nearest even, as the GPU does."""
    if DOT_PRECISION == "interpreter_bf16":
        # the interpreter truncates fp32 -> bf16: round the bits first so truncation is exact
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mask_scores(s, q_idx, k_idx, seqlen_q, seqlen_k, CAUSAL: tl.constexpr):
    """Set scores of keys past seqlen_k, or above the causal diagonal, to -inf.

    q_idx and k_idx are index vectors already shaped to broadcast against s, so the same code
    serves s = Q.K^T (forward, dq) and s^T = K.Q^T (dk/dv).
    """
    s = tl.where(k_idx < seqlen_k, s, float("-inf"))
    if CAUSAL:
        s = tl.where(k_idx <= q_idx + (seqlen_k - seqlen_q), s, float("-inf"))
    return s


@triton.jit
def online_softmax_fold(s, m_i, l_i, acc, v, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores s [M, N] and values v [N, D] into (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row that has seen only masked keys keeps m = -inf; shift it by 0 so exp2 gives 0
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(s - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = mma(cast(p, v.dtype, DOT_PRECISION), v, acc, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def attend_tile(
    acc, l_i, m_i, q, kt_ptrs, v_ptrs, q_idx, cols, mask_d, seqlen_q, seqlen_k, qk_scale,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The forward step shared by the dense/varlen and the KV-cache kernels: load K^T [D, N] and
    V [N, D] from pointer tiles the caller built (strided or gathered from pages), score them
    against q [M, D] and fold them in. cols are the tile's key indices, q_idx each row's query
    index; both count from the sequence's first key/query."""
    kt = load_tile(kt_ptrs, (cols < seqlen_k)[None, :], mask_d[:, None], MASKED, not EVEN_D)
    v = load_tile(v_ptrs, (cols < seqlen_k)[:, None], mask_d[None, :], MASKED, not EVEN_D)
    s = mma(q, kt, None, DOT_PRECISION) * qk_scale
    if MASKED:
        s = mask_scores(s, q_idx[:, None], cols[None, :], seqlen_q, seqlen_k, CAUSAL)
    return online_softmax_fold(s, m_i, l_i, acc, v, MASKED, DOT_PRECISION)


@triton.jit
def finish_softmax(m_i, l_i, acc):
    """Normalize the accumulator; returns (out, natural-log lse). Empty rows: 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def sequence(b, CuSeqQ, CuSeqK, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first query row, seqlen_q, first key row, seqlen_k) of batch entry b.

    Packed (varlen) inputs are one long sequence per tensor, split by cu_seqlens; dense inputs
    have one sequence per batch entry, addressed by the batch stride instead.
    """
    # one return after a constexpr if/else: the compiler type-checks every return statement
    if VARLEN:
        q_start = tl.load(CuSeqQ + b)
        k_start = tl.load(CuSeqK + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
        seqlen_k = tl.load(CuSeqK + b + 1) - k_start
        # int64: row offsets into a packed tensor can pass 2**31 elements
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    else:
        q_start = 0
        k_start = 0
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def key_range(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M): keys [0, full) need no mask, [full, hi) do.

    full is a multiple of BLOCK_N; the masked range holds the causal diagonal and the ragged
    last key tile.
    """
    hi = seqlen_k
    full = seqlen_k
    if CAUSAL:
        diag = seqlen_k - seqlen_q
        # the last row of the block sees keys < start_m + BLOCK_M + diag, the first < start_m + diag + 1
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), seqlen_k)
        full = tl.minimum(tl.maximum(start_m + diag + 1, 0), hi)
    full = (full // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def query_range(start_n, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For keys [start_n, start_n + BLOCK_N): query tiles [lo, full) need the causal mask,
    [full, full_end) need no mask, and [max(full, full_end), seqlen_q) is the ragged tail.
    All returned bounds are multiples of BLOCK_M.
    """
    full_end = (seqlen_q // BLOCK_M) * BLOCK_M
    lo = 0
    full = 0
    if CAUSAL:
        diag = seqlen_k - seqlen_q
        # query i sees key j iff i >= j - diag: the first key of the block from row start_n - diag,
        # all keys of the block from row start_n + BLOCK_N - 1 - diag
        lo = tl.minimum(tl.maximum(start_n - diag, 0), seqlen_q)
        lo = (lo // BLOCK_M) * BLOCK_M
        first_full = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), seqlen_q)
        full = ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    return lo, full, full_end
