"""The Triton forward launcher directly, with poisoned outputs so unwritten elements show."""

import pytest
import torch

from tileattn import flash_attn_func, flash_attn_varlen_func, kernels
from tileattn.kernels import config
from tileattn.kernels.config import desc_block_setter, head_blocks
from tileattn.kernels.forward import DESC_ROWS, HOST_TMA_DEFAULT, SPLIT_DEFAULT, _host_descs, _select, check_offsets
from tileattn.reference import attention_ref
from tileattn.testing import Check, _rounding_atol, check_attention

from ..helpers import DEVICE, make_qkv, shape_id

SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 65, 33, 4, 2, 80),  # ragged tiles both ways, head dim split 64 + 16
    (1, 40, 70, 2, 1, 72),  # split 64 + 16 with the second part masked (72 = 64 + 8)
    (1, 37, 37, 2, 2, 96),  # split 64 + 32
    (1, 33, 130, 3, 1, 5),  # tiny odd head dim, MQA
    (1, 129, 64, 2, 2, 64),  # Sq > Sk causal: whole query tiles see no key
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_forward_writes_every_element(shape, causal, tma):
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    q, k, v = make_qkv(*shape)
    out = torch.full((batch, seqlen_q, heads, head_dim), float("nan"), device=DEVICE)
    lse = torch.full((batch, heads, seqlen_q), float("nan"), device=DEVICE)
    kernels.forward(q, k, v, head_dim**-0.5, causal, out=out, lse=lse)
    ref_out, ref_lse = attention_ref(q, k, v, causal=causal)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_varlen_forward_writes_every_element(tma):
    cu_q = torch.tensor([0, 1, 1, 70], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 5, 36], dtype=torch.int32, device=DEVICE)  # middle: no queries, no keys
    q, k, v = (torch.randn(n, 3, 20, device=DEVICE) for n in (70, 36, 36))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((3, 70), float("nan"), device=DEVICE)
    kernels.forward(q, k, v, 0.2, True, cu_q, cu_k, 69, 31, out=out, lse=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    # causal with Sq=69 > Sk=31: the third sequence's first 38 queries see no key
    assert torch.equal(out[1:39], torch.zeros_like(out[1:39]))
    assert (lse[:, 1:39] == float("-inf")).all()


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(37, 70), (70, 37)], ids=["sq<sk", "sq>sk"])
def test_a_window_that_cuts_nothing_is_dropped(launch_flags, seqlen_q, seqlen_k):
    """Window sides at the sequence's reach (left = Sk - 1, right = Sq - 1) cut no key: forward
    and backward launch without the window switch. One key shorter on either side they keep
    it. Both ways the result is the oracle's."""
    flags = launch_flags("tileattn.kernels.forward", "_fwd")
    launch_flags("tileattn.kernels.backward", "_dq", "_dkdv")
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 2, 1, 32)
    for window, cuts in (((seqlen_k - 1, seqlen_q - 1), False), ((seqlen_k - 2, -1), True),
                         ((-1, seqlen_q - 2), True)):
        flags.clear()
        out, lse = kernels.forward(q, k, v, 0.2, False, window_size=window)
        dout = torch.randn_like(out)
        grads = kernels.backward(dout, q, k, v, out, lse, 0.2, False, window_size=window)
        assert [f["WINDOW"] for f in flags] == [cuts] * 3, window
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = attention_ref(*leaves, 0.2, False, window_size=window)
        ref_grads = torch.autograd.grad(ref_out, leaves, dout.double())
        for got, want in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads)):
            torch.testing.assert_close(got.double(), want.detach(), atol=5e-5, rtol=5e-5)


def test_offsets_inside_a_tile_must_fit_32_bits():
    # meta tensors carry shapes and strides without memory; tile starts are 64-bit (a GPU test,
    # test_large_offsets, runs such sequences), offsets inside one tile are 32-bit
    check_offsets(2**20, q=torch.empty_strided((1, 2**20, 64, 64), (0, 4096, 64, 1), device="meta"))
    check_offsets(1024, q=torch.empty_strided((64, 1024, 64, 64), (2**22, 4096, 64, 1), device="meta"))
    q = torch.empty_strided((1, 1024, 1, 64), (0, 2**24, 64, 1), device="meta")  # 256 rows span 2**32
    with pytest.raises(ValueError, match=r"q: row stride 16777216 .* one 256-row tile span .* pass a contiguous"):
        kernels.forward(q, q, q, 0.125, True)


def test_dense_tma_descriptors_are_made_on_the_host():
    """Dense inputs get K/V descriptors from the launcher; varlen, split head dims and an empty
    K/V keep the per-sequence device-made ones; block shapes follow the tile config."""
    _, k, v = make_qkv(2, 33, 17, 4, 2, 64)
    dense = _host_descs(True, False, head_blocks(64), k, v)
    assert dense["TMA"] == 2 and dense["KDesc"].shape == [2, 17, 2, 64]
    assert _host_descs(True, True, head_blocks(64), k, v)["TMA"] == 1
    assert _host_descs(True, False, head_blocks(80), k, v)["TMA"] == 1
    assert _host_descs(True, False, head_blocks(64), k[:, :0], v[:, :0])["TMA"] == 1
    assert _host_descs(False, False, head_blocks(64), k, v) == dict(KDesc=None, VDesc=None, TMA=0)
    meta = dict(dense, BLOCK_M=64, BLOCK_N=32, BLOCK_D=64)
    desc_block_setter(**DESC_ROWS)(meta)
    assert meta["KDesc"].block_shape == meta["VDesc"].block_shape == [1, 32, 1, 64]


def test_forward_config_selection():
    """2-stage pipelines crash Triton 3.6's ptxas with host descriptors: never compiled for
    them; host descriptors and split head dims (80, 96) take their own untuned default first,
    host descriptors with dropout too, split head dims not (4 warps spill dropout's Philox
    state); the set is otherwise unchanged."""
    configs = config._GPU_CONFIGS["fwd"][128]
    host = _select(configs, dict(TMA=2, SPLIT_D=False, DROPOUT=False))
    assert host[0] == HOST_TMA_DEFAULT and all(stages >= 3 for *_, stages in host) and len(host) < len(configs)
    assert _select(configs, dict(TMA=2, SPLIT_D=False, DROPOUT=True)) == host
    assert _select(configs, dict(TMA=0, SPLIT_D=False, DROPOUT=False)) == list(configs)
    split = _select(configs, dict(TMA=0, SPLIT_D=True, DROPOUT=False))
    assert split[0] == SPLIT_DEFAULT and sorted(split) == sorted(configs)
    assert _select(configs, dict(TMA=0, SPLIT_D=True, DROPOUT=True)) == list(configs)


def test_causal_half_precision_alibi_takes_the_per_key_form(launch_flags):
    """The causal fp16/bf16 forward runs ALiBi as one vector over each tile's keys (ALIBI 2; the
    variant tests check its results against the oracle); fp32, non-causal calls, the backward
    and the KV-cache kernel, whose tile rows are heads with their own slopes, keep
    slope * |i - j|."""
    flags = launch_flags("tileattn.kernels.forward", "_fwd")
    launch_flags("tileattn.kernels.backward", "_dq", "_dkdv")
    launch_flags("tileattn.kernels.decode", "_decode")
    slopes = torch.full((2,), 0.25, device=DEVICE)
    for dtype, causal, mode in ((torch.float16, True, 2), (torch.float16, False, 1), (torch.float32, True, 1)):
        flags.clear()
        q, k, v = make_qkv(1, 20, 20, 2, 1, 16, dtype=dtype)
        out, lse = kernels.forward(q, k, v, 0.25, causal, alibi_slopes=slopes)
        kernels.backward(torch.randn_like(out), q, k, v, out, lse, 0.25, causal, alibi_slopes=slopes)
        assert [f["ALIBI"] for f in flags] == [mode, 1, 1], (dtype, causal)  # forward, dQ, dK/dV
    flags.clear()
    lens = torch.full((1,), 20, dtype=torch.int32, device=DEVICE)
    kernels.decode(q[:, -1:].half(), k.half(), v.half(), lens, 0.25, True, alibi_slopes=slopes)
    assert [f["ALIBI"] for f in flags] == [1]


# name: (dtype, softcap, softmax_scale, sign of the scores, variants)
BOUNDED = {
    # Gemma 2's cap; scores near -cap: p = 2**-107 below a shift of the cap (72 in base 2) would
    # flush to 0 (2**-131); the shift 120 - c keeps them normal
    "bf16-cap50-scores-near-minus-cap": (torch.bfloat16, 50.0, 1.2, -1, {}),
    "bf16-cap50-scores-near-cap": (torch.bfloat16, 50.0, 1.2, 1, {}),
    "bf16-cap30-mixed-sink-window-empty-rows": (torch.bfloat16, 30.0, 0.5, 0,
                                                dict(window_size=(0, 0), learnable_sink=True)),
    "fp32-cap5-mixed": (torch.float32, 5.0, None, 0, {}),
}


@pytest.mark.parametrize("name", BOUNDED, ids=list(BOUNDED))
def test_bounded_softcap_scores_need_no_running_max(launch_flags, monkeypatch, name):
    """A softcap (up to 50, no ALiBi) bounds the scores, so bf16 and fp32 forwards (and decode:
    test_decode's bounded test) shift them by one constant instead of a running max (BOUNDED).
    Scores saturated near either end of the cap, sinks and rows that see no key (window (0, 0),
    Sq > Sk) against the oracle within the 2x-PyTorch rule, outputs poisoned; 45 keys make one
    unmasked tile and one masked."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    flags = launch_flags("tileattn.kernels.forward", "_fwd")
    dtype, cap, scale, sign, variants = BOUNDED[name]
    variants = dict(variants)
    q, k, v = make_qkv(2, 70, 45, 4, 2, 80, dtype=dtype)  # split head dim, GQA, Sq > Sk
    if sign:  # every q.k of one sign, about -0.64 * 80 * sign
        q, k = q.abs(), k.abs() * sign
    if variants.pop("learnable_sink", False):
        variants["learnable_sink"] = torch.randn(4, device=DEVICE) * 2
    checks = check_attention(flash_attn_func, q, k, v, causal=False, softmax_scale=scale, softcap=cap, **variants)
    failed = [str(c) for c in checks if not c.ok]
    assert not failed, failed
    # bf16 takes half the unmasked tiles' exponentials off the MUFU unit (fastmath.exp2_fma)
    assert flags and all(f["BOUNDED"] == (2 if dtype == torch.bfloat16 else 1) for f in flags)

    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((2, 4, 70), float("nan"), device=DEVICE)
    kernels.forward(q, k, v, scale or 80**-0.5, False, out=out, lse=lse, softcap=cap, **variants)
    assert not out.isnan().any() and not lse.isnan().any()


# name: (seqlen_k, causal, window_size), each leaving every query row one key
ONE_KEY = {"one-key": (1, False, (-1, -1)), "window-0-0": (40, False, (0, 0)),
           "causal-window-left-0": (40, True, (0, -1))}


@pytest.mark.parametrize("name", ONE_KEY, ids=list(ONE_KEY))
def test_bounded_softcap_rows_of_one_key_are_exact(launch_flags, monkeypatch, name):
    """A row that sees one key has p = 1. Under the bounded shift that p rounded to bf16 in the
    output's sum but not in its normalizer (out = v * bf16(p) / p), and the backward's rowsum(dO
    * out) then missed dO.v: dq and dk, exactly 0 whatever the scores, came out at 0.15-0.30
    here. Masked tiles, where such rows see their keys, keep the running max (BOUNDED still on):
    out, LSE and dv pass the 2x rule, dq and dk carry only fp32 rounding (the rule's floor, 1e-6
    at a scale of 0, is below what rowsum(dO * out) against dO.v leaves in any FlashAttention:
    ~5e-6 here)."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    flags = launch_flags("tileattn.kernels.forward", "_fwd")
    seqlen_k, causal, window = ONE_KEY[name]
    q, k, v = make_qkv(2, 40, seqlen_k, 4, 2, 48, dtype=torch.bfloat16)
    checks = check_attention(flash_attn_func, q, k, v, causal=causal, softmax_scale=1.0, softcap=50.0,
                             window_size=window)
    failed = [str(c) for c in checks if not (c.ok if c.name in ("out", "lse", "dv") else c.err < 1e-4)]
    assert not failed, failed
    assert [f["BOUNDED"] for f in flags] == [2]


def test_bounded_softcap_packed_one_key_sequence(monkeypatch):
    """A packed batch whose longest sequence runs unmasked tiles under the bound, beside a
    sequence of 100 queries over one key: with the shift rounding their p = 1, dq was 1.8e-2
    off (PyTorch's bf16 2.9e-3, the rule's bound 1e-2). Per sequence, the 2x rule."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    lens_q, lens_k = (33, 100, 100, 1), (0, 200, 1, 9)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for n in (lens_q, lens_k))
    q = torch.randn(sum(lens_q), 4, 32, device=DEVICE).abs().bfloat16()
    k, v = (torch.randn(sum(lens_k), 2, 32, device=DEVICE).abs().bfloat16() for _ in range(2))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, 100, 200, softcap=30.0)
    dout = torch.randn_like(out)
    results = [(out, *torch.autograd.grad(out, leaves, dout))]
    for dtype in (torch.float64, torch.bfloat16):  # the oracle, then PyTorch in bf16
        ref_leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        outs = [attention_ref(ref_leaves[0][None, cu_q[b]:cu_q[b + 1]], ref_leaves[1][None, cu_k[b]:cu_k[b + 1]],
                              ref_leaves[2][None, cu_k[b]:cu_k[b + 1]], softcap=30.0,
                              upcast=dtype == torch.float64)[0][0] for b in range(4)]
        ref_out = torch.cat(outs)
        results.append((ref_out, *torch.autograd.grad(ref_out, ref_leaves, dout.to(dtype))))
    for name, ours, ref, lowp in zip(("out", "dq", "dk", "dv"), *results):
        err, torch_err = ((x.double() - ref).abs().max().item() for x in (ours, lowp))
        check = Check(name, err, torch_err, _rounding_atol(ref, torch.bfloat16))
        assert check.ok, str(check)


# name: (softmax_scale, cap, sign of the later keys' scores): a window's left edge whose
# scores lie below the shift, or at 71 (base 2) with later scores near -71
LEFT_EDGE = {"max-below-shift": (None, 30.0, 1), "max-above-shift-then-near-minus-cap": (6.0, 50.0, -1)}


@pytest.mark.parametrize("name", LEFT_EDGE, ids=list(LEFT_EDGE))
def test_bounded_softcap_masked_tiles_before_unmasked_ones(launch_flags, monkeypatch, name):
    """A window's left edge runs masked tiles before the unmasked ones; where a program has an
    unmasked tile its masked tiles take the shift too, so m, l and acc never change footing
    (moving from a running max to the shift between them without a rescale put out 2.9 off
    and, past exp2_fma's range, NaN)."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    flags = launch_flags("tileattn.kernels.forward", "_fwd")
    scale, cap, sign = LEFT_EDGE[name]
    q, k, v = make_qkv(1, 100, 200, 2, 1, 32, dtype=torch.bfloat16)
    q, k = q.abs(), k.abs()
    k[:, 64:] *= sign  # keys from the first unmasked tile on
    checks = check_attention(flash_attn_func, q, k, v, softmax_scale=scale, softcap=cap, window_size=(100, -1))
    failed = [str(c) for c in checks if not c.ok]
    assert not failed, failed
    assert [f["BOUNDED"] for f in flags] == [2]


def test_softcap_keeps_the_running_max_where_the_bound_does_not_serve(launch_flags):
    """fp16 probabilities have no exponent range for a fixed shift, ALiBi's bias no lower
    bound, and caps above 50 would put p past 2**24: those keep the running max."""
    flags = launch_flags("tileattn.kernels.forward", "_fwd")
    slopes = torch.full((2,), 0.25, device=DEVICE)
    for dtype, cap, alibi in ((torch.float16, 30.0, None), (torch.bfloat16, 30.0, slopes),
                              (torch.bfloat16, 50.5, None)):
        flags.clear()
        q, k, v = make_qkv(1, 20, 20, 2, 1, 16, dtype=dtype)
        kernels.forward(q, k, v, 0.25, True, softcap=cap, alibi_slopes=alibi)
        assert [f["BOUNDED"] for f in flags] == [False], (dtype, cap, alibi is not None)
