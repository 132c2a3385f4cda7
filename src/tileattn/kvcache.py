"""Attention over a KV cache for decoding, named and shaped as flash-attn 2's
``flash_attn_with_kvcache``: append the new keys/values in place (with rotary), then attend."""

from __future__ import annotations

import torch

from . import ops
from .validation import check_features, check_kvcache, resolve_scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (B, S, H, D) at integer positions (B, S); cos/sin (seqlen_ro,
    rotary_dim / 2). Interleaved rotates pairs (0, 1), (2, 3), ...; otherwise (GPT-NeoX style)
    the first half of the rotary dims against the second. Dims past rotary_dim pass through."""
    rotary_dim = 2 * cos.shape[1]
    c = cos[positions].unsqueeze(2).float()  # (B, S, 1, rotary_dim / 2)
    s = sin[positions].unsqueeze(2).float()
    xr = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _write_cache(cache, new, positions, cache_batch_idx, block_table):
    """cache[sequence b, positions[b, i]] = new[b, i], in place, with no host synchronization."""
    if block_table is not None:
        page_size = cache.shape[1]
        pages = torch.gather(block_table.long(), 1, positions // page_size)
        cache.index_put_((pages, positions % page_size), new)
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(new.shape[0], device=new.device)
        cache.index_put_((rows[:, None], positions), new)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    learnable_sink: torch.Tensor | None = None,
):
    """Append k/v to a KV cache in place, then attend q to the cache (flash-decoding).

    Args:
        q: (batch, seqlen_q, heads, head_dim), usually 1 to a few new tokens.
        k_cache, v_cache: dense (batch_cache, capacity, heads_kv, head_dim), or with block_table
            a paged cache (num_blocks, page_size, heads_kv, head_dim) with page_size a multiple
            of 16. Same dtype as q; heads % heads_kv == 0.
        k, v: optional new keys/values (batch, seqlen_new, heads_kv, head_dim), written into the
            cache at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (in place).
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2) tables, needing k and v:
            rotary is applied to k at its cache positions and to q at the same positions when
            causal, else at position cache_seqlens[b] for every query.
        cache_seqlens: int or int32 (batch,): tokens already in each sequence's cache (before
            appending). None means the cache is full (capacity).
        cache_batch_idx: optional int32 (batch,): which dense-cache row each sequence uses.
        cache_leftpad: optional int32 (batch,): sequence b's keys start at this cache position.
        block_table: optional int32 (batch, max_blocks): page indices of each sequence.
        causal: bottom-right aligned to each sequence's length after appending.
        num_splits: how many programs split one sequence's keys; 0 chooses from the SM count,
            batch, heads and capacity, then (on a GPU, unless TILEATTN_AUTOTUNE=0) times that
            count against half, twice and four times it on the first call of each shape and
            cache layout; a call inside a CUDA-graph capture uses what an earlier call chose.
            Any value gives the same result up to rounding.
        window_size, softcap, alibi_slopes: as in :func:`tileattn.flash_attn_func`, with each
            sequence's diagonal at its length after appending; learnable_sink (heads,) likewise.
        return_softmax_lse: also return the LSE (batch, heads, seqlen_q) float32.

    Returns:
        out (batch, seqlen_q, heads, head_dim), or (out, softmax_lse).

    Runs without synchronizing with the host when the value checks are skipped (inside
    torch.compile or CUDA-graph capture), so a decode step can be captured.

    Example:
        >>> k_cache = v_cache = torch.zeros(2, 256, 2, 64)
        >>> q, k = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 2, 64)
        >>> lens = torch.tensor([10, 37], dtype=torch.int32)
        >>> flash_attn_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=lens, causal=True).shape
        torch.Size([2, 1, 8, 64])
    """
    variants = check_features(0.0, softmax_scale, window_size, softcap, alibi_slopes, q.shape[0], q.shape[2], q.device,
                              learnable_sink)
    cache_seqlens = check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                  cache_leftpad, block_table, num_splits)
    seqlens_k = cache_seqlens
    if k is not None:
        new_len = k.shape[1]
        positions = cache_seqlens.long()[:, None] + torch.arange(new_len, device=q.device)
        if rotary_cos is not None:
            q_positions = (cache_seqlens.long()[:, None] + torch.arange(q.shape[1], device=q.device)) if causal \
                else cache_seqlens.long()[:, None].expand(-1, q.shape[1])
            q = apply_rotary(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
            k = apply_rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        _write_cache(k_cache, k, positions, cache_batch_idx, block_table)
        _write_cache(v_cache, v, positions, cache_batch_idx, block_table)
        seqlens_k = cache_seqlens + new_len
    scale = resolve_scale(softmax_scale, q.shape[-1])
    out, lse = ops.fwd_kvcache(q, k_cache, v_cache, seqlens_k, cache_batch_idx, cache_leftpad, block_table, scale,
                               bool(causal), int(num_splits), *variants, alibi_slopes, learnable_sink)
    return (out, lse) if return_softmax_lse else out
