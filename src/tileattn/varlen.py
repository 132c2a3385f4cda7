"""Variable-length (packed) attention: many sequences of different lengths in one tensor, with
no padding. Named and shaped as flash-attn 2's varlen functions."""

from __future__ import annotations

import torch

from . import ops
from .dropout import new_seed
from .layout import gather_pages
from .validation import (
    check_block_table,
    check_cu_seqlens,
    check_features,
    check_packed,
    check_pages_in_use,
    check_qkv,
    resolve_scale,
)

_LAYOUT = "(total_tokens, heads, head_dim)"
_PAGED = dict(kv_rank=4, kv_layout="(num_blocks, page_size, heads_kv, head_dim) with a block_table")


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    learnable_sink: torch.Tensor | None = None,
):
    """Exact attention over packed sequences; each sequence attends only to itself.

    Args:
        q: (total_q, heads, head_dim), the sequences' queries one after another.
        k, v: (total_k, heads_kv, head_dim); heads % heads_kv == 0. With block_table, a paged
            cache instead: (num_blocks, page_size, heads_kv, head_dim), page_size a multiple of 16.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,): sequence i is rows
            cu_seqlens[i]:cu_seqlens[i + 1]. Empty sequences are allowed. With block_table,
            cu_seqlens_k only gives each sequence's key count (its last entry is free).
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (the kernel grid covers them).
        causal: per sequence, bottom-right aligned as in :func:`tileattn.flash_attn_func`.
        block_table: optional int32 (batch, max_blocks): sequence i's key j is
            k[block_table[i, j // page_size], j % page_size] (chunked prefill over a paged KV
            cache, as flash-attn and vLLM use it). Without gradients or dropout the KV-cache
            kernel reads the pages in place; otherwise the used pages are gathered into packed
            K/V first, so gradients reach k and v (pages shared by sequences sum theirs).
        Other arguments (window_size, softcap, alibi_slopes: per sequence, slopes (batch, heads)
        indexed by sequence) as in :func:`tileattn.flash_attn_func`.

    Returns:
        out (total_q, heads, head_dim); with return_attn_probs=True, (out, softmax_lse, None)
        with softmax_lse (heads, total_q) float32. (Sequence b's dropout bits are those of a dense
        call's batch entry b: tileattn.dropout.)

    Example:
        >>> q = torch.randn(10, 4, 32)                       # sequences of 3 and 7 tokens
        >>> cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> flash_attn_varlen_func(q, q, q, cu, cu, 7, 7, causal=True).shape
        torch.Size([10, 4, 32])
    """
    paged = block_table is not None
    check_qkv(q, k, v, rank=3, layout=_LAYOUT, **(_PAGED if paged else {}))
    cu_k = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0],
                            None if paged else k.shape[0], q.device)
    batch = cu_seqlens_q.shape[0] - 1
    variants = check_features(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, batch, q.shape[1],
                              q.device, learnable_sink)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    if paged:
        capacity = check_block_table(block_table, k, batch, q.device, "k")
        if cu_k is not None:
            longest = max((e - s for s, e in zip(cu_k, cu_k[1:])), default=0)
            if longest > capacity:
                raise ValueError(f"cu_seqlens_k: a sequence of {longest} keys exceeds block_table's capacity "
                                 f"{block_table.shape[1]} pages x {k.shape[1]} = {capacity}")
            check_pages_in_use(block_table, cu_seqlens_k[1:] - cu_seqlens_k[:-1], k, "k")
        if dropout_p == 0 and not ops.wants_grad(q, k, v, learnable_sink):
            out, lse = ops.fwd_kvcache(q, k, v, cu_seqlens_k, None, None, block_table, scale, bool(causal), 0,
                                       *variants, alibi_slopes, learnable_sink, cu_seqlens_q, max_seqlen_q)
            return (out, lse, None) if return_attn_probs else out
        k, v = (gather_pages(x, block_table, cu_seqlens_k, cu_k) for x in (k, v))
    seed, offset = new_seed() if dropout_p > 0 else (0, 0)
    out, lse = ops.fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal),
                       bool(deterministic), *variants, float(dropout_p), seed, offset, alibi_slopes, learnable_sink)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_varlen_func` with kv packed as (total_k, 2, heads_kv, head_dim)."""
    check_packed("kv", kv, 2, "(total_tokens, 2, heads, head_dim)")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_varlen_func` with qkv packed as (total, 3, heads, head_dim)."""
    check_packed("qkv", qkv, 3, "(total_tokens, 3, heads, head_dim)")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
