"""Sliding window, softcap and ALiBi, forward and backward, against the fp64 oracle with the
same feature (the 2x-PyTorch-error rule of tileattn.testing)."""

import pytest
import torch

from tileattn import flash_attn_func, flash_attn_varlen_func
from tileattn.reference import attention_ref
from tileattn.testing import check_attention

from .helpers import DEVICE, make_qkv


def _slopes(*shape):
    return torch.rand(*shape, device=DEVICE) * 0.5 + 0.05


# name: (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, variants)
CASES = {
    "window4-causal": (2, 113, 113, 4, 2, 40, True, dict(window_size=(4, 0))),
    "window0-0": (1, 67, 67, 2, 2, 32, False, dict(window_size=(0, 0))),
    "window1-1-sq-lt-sk": (1, 37, 113, 2, 1, 64, False, dict(window_size=(1, 1))),
    "window16-sq-gt-sk": (1, 113, 37, 4, 1, 32, False, dict(window_size=(16, 16))),
    "window-larger-than-seq": (1, 50, 50, 2, 2, 16, True, dict(window_size=(300, 300))),
    "window-left-only": (1, 90, 90, 2, 2, 32, False, dict(window_size=(8, -1))),
    "window-right-only": (1, 90, 90, 2, 2, 32, False, dict(window_size=(-1, 5))),
    "window-skips-tiles": (1, 300, 300, 2, 1, 32, True, dict(window_size=(40, 0))),
    "softcap": (2, 70, 90, 4, 2, 40, False, dict(softcap=1.5)),
    "softcap-causal-d80": (1, 65, 65, 2, 2, 80, True, dict(softcap=0.8)),
    "alibi-heads": (2, 64, 80, 4, 2, 32, True, dict(alibi_slopes="heads")),
    "alibi-batch-heads": (2, 50, 50, 4, 4, 32, False, dict(alibi_slopes="batch")),
    "softcap-alibi": (1, 60, 60, 4, 1, 32, True, dict(softcap=2.0, alibi_slopes="heads")),
    "window-softcap-alibi-gqa": (2, 77, 77, 4, 2, 64, True, dict(window_size=(12, 0), softcap=3.0,
                                                                 alibi_slopes="batch")),
    # causal ALiBi's per-key form shifts each row's max: sinks, empty rows, several query tiles
    "alibi-sink-causal-sq-gt-sk": (1, 150, 90, 4, 2, 32, True, dict(alibi_slopes="heads", learnable_sink="heads")),
    "sink": (2, 70, 90, 4, 2, 40, False, dict(learnable_sink="heads")),
    "sink-causal-sq-gt-sk": (1, 90, 30, 4, 1, 32, True, dict(learnable_sink="heads")),
    "sink-window-gqa": (2, 64, 64, 4, 2, 64, True, dict(window_size=(10, 0), learnable_sink="heads")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_variant_matches_reference(backend, name, dtype):
    batch, sq, sk, heads, heads_kv, dim, causal, variants = CASES[name]
    variants = dict(variants)
    if variants.get("alibi_slopes") == "heads":
        variants["alibi_slopes"] = _slopes(heads)
    elif variants.get("alibi_slopes") == "batch":
        variants["alibi_slopes"] = _slopes(batch, heads)
    if variants.get("learnable_sink") == "heads":
        variants["learnable_sink"] = torch.randn(heads, device=DEVICE) * 2
    q, k, v = make_qkv(batch, sq, sk, heads, heads_kv, dim, dtype=dtype)
    # window (0, 0) at Sq == Sk: each query sees only its own key, p == 1 and the exact dk is 0,
    # which PyTorch's softmax backward hits exactly (g - g); judge the gradients separately
    exact_zero_dk = variants.get("window_size") == (0, 0) and sq == sk
    checks = check_attention(flash_attn_func, q, k, v, causal=causal, backward=not exact_zero_dk, **variants)
    if exact_zero_dk:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attn_func(*leaves, causal=causal, **variants)
        dk = torch.autograd.grad(out, leaves[1], torch.randn_like(out))[0]
        assert dk.abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
    failed = [str(c) for c in checks if not c.ok]
    assert not failed, failed


def test_window_with_empty_rows_outputs_zero(backend):
    """Window (0, 0) with Sq > Sk: the first Sq - Sk queries see no key at all."""
    q, k, v = make_qkv(1, 20, 8, 2, 2, 16)
    out, lse, _ = flash_attn_func(q, k, v, window_size=(0, 0), return_attn_probs=True)
    ref_out, ref_lse = attention_ref(q, k, v, window_size=(0, 0))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    assert (lse[0, :, :12] == float("-inf")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_window_alibi_per_sequence(backend, dtype):
    """Causal fp16 runs ALiBi's per-key form (a shift per row taken out of the LSE), fp32 the
    per-score one; both per packed sequence, with a window, a softcap and rows past 64."""
    lengths_q, lengths_k = [5, 70, 1, 33], [9, 70, 40, 33]
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lengths_q), 4, 32, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(sum(lengths_k), 2, 32, device=DEVICE, dtype=dtype) for _ in range(2))
    slopes = _slopes(4, 4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_varlen_func(*leaves, cu_q, cu_k, 70, 70, causal=True, window_size=(6, 0),
                                         alibi_slopes=slopes, softcap=2.5, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    outs, lses = [], []
    for b in range(4):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        o, ref_lse = attention_ref(ref_leaves[0][None, qs:qe], ref_leaves[1][None, ks:ke],
                                   ref_leaves[2][None, ks:ke], causal=True, window_size=(6, 0), alibi_slopes=slopes[b],
                                   softcap=2.5)
        outs.append(o[0])
        lses.append(ref_lse[0])
    ref_out = torch.cat(outs)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    tol = 2e-5 if dtype == torch.float32 else 4e-3  # test_varlen's tolerances for these dtypes
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), torch.cat(lses, 1).detach(), atol=tol, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=2.5 * tol if dtype == torch.float32 else 4 * tol, rtol=0)


def test_sink_rows_without_keys_output_zero_with_lse_sink(backend):
    """Causal with Sq > Sk: the first queries see no key; with a sink they output 0, LSE = sink."""
    q, k, v = make_qkv(1, 12, 4, 2, 2, 16)
    sink = torch.tensor([0.5, -1.0], device=DEVICE)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, learnable_sink=sink)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, learnable_sink=sink)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
    assert (out[0, :8] == 0).all() and torch.equal(lse[0, :, :8], sink[:, None].expand(2, 8))


def test_varlen_sink_gradient(backend):
    lengths = [5, 40, 0, 17]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lengths), 4, 32, device=DEVICE) for _ in range(3))
    sink = torch.randn(4, device=DEVICE)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    out = flash_attn_varlen_func(*leaves[:3], cu, cu, 40, 40, causal=True, learnable_sink=leaves[3])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, sink)]
    outs = []
    for b in range(len(lengths)):
        s0, s1 = cu[b], cu[b + 1]
        o, _ = attention_ref(*(x[None, s0:s1] for x in ref_leaves[:3]), causal=True, learnable_sink=ref_leaves[3])
        outs.append(o[0])
    ref_grads = torch.autograd.grad(torch.cat(outs), ref_leaves, dout.double())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=5e-5, rtol=0)
