"""Elementwise math of the tile step beyond Triton's: the softcap's tanh, and 2**x on the FMA
and integer units (exp2_fma), which takes work off the MUFU unit where tanh and exp2 crowd it;
with them the split of a tile into the column pairs one thread holds, which exp2_half_fma and
dropout's selection share.
"""

import triton
import triton.language as tl

# constexpr so kernels may read it; launchers use LOG2E.value
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def tanh(x, APPROX: tl.constexpr):
    """tanh in fp32. APPROX: the GPU's one-instruction tanh.approx (relative error ~2**-11, below
    fp16/bf16 input rounding); else from exp2 (the interpreter has no libdevice or inline asm):
    a short series near 0, where (1 - e) / (1 + e) would cancel, the closed form elsewhere."""
    if APPROX:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        t = _tanh_exp2(x)
    return t


@triton.jit
def _tanh_exp2(x):
    ax = tl.abs(x)
    e = tl.math.exp2(ax * (-2.0 * LOG2E))  # tensor first: triton 3.9 wraps constexpr * tensor
    closed = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    series = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.3, series, closed)
    return tl.where(x < 0, -t, t)


# exp2_fma: 1.5 * 2**23, whose float spacing is 1, and 2**f's minimax cubic on [-0.5, 0.5]
ROUND_MAGIC = tl.constexpr(12582912.0)
EXP2_C0 = tl.constexpr(0.9999281167984009)
EXP2_C1 = tl.constexpr(0.6932609677314758)
EXP2_C2 = tl.constexpr(0.24261054396629333)
EXP2_C3 = tl.constexpr(0.05517132207751274)


@triton.jit
def exp2_fma(x):
    """2**x for finite x in [-125, 127] on the FMA and integer units, where tl.math.exp2 is one
    MUFU instruction, a unit with an eighth of the FMA units' throughput on sm_90 (16 results
    per clock per SM). Relative error 7.5e-5, under bf16's rounding of the probabilities
    (2**-9), not fp32's. x = n + f with n the nearest integer, which adding 1.5 * 2**23 leaves
    in the sum's low mantissa bits (no float-to-int conversion, another 16-per-clock
    instruction); 2**f from a cubic, 2**n added to its exponent field."""
    t = x + ROUND_MAGIC
    f = x - (t - ROUND_MAGIC)
    p = ((f * EXP2_C3 + EXP2_C2) * f + EXP2_C1) * f + EXP2_C0
    bits = p.to(tl.uint32, bitcast=True) + (t.to(tl.uint32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def split_column_pairs(x):
    """(even, odd) columns of x [M, N], each [M, N / 2]. Columns 2k and 2k + 1 sit in one thread
    of the tensor cores' accumulator layout, so splitting them (and join_column_pairs) moves
    nothing between threads."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def join_column_pairs(even, odd):
    """split_column_pairs undone: [M, 2 * N] from even and odd columns [M, N]."""
    return tl.reshape(tl.join(even, odd), [even.shape[0], 2 * even.shape[1]])


@triton.jit
def exp2_half_fma(x):
    """2**x [M, N] for finite x in exp2_fma's range: even columns by the MUFU unit, odd ones by
    exp2_fma. Half was best on an H100, d128 causal bf16 softcap forward: 1.24 ms; a quarter
    1.29, three quarters 1.29, all 1.35, none 1.31."""
    even, odd = split_column_pairs(x)
    return join_column_pairs(tl.math.exp2(even), exp2_fma(odd))
