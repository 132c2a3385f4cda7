"""Argument checks shared by the public functions: clear errors that name the argument."""

from __future__ import annotations

import math
from numbers import Real

import torch

from .layout import pages_in_use

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def check_qkv(q, k, v, rank: int = 4, layout: str = "(batch, seqlen, heads, head_dim)", kv_rank: int | None = None,
              kv_layout: str | None = None) -> None:
    """q, k, v of one dtype and device, compatible heads and head dims; k and v may have their
    own rank and layout (a paged cache's (num_blocks, page_size, heads_kv, head_dim))."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        want, names = (rank, layout) if name == "q" or kv_rank is None else (kv_rank, kv_layout)
        if x.dim() != want:
            raise ValueError(f"{name} must have {want} dims {names}, got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if rank == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    heads, heads_kv = q.shape[-2], k.shape[-2]
    if heads_kv < 1 or heads < 1:
        raise ValueError(f"q and k need at least one head, got heads={heads}, heads_kv={heads_kv}")
    if heads % heads_kv != 0:
        raise ValueError(
            f"number of query heads ({heads}) must be a multiple of the number of key/value heads ({heads_kv})"
        )


def check_features(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, batch: int, heads: int,
                   device, learnable_sink=None) -> tuple[int, int, float]:
    """Checks the attention variants; returns (window_left, window_right, softcap) normalized.
    dropout_p is checked here and drawn by the caller (tileattn.dropout)."""
    if not isinstance(dropout_p, Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and (not isinstance(softmax_scale, Real) or not math.isfinite(softmax_scale)):
        raise TypeError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise ValueError(f"window_size {side} must be an int >= 0, or -1 for unbounded, got {w!r}")
    if not isinstance(softcap, Real) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a torch.Tensor, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got "
                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.stride(-1) != 1:
            raise ValueError("alibi_slopes must be contiguous in its last (heads) dim")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes must be on q's device {device}, got {alibi_slopes.device}")
    if learnable_sink is not None:
        if not isinstance(learnable_sink, torch.Tensor) or not learnable_sink.is_floating_point():
            raise TypeError(f"learnable_sink must be a floating-point torch.Tensor, got {learnable_sink!r:.60}")
        if tuple(learnable_sink.shape) != (heads,):
            raise ValueError(f"learnable_sink must have shape ({heads},) (one logit per query head), got "
                             f"{tuple(learnable_sink.shape)}")
        if learnable_sink.device != device:
            raise ValueError(f"learnable_sink must be on q's device {device}, got {learnable_sink.device}")
    return int(left), int(right), float(softcap)


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """The softmax scale the kernels use: the given one, or 1 / sqrt(head_dim) as flash-attn."""
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def check_packed(name: str, x, parts: int, layout: str) -> None:
    check_tensor(name, x)
    if x.dim() != len(layout.split(",")) or x.shape[-3] != parts:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def _inspectable() -> bool:
    """False while tracing or capturing a CUDA graph, where reading tensor values would
    synchronize or break the graph; value checks are skipped there."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_cu_type(name: str, cu, device=None) -> None:
    """cu: a 1-D int32 tensor of running totals (on ``device`` when given)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if device is not None and cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")


def cu_bounds(name: str, cu: torch.Tensor, total: int | None, what: str = "the packed length") -> list[int]:
    """cu's values as host ints (one read), checked: from 0, never decreasing, ending at total
    (when given)."""
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {values[:8]}...")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name} must end at {what} {total}, got {values[-1]}")
    return values


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q: int, total_k: int | None,
                     device) -> list[int] | None:
    """cu_seqlens: int32 (batch + 1,) running totals from 0 to the packed length (any end for
    cu_seqlens_k when total_k is None: keys in a paged cache are not packed). Returns
    cu_seqlens_k's values, or None where values cannot be read (tracing, graph capture)."""
    check_cu_type("cu_seqlens_q", cu_seqlens_q, device)
    check_cu_type("cu_seqlens_k", cu_seqlens_k, device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{name} must be a non-negative int, got {m!r}")
    if not _inspectable():
        return None
    for name, cu, total, max_name, max_len in (
        ("cu_seqlens_q", cu_seqlens_q, total_q, "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, total_k, "max_seqlen_k", max_seqlen_k),
    ):
        values = cu_bounds(name, cu, total)
        longest = max((b - a for a, b in zip(values, values[1:])), default=0)
        if longest > max_len:
            raise ValueError(f"{max_name}={max_len} is shorter than the longest sequence ({longest})")
    return values


def _check_index(name: str, x, shape: tuple[int, ...], device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")


def check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                  block_table, num_splits):
    """Checks for flash_attn_with_kvcache; returns cache_seqlens as an int32 (batch,) tensor."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(x.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"q, k_cache, v_cache must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    batch, _, heads, head_dim = q.shape
    _, slots, heads_kv, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"q and k_cache must have the same head_dim, got {head_dim} and {cache_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if heads % heads_kv != 0:
        raise ValueError(
            f"number of query heads ({heads}) must be a multiple of the number of key/value heads ({heads_kv})"
        )
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = choose), got {num_splits!r}")

    if block_table is not None:
        capacity = check_block_table(block_table, k_cache, batch, q.device, "k_cache")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (pages already pick the rows)")
    else:
        capacity = slots
        if cache_batch_idx is not None:
            _check_index("cache_batch_idx", cache_batch_idx, (batch,), q.device)
        elif k_cache.shape[0] != batch:
            raise ValueError(f"k_cache has {k_cache.shape[0]} sequences but q has batch {batch}; "
                             "pass cache_batch_idx to pick rows")
    if cache_leftpad is not None:
        _check_index("cache_leftpad", cache_leftpad, (batch,), q.device)

    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity:
            raise ValueError(f"cache_seqlens={cache_seqlens} is outside the cache's capacity 0..{capacity}")
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        _check_index("cache_seqlens", cache_seqlens, (batch,), q.device)

    new_len = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append)")
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x)
            if x.dim() != 4 or x.shape[0] != batch or x.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{name} must have shape (batch={batch}, seqlen_new, heads_kv={heads_kv}, "
                                 f"head_dim={head_dim}), got {tuple(x.shape)}")
            if x.dtype != q.dtype or x.device != q.device:
                raise TypeError(f"{name} must be {q.dtype} on {q.device}, got {x.dtype} on {x.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        new_len = k.shape[1]
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need new k and v (rotary is applied as they are appended)")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape != rotary_cos.shape:
                raise ValueError(f"{name} must be a 2-D tensor (seqlen_ro, rotary_dim / 2) like rotary_cos")
            if x.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
        if 2 * rotary_cos.shape[1] > head_dim:
            raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} exceeds "
                             f"head_dim {head_dim}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions; the cache holds up to {capacity}")

    if not _inspectable():
        return cache_seqlens
    ends = cache_seqlens.long() + new_len
    if bool((cache_seqlens < 0).any()) or bool((ends > capacity).any()):
        raise ValueError(f"cache_seqlens + seqlen_new must lie in 0..{capacity} (the cache's capacity), got "
                         f"cache_seqlens {cache_seqlens.tolist()[:8]} with {new_len} new tokens")
    if cache_leftpad is not None and bool(((cache_leftpad < 0) | (cache_leftpad.long() > ends)).any()):
        raise ValueError(f"cache_leftpad must lie in 0..cache_seqlens + seqlen_new, got {cache_leftpad.tolist()[:8]}")
    if cache_batch_idx is not None and bool(((cache_batch_idx < 0) | (cache_batch_idx >= k_cache.shape[0])).any()):
        raise ValueError(f"cache_batch_idx entries must lie in 0..{k_cache.shape[0] - 1}, got "
                         f"{cache_batch_idx.tolist()[:8]}")
    if block_table is not None:
        check_pages_in_use(block_table, ends, k_cache, "k_cache")
    return cache_seqlens


def check_block_table(block_table, k_cache, batch: int, device, cache_name: str) -> int:
    """block_table: int32 (batch, max_blocks) page indices into a cache whose page size
    (k_cache.shape[1]) is a multiple of 16. Returns the capacity, max_blocks * page_size."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise ValueError("block_table must be an int32 tensor (batch, max_blocks)")
    _check_index("block_table", block_table, (batch, block_table.shape[1]), device)
    page_size = k_cache.shape[1]
    if page_size % 16 != 0:
        raise ValueError(f"page_size ({cache_name}.shape[1] with a block_table) must be a multiple of 16, got "
                         f"{page_size}")
    return block_table.shape[1] * page_size


def check_pages_in_use(block_table, lengths: torch.Tensor, k_cache, cache_name: str) -> None:
    """The pages holding each sequence's first lengths[b] positions must be blocks of the cache
    (one host read)."""
    used = pages_in_use(block_table, lengths, k_cache.shape[1])
    if bool((used & ((block_table < 0) | (block_table >= k_cache.shape[0]))).any()):
        raise ValueError(f"block_table entries in use must lie in 0..{k_cache.shape[0] - 1} ({cache_name}'s blocks)")
