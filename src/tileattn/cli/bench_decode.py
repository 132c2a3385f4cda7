"""`tileattn bench --decode`: KV-cache decode bandwidth against SDPA's kernels.

One new query token per sequence, bf16, 32 query heads sharing 8 K/V heads, head dim 128.
Bandwidth = bytes of K and V read / time. Every implementation is timed inside a CUDA graph
(triton.testing.do_bench_cudagraph) so launch overhead doesn't hide the memory time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..kvcache import flash_attn_with_kvcache

SHAPES = [(1, 8192), (1, 65536), (8, 8192), (32, 4096), (64, 16384)]  # (batch, cache length)
HEADS, HEADS_KV, HEAD_DIM = 32, 8, 128


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attn(q, k_cache, v_cache):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2),
                                                  v_cache.transpose(1, 2), enable_gqa=True)

    return attn


def _paged(k_cache, v_cache, page_size, gen):
    """The same keys and values in shuffled pages: (k_pages, v_pages, block_table)."""
    batch, seqlen = k_cache.shape[:2]
    per_seq = seqlen // page_size
    order = torch.randperm(batch * per_seq, generator=gen).to(k_cache.device)
    paged = []
    for cache in (k_cache, v_cache):
        pages = torch.empty(batch * per_seq, page_size, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
        pages[order] = cache.reshape(batch * per_seq, page_size, *cache.shape[2:])
        paged.append(pages)
    return *paged, order.view(batch, per_seq).to(torch.int32)


def _time_ms(fn) -> float | None:
    import triton.testing

    try:
        fn()
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception:  # a backend that refuses this shape (or GQA) is reported as absent
        return None


def decode_bench(device, log, page_sizes=(16, 256), shapes=SHAPES) -> list[tuple]:
    """Rows (batch, seqlen, layout, {impl: TB/s}); dense rows compare SDPA flash and cuDNN."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch, seqlen in shapes:
        q = torch.randn(batch, 1, HEADS, HEAD_DIM, dtype=dtype, device=device)
        k_cache = torch.randn(batch, seqlen, HEADS_KV, HEAD_DIM, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        lens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        tbytes = 2 * k_cache.numel() * k_cache.element_size() / 1e12
        ours = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
        impls = {"tileattn": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)}
        for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
            fn = _sdpa(backend)
            with contextlib.suppress(Exception):
                diff = (fn(q, k_cache, v_cache).transpose(1, 2).float() - ours.float()).abs().max().item()
                log(f"   {name} vs tileattn max |diff| {diff:.2e}")
            impls[name] = lambda fn=fn: fn(q, k_cache, v_cache)
        speeds = {name: (tbytes / (ms / 1e3) if ms else None) for name, ms in ((n, _time_ms(f))
                                                                             for n, f in impls.items())}
        rows.append((batch, seqlen, "dense", speeds))
        log(f"   B{batch} S{seqlen} dense: " + ", ".join(f"{n} {_fmt(s)} TB/s" for n, s in speeds.items()))
        for page_size in page_sizes:
            k_pages, v_pages, table = _paged(k_cache, v_cache, page_size, gen)
            paged_out = flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=lens, block_table=table)
            if not torch.allclose(paged_out.float(), ours.float(), atol=1e-2):
                raise AssertionError(f"paged (page {page_size}) and dense decode disagree at B{batch} S{seqlen}")
            ms = _time_ms(lambda: flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=lens,
                                                          block_table=table))
            speed = tbytes / (ms / 1e3) if ms else None
            rows.append((batch, seqlen, f"paged {page_size}", {"tileattn": speed}))
            log(f"   B{batch} S{seqlen} paged {page_size}: tileattn {_fmt(speed)} TB/s")
    return rows


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def decode_table(rows) -> list[str]:
    impls = ["tileattn", "sdpa-flash", "sdpa-cudnn"]
    lines = [f"Decode, bf16, one query token, {HEADS} query / {HEADS_KV} K/V heads, head dim {HEAD_DIM}: "
             "K+V bytes read / time, TB/s (CUDA-graph timing):", "",
             "| batch | cache length | layout | " + " | ".join(impls) + " | tileattn / cuDNN |",
             "|---|---|---|" + "---|" * (len(impls) + 1)]
    for batch, seqlen, layout, speeds in rows:
        ours, cudnn = speeds.get("tileattn"), speeds.get("sdpa-cudnn")
        ratio = f"{ours / cudnn:.2f}" if ours and cudnn else "—"
        lines.append(f"| {batch} | {seqlen} | {layout} | " + " | ".join(_fmt(speeds.get(n)) for n in impls)
                     + f" | {ratio} |")
    return lines + [""]
