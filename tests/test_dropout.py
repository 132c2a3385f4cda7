"""Attention dropout: the Philox bits, the output and gradients given the returned mask, the
keep rate, and reproducibility."""

import pytest
import torch
import triton
import triton.language as tl

from tileattn import flash_attn_func, flash_attn_varlen_func
from tileattn.dropout import dropout_mask, keep_mask, philox
from tileattn.kernels.tile import dropout_words, dropped

from .helpers import DEVICE, make_qkv


@pytest.mark.parametrize("rounds", [7, 10], ids=["philox-4x32-7", "philox-4x32-10"])
def test_philox_known_answers(rounds):
    """Random123's Philox-4x32 test vectors (tests/kat_vectors), all four output words: seven
    rounds (dropout's) and the recommended ten."""
    counters = [(0, 0, 0, 0), (0xFFFFFFFF,) * 4, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    seeds = [0, 0xFFFFFFFFFFFFFFFF, 0x299F31D0A4093822]
    expected = {7: [(0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48), (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662),
                    (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)],
                10: [(0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
                     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)]}[rounds]
    for counter, seed, words in zip(counters, seeds, expected):
        assert tuple(int(w) for w in philox(seed, *counter, rounds=rounds)) == words


@triton.jit
def _keep_kernel(Out, seed, offset, bh, p, first_col, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    words = dropout_words(seed, offset, bh, rows, first_col, COLS)
    kept = dropped(tl.full([ROWS, COLS], 2.0, tl.float32), words, p)
    tl.store(Out + rows[:, None] * COLS + tl.arange(0, COLS)[None, :], kept)


@pytest.mark.parametrize("p", [0.3, 1 - 2**-17], ids=["p0.3", "p-near-1"])
@pytest.mark.parametrize("first_col, cols", [(64, 32), (0, 128)], ids=["tile-at-64", "tile-of-128"])
def test_kernel_bits_match_the_torch_definition(p, first_col, cols):
    """The kernels' dropped tile (four Philox calls per 32-key group, words split into even and
    odd columns) is the mask tileattn.dropout defines, at tiles that do not start at key 0 or
    span several groups; p within 2**-17 of 1 drops every key (the high half's bound is the
    largest word there)."""
    out = torch.empty(16, cols, device=DEVICE)
    _keep_kernel[(1,)](out, 987654321, 11, 5, p, first_col, ROWS=16, COLS=cols)
    ref = keep_mask(p, 987654321, 11, 5, torch.arange(16), first_col, cols)
    assert torch.equal(out.cpu(), ref.float() * 2.0)
    if p < 0.5:
        assert 0.5 < ref.float().mean() < 0.9
    else:
        assert not ref.any()


def test_mask_of_any_key_range_is_a_slice_of_the_whole():
    """The CPU backend asks for key chunks that need not start at a Philox call's first key."""
    rows = torch.arange(6)
    whole = keep_mask(0.4, 42, 3, 7, rows, 0, 40)
    for first, count in [(5, 13), (8, 8), (15, 1), (1, 39)]:
        assert torch.equal(keep_mask(0.4, 42, 3, 7, rows, first, count), whole[..., first : first + count])


def _reference(q, k, v, keep, p, causal, dout):
    """fp64 attention whose probabilities are multiplied by keep / (1 - p); out and grads."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    qd, kd, vd = leaves
    group = q.shape[2] // k.shape[2]
    kd, vd = kd.repeat_interleave(group, 2), vd.repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd) / q.shape[-1] ** 0.5
    if causal:
        i = torch.arange(q.shape[1], device=q.device)[:, None]
        j = torch.arange(k.shape[1], device=q.device)[None, :]
        scores = scores.masked_fill(j > i + k.shape[1] - q.shape[1], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0) * keep.double() / (1 - p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vd)
    return out, torch.autograd.grad(out, leaves, dout.double())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 37, 70, 4, 2, 40), (1, 113, 113, 2, 2, 64)], ids=["gqa-sq-lt-sk", "mha-113"])
def test_dropout_matches_reference_given_mask(backend, shape, causal):
    p = 0.3
    q, k, v = make_qkv(*shape)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _, keep = flash_attn_func(*leaves, dropout_p=p, causal=causal, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref_grads = _reference(q, k, v, keep, p, causal, dout)
    torch.testing.assert_close(out.double(), ref_out, atol=3e-5, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=0, msg=f"d{name}")


@pytest.mark.parametrize("p", [0.001, 0.17, 0.9])
def test_keep_rate_within_statistical_bounds(p):
    keep = dropout_mask(p, 1234, 5, 4, 8, 128, 128)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma


def test_same_seed_same_output_new_draw_new_mask(backend):
    q, k, v = make_qkv(1, 40, 40, 2, 2, 32)
    torch.manual_seed(7)
    a = flash_attn_func(q, k, v, dropout_p=0.5)
    b_ = flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    c = flash_attn_func(q, k, v, dropout_p=0.5)
    assert torch.equal(a, c) and not torch.equal(a, b_)


def test_varlen_dropout_uses_dense_bits_per_sequence(backend):
    """Sequence b of a varlen call drops what batch entry b of a dense call drops."""
    p = 0.4
    q, k, v = make_qkv(2, 30, 30, 2, 2, 16)
    torch.manual_seed(3)
    dense = flash_attn_func(q, k, v, dropout_p=p, causal=True)
    cu = torch.tensor([0, 30, 60], dtype=torch.int32, device=DEVICE)
    torch.manual_seed(3)
    packed = flash_attn_varlen_func(*(x.reshape(60, 2, 16) for x in (q, k, v)), cu, cu, 30, 30, dropout_p=p,
                                    causal=True)
    torch.testing.assert_close(packed.view(2, 30, 2, 16), dense, atol=1e-6, rtol=0)


def test_fresh_seeds_do_not_compile_new_kernel_variants():
    """Triton specializes int arguments (divisibility by 16), so a random seed and offset per
    call compiled up to four variants of each kernel, at random steps (a timed dropout forward
    read 2.5 s on an H100): they are excluded from specialization."""
    from importlib import import_module

    forward, backward = (import_module(f"tileattn.kernels.{name}") for name in ("forward", "backward"))
    kernels = [forward._fwd_kernel, backward._bwd_dkdv_kernel, backward._bwd_dq_kernel]
    for kernel in kernels:
        if hasattr(kernel, "params"):  # a JITFunction
            unspecialized = {p.name for p in kernel.params if p.do_not_specialize}
        else:  # under TRITON_INTERPRET, the jit's arguments as given
            unspecialized = set(kernel.kwargs.get("do_not_specialize", ()))
        assert {"seed", "philox_offset"} <= unspecialized
