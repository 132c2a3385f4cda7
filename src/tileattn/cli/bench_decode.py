"""`tileattn bench --decode`: KV-cache decode bandwidth against SDPA's kernels.

One new query token per sequence, bf16. Two sets of shapes: 32 query heads sharing 8 K/V heads
of dim 128 in flash-attn's (batch, seqlen, heads, dim) cache, dense and paged (issue #4's
table); and Phi-2's 32 heads of dim 80 (no GQA) in transformers' (batch, heads, seqlen, dim)
cache at the lengths `tileattn generate` decodes with (a 2k or 16k prompt plus 256 new tokens).
Bandwidth = bytes of K and V read / time. On the GPU every implementation is timed inside a CUDA
graph (triton.testing.do_bench_cudagraph) so launch overhead doesn't hide the memory time, and
consecutive calls read different copies of the cache, enough of them to hold twice the L2 cache,
as a model's layers do: a 1 x 8k cache (34 MB) replayed alone sits partly in an H100's 50 MB L2.
Implementations are timed in turn, ``rounds`` times, and each reports its median, so a gap
smaller than the run-to-run spread shows as such in the log. "heuristic splits" is tileattn with
the split count the rule alone picks, beside the default that times it against other counts.
The CPU runs toy shapes so the command itself is tested.

``tileattn bench --paged-varlen`` times flash_attn_varlen_func's paged cache (``block_table``):
packed new queries of each sequence (one token each, or a causal chunk of a prefill) over its
cached keys in shuffled pages (256 and 16 rows), beside flash_attn_with_kvcache on the same
pages and the dense varlen kernel on the same keys packed; and prefill chunks over a dense cache
through flash_attn_with_kvcache beside flash_attn_func on the same keys.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..api import flash_attn_func
from ..kvcache import flash_attn_with_kvcache
from ..varlen import flash_attn_varlen_func
from .rounds import time_or_none, timed_rounds


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen: int
    heads: int
    heads_kv: int
    head_dim: int
    transformers_layout: bool  # the cache is (batch, heads_kv, seqlen, dim), seen through a transpose


GQA = [Case(b, s, 32, 8, 128, False) for b, s in [(1, 8192), (1, 65536), (8, 8192), (32, 4096), (64, 16384)]]
PHI2 = [Case(b, s, 32, 32, 80, True) for b, s in [(1, 2304), (1, 8192), (1, 16640), (8, 2304)]]
TOY = [Case(1, 96, 4, 2, 32, False), Case(2, 48, 2, 2, 80, True)]
IMPLS = ["tileattn", "tileattn, heuristic splits", "sdpa-flash", "sdpa-cudnn"]


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


def _cache(case: Case, dtype, device):
    shape = (case.batch, case.heads_kv, case.seqlen, case.head_dim)
    k, v = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
    if case.transformers_layout:
        return k.transpose(1, 2), v.transpose(1, 2)
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def l2_bytes(device) -> int:
    """The GPU's L2 cache size (0 on the CPU)."""
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def copies_past_l2(nbytes: int, device) -> int:
    """How many copies of an operand of nbytes hold twice the GPU's L2, so that timing them in
    turn reads memory, as a model's layers do (1 on the CPU and for large operands, at most 16)."""
    return max(1, min(16, -(-2 * l2_bytes(device) // nbytes)))


def _copies(case: Case, dtype, device) -> int:
    """How many caches of this case hold twice the GPU's L2."""
    return copies_past_l2(2 * case.batch * case.seqlen * case.heads_kv * case.head_dim * torch.finfo(dtype).bits // 8,
                          device)


def _rotating(call, inputs: list):
    """fn() calling call(*inputs[i]) for i = 0, 1, ... in turn: a CUDA graph captured from
    repeated fn() calls reads each copy in turn, not one copy out of L2."""
    turn = itertools.cycle(inputs)
    return lambda: call(*next(turn))


def decode_bench(device, log, timer, page_sizes=(16, 256), cases=None, rounds: int = 3) -> list[tuple]:
    """Rows (case, layout, {impl: TB/s}); dense rows compare SDPA flash and cuDNN; timer(fn) -> ms."""
    from ..kernels.decode import choose_splits

    gpu = device.type == "cuda"
    cases = cases if cases is not None else (GQA + PHI2 if gpu else TOY)
    dtype = torch.bfloat16 if gpu else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in cases:
        q = torch.randn(case.batch, 1, case.heads, case.head_dim, dtype=dtype, device=device)
        caches = [_cache(case, dtype, device) for _ in range(_copies(case, dtype, device))]
        k_cache, v_cache = caches[0]
        lens = torch.full((case.batch,), case.seqlen, dtype=torch.int32, device=device)
        tbytes = 2 * k_cache.numel() * k_cache.element_size() / 1e12
        ours = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
        heuristic = choose_splits(case.batch * case.heads_kv, case.seqlen, device)
        impls = {"tileattn": _rotating(lambda k, v: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens), caches),
                 "tileattn, heuristic splits": _rotating(lambda k, v: flash_attn_with_kvcache(
                     q, k, v, cache_seqlens=lens, num_splits=heuristic), caches)}
        for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
            fn = _sdpa(backend)
            with contextlib.suppress(Exception):
                diff = (fn(q, k_cache, v_cache).transpose(1, 2).float() - ours.float()).abs().max().item()
                log(f"   {name} vs tileattn max |diff| {diff:.2e}")
            impls[name] = _rotating(lambda k, v, fn=fn: fn(q, k, v), caches)
        speeds = {n: tbytes / (ms / 1e3) if ms else None for n, ms in timed_rounds(timer, impls, rounds, log).items()}
        layout = "transformers" if case.transformers_layout else "dense"
        rows.append((case, layout, speeds))
        log(f"   {case} ({heuristic} heuristic splits, {len(caches)} copies): "
            + ", ".join(f"{n} {_fmt(s)} TB/s" for n, s in speeds.items()))
        for page_size in page_sizes if not case.transformers_layout else ():
            if case.seqlen % page_size:
                continue
            pages = [_paged(k, v, page_size, gen) for k, v in caches]
            k_pages, v_pages, table = pages[0]
            paged_out = flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=lens, block_table=table)
            if not torch.allclose(paged_out.float(), ours.float(), atol=1e-2):
                raise AssertionError(f"paged (page {page_size}) and dense decode disagree at {case}")
            paged = _rotating(lambda k, v, table: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens,
                                                                           block_table=table), pages)
            ms = timed_rounds(timer, {"tileattn": paged}, rounds, log)["tileattn"]
            speed = tbytes / (ms / 1e3) if ms else None
            rows.append((case, f"paged {page_size}", {"tileattn": speed}))
            log(f"   {case} paged {page_size}: tileattn {_fmt(speed)} TB/s")
    return rows


def _fmt(x) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"  # the CPU's toy shapes read well under 0.01 TB/s


def decode_table(rows) -> list[str]:
    lines = ["Decode, one query token: K+V bytes read / time, TB/s (CUDA-graph timing on the GPU, consecutive "
             "calls on copies of the cache that hold twice the L2; the median of rounds taken in turn). Layout: "
             "dense and paged caches in flash-attn's (batch, seqlen, heads, dim) order, transformers' "
             "(batch, heads, seqlen, dim) seen through a transpose:", "",
             "| batch | cache length | heads (K/V) | head dim | layout | " + " | ".join(IMPLS)
             + " | tileattn / cuDNN |",
             "|---|---|---|---|---|" + "---|" * (len(IMPLS) + 1)]
    for case, layout, speeds in rows:
        ours, cudnn = speeds.get("tileattn"), speeds.get("sdpa-cudnn")
        ratio = f"{ours / cudnn:.2f}" if ours and cudnn else "—"
        lines.append(f"| {case.batch} | {case.seqlen} | {case.heads} ({case.heads_kv}) | {case.head_dim} | {layout} | "
                     + " | ".join(_fmt(speeds.get(n)) for n in IMPLS) + f" | {ratio} |")
    return lines + [""]


# (sequences, new queries each, cached keys each incl. the new ones), 32 query / 8 K/V heads of dim 128
PACKED = [(8, 1, 8192), (4, 512, 4096), (2, 2048, 8192)]
PACKED_TOY = [(3, 1, 64), (2, 17, 48)]
PAGE_SIZES, PAGE_SIZES_TOY = (256, 16), (16,)
PACKED_IMPLS = ["varlen, paged", "kvcache, paged", "varlen, packed K/V"]
# prefill chunks over a dense cache: (batch, new, keys, heads, heads_kv, head_dim)
CHUNKS = [(4, 512, 4096, 32, 8, 128), (1, 1024, 8192, 32, 32, 80)]
CHUNKS_TOY = [(2, 40, 64, 4, 2, 32)]
CHUNK_IMPLS = ["kvcache, dense", "flash_attn_func"]


def check_agrees(out: torch.Tensor, ref: torch.Tensor, name: str, reference: str, where) -> None:
    """A benchmarked implementation's output must match the reference one's before it is timed."""
    diff = (out.float().reshape(ref.shape) - ref.float()).abs().max().item()
    if diff > 2e-2:
        raise AssertionError(f"{name} differs from {reference} by {diff:.2e} at {where}")


def _checked_times(impls: dict, reference: str, timer, where) -> dict:
    """{impl: ms}, each implementation first checked against the reference one's output."""
    ref = impls[reference]().float()
    for name, fn in impls.items():
        check_agrees(fn(), ref, name, reference, where)
    return {name: time_or_none(timer, fn) for name, fn in impls.items()}


def _causal_tflops(batch, new, keys, heads, dim) -> float:
    """TFLOP of causal attention of each sequence's new queries (its last keys) over its keys."""
    pairs = batch * (new * (keys - new) + new * (new + 1) // 2)
    return 4 * dim * heads * pairs / 1e12


def packed_paged_bench(device, log, timer) -> list[tuple]:
    """Rows ((batch, new, keys, page size), {impl: ms}, tflops, K+V TB) for packed queries over
    paged keys; causal, bottom-right aligned (the new queries are each sequence's last keys)."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    heads, heads_kv, dim = (32, 8, 128) if gpu else (4, 2, 32)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for page_size in PAGE_SIZES if gpu else PAGE_SIZES_TOY:
        for batch, new, keys in PACKED if gpu else PACKED_TOY:
            q = torch.randn(batch * new, heads, dim, dtype=dtype, device=device)
            k_cache, v_cache = (torch.randn(batch, keys, heads_kv, dim, dtype=dtype, device=device) for _ in range(2))
            k_pages, v_pages, table = _paged(k_cache, v_cache, page_size, gen)
            cu_q = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=device)
            cu_k = torch.arange(0, batch * keys + 1, keys, dtype=torch.int32, device=device)
            lens = torch.full((batch,), keys, dtype=torch.int32, device=device)
            k_packed, v_packed = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
            impls = {
                "varlen, paged": lambda: flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, new, keys,
                                                                causal=True, block_table=table),
                "kvcache, paged": lambda: flash_attn_with_kvcache(q.view(batch, new, heads, dim), k_pages, v_pages,
                                                                  cache_seqlens=lens, block_table=table, causal=True),
                "varlen, packed K/V": lambda: flash_attn_varlen_func(q, k_packed, v_packed, cu_q, cu_k, new, keys,
                                                                     causal=True),
            }
            times = _checked_times(impls, "varlen, packed K/V", timer, (batch, new, keys, page_size))
            rows.append(((batch, new, keys, page_size), times, _causal_tflops(batch, new, keys, heads, dim),
                         2 * k_cache.numel() * k_cache.element_size() / 1e12))
            log(f"   packed {batch} x {new} over {keys} keys, pages of {page_size}: " + ", ".join(
                f"{n} {_fmt(ms)} ms" for n, ms in times.items()))
    return rows


def dense_chunk_bench(device, log, timer) -> list[tuple]:
    """Rows (case, {impl: ms}, tflops) for prefill chunks over a dense cache: flash_attn_with_kvcache
    with the new tokens already cached, against flash_attn_func on the same keys; causal."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    for case in CHUNKS if gpu else CHUNKS_TOY:
        batch, new, keys, heads, heads_kv, dim = case
        q = torch.randn(batch, new, heads, dim, dtype=dtype, device=device)
        k_cache, v_cache = (torch.randn(batch, keys, heads_kv, dim, dtype=dtype, device=device) for _ in range(2))
        lens = torch.full((batch,), keys, dtype=torch.int32, device=device)
        impls = {
            "kvcache, dense": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True),
            "flash_attn_func": lambda: flash_attn_func(q, k_cache, v_cache, causal=True),
        }
        times = _checked_times(impls, "flash_attn_func", timer, case)
        rows.append((case, times, _causal_tflops(batch, new, keys, heads, dim)))
        log(f"   chunk {batch} x {new} over {keys} keys, {heads}/{heads_kv} heads d{dim}: " + ", ".join(
            f"{n} {_fmt(ms)} ms" for n, ms in times.items()))
    return rows


def _ms_and_rate(ms, rate) -> str:
    """"ms (rate(ms))", or — where the implementation refused the shape (ms None)."""
    return "—" if ms is None else f"{ms:.3f} ({rate(ms)})"


def packed_table(rows) -> list[str]:
    lines = ["Packed queries over a paged cache (shuffled pages), causal, 32 query / 8 K/V heads of dim 128: ms, and "
             "TB/s (K+V bytes / time) for one new token, TFLOP/s for prefill chunks:", "",
             "| sequences | new queries | keys | pages | " + " | ".join(PACKED_IMPLS) + " |",
             "|---|---|---|---|" + "---|" * len(PACKED_IMPLS)]
    for (batch, new, keys, page_size), times, tflops, tbytes in rows:
        def rate(ms):
            return f"{tbytes / (ms / 1e3):.2f} TB/s" if new == 1 else f"{tflops / (ms / 1e3):.0f} TFLOP/s"
        lines.append(f"| {batch} | {new} | {keys} | {page_size} | "
                     + " | ".join(_ms_and_rate(times.get(n), rate) for n in PACKED_IMPLS) + " |")
    return lines + [""]


def chunk_table(rows) -> list[str]:
    lines = ["Prefill chunks over a dense cache (the new tokens already cached), causal: ms (TFLOP/s):", "",
             "| batch | new | keys | heads (K/V) | head dim | " + " | ".join(CHUNK_IMPLS) + " |",
             "|---|---|---|---|---|" + "---|" * len(CHUNK_IMPLS)]
    for (batch, new, keys, heads, heads_kv, dim), times, tflops in rows:
        cells = [_ms_and_rate(times.get(n), lambda ms: f"{tflops / (ms / 1e3):.0f} TFLOP/s") for n in CHUNK_IMPLS]
        lines.append(f"| {batch} | {new} | {keys} | {heads} ({heads_kv}) | {dim} | " + " | ".join(cells) + " |")
    return lines + [""]
