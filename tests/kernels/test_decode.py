"""The Triton decode launcher directly: split keys and their merge, with poisoned outputs."""

import importlib

import pytest
import torch

from tileattn.kernels.config import configs, head_blocks, use_tma
from tileattn.kernels.decode import _select, choose_splits, decode
from tileattn.reference import attention_ref
from tileattn.testing import Check, _max_err, _rounding_atol

from ..helpers import DEVICE

SPLITS = [1, 3, 16]


@pytest.mark.parametrize("splits", SPLITS, ids=[f"splits{s}" for s in SPLITS])
@pytest.mark.parametrize("head_dim", [64, 80], ids=["d64", "d80"])
def test_merged_splits_write_every_element(splits, head_dim):
    """Lengths 0 and 1 give splits without keys; 16 splits of 100 keys leave some empty too.
    A second launch gives the same bits."""
    gen = torch.Generator().manual_seed(0)
    batch, seqlen_q, heads, heads_kv, capacity = 3, 2, 4, 2, 100
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen).to(DEVICE)
    k_cache, v_cache = (torch.randn(batch, capacity, heads_kv, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    seqlens = torch.tensor([100, 0, 1], dtype=torch.int32, device=DEVICE)
    results = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((batch, heads, seqlen_q), float("nan"), device=DEVICE)
        decode(q, k_cache, v_cache, seqlens, head_dim**-0.5, causal=False, num_splits=splits, out=out, lse=lse)
        assert not out.isnan().any() and not lse.isnan().any()
        results.append((out, lse))
    for b, n in enumerate(seqlens.tolist()):
        ref_out, ref_lse = attention_ref(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        torch.testing.assert_close(results[0][0][b : b + 1].double(), ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(results[0][1][b : b + 1].double(), ref_lse, atol=2e-5, rtol=2e-5)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_a_window_that_cuts_nothing_is_dropped(launch_flags):
    """Against the cache's capacity: left = capacity - 1 and right = Sq - 1 reach every slot of
    any fill, so the kernel runs without the window switch; one slot shorter it keeps it. Both
    ways each sequence gets the oracle's answer over its own keys."""
    flags = launch_flags("tileattn.kernels.decode", "_decode")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 32, generator=gen).to(DEVICE)
    k_cache, v_cache = (torch.randn(2, 100, 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    seqlens = torch.tensor([100, 40], dtype=torch.int32, device=DEVICE)
    for window, cuts in (((99, 2), False), ((98, 2), True), ((99, 1), True)):
        flags.clear()
        out, lse = decode(q, k_cache, v_cache, seqlens, 0.2, causal=False, window_size=window, num_splits=2)
        assert [f["WINDOW"] for f in flags] == [cuts], window
        for b, n in enumerate(seqlens.tolist()):
            ref_out, ref_lse = attention_ref(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], 0.2,
                                             window_size=window)
            torch.testing.assert_close(out[b : b + 1].double(), ref_out, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(lse[b : b + 1].double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_split_counts_fill_at_most_a_wave():
    """A dense cache's splits never exceed one program per SM, a paged cache's two (more
    programs than that left a tail: BENCHMARKS.md), nor cut a split below 192 keys (512
    paged); the CPU stands in for 8 SMs."""
    sms = 8
    for programs in (1, 2, 3, 5, 8, 20):
        for capacity in (16, 511, 1024, 4000, 65536):
            for paged, per_sm in ((False, 1), (True, 2)):
                splits = choose_splits(programs, capacity, torch.device("cpu"), paged)
                assert splits >= 1
                if splits > 1:
                    min_keys = 512 if paged else 192
                    assert programs * splits <= per_sm * sms, (programs, capacity)
                    assert capacity / (splits - 1) > min_keys, (programs, capacity)
    # a short cache still spreads over the SMs: one program, 2304 slots -> 8 splits of 288 keys
    assert choose_splits(1, 2304, torch.device("cpu")) == sms


def test_tuned_split_count_is_the_fastest_candidate_over_two_rounds(monkeypatch):
    """Candidates are the heuristic's count, half, twice and four times it (capped), each timed
    in two rounds; the fastest best-of-two is remembered per key (one slow reading, as when other
    work shares the GPU, does not decide), and a CUDA-graph capture (where nothing can be timed)
    falls back to the heuristic without remembering it."""
    decode_module = importlib.import_module("tileattn.kernels.decode")
    monkeypatch.setattr(decode_module, "_TUNED_SPLITS", {})
    timed = []
    rounds = [{2: 3.0, 4: 2.0, 8: 9.0, 16: 1.7}, {2: 3.0, 4: 2.0, 8: 1.5, 16: 1.7}]  # 8 disturbed once

    def time_splits(splits):
        timed.append(splits)
        return rounds[(len(timed) - 1) // 4][splits]

    assert decode_module.tuned_splits("a", 4, time_splits) == 8
    assert timed == [2, 4, 8, 16] * 2
    assert decode_module.tuned_splits("a", 4, time_splits) == 8 and len(timed) == 8
    top = decode_module.MAX_SPLITS
    decode_module.tuned_splits("b", top, lambda s: timed.append(s) or 1.0)
    assert timed[8:] == [top // 2, top] * 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert decode_module.tuned_splits("c", 4, time_splits) == 4 and "c" not in decode_module._TUNED_SPLITS


def test_split_key_tells_cache_layouts_apart_but_not_capacities_in_one_bucket():
    """The best split count moved with the cache's dim order (BENCHMARKS.md): flash-attn's
    (B, S, H, D) and transformers' (B, H, S, D) seen as (B, S, H, D) get separate entries.
    Capacity counts by its power-of-two bucket, as the tile autotuner's key does, so 1100 and
    2000 slots share one entry (a new bucket is timed anew)."""
    decode_module = importlib.import_module("tileattn.kernels.decode")
    q = torch.randn(1, 1, 4, 16)

    def key(cache):
        return decode_module._split_key(q, cache, cache.shape[1], False, False)

    flash = torch.randn(1, 2000, 2, 16)
    transformers = torch.randn(1, 2, 2000, 16).transpose(1, 2)
    assert key(flash) != key(transformers)
    assert key(flash) == key(torch.randn(1, 1100, 2, 16))
    assert key(flash) != key(torch.randn(1, 2100, 2, 16))


@pytest.mark.parametrize("variant", ["plain", "window_softcap_alibi_sink"])
@pytest.mark.parametrize("splits", [1, 2, 3, 7], ids=lambda s: f"splits{s}")
def test_packed_queries_over_pages(splits, variant):
    """flash_attn_varlen_func's paged path: packed queries (an empty sequence, a single token, a
    sequence with more queries than keys) over shuffled pages, NaN-poisoned outputs, each
    split count against the oracle per sequence. Sequence b's keys are its pages' first
    cu_k[b + 1] - cu_k[b] positions."""
    gen = torch.Generator().manual_seed(3)
    lq, lk, heads, heads_kv, dim, page = [3, 0, 17, 9], [20, 5, 33, 4], 4, 2, 32, 16
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for n in (lq, lk))
    q = torch.randn(sum(lq), heads, dim, generator=gen).to(DEVICE)
    pages = torch.randperm(12, generator=gen).view(4, 3).to(torch.int32).to(DEVICE)
    k_cache, v_cache = (torch.randn(12, page, heads_kv, dim, generator=gen).to(DEVICE) for _ in range(2))
    extra = {}
    if variant != "plain":
        extra = dict(window_size=(6, 2), softcap=3.0, alibi_slopes=torch.rand(4, heads, generator=gen).to(DEVICE),
                     learnable_sink=torch.randn(heads, generator=gen).to(DEVICE))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((heads, sum(lq)), float("nan"), device=DEVICE)
    decode(q, k_cache, v_cache, cu_k, 0.3, True, block_table=pages, num_splits=splits, out=out, lse=lse,
           cu_seqlens_q=cu_q, max_seqlen_q=max(lq), **extra)
    assert not out.isnan().any() and not lse.isnan().any()
    for b in range(4):
        qs, qe, n = cu_q[b].item(), cu_q[b + 1].item(), lk[b]
        k, v = (c[pages[b].long()].flatten(0, 1)[None, :n] for c in (k_cache, v_cache))
        ref_extra = dict(extra)
        if "alibi_slopes" in extra:
            ref_extra["alibi_slopes"] = extra["alibi_slopes"][b]
        ref_out, ref_lse = attention_ref(q[None, qs:qe], k, v, 0.3, causal=True, **ref_extra)
        torch.testing.assert_close(out[qs:qe].double(), ref_out[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[:, qs:qe].double(), ref_lse[0], atol=2e-5, rtol=2e-5)


CACHES = {"dense": None, "pages128": 128, "pages16": 16}


@pytest.mark.parametrize("cache", CACHES, ids=list(CACHES))
@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
def test_many_query_rows_take_tall_tiles(launch_flags, monkeypatch, splits, cache):
    """A prefill chunk over a cache (70 new tokens x a group of 2 = 140 (query, head) rows) runs
    128-row tiles in bf16, the second tile partly past the rows, with K/V through TMA where
    every key tile lies in one page (dense, pages of 128; not 16) and the device takes TMA
    (use_tma: the interpreter, an sm_90+ GPU at head dim 128); fp32 keeps 64-row pointer tiles.
    Slots past each sequence hold NaN, outputs are poisoned; against the fp64 oracle per
    sequence within 2x PyTorch's own error. Eight SMs on any device, so the 8 tall programs
    fill a wave (the rule's other condition)."""
    monkeypatch.setattr(importlib.import_module("tileattn.kernels.decode"), "_sms", lambda device: 8)
    flags = launch_flags("tileattn.kernels.decode", "_decode")
    gen = torch.Generator().manual_seed(5)
    seqlen_q, heads, heads_kv, dim, capacity = 70, 4, 2, 128, 256  # TMA's head dim on an H100 too
    seqlens = torch.tensor([200, 70], dtype=torch.int32, device=DEVICE)
    page = CACHES[cache]
    variant = dict(causal=True, window_size=(90, 0), softcap=4.0)
    for dtype, rows in ((torch.bfloat16, 128), (torch.float32, 64)):
        q = torch.randn(2, seqlen_q, heads, dim, generator=gen).to(DEVICE, dtype)
        k_cache, v_cache = (torch.randn(2, capacity, heads_kv, dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
        for b, n in enumerate(seqlens.tolist()):
            k_cache[b, n:], v_cache[b, n:] = float("nan"), float("nan")
        paged = {}
        k_in, v_in = k_cache, v_cache
        if page is not None:  # the same slots in shuffled pages
            count = capacity // page
            order = torch.randperm(2 * count, generator=gen)
            table = order.view(2, count).to(torch.int32).to(DEVICE)
            k_in, v_in = (torch.empty(2 * count, page, heads_kv, dim, dtype=dtype, device=DEVICE) for _ in range(2))
            k_in[order.to(DEVICE)] = k_cache.reshape(2 * count, page, heads_kv, dim)
            v_in[order.to(DEVICE)] = v_cache.reshape(2 * count, page, heads_kv, dim)
            paged = dict(block_table=table)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((2, heads, seqlen_q), float("nan"), device=DEVICE)
        flags.clear()
        decode(q, k_in, v_in, seqlens, dim**-0.5, num_splits=splits, out=out, lse=lse, **variant, **paged)
        tma = rows == 128 and page != 16 and use_tma(head_blocks(dim), k_in, v_in)
        assert [(f["BLOCK_M"], f["TMA"]) for f in flags] == [(rows, tma)]
        assert not out.isnan().any() and not lse.isnan().any()
        for b, n in enumerate(seqlens.tolist()):
            kv = (k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
            ref_out, ref_lse = attention_ref(q[b : b + 1], *kv, dim**-0.5, **variant)
            low_out, low_lse = attention_ref(q[b : b + 1], *kv, dim**-0.5, upcast=False, **variant)
            for name, ours, low, ref in (("out", out[b : b + 1], low_out, ref_out),
                                         ("lse", lse[b : b + 1], low_lse, ref_lse)):
                check = Check(f"{name} {dtype}", _max_err(ours, ref), _max_err(low, ref), _rounding_atol(ref, dtype))
                assert check.ok, str(check)


def test_tall_tiles_only_where_they_fill_a_wave():
    """128-row tiles for >= 128 rows in fp16/bf16 up to head dim 128 when their programs fill
    the SMs (the CPU stands in for 8); else at most 64 rows, at least 16."""
    decode_module = importlib.import_module("tileattn.kernels.decode")
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert decode_module._block_rows(1024, 1, 128, bf16) == 128  # 8 tiles of one sequence's rows
    assert decode_module._block_rows(256, 3, 64, bf16) == 64  # 6 tall programs for 8 SMs
    assert decode_module._block_rows(256, 4, 80, bf16) == 128
    assert decode_module._block_rows(1024, 8, 128, fp32) == 64
    assert decode_module._block_rows(1024, 8, 256, bf16) == 64
    assert decode_module._block_rows(4, 8, 128, bf16) == 16
    assert decode_module._block_rows(40, 8, 128, bf16) == 64


@pytest.mark.parametrize("splits", [1, 3], ids=lambda s: f"splits{s}")
def test_bounded_softcap_splits_and_sinks(launch_flags, splits):
    """bf16 with a softcap of 50 shifts scores by a constant instead of a running max (BOUNDED,
    see test_forward's bounded tests); each split's partial (max, sum) then carries the shift,
    which the merge and the sink (split 0 only) must see like any max. Every q.k negative so the
    capped scores sit near -50, where a shift of the cap itself would leave p subnormal (about
    2**-139; the GPU's exp2 flushes those to 0, the interpreter's does not); sequences of 37, 0
    and 1 keys; poisoned outputs; the 2x rule per sequence."""
    flags = launch_flags("tileattn.kernels.decode", "_decode")
    gen = torch.Generator().manual_seed(7)
    batch, seqlen_q, heads, heads_kv, dim, capacity, scale = 3, 2, 4, 2, 64, 40, 2.0
    q = torch.randn(batch, seqlen_q, heads, dim, generator=gen).abs().to(DEVICE, torch.bfloat16)
    k_cache = -torch.randn(batch, capacity, heads_kv, dim, generator=gen).abs().to(DEVICE, torch.bfloat16)
    v_cache = torch.randn(batch, capacity, heads_kv, dim, generator=gen).to(DEVICE, torch.bfloat16)
    sink = (torch.randn(heads, generator=gen) * 2).to(DEVICE)
    seqlens = torch.tensor([37, 0, 1], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, heads, seqlen_q), float("nan"), device=DEVICE)
    decode(q, k_cache, v_cache, seqlens, scale, causal=True, num_splits=splits, out=out, lse=lse, softcap=50.0,
           learnable_sink=sink)
    assert [f["BOUNDED"] for f in flags] == [2]  # bf16: half the exponentials by fastmath.exp2_fma
    assert not out.isnan().any() and not lse.isnan().any()
    for b, n in enumerate(seqlens.tolist()):
        kv = (k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        variant = dict(causal=True, softcap=50.0, learnable_sink=sink)
        ref_out, ref_lse = attention_ref(q[b : b + 1], *kv, scale, **variant)
        low_out, low_lse = attention_ref(q[b : b + 1], *kv, scale, upcast=False, **variant)
        for name, ours, low, ref, floor in (("out", out[b : b + 1], low_out, ref_out, torch.bfloat16),
                                            ("lse", lse[b : b + 1], low_lse, ref_lse, torch.float32)):
            check = Check(f"{name} b{b}", _max_err(ours, ref), _max_err(low, ref), _rounding_atol(ref, floor))
            assert check.ok, str(check)


def test_one_warp_configs_serve_only_16_row_tiles():
    """Sixteen rows cannot be split among warps (each warp would compute the whole tile), so
    one-warp programs are tried there; taller tiles split among warps and skip them."""
    listed = configs("decode", 128)
    assert any(c[2] == 1 for c in _select(listed, {"BLOCK_M": 16}))
    taller = _select(listed, {"BLOCK_M": 64})
    assert taller[0] == listed[0] and all(c[2] > 1 for c in taller)
