"""Sequences whose offsets pass 2**31 elements (one sequence of more than 1M rows of 16 x 128).

The kernels fold each tile's first row into a 64-bit base; 32-bit row offsets wrapped here and
read the wrong rows. Triton's interpreter computes these offsets in 64 bits whatever the source
says, so only a GPU can show the bug: the tests need one and about 20 GB of its memory.
"""

import pytest
import torch

from tileattn import flash_attn_func, flash_attn_with_kvcache
from tileattn.reference import attention_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (see module docstring)")

LONG = 2**20 + 384  # rows of 2048 elements: the last rows start past 2**31
SHORT = 256


def _bf16(*shape, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)


def _close(actual, expected, what):
    err = (actual.float() - expected.float()).abs().max().item()
    assert err < 2e-2 * max(1.0, expected.float().abs().max().item()), f"{what}: max error {err}"


def test_long_query_sequence():
    q, dout = _bf16(1, LONG, 16, 128, seed=0), _bf16(1, LONG, 16, 128, seed=1)
    k, v = _bf16(1, SHORT, 16, 128, seed=2), _bf16(1, SHORT, 16, 128, seed=3)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    out = flash_attn_func(q, k, v)
    out.backward(dout)
    # rows are independent: check both ends against the fp64 reference on those rows alone, and
    # dK/dV as the sum of per-chunk reference gradients
    dk_ref = torch.zeros(k.shape, device="cuda", dtype=torch.float64)
    dv_ref = torch.zeros(v.shape, device="cuda", dtype=torch.float64)
    kf, vf = (x.detach().double().requires_grad_() for x in (k, v))
    for start in range(0, LONG, 2**17):
        rows = slice(start, min(start + 2**17, LONG))
        qf = q.detach()[:, rows].double().requires_grad_()
        ref, _ = attention_ref(qf, kf, vf)
        dq_c, dk_c, dv_c = torch.autograd.grad(ref, (qf, kf, vf), dout[:, rows].double())
        dk_ref += dk_c
        dv_ref += dv_c
        if start == 0 or rows.stop == LONG:
            _close(out[:, rows], ref, f"out rows {rows}")
            _close(q.grad[:, rows], dq_c, f"dq rows {rows}")
    _close(k.grad, dk_ref, "dk")
    _close(v.grad, dv_ref, "dv")


def test_long_key_sequence():
    q, dout = _bf16(1, SHORT, 16, 128, seed=4), _bf16(1, SHORT, 16, 128, seed=5)
    k, v = _bf16(1, LONG, 16, 128, seed=6), _bf16(1, LONG, 16, 128, seed=7)
    for x in (q, k, v):
        x.requires_grad_()
    out = flash_attn_func(q, k, v, causal=True)  # bottom-right aligned: the last keys count
    out.backward(dout)
    for h in (0, 15):  # one head at a time keeps the reference's fp64 scores to 2 GB
        head = slice(h, h + 1)
        qf, kf, vf = (x.detach()[:, :, head].double().requires_grad_() for x in (q, k, v))
        ref, _ = attention_ref(qf, kf, vf, causal=True)
        grads = torch.autograd.grad(ref, (qf, kf, vf), dout[:, :, head].double())
        _close(out[:, :, head], ref, f"out head {h}")
        for name, x, g in zip(("dq", "dk", "dv"), (q, k, v), grads):
            _close(x.grad[:, -4096:, head], g[:, -4096:], f"{name} head {h} (last rows)")


def test_long_dense_kv_cache():
    cache_len = 2**21 + 384  # rows of 8 x 128 = 1024 elements
    k_cache, v_cache = _bf16(1, cache_len, 8, 128, seed=8), _bf16(1, cache_len, 8, 128, seed=9)
    q = _bf16(1, 1, 32, 128, seed=10)
    seqlens = torch.tensor([cache_len], dtype=torch.int32, device="cuda")
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
    for hk in (0, 7):  # query heads 4 hk .. 4 hk + 3 share K/V head hk
        heads = slice(4 * hk, 4 * hk + 4)
        ref, _ = attention_ref(q[:, :, heads], k_cache[:, :, hk:hk + 1], v_cache[:, :, hk:hk + 1])  # fp64
        _close(out[:, :, heads], ref, f"decode K/V head {hk}")
