"""The tile step every kernel shares: score masking, the online-softmax fold, tile ranges.

Scores live in the base-2 domain inside kernels: ``s = q.k * softmax_scale * log2(e)`` so the
softmax uses ``exp2``. LSE crosses kernel boundaries in natural log, as the API promises.

Masks are bottom-right aligned: with diag = seqlen_k - seqlen_q, causal lets query i see key j
iff ``j <= i + diag``, a sliding window (left, right) iff ``i + diag - left <= j <= i + diag +
right``. Each loop over tiles is split in three: tiles that every row of the block sees
completely run with ``MASKED=False`` (no index arithmetic, no bound checks); the tiles before
(window's left edge) and after (diagonal, window's right edge, ragged end) run ``MASKED=True``;
tiles nobody sees are skipped, so a window's cost grows with the window, not the sequence.

Score variants are constexpr switches of one score function: softcap (``cap * tanh(s / cap)``)
then ALiBi (``- slope * |i + diag - j|``), as flash-attn orders them. Dropout zeroes the
probabilities that reach the output where ``dropout_words``' bits say so (bits regenerated, never
stored); the kernels scale by 1 / (1 - p) once, after their loops.
"""

import triton
import triton.language as tl

from .. import dropout
from .fastmath import LOG2E, exp2_half_fma, join_column_pairs, split_column_pairs, tanh

# dropped() splits each Philox word into two 16-bit halves
assert dropout.KEY_BITS == 16
KEYS_PER_WORD = tl.constexpr(dropout.KEYS_PER_WORD)
KEY_GROUP = tl.constexpr(dropout.KEY_GROUP)
CALLS_PER_GROUP = tl.constexpr(dropout.CALLS_PER_GROUP)
KEY_SCALE = tl.constexpr(float(2**dropout.KEY_BITS))
PHILOX_ROUNDS = tl.constexpr(dropout.ROUNDS)

# constexpr so kernels may read it
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
def score_tile(qk, q_idx, k_idx, seqlen_q, seqlen_k, qk_scale, softcap, slope,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, FOLD: tl.constexpr = False):
    """Raw q.k products -> base-2 scores: scale, then softcap, then ALiBi (slope already in
    base 2). Returns (s, th, c): th is tanh of the capped argument, which the backward's chain
    rule needs. SOFTCAP: 0 off, 1 exact tanh, 2 the GPU's approximate tanh (fp16/bf16 on CUDA).

    ALIBI 1 subtracts slope * |i + diag - j| per score (q_idx, k_idx broadcast to the tile).
    ALIBI 2 (causal: every visible key has j <= i + diag) takes a reference row r as q_idx, one
    scalar, and subtracts slope * (r + diag - j), a vector over the keys: the score plus
    slope * (i - r), a constant per row that the softmax does not see and the caller takes out
    of its running max after the last tile (alibi_row_shift). With r in the tile the shift stays
    below slope x the tile's rows, so the scores near the diagonal, which carry the probability,
    keep their precision.

    FOLD leaves the last factor c > 0 (the scale, or the cap) to the caller, which folds it into
    its exp2 argument as one FMA (max(c * s) is c * max(s)): the score is s * c; ALIBI 2's bias
    is folded with it (divided by c). Otherwise, and with ALIBI 1, c = 1."""
    tl.static_assert(ALIBI != 2 or FOLD, "ALiBi's per-key form is the folded forward's")
    if SOFTCAP:
        th = tanh(qk * (qk_scale / (softcap * LOG2E)), SOFTCAP == 2)
        c = softcap * LOG2E
    else:
        th = qk
        c = qk_scale
    if FOLD and ALIBI != 1:
        s = th
        if ALIBI == 2:
            s = s - (slope / c) * (q_idx + (seqlen_k - seqlen_q) - k_idx).to(tl.float32)
    else:
        s = th * c
        c = 1.0
        if ALIBI:
            s = s - slope * tl.abs(q_idx + (seqlen_k - seqlen_q) - k_idx).to(tl.float32)
    return s, th, c


@triton.jit
def alibi_row_shift(slope, rows, ref):
    """What ALIBI 2's scores carry over the true ones for query rows ``rows`` with reference row
    ``ref``: slope * (rows - ref), base 2."""
    return slope * (rows - ref).to(tl.float32)


@triton.jit
def alibi_slope(Alibi, b, h, stride_ab, ALIBI: tl.constexpr):
    """This (batch, head)'s ALiBi slope in base 2 (0 without ALiBi)."""
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h) * LOG2E
    return slope


@triton.jit
def mask_scores(s, q_idx, k_idx, seqlen_q, seqlen_k, window_left, window_right,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Set scores of keys past seqlen_k, above the causal diagonal or outside the window to -inf.

    q_idx and k_idx are index vectors already shaped to broadcast against s, so the same code
    serves s = Q.K^T (forward, dq) and s^T = K.Q^T (dk/dv).
    """
    s = tl.where(k_idx < seqlen_k, s, float("-inf"))
    diag = q_idx + (seqlen_k - seqlen_q)
    if WINDOW:  # with CAUSAL, window_right <= 0 (forward.window_bounds): the diagonal is inside
        s = tl.where((k_idx >= diag - window_left) & (k_idx <= diag + window_right), s, float("-inf"))
    elif CAUSAL:
        s = tl.where(k_idx <= diag, s, float("-inf"))
    return s


@triton.jit
def dropout_words(seed, offset, bh, rows, first_col, BLOCK_N: tl.constexpr):
    """[M, BLOCK_N / 2] Philox words for query rows [M] and keys first_col.. (a multiple of
    KEY_GROUP, as BLOCK_N must be): word x holds the 16-bit draws of keys 2x (low half) and
    2x + 1, as tileattn.dropout defines them; apply with dropped().

    Each call's four words serve the column pairs 8w + 2t of a 32-key group (w = 0..3), which is
    what one thread of the tensor cores' accumulator layout holds, and the [M, groups, t] counters
    map t to those threads: the words come out in the score tile's layout, with no conversion
    through shared memory (the old interleaving of eight neighbouring keys per call cost one per
    tile; offline sm_90a SASS, triton 3.6, d128 forward loop: 754 instructions then, 555 now,
    342 without dropout)."""
    tl.static_assert(BLOCK_N // KEY_GROUP * KEY_GROUP == BLOCK_N, "dropout needs key tiles of whole 32-key groups")
    g = (tl.arange(0, BLOCK_N // KEY_GROUP) + first_col // KEY_GROUP)[None, :, None]
    t = tl.arange(0, CALLS_PER_GROUP)[None, None, :]
    c0 = g * CALLS_PER_GROUP + t + rows[:, None, None] * 0
    c1 = rows[:, None, None] + c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c0 * 0 + bh, c0 * 0 + offset, PHILOX_ROUNDS)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [M, G, T, 2, 2]: word 2 * i + j at [.., i, j]
    words = tl.permute(words, (0, 1, 3, 4, 2))  # [M, G, W, T]: key pair 16 g + 4 w + t
    return tl.reshape(words, [rows.shape[0], BLOCK_N // KEYS_PER_WORD])


@triton.jit
def _kept_halves(words, dropout_p):
    """(even, odd): whether dropout keeps the key in each word's low half (even column) and in
    its high half (odd column). u / 2**16 >= p  <=>  u >= ceil(p * 2**16) for an integer u (the
    scaling is exact); the high half compares the whole word with low * 2**16 - 1, no shift
    (low >= 1 as p > 0, so no wrap below zero; low = 2**16 wraps to the largest word, which keeps
    nothing)."""
    low = tl.math.ceil(dropout_p * KEY_SCALE).to(tl.uint32)
    return (words & 0xFFFF) >= low, words > low * 65536 - 1


@triton.jit
def dropped(x, words, dropout_p):
    """x [M, N] with the entries dropout drops set to 0 (kept ones unscaled), words [M, N / 2]
    from dropout_words. x's even and odd columns are split apart (split_column_pairs) rather
    than each word's halves interleaved into x's layout."""
    keep_even, keep_odd = _kept_halves(words, dropout_p)
    # a zero LLVM cannot see as a constant: with 0.0 it moves the select past the bf16
    # conversion and selects 16-bit halves of packed pairs (two byte permutes per score)
    zero = dropout_p * 0.0
    even, odd = split_column_pairs(x)
    return join_column_pairs(tl.where(keep_even, even, zero), tl.where(keep_odd, odd, zero))


@triton.jit
def kept_transposed(words_t, dropout_p):
    """[N, M] of 1.0 where dropout keeps, 0.0 where it drops, for dK/dV's [keys, queries] tiles;
    words_t [N / 2, M] is dropout_words' tile transposed. The accumulator layout holds neighbouring
    keys (rows there) in different threads, so something crosses threads: the words (one 32-bit
    value per two keys), not a float factor per key (offline sm_90a SASS, triton 3.6, d128 dK/dV
    loop: 860 instructions, 922 with the float tile converted, 996 before dropout_words)."""
    keep_even, keep_odd = _kept_halves(words_t, dropout_p)
    factors = tl.join(tl.where(keep_even, 1.0, 0.0), tl.where(keep_odd, 1.0, 0.0))
    factors = tl.permute(factors, (0, 2, 1))  # [N / 2, 2, M]: key 2 x + s at [x, s]
    return tl.reshape(factors, [2 * words_t.shape[0], words_t.shape[1]])


@triton.jit
def _shifted(s, c, m_i, l_i, EXP2_FMA: tl.constexpr):
    """BOUNDED's step: every score shifted by the bound (m = -inf before the first tile)."""
    m_new = tl.maximum(m_i, bounded_shift(c))
    x = s * c - m_new[:, None]
    if EXP2_FMA:  # finite, in [-120, 24.3]: exp2_fma's range
        p = exp2_half_fma(x)
    else:
        p = tl.math.exp2(x)  # masked scores are -inf: p = 0, no -inf - -inf
    return m_new, l_i + tl.sum(p, 1), p


@triton.jit
def _running(s, c, m_i, l_i, acc, acc2, MASKED: tl.constexpr, SPLIT_D: tl.constexpr):
    """The online softmax's step: shift by the running max, rescale what came before."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    if MASKED:
        # a row that has seen only masked keys keeps m = -inf; shift it by 0 so exp2 gives 0
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(s * c - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    acc = acc * alpha[:, None]
    if SPLIT_D:
        acc2 = acc2 * alpha[:, None]
    return m_new, l_i * alpha + tl.sum(p, 1), acc, acc2, p


@triton.jit
def online_softmax_fold(s, c, m_i, l_i, acc, acc2, v, v2, words, dropout_p, shift_masked, MASKED: tl.constexpr,
                        DROPOUT: tl.constexpr, SPLIT_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BOUNDED: tl.constexpr = False):
    """Fold one tile of base-2 scores s * c [M, N] (c > 0, see score_tile's FOLD) and values v
    [N, D] (and v2 [N, D2], the head dim's second part, with SPLIT_D) into (m, l, acc, acc2).
    With DROPOUT, words (dropout_words) zero the probabilities dropout drops before they reach
    acc (the caller scales acc by 1 / (1 - p) at the end); the sum l (and so the LSE) stays that
    of the undropped softmax.

    BOUNDED (softcap without ALiBi, |s| <= 1: see bounded_shift) shifts every score by one
    constant instead of the running max: no row max, no rescale of l and acc per tile. BOUNDED 2
    (bf16) also takes the odd columns' exponentials of unmasked tiles off the MUFU unit, which
    the softcap's tanh already loads with one instruction per score (fastmath.exp2_half_fma).

    shift_masked (runtime, one value per program) says whether BOUNDED's masked tiles take the
    shift too: the caller passes whether it runs an unmasked tile, so that every row it holds
    sees whole tiles of keys. Programs of masked tiles only, which hold the rows that see a few
    keys, keep the running max: under the shift a row's largest p, 1 with the max, rounds to
    bf16 in acc but not in l, and with one key the output was v * bf16(p) / p, the backward's dq
    and dk (exactly 0) 0.15-0.30 off and a packed batch's one-key sequence 1.8e-2 (PyTorch's
    bf16 2.9e-3; test_forward)."""
    if BOUNDED and not MASKED:
        m_new, l_i, p = _shifted(s, c, m_i, l_i, BOUNDED == 2)
    elif BOUNDED:
        if shift_masked:
            m_new, l_i, p = _shifted(s, c, m_i, l_i, False)
        else:
            m_new, l_i, acc, acc2, p = _running(s, c, m_i, l_i, acc, acc2, MASKED, SPLIT_D)
    else:
        m_new, l_i, acc, acc2, p = _running(s, c, m_i, l_i, acc, acc2, MASKED, SPLIT_D)
    if DROPOUT:
        p = dropped(p, words, dropout_p)
    p = cast(p, v.dtype, DOT_PRECISION)
    acc = mma(p, v, acc, DOT_PRECISION)
    if SPLIT_D:
        acc2 = mma(p, v2, acc2, DOT_PRECISION)
    return m_new, l_i, acc, acc2


BOUNDED_SPAN = tl.constexpr(120.0)  # base 2: the most a shifted score may lie below the shift


@triton.jit
def bounded_shift(c):
    """The fixed base-2 shift of BOUNDED scores s * c with |s| <= 1 (a softcap's tanh, c the cap
    in base 2): min(c, 120 - c). Every p = exp2(s * c - shift) then lies in [2**-min(2c, 120),
    2**max(0, 2c - 120)]: never a subnormal (exp2 flushes them), and at most 2**24.3 for the
    largest cap the launchers allow (50, Gemma 2's), so fp32 sums over a million keys stay far
    from overflow. Only bf16 and fp32 probabilities have the exponent range for it."""
    return tl.minimum(c, BOUNDED_SPAN - c)


@triton.jit
def rows_desc(base, rows, head_dim, stride_row, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_D2: tl.constexpr, SECOND: tl.constexpr):
    """A TMA descriptor over one sequence's (rows, head_dim) matrix: the head dim's first part,
    or with SECOND its second part (columns BLOCK_D..). Reads past the shape give zeros, writes
    are dropped, so tiles never spill into the next sequence or head."""
    if SECOND:
        desc = tl.make_tensor_descriptor(base + BLOCK_D, shape=[rows, head_dim - BLOCK_D], strides=[stride_row, 1],
                                         block_shape=[BLOCK_R, BLOCK_D2])
    else:
        desc = tl.make_tensor_descriptor(base, shape=[rows, head_dim], strides=[stride_row, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    return desc


@triton.jit
def desc_rows(desc, b, row, h):
    """The [rows, dim] tile at (batch b, row, head h) of a host-made descriptor over a whole
    (batch, rows, heads, dim) tensor, whose blocks are [1, rows, 1, dim]."""
    x = desc.load([b, row, h, 0])
    return tl.reshape(x, [x.shape[1], x.shape[3]])


@triton.jit
def row_ptrs(base, start, offs, stride, WIDE: tl.constexpr):
    """Pointers to rows start + offs. WIDE (a sequence's offsets pass 2**31 elements: 1M tokens
    of 16 heads x 128) folds the tile's first row into the base in 64 bits, offsets inside the
    tile stay 32-bit; off, all 32-bit, which ptxas fits in fewer registers."""
    if WIDE:
        ptrs = (base + tl.cast(start, tl.int64) * stride) + offs * stride
    else:
        ptrs = base + (start + offs) * stride
    return ptrs


@triton.jit
def load_rows(rows, offs_d, offs_d2, mask_r, mask_d, mask_d2, stride_d, CHECK_ROWS: tl.constexpr,
              EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr):
    """A [R, D] tile from row pointers rows [R, 1] (mask_r marks the rows that exist), and with
    SPLIT_D the head dim's second part [R, D2]; without it the second is the first, unused."""
    x = load_tile(rows + offs_d[None, :] * stride_d, mask_r[:, None], mask_d[None, :], CHECK_ROWS, not EVEN_D)
    x2 = x
    if SPLIT_D:
        x2 = load_tile(rows + offs_d2[None, :] * stride_d, mask_r[:, None], mask_d2[None, :], CHECK_ROWS, not EVEN_D)
    return x, x2


@triton.jit
def load_cols(cols, offs_d, offs_d2, mask_c, mask_d, mask_d2, stride_d, CHECK_COLS: tl.constexpr,
              EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr):
    """load_rows transposed: a [D, C] tile from column pointers cols [1, C] (and its [D2, C] part)."""
    x = load_tile(cols + offs_d[:, None] * stride_d, mask_c[None, :], mask_d[:, None], CHECK_COLS, not EVEN_D)
    x2 = x
    if SPLIT_D:
        x2 = load_tile(cols + offs_d2[:, None] * stride_d, mask_c[None, :], mask_d2[:, None], CHECK_COLS, not EVEN_D)
    return x, x2


@triton.jit
def load_kv(k_cols, v_rows, offs_d, offs_d2, in_k, mask_d, mask_d2, stride_kd, stride_vd, MASKED: tl.constexpr,
            EVEN_D: tl.constexpr, SPLIT_D: tl.constexpr):
    """K^T [D, N] and V [N, D] tiles (and the head dim's second parts with SPLIT_D) from key
    pointers the caller built, strided or gathered from pages; in_k marks the keys that exist."""
    kt, kt2 = load_cols(k_cols, offs_d, offs_d2, in_k, mask_d, mask_d2, stride_kd, MASKED, EVEN_D, SPLIT_D)
    v, v2 = load_rows(v_rows, offs_d, offs_d2, in_k, mask_d, mask_d2, stride_vd, MASKED, EVEN_D, SPLIT_D)
    return kt, kt2, v, v2


@triton.jit
def attend_tile(
    acc, acc2, l_i, m_i, q, q2, kt, kt2, v, v2, q_idx, first_col, cols, seqlen_q, seqlen_k,
    qk_scale, softcap, slope, window_left, window_right, seed, offset, bh, dropout_p, alibi_ref, shift_masked,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASKED: tl.constexpr, SPLIT_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BOUNDED: tl.constexpr,
):
    """The forward step shared by the dense/varlen and the KV-cache kernels: score K^T [D, N]
    against q [M, D] and fold the tile with V [N, D] into the running softmax. cols are the
    tile's key indices, q_idx each row's query index; both count from the sequence's first
    key/query. With SPLIT_D the head dim comes in two parts (q, kt, v, acc and q2, kt2, v2, acc2:
    64 + 16 columns for head dim 80), so no tensor-core work goes to padding; without it the *2
    arguments are ignored. With ALIBI 2, alibi_ref is score_tile's reference row: the running
    max then carries alibi_row_shift, which the caller subtracts after the last tile. BOUNDED and
    shift_masked: see online_softmax_fold."""
    qk = mma(q, kt, None, DOT_PRECISION)
    if SPLIT_D:
        qk = mma(q2, kt2, qk, DOT_PRECISION)
    score_rows = q_idx[:, None]
    if ALIBI == 2:  # the bias is one vector over the keys, measured from the reference row
        score_rows = alibi_ref
    s, _, c = score_tile(qk, score_rows, cols[None, :], seqlen_q, seqlen_k, qk_scale, softcap, slope, SOFTCAP, ALIBI,
                         FOLD=True)
    if MASKED:
        s = mask_scores(s, q_idx[:, None], cols[None, :], seqlen_q, seqlen_k, window_left, window_right, CAUSAL,
                        WINDOW)
    words = 0
    if DROPOUT:
        words = dropout_words(seed, offset, bh, q_idx, first_col, cols.shape[0])
    return online_softmax_fold(s, c, m_i, l_i, acc, acc2, v, v2, words, dropout_p, shift_masked, MASKED, DROPOUT,
                               SPLIT_D, DOT_PRECISION, BOUNDED)


@triton.jit
def fold_sink(m_i, l_i, acc, acc2, sink):
    """Fold a per-row base-2 sink logit (a key with no value) into (m, l, acc); sink = -inf is a
    no-op, and a row that saw no key keeps acc = 0 but gains l > 0 (output 0, LSE = sink)."""
    m_new = tl.maximum(m_i, sink)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.math.exp2(sink - m_safe)
    return m_new, l_i, acc * alpha[:, None], acc2 * alpha[:, None]


@triton.jit
def finish_softmax(m_i, l_i, acc, acc2):
    """Normalize the accumulators; returns (out, out2, natural-log lse). Empty rows: 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return acc / l_safe[:, None], acc2 / l_safe[:, None], lse


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
def query_tile(BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """First query row of this program's tile (grid axis 0). Causal tiles further down see more
    keys, so they run first: the grid then ends on light tiles instead of a tail of the heaviest."""
    pid = tl.program_id(0)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid
    return pid * BLOCK_M


@triton.jit
def key_range(first_q, last_q, seqlen_q, seqlen_k, window_left, window_right,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key tiles for query rows [first_q, last_q]: (lo, full_lo, full_hi, hi).

    Run [lo, min(full_lo, hi)) masked, [full_lo, full_hi) unmasked (every row sees every key),
    [max(full_lo, full_hi), hi) masked. lo, full_lo, full_hi are multiples of BLOCK_N; keys
    outside [lo, hi) are seen by no row.
    """
    diag = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    hi = seqlen_k
    full_hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(tl.maximum(last_q + diag + 1, 0), seqlen_k)
        full_hi = tl.minimum(tl.maximum(first_q + diag + 1, 0), hi)
    if WINDOW:
        hi = tl.minimum(tl.maximum(last_q + diag + window_right + 1, 0), hi)
        full_hi = tl.minimum(tl.maximum(first_q + diag + window_right + 1, 0), tl.minimum(full_hi, hi))
        lo = tl.minimum(tl.maximum(first_q + diag - window_left, 0), hi)
        full_lo = tl.maximum(last_q + diag - window_left, lo)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    return lo, full_lo, full_hi, hi


@triton.jit
def query_range(first_k, last_k, seqlen_q, seqlen_k, window_left, window_right,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query tiles for key rows [first_k, last_k]: (lo, full_lo, full_hi, hi), used as in
    key_range. Query i sees key j iff j - diag - right <= i <= j - diag + left (causal: right 0).
    """
    diag = seqlen_k - seqlen_q
    lo = 0
    full_lo = 0
    hi = seqlen_q
    full_hi = seqlen_q
    if CAUSAL:
        lo = tl.minimum(tl.maximum(first_k - diag, 0), seqlen_q)
        full_lo = tl.maximum(last_k - diag, lo)
    if WINDOW:
        lo = tl.minimum(tl.maximum(first_k - diag - window_right, lo), seqlen_q)
        full_lo = tl.maximum(last_k - diag - window_right, tl.maximum(full_lo, lo))
        hi = tl.minimum(tl.maximum(last_k - diag + window_left + 1, 0), seqlen_q)
        full_hi = tl.minimum(tl.maximum(first_k - diag + window_left + 1, 0), hi)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
    full_hi = (full_hi // BLOCK_M) * BLOCK_M  # rows past seqlen_q need the row mask
    return lo, full_lo, full_hi, hi
