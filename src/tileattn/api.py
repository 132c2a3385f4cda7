"""Public functions, named and shaped as flash-attn 2's so switching is an import change."""

from __future__ import annotations

import torch

from . import ops
from .dropout import dropout_mask, new_seed
from .validation import check_features, check_packed, check_qkv, resolve_scale


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    learnable_sink: torch.Tensor | None = None,
):
    """Exact attention, softmax(q k^T * softmax_scale) v, without materializing the scores.

    Args:
        q: (batch, seqlen_q, heads, head_dim)
        k, v: (batch, seqlen_k, heads_kv, head_dim). heads % heads_kv == 0: GQA and MQA share
            each K/V head between heads // heads_kv query heads without copying it.
            head_dim may be any value in 1..256. float16, bfloat16 or float32 (computed in
            float32, no tf32); any strides.
        softmax_scale: defaults to 1 / sqrt(head_dim).
        causal: query i sees key j iff j <= i + seqlen_k - seqlen_q (bottom-right aligned, as in
            flash-attn 2). A query that sees no key outputs 0 and has LSE = -inf.
        window_size: (left, right) sliding window: query i sees keys j with
            i + Sk - Sq - left <= j <= i + Sk - Sq + right; -1 is unbounded. With causal, right
            is 0. Key tiles outside every row's window are skipped, so cost grows with the window;
            the GPU kernels run a window reaching past the sequence (Mistral's 4096 on a shorter
            one) as no window.
        softcap: > 0 replaces each scaled score s by softcap * tanh(s / softcap) (Gemma 2).
        alibi_slopes: float32 (heads,) or (batch, heads): adds -slope * |i + Sk - Sq - j| to the
            scores after softcap (BLOOM, MPT). No gradient flows to the slopes.
        deterministic: accepted for compatibility; the backward is always deterministic.
        learnable_sink: (heads,) attention sinks (gpt-oss's s_aux, flash-attn-4's name): one
            extra logit per head in every row's softmax, with no value; it gets a gradient.
        dropout_p: probability of dropping each attention probability (kept ones are scaled by
            1 / (1 - dropout_p)), applied whenever > 0, as in flash-attn: pass 0 for evaluation.
            The bits come from Philox seeded by torch's default generator (torch.manual_seed
            reproduces them) and are regenerated in the backward, never stored.
        return_attn_probs: also return the LSE and, with dropout, the keep mask (see Returns).

    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype; with return_attn_probs=True,
        (out, softmax_lse, keep) where softmax_lse is (batch, heads, seqlen_q) float32, natural
        log (of the undropped softmax), and keep is the bool dropout mask (batch, heads,
        seqlen_q, seqlen_k) the output was computed with, or None without dropout.

    Runs the Triton kernels on CUDA and a blocked PyTorch implementation of the same algorithm
    elsewhere; ``TILEATTN_BACKEND=triton|torch`` forces one.

    Example:
        >>> q = torch.randn(2, 128, 8, 64)
        >>> k = v = torch.randn(2, 128, 2, 64)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 128, 8, 64])
    """
    check_qkv(q, k, v)
    variants = check_features(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, q.shape[0], q.shape[2],
                              q.device, learnable_sink)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    seed, offset = new_seed() if dropout_p > 0 else (0, 0)
    out, lse = ops.fwd(q, k, v, None, None, 0, 0, scale, bool(causal), bool(deterministic), *variants,
                       float(dropout_p), seed, offset, alibi_slopes, learnable_sink)
    if not return_attn_probs:
        return out
    keep = None
    if dropout_p > 0:
        keep = dropout_mask(dropout_p, seed, offset, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device)
    return out, lse, keep


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` with K and V packed: kv is (batch, seqlen_k, 2, heads_kv, head_dim).

    Example:
        >>> q, kv = torch.randn(1, 16, 4, 32), torch.randn(1, 16, 2, 4, 32)
        >>> flash_attn_kvpacked_func(q, kv).shape
        torch.Size([1, 16, 4, 32])
    """
    check_packed("kv", kv, 2, "(batch, seqlen, 2, heads, head_dim)")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` with Q, K, V packed: qkv is (batch, seqlen, 3, heads, head_dim).

    Example:
        >>> flash_attn_qkvpacked_func(torch.randn(1, 16, 3, 4, 32), causal=True).shape
        torch.Size([1, 16, 4, 32])
    """
    check_packed("qkv", qkv, 3, "(batch, seqlen, 3, heads, head_dim)")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)

