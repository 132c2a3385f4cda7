"""flash_attn_varlen_func against the fp64 oracle applied sequence by sequence."""

import pytest
import torch

from tileattn import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func
from tileattn.reference import attention_ref

from .helpers import DEVICE

# (query lengths, key lengths): singles, primes, empty sequences inside the batch, Sq != Sk both ways
LENGTHS = {
    "same": ([1, 7, 113, 64], [1, 7, 113, 64]),
    "q_shorter": ([1, 3, 0, 37], [5, 67, 4, 37]),
    "k_shorter": ([31, 2, 70, 5], [7, 0, 41, 5]),
}


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _reference(q, k, v, cu_q, cu_k, causal, dout):
    """fp64 out, lse and grads, one sequence at a time."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    outs, lses = [], []
    bounds = zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])
    for qs, qe, ks, ke in bounds:
        o, lse = attention_ref(leaves[0][None, qs:qe], leaves[1][None, ks:ke], leaves[2][None, ks:ke], causal=causal)
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out, torch.cat(lses, dim=1), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=list(LENGTHS))
def test_varlen_matches_per_sequence_reference(backend, lengths, causal, dtype):
    lq, lk = LENGTHS[lengths]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), 4, 40, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(sum(lk), 2, 40, device=DEVICE, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lq), max(lk), causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, cu_q, cu_k, causal, dout)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert lse.shape == (4, sum(lq))
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=4 * tol, rtol=4 * tol, msg=f"d{name}")


def test_packed_variants_match(backend):
    lengths = [5, 1, 12]
    cu = _cu(lengths)
    qkv = torch.randn(sum(lengths), 3, 2, 16, device=DEVICE)
    ref = flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 12, 12, causal=True)
    torch.testing.assert_close(flash_attn_varlen_qkvpacked_func(qkv, cu, 12, causal=True), ref, atol=0, rtol=0)
    out = flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 12, 12, causal=True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def _args(**over):
    q = torch.randn(10, 2, 8, device=DEVICE)
    args = dict(q=q, k=q, v=q, cu_seqlens_q=_cu([4, 6]), cu_seqlens_k=_cu([4, 6]), max_seqlen_q=6, max_seqlen_k=6)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in over.items()})
    return args


BAD = {
    "q_rank4": (dict(q=torch.randn(1, 10, 2, 8)), ValueError, r"q must have 3 dims \(total_tokens, heads, head_dim\)"),
    "cu_int64": (dict(cu_seqlens_q=_cu([4, 6]).long()), TypeError, "cu_seqlens_q must be int32"),
    "cu_2d": (dict(cu_seqlens_k=_cu([4, 6])[None]), ValueError, "cu_seqlens_k must be 1-D"),
    "cu_lengths_differ": (dict(cu_seqlens_k=_cu([4, 3, 3])), ValueError, "must have the same length"),
    "cu_decreasing": (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                           cu_seqlens_k=_cu([2, 4, 4])), ValueError, "never decrease"),
    "cu_not_from_zero": (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "start at 0"),
    "cu_wrong_total": (dict(cu_seqlens_k=_cu([4, 5])), ValueError, "must end at the packed length 10, got 9"),
    "max_too_small": (dict(max_seqlen_q=5), ValueError, r"max_seqlen_q=5 is shorter than the longest sequence \(6\)"),
    "max_not_int": (dict(max_seqlen_k=6.0), TypeError, "max_seqlen_k must be a non-negative int"),
    "paged_unbuilt": (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), NotImplementedError, "block_table"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_varlen_input_is_rejected(case):
    over, exc, message = BAD[case]
    with pytest.raises(exc, match=message):
        flash_attn_varlen_func(**_args(**over))
