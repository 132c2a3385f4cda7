"""Variable-length (packed) attention: many sequences of different lengths in one tensor, with
no padding. Named and shaped as flash-attn 2's varlen functions."""

from __future__ import annotations

import torch

from . import ops
from .dropout import new_seed
from .validation import check_cu_seqlens, check_features, check_packed, check_qkv, resolve_scale

_LAYOUT = "(total_tokens, heads, head_dim)"


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
        k, v: (total_k, heads_kv, head_dim); heads % heads_kv == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,): sequence i is rows
            cu_seqlens[i]:cu_seqlens[i + 1]. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (the kernel grid covers them).
        causal: per sequence, bottom-right aligned as in :func:`tileattn.flash_attn_func`.
        Other arguments (window_size, softcap, alibi_slopes: per sequence, slopes (batch, heads)
        indexed by sequence) as in :func:`tileattn.flash_attn_func`; block_table (paged KV) is
        served by :func:`tileattn.flash_attn_with_kvcache` instead.

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
    check_qkv(q, k, v, rank=3, layout=_LAYOUT)
    if block_table is not None:
        raise NotImplementedError("block_table with varlen is not supported yet; use flash_attn_with_kvcache")
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0], q.device)
    variants = check_features(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, cu_seqlens_q.shape[0] - 1,
                              q.shape[1], q.device, learnable_sink)
    scale = resolve_scale(softmax_scale, q.shape[-1])
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
