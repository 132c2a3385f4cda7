"""flash_attn_with_kvcache against the fp64 oracle applied sequence by sequence."""

from __future__ import annotations

import pytest
import torch

from tileattn import flash_attn_with_kvcache
from tileattn.reference import attention_ref

from .helpers import DEVICE

HEADS, HEADS_KV, DIM = 4, 2, 40
CAPACITY = 96
LENGTHS = [37, 0, 64, 5]  # tokens already cached; 0 = empty sequence


def _rope_ref(x, cos, sin, positions, interleaved):
    """Rotary by its definition, in float64: x (S, H, D), positions (S,)."""
    half = cos.shape[1]
    i = torch.arange(half)
    a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
    c, s = (t[positions].double()[:, None, :].to(x.device) for t in (cos, sin))
    out = x.clone()
    out[..., a] = x[..., a] * c - x[..., b] * s
    out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def _rotary_tables(rotary_dim, seqlen):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


def _paged(k_cache, v_cache, page_size, gen):
    """Scatter dense caches (B, S, H, D) into shuffled pages (with spare ones); returns
    (k_pages, v_pages, block_table)."""
    batch, slots = k_cache.shape[:2]
    per_seq = slots // page_size
    num_blocks = batch * per_seq + 3
    table = torch.randperm(num_blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
    paged = []
    for dense in (k_cache, v_cache):
        pages = torch.zeros(num_blocks, page_size, *dense.shape[2:], dtype=dense.dtype, device=DEVICE)
        pages[table.flatten().to(DEVICE)] = dense.reshape(batch * per_seq, page_size, *dense.shape[2:])
        paged.append(pages)
    return *paged, table.to(torch.int32).to(DEVICE)


def _case(new_len, seqlen_q, rotary, causal, paged, batch_idx, leftpad, dtype=torch.float32, splits=0, variants=None):
    gen = torch.Generator().manual_seed(1)
    batch = len(LENGTHS)
    lens = torch.tensor(LENGTHS, dtype=torch.int32)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q = rand(batch, seqlen_q, HEADS, DIM)
    rows = batch + 2 if batch_idx else batch
    k_cache, v_cache = rand(rows, CAPACITY, HEADS_KV, DIM), rand(rows, CAPACITY, HEADS_KV, DIM)
    k_new, v_new = (rand(batch, new_len, HEADS_KV, DIM) for _ in range(2)) if new_len else (None, None)
    idx = torch.tensor([4, 0, 2, 1], dtype=torch.int32) if batch_idx else torch.arange(batch, dtype=torch.int32)
    pad = torch.tensor([3, 0, 10, 1], dtype=torch.int32) if leftpad else torch.zeros(batch, dtype=torch.int32)
    cos = sin = None
    if rotary:
        cos, sin = _rotary_tables(24, CAPACITY)

    # expected: each sequence's keys after the append, rotary applied, then fp64 attention
    exp_k, exp_v = k_cache.double().clone(), v_cache.double().clone()
    outs, lses = [], []
    for b in range(batch):
        row, start, end = int(idx[b]), int(lens[b]), int(lens[b]) + new_len
        qb = q[b].double()
        if new_len:
            kb = k_new[b].double()
            if rotary:
                positions = torch.arange(start, end)
                kb = _rope_ref(kb, cos.cpu(), sin.cpu(), positions, rotary == "interleaved")
                q_pos = torch.arange(start, start + seqlen_q) if causal else torch.full((seqlen_q,), start)
                qb = _rope_ref(qb, cos.cpu(), sin.cpu(), q_pos, rotary == "interleaved")
            exp_k[row, start:end] = kb.to(dtype).double()
            exp_v[row, start:end] = v_new[b].double()
        ks, vs = exp_k[row, int(pad[b]) : end], exp_v[row, int(pad[b]) : end]
        per_seq = dict(variants or {})
        if per_seq.get("alibi_slopes") is not None:
            per_seq["alibi_slopes"] = per_seq["alibi_slopes"][b]
        o, lse = attention_ref(qb.to(dtype)[None], ks[None], vs[None], causal=causal, **per_seq)
        outs.append(o[0])
        lses.append(lse[0])
    ref_out, ref_lse = torch.stack(outs), torch.stack(lses)

    kwargs = dict(cache_seqlens=lens.to(DEVICE), causal=causal, rotary_cos=cos, rotary_sin=sin,
                  rotary_interleaved=rotary == "interleaved", num_splits=splits, return_softmax_lse=True,
                  **(variants or {}))
    if batch_idx:
        kwargs["cache_batch_idx"] = idx.to(DEVICE)
    if leftpad:
        kwargs["cache_leftpad"] = pad.to(DEVICE)
    if paged:
        k_pages, v_pages, table = _paged(k_cache, v_cache, 16, gen)
        out, lse = flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, block_table=table, **kwargs)
        k_after = k_pages[table.long()].flatten(1, 2)
    else:
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kwargs)
        k_after = k_cache
    return out, lse, ref_out, ref_lse, k_after, exp_k.to(dtype)


DECODE_CASES = {
    "read-only": dict(new_len=0, seqlen_q=1),
    "append1": dict(new_len=1, seqlen_q=1),
    "append3": dict(new_len=3, seqlen_q=3),
    "append3-rotary-interleaved": dict(new_len=3, seqlen_q=3, rotary="interleaved"),
    "append1-rotary-neox": dict(new_len=1, seqlen_q=1, rotary="neox"),
    "append2-batch-idx": dict(new_len=2, seqlen_q=2, batch_idx=True),
    "append1-leftpad": dict(new_len=1, seqlen_q=1, leftpad=True),
}


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=list(DECODE_CASES))
def test_kvcache_matches_reference(backend, case, causal, paged):
    spec = dict(rotary=None, batch_idx=False, leftpad=False) | DECODE_CASES[case]
    if paged and spec["batch_idx"]:
        pytest.skip("cache_batch_idx does not combine with block_table")
    out, lse, ref_out, ref_lse, k_after, exp_k = _case(causal=causal, paged=paged, **spec)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-5, rtol=0)
    # rotary in float32 vs float64-then-rounded: a few ulp apart
    torch.testing.assert_close(k_after.double(), exp_k[: k_after.shape[0]].double(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("filler", [-1, 1000], ids=["minus-one", "past-the-cache"])
def test_kvcache_pages_past_the_fill_are_never_read(backend, filler):
    """Block tables are often padded past each sequence's pages (-1, or whatever was there):
    only the pages holding the cache_seqlens[b] + seqlen_new filled positions are read."""
    gen = torch.Generator().manual_seed(3)
    page, per_seq = 16, 4
    lens = [17, 0, 40]  # + 1 appended: 2, 1 and 3 pages in use
    batch = len(lens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    k_pages, v_pages = rand(batch * per_seq, page, HEADS_KV, DIM), rand(batch * per_seq, page, HEADS_KV, DIM)
    q, k_new, v_new = rand(batch, 1, HEADS, DIM), rand(batch, 1, HEADS_KV, DIM), rand(batch, 1, HEADS_KV, DIM)
    table = torch.arange(batch * per_seq, dtype=torch.int32, device=DEVICE).view(batch, per_seq)
    padded = table.clone()
    for b, n in enumerate(lens):
        padded[b, (n + page) // page:] = filler
    outs = []
    for block_table in (table, padded):
        kc, vc = k_pages.clone(), v_pages.clone()
        outs.append(flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=torch.tensor(lens, dtype=torch.int32,
                                            device=DEVICE), block_table=block_table, causal=True))
    assert torch.equal(outs[0], outs[1])


VARIANTS = {
    "window": dict(window_size=(6, 0)),
    "softcap-alibi": dict(softcap=1.5, alibi_slopes="batch"),
    "window-softcap-alibi": dict(window_size=(20, 0), softcap=2.0, alibi_slopes="batch"),
    "sink-window": dict(window_size=(9, 0), learnable_sink="heads"),
    "negative-scale": dict(softmax_scale=-0.4),  # the kernels fold a positive scale into exp2
    "zero-scale-softcap": dict(softmax_scale=0.0, softcap=2.0),
}


@pytest.mark.parametrize("splits", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
@pytest.mark.parametrize("name", VARIANTS, ids=list(VARIANTS))
def test_kvcache_variants(backend, name, paged, splits):
    variants = dict(VARIANTS[name])
    if variants.get("alibi_slopes") == "batch":
        variants["alibi_slopes"] = torch.rand(len(LENGTHS), HEADS, device=DEVICE) * 0.5 + 0.05
    if variants.get("learnable_sink") == "heads":
        variants["learnable_sink"] = torch.randn(HEADS, device=DEVICE)
    out, lse, ref_out, ref_lse, _, _ = _case(new_len=3, seqlen_q=3, rotary=None, causal=True, paged=paged,
                                             batch_idx=False, leftpad=True, splits=splits, variants=variants)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kvcache_low_precision(backend, dtype):
    out, lse, ref_out, ref_lse, _, _ = _case(new_len=1, seqlen_q=1, rotary="interleaved", causal=True, paged=True,
                                             batch_idx=False, leftpad=False, dtype=dtype)
    tol = 8e-3 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=0)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged16"])
def test_kvcache_split_counts_agree(monkeypatch, paged):
    """Every split count of the kernel merges to the same answer (up to fp32 rounding)."""
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    results = []
    for splits in (1, 2, 3, 7):
        out, lse, ref_out, _, _, _ = _case(new_len=1, seqlen_q=1, rotary=None, causal=True, paged=paged,
                                           batch_idx=False, leftpad=True, splits=splits)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
        results.append((out, lse))
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(lse, results[0][1], atol=1e-6, rtol=0)


def _inputs(batch=2, capacity=32):
    q = torch.randn(batch, 1, 4, 16, device=DEVICE)
    cache = torch.zeros(batch, capacity, 2, 16, device=DEVICE)
    return q, cache, cache.clone()


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


BAD = {
    "seqlens-int64": (lambda q, kc, vc: dict(cache_seqlens=torch.tensor([1, 2], device=DEVICE)), TypeError,
                      "cache_seqlens must be int32"),
    "seqlens-wrong-length": (lambda q, kc, vc: dict(cache_seqlens=_i32([1, 2, 3])), ValueError, "cache_seqlens"),
    "seqlens-beyond-cache": (lambda q, kc, vc: dict(cache_seqlens=_i32([1, 33])), ValueError, "capacity"),
    "new-kv-overflow": (lambda q, kc, vc: dict(cache_seqlens=_i32([1, 31]), k=torch.randn(2, 2, 2, 16, device=DEVICE),
                                               v=torch.randn(2, 2, 2, 16, device=DEVICE)), ValueError, "capacity"),
    "k-without-v": (lambda q, kc, vc: dict(k=torch.randn(2, 1, 2, 16, device=DEVICE)), ValueError, "together"),
    "page-size": (lambda q, kc, vc: dict(block_table=_i32([[0], [1]]), k_cache=torch.zeros(2, 24, 2, 16, device=DEVICE),
                                         v_cache=torch.zeros(2, 24, 2, 16, device=DEVICE)),
                  ValueError, "multiple of 16"),
    "block-out-of-range": (lambda q, kc, vc: dict(block_table=_i32([[0, 1], [2, 9]]), cache_seqlens=_i32([4, 20]),
                                                  k_cache=torch.zeros(4, 16, 2, 16, device=DEVICE),
                                                  v_cache=torch.zeros(4, 16, 2, 16, device=DEVICE)),
                           ValueError, "block_table entries"),
    "batch-idx-range": (lambda q, kc, vc: dict(cache_batch_idx=_i32([0, 5])), ValueError, "cache_batch_idx"),
    "rotary-without-k": (lambda q, kc, vc: dict(rotary_cos=torch.ones(32, 4, device=DEVICE),
                                                rotary_sin=torch.ones(32, 4, device=DEVICE)), ValueError, "need new k"),
    "window-not-pair": (lambda q, kc, vc: dict(window_size=4), ValueError, "window_size must be a pair"),
}


@pytest.mark.parametrize("name", BAD, ids=list(BAD))
def test_kvcache_bad_input(name):
    make, error, match = BAD[name]
    q, kc, vc = _inputs()
    kwargs = make(q, kc, vc)
    kc, vc = kwargs.pop("k_cache", kc), kwargs.pop("v_cache", vc)
    with pytest.raises(error, match=match):
        flash_attn_with_kvcache(q, kc, vc, **kwargs)
