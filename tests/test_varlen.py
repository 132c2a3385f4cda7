"""flash_attn_varlen_func against the fp64 oracle applied sequence by sequence."""

import pytest
import torch

from tileattn import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func
from tileattn.reference import attention_ref
from tileattn.testing import Check, _rounding_atol

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
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_varlen_input_is_rejected(case):
    over, exc, message = BAD[case]
    with pytest.raises(exc, match=message):
        flash_attn_varlen_func(**_args(**over))


def _pages(k, v, cu_k, page_size, gen):
    """Packed k, v (total_k, H, D) scattered into shuffled pages with spares: (k_pages, v_pages,
    block_table). Entries past a sequence's pages point far outside the cache (never read)."""
    lengths = (cu_k[1:] - cu_k[:-1]).tolist()
    counts = [-(-n // page_size) for n in lengths]
    num_blocks = sum(counts) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(lengths), max(counts, default=0) + 1), 10**6, dtype=torch.int32)
    k_pages, v_pages = (torch.randn(num_blocks, page_size, *k.shape[1:], generator=gen).to(k) for _ in range(2))
    start = 0
    for b, (n, count) in enumerate(zip(lengths, counts)):
        for j in range(count):
            page = order.pop()
            table[b, j] = page
            rows = slice(start + j * page_size, start + min(n, (j + 1) * page_size))
            k_pages[page, : rows.stop - rows.start], v_pages[page, : rows.stop - rows.start] = k[rows], v[rows]
        start += n
    return k_pages, v_pages, table.to(DEVICE)


def _lowp_reference(q, k, v, cu_q, cu_k, causal):
    """PyTorch in q's own dtype, per sequence: the error the 2x rule allows."""
    outs, lses = [], []
    for qs, qe, ks, ke in zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]):
        o, lse = attention_ref(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal=causal, upcast=False)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _within_rule(name, ours, lowp, ref, dtype):
    """tileattn.testing's rule (2x PyTorch's own error plus the dtype's rounding) on one output."""
    def err(x):
        return (x.double() - ref).abs().max().item() if ref.numel() else 0.0

    check = Check(name, err(ours), err(lowp), _rounding_atol(ref, dtype))
    assert check.ok, str(check)


@pytest.mark.parametrize("page_size", [16, 32], ids=["page16", "page32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=list(LENGTHS))
def test_paged_varlen_matches_per_sequence_reference(backend, lengths, causal, dtype, page_size):
    """Keys in shuffled pages read in place (no gradient wanted): out and LSE against the fp64
    oracle per sequence, poisoned-free, within 2x PyTorch's own error in the dtype."""
    gen = torch.Generator().manual_seed(1)
    lq, lk = LENGTHS[lengths]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), 4, 40, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(sum(lk), 2, 40, generator=gen).to(DEVICE, dtype) for _ in range(2))
    k_pages, v_pages, table = _pages(k, v, cu_k, page_size, gen)
    out, lse, _ = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                         return_attn_probs=True, block_table=table)
    ref_out, ref_lse, _ = _reference(q, k, v, cu_q, cu_k, causal, torch.zeros_like(q))
    pt_out, pt_lse = _lowp_reference(q, k, v, cu_q, cu_k, causal)
    assert out.shape == q.shape and lse.shape == (4, sum(lq))
    assert not out.isnan().any()
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    finite = ref_lse > float("-inf")
    _within_rule("out", out, pt_out, ref_out, dtype)
    _within_rule("lse", lse[finite], pt_lse[finite], ref_lse[finite], torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_paged_varlen_gradients_reach_the_pages(backend, causal):
    """With gradients wanted the used pages are gathered: dq and the pages' dk/dv (zero in
    spare pages and rows past each sequence) match the oracle's packed gradients."""
    gen = torch.Generator().manual_seed(2)
    lq, lk = [3, 0, 17, 1], [20, 5, 33, 1]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), 4, 24, generator=gen).to(DEVICE)
    k, v = (torch.randn(sum(lk), 1, 24, generator=gen).to(DEVICE) for _ in range(2))
    k_pages, v_pages, table = _pages(k, v, cu_k, 16, gen)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    leaves = [x.clone().requires_grad_() for x in (q, k_pages, v_pages)]
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lq), max(lk), causal=causal, block_table=table)
    dq, dk_pages, dv_pages = torch.autograd.grad(out, leaves, dout)
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, cu_q, cu_k, causal, dout)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dq.double(), ref_dq, atol=1e-4, rtol=1e-4)
    expect_dk, expect_dv, _ = _pages(ref_dk, ref_dv, cu_k, 16, torch.Generator().manual_seed(2))
    used = torch.zeros(k_pages.shape[:2], dtype=torch.bool, device=DEVICE)
    for b, n in enumerate((cu_k[1:] - cu_k[:-1]).tolist()):
        for j in range(n):
            used[table[b, j // 16], j % 16] = True
    for name, g, rg, pages in (("dk", dk_pages, ref_dk, k_pages), ("dv", dv_pages, ref_dv, v_pages)):
        assert not g[~used].any(), f"{name} outside the used rows"
        packed = torch.cat([g[table[b, : -(-n // 16)].long()].flatten(0, 1)[:n]
                            for b, n in enumerate((cu_k[1:] - cu_k[:-1]).tolist())])
        torch.testing.assert_close(packed.double(), rg, atol=1e-4, rtol=1e-4, msg=name)


def _paged_args(**over):
    q = torch.randn(10, 2, 16, device=DEVICE)
    pages = torch.randn(3, 16, 2, 16, device=DEVICE)
    args = dict(q=q, k=pages, v=pages, cu_seqlens_q=_cu([4, 6]), cu_seqlens_k=_cu([20, 9]), max_seqlen_q=6,
                max_seqlen_k=20, block_table=torch.tensor([[2, 0], [1, 7]], dtype=torch.int32, device=DEVICE))
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in over.items()})
    return args


BAD_PAGED = {
    "k_rank3": (dict(k=torch.randn(48, 2, 16), v=torch.randn(48, 2, 16)), ValueError,
                r"k must have 4 dims \(num_blocks, page_size, heads_kv, head_dim\)"),
    "page_size_24": (dict(k=torch.randn(3, 24, 2, 16), v=torch.randn(3, 24, 2, 16)), ValueError,
                     "page_size .* must be a multiple of 16, got 24"),
    "table_int64": (dict(block_table=torch.tensor([[2, 0], [1, 7]])), TypeError, "block_table must be int32"),
    "table_rows": (dict(block_table=torch.tensor([[2, 0]], dtype=torch.int32)), ValueError,
                   r"block_table must have shape \(2, 2\), got \(1, 2\)"),
    "page_out_of_range": (dict(block_table=torch.tensor([[2, 3], [1, 7]], dtype=torch.int32)), ValueError,
                          r"block_table entries in use must lie in 0\.\.2"),
    "negative_page": (dict(block_table=torch.tensor([[2, 0], [-1, 7]], dtype=torch.int32)), ValueError,
                      "block_table entries in use"),
    "beyond_capacity": (dict(cu_seqlens_k=_cu([33, 9]), max_seqlen_k=33), ValueError,
                        "a sequence of 33 keys exceeds block_table's capacity 2 pages x 16 = 32"),
    "cu_k_decreasing": (dict(cu_seqlens_k=torch.tensor([0, 20, 9], dtype=torch.int32)), ValueError,
                        "never decrease"),
}


@pytest.mark.parametrize("case", BAD_PAGED, ids=list(BAD_PAGED))
def test_bad_paged_varlen_input_is_rejected(case):
    over, exc, message = BAD_PAGED[case]
    with pytest.raises(exc, match=message):
        flash_attn_varlen_func(**_paged_args(**over))


def test_paged_varlen_accepts_any_last_cu_seqlens_k():
    """Paged keys are not packed, so cu_seqlens_k's end need not match k's rows; the good
    arguments above run and a spare table entry (7) past the used pages is never read."""
    out = flash_attn_varlen_func(**_paged_args())
    assert out.shape == (10, 2, 16) and not out.isnan().any()
