"""One-row matrix-vector product with bias, y = W x + b, for the batch-1 decode step.

A decode step at batch 1 multiplies one token by every weight matrix: pure reads of the weights.
cuBLAS runs these as tiles of 64 or 128 weight rows, too few programs for 132 SMs at Phi-2's
sizes (2560 output rows: 40), or split over K with a second reduction kernel. Here each
program owns a few rows and walks K in wide chunks, so thousands of small programs keep every
SM's loads in flight. The products accumulate in float32; the result has the input's dtype.

An activation can be applied to the float32 sums before they are stored (an MLP's first
product: tileattn.projections), which saves the activation's own kernel and lets the next
product's launch follow this one directly (its weights prefetch under PDL); to the rows from
``activation_from`` on only, where one product serves an attention's q/k/v and a parallel
MLP's up projection together.

A second operand (``x2``, ``weight2``, ``bias2``) adds its product into the same float32 sums,
y = W x + W2 x2 + b + b2, for a parallel layer whose attention output projection and MLP down
projection the layer adds anyway: one launch and one tail instead of two. Phi-2's 2560 x 2560
output projection alone read at ~2.0 TB/s on an H100 where its 2560 x 10240 fc2 read 2.7; a
16k decode step's GEMVs went from 97 launches and 1939.5 us to 65 and 1878.1 (profile, one call).
"""

import torch
import triton
import triton.language as tl

from ..validation import check_tensor
from .config import gdc_launch_dependents, gdc_wait, interpreting, pdl_launch


@triton.jit
def _chunk(acc, w_rows, X, in_n, start, k, BLOCK_K: tl.constexpr, WAIT: tl.constexpr):
    """acc += one K chunk of the weight rows times x. WAIT: wait for the previous kernel (PDL)
    after loading the weights, which no kernel writes, and before loading x, which it does."""
    cols = start + tl.arange(0, BLOCK_K)
    in_k = cols < k
    w = tl.load(w_rows + cols[None, :], mask=in_n[:, None] & in_k[None, :], other=0.0)
    if WAIT:
        gdc_wait()
    x = tl.load(X + cols, mask=in_k, other=0.0)
    return acc + w.to(tl.float32) * x.to(tl.float32)[None, :]


# name -> the kernel's ACTIVATION code; the float32 formulas are in _activate
ACTIVATIONS = {"": 0, "gelu_tanh": 1, "gelu": 2, "silu": 3, "relu": 4}


@triton.jit
def _activate(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # 0.5 * (1 + tanh(u)) is sigmoid(2u): no tanh needed
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACTIVATION == 2:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACTIVATION == 3:
        y = y * tl.sigmoid(y)
    elif ACTIVATION == 4:
        y = tl.maximum(y, 0.0)
    return y


@triton.jit
def _gemv_kernel(X, W, Bias, Y, n, k, stride_wn, act_from, X2, W2, Bias2, k2, stride_w2n, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SECOND: tl.constexpr, HAS_BIAS2: tl.constexpr,
                 ACTIVATION: tl.constexpr, X_READY: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rows < n
    w_rows = W + rows[:, None].to(tl.int64) * stride_wn  # int64: a vocabulary projection passes 2**31 elements
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    first = 0
    if PDL and not X_READY:  # the first chunk's weights load while the previous kernel drains
        acc = _chunk(acc, w_rows, X, in_n, 0, k, BLOCK_K, True)
        first = BLOCK_K
    for start in range(first, k, BLOCK_K):
        acc = _chunk(acc, w_rows, X, in_n, start, k, BLOCK_K, False)
    if PDL and X_READY:  # x was complete before this grid started: only x2, bias and y wait
        gdc_wait()
    if SECOND:  # after the wait (with PDL): x2 comes from the kernels before this one too
        w2_rows = W2 + rows[:, None].to(tl.int64) * stride_w2n
        for start in range(0, k2, BLOCK_K):
            acc = _chunk(acc, w2_rows, X2, in_n, start, k2, BLOCK_K, False)
    if PDL:
        gdc_launch_dependents()
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(Bias + rows, mask=in_n, other=0.0).to(tl.float32)
    if HAS_BIAS2:
        y += tl.load(Bias2 + rows, mask=in_n, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        y = tl.where(rows >= act_from, _activate(y, ACTIVATION), y)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=in_n)


def gemv_config(n: int) -> tuple[int, int, int]:
    """(rows per program, K chunk, warps) for N output rows: about a thousand programs or more.
    Swept on an H100 as decode reads the weights (32 distinct copies a shape, so nothing stays
    in L2; graph-timed) over rows {2, 4, 8, 16} x chunk {128 ... 1024} x warps {2, 4, 8}: at N =
    2560 (K 2560 and 10240) 2 x 1024 x 4 was best, at N = 7680 and 10240 8 x 256 x 4 within 1%
    of the best."""
    return (2, 1024, 4) if n <= 4096 else (8, 256, 4)


INTERPRETER_CONFIG = (32, 256, 4)


def launch_config(n: int) -> tuple[int, int, int]:
    """gemv_config on the GPU. The CPU interpreter runs programs one after another in Python, so
    there a few wide programs: one projections test on a 2-layer model took 45 s through the GPU
    configs (hundreds of 2-row programs per product), 8 s with 32 rows a program.
    tests/kernels/test_gemv.py runs the GPU configs under the interpreter."""
    return INTERPRETER_CONFIG if interpreting() else gemv_config(n)


def _check_operand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, names: tuple[str, str, str],
                   dtype: torch.dtype, device: torch.device, n: int | None = None):
    """One (x, weight, bias) operand: x one row of weight's K columns, weight (N, K) with unit
    column stride (N = n where given), bias (N,) or None, all of dtype on device."""
    x_name, w_name, b_name = names
    tensors = {x_name: x, w_name: weight} | ({b_name: bias} if bias is not None else {})
    for name, t in tensors.items():
        check_tensor(name, t)
        if t.dtype != dtype:
            raise TypeError(f"{name} must have x's dtype ({dtype}), got {t.dtype}")
        if t.device != device or not (t.is_cuda or interpreting()):
            raise ValueError(f"{name} must be on x's CUDA device (or run under TRITON_INTERPRET=1), got {t.device}")
    if weight.dim() != 2 or weight.stride(1) != 1 or (n is not None and weight.shape[0] != n):
        rows = "N" if n is None else n
        raise ValueError(f"{w_name} must be 2-D ({rows}, K) with unit column stride, got shape {tuple(weight.shape)} "
                         f"and strides {weight.stride()}")
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"{x_name} must hold one row of {k} elements ({w_name} is {n} x {k}), got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"{b_name} must be a contiguous ({n},) vector, got shape {tuple(bias.shape)}")


_joined = None  # (device, first byte, end) of the latest product activated from a row > 0: see x_ready


def _span(t: torch.Tensor) -> tuple:
    return t.device, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, activation: str = "", activation_from: int = 0,
         x2: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
         bias2: torch.Tensor | None = None, x_ready: bool = False) -> torch.Tensor:
    """x (..., K) holding one row, weight (N, K) with unit column stride, bias (N,) or None ->
    (..., N) in x's dtype: the same product as ``F.linear(x, weight, bias)``, plus
    ``F.linear(x2, weight2, bias2)`` where x2 and weight2 (N, K2) are given (both sums in float32,
    rounded once), then the named activation (a key of ACTIVATIONS; "gelu_tanh" is
    tanh-approximated GELU) on outputs ``activation_from`` to N - 1, before rounding. out may be
    passed preallocated and contiguous (tests poison it).

    x_ready: the caller knows that x was written before the kernel that precedes this one on the
    stream (a parallel layer's MLP activation, made by the q/k/v + up GEMV, against x2, the
    attention's output). Under PDL this kernel may start while the one ahead still runs (after
    that one lets dependents launch, which every tileattn kernel does only past its own wait,
    so the kernels before it have finished); the whole x product then streams under its tail,
    and only x2 waits. Honoured only where x lies inside the latest product activated from a row
    > 0 (the joined q/k/v + up product), so a copy made between them is never read early."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    check_tensor("x", x)
    _check_operand(x, weight, bias, ("x", "weight", "bias"), x.dtype, x.device)
    n, k = weight.shape
    if not 0 <= activation_from <= n:
        raise ValueError(f"activation_from must be in [0, {n}] (weight's rows), got {activation_from}")
    second = x2 is not None or weight2 is not None
    if second:
        if x2 is None or weight2 is None:
            raise ValueError("x2 and weight2 come together: pass both or neither")
        _check_operand(x2, weight2, bias2, ("x2", "weight2", "bias2"), x.dtype, x.device, n)
    elif bias2 is not None:
        raise ValueError("bias2 needs x2 and weight2")
    shape = x.shape[:-1] + (n,)
    y = torch.empty(shape, device=x.device, dtype=x.dtype) if out is None else out
    if y.shape != shape or y.dtype != x.dtype or y.device != x.device or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(shape)} on {x.device}, got "
                         f"{y.dtype} {tuple(y.shape)} on {y.device}")
    if n == 0:
        return y
    x = x.reshape(k).contiguous()
    x2 = x2.reshape(-1).contiguous() if second else x
    weight2 = weight2 if second else weight
    global _joined
    ready = False
    if x_ready and _joined is not None:
        device, lo, hi = _span(x)
        ready = device == _joined[0] and _joined[1] <= lo and hi <= _joined[2]
    if activation and activation_from > 0:
        _joined = _span(y)
    block_n, block_k, warps = launch_config(n)
    pdl = pdl_launch(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else weight, y, n, k,
                                             weight.stride(0), activation_from, x2, weight2,
                                             bias2 if bias2 is not None else weight, weight2.shape[1],
                                             weight2.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             HAS_BIAS=bias is not None, SECOND=second, HAS_BIAS2=bias2 is not None,
                                             ACTIVATION=ACTIVATIONS[activation], X_READY=ready,
                                             num_warps=warps, **pdl)
    return y
