"""fastmath's functions, which no launcher isolates, through small kernels of their own."""

import torch
import triton
import triton.language as tl

from tileattn.kernels.fastmath import exp2_fma, tanh

from ..helpers import DEVICE


@triton.jit
def _exp2_fma_kernel(X, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + offs, exp2_fma(tl.load(X + offs, mask=offs < n)), mask=offs < n)


def test_exp2_fma_is_within_its_bound_over_its_whole_range():
    """Integers, half-integers (rounding ties) and everything between, from -125 (below, the
    result's exponent field reaches 0) to 127, poisoned output; relative error against fp64
    under the 7.5e-5 the BOUNDED 2 softmax is allowed (bf16 rounds probabilities by 2**-9)."""
    x = torch.cat([torch.linspace(-125, 127, 40_000), torch.arange(-125, 128.0), torch.arange(-124.5, 127.0)])
    x = x.to(device=DEVICE, dtype=torch.float32)
    out = torch.full_like(x, float("nan"))
    _exp2_fma_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    rel = (out.double() / torch.exp2(x.double()) - 1).abs()
    assert rel.max() < 7.6e-5, (rel.max().item(), x[rel.argmax()].item())


@triton.jit
def _tanh_kernel(X, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + offs, tanh(tl.load(X + offs, mask=offs < n), False), mask=offs < n)


def test_exact_tanh_matches_fp64_on_both_sides_of_its_series():
    """The exact tanh (fp32 and the CPU) switches from a series to the closed form at |x| = 0.3;
    both pieces, the switch and saturation against fp64 within a few fp32 ulps (relative)."""
    x = torch.cat([torch.linspace(-20, 20, 40_001), torch.tensor([0.3, -0.3, 0.2999999, 1e-30, -0.0, 0.0])])
    x = x.to(device=DEVICE, dtype=torch.float32)
    out = torch.full_like(x, float("nan"))
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    ref = torch.tanh(x.double())
    err = ((out.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max()
    assert err < 4 * 2**-24, err.item()
