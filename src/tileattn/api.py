"""Public functions, named and shaped as flash-attn 2's so switching is an import change."""

from __future__ import annotations

import math
from numbers import Real

import torch

from . import ops

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    head_dim = q.shape[3]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    heads, heads_kv = q.shape[2], k.shape[2]
    if heads_kv < 1 or heads < 1:
        raise ValueError(f"q and k need at least one head, got heads={heads}, heads_kv={heads_kv}")
    if heads % heads_kv != 0:
        raise ValueError(
            f"number of query heads ({heads}) must be a multiple of the number of key/value heads ({heads_kv})"
        )


def _check_features(dropout_p, softmax_scale, window_size, softcap, alibi_slopes) -> None:
    if not isinstance(dropout_p, Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and (not isinstance(softmax_scale, Real) or not math.isfinite(softmax_scale)):
        raise TypeError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if window_size is None or len(tuple(window_size)) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    # Not built yet: refuse rather than silently compute plain attention.
    if dropout_p != 0.0:
        raise NotImplementedError("dropout_p > 0 is not supported yet")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("window_size (sliding window attention) is not supported yet")
    if softcap != 0.0:
        raise NotImplementedError("softcap is not supported yet")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported yet")


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
        deterministic: accepted for compatibility; the backward is always deterministic.
        dropout_p, window_size, softcap, alibi_slopes: not supported yet; anything but the
            default raises NotImplementedError.
        return_attn_probs: also return the LSE (see Returns).

    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype; with return_attn_probs=True,
        (out, softmax_lse, None) where softmax_lse is (batch, heads, seqlen_q) float32,
        natural log.

    Runs the Triton kernels on CUDA and a blocked PyTorch implementation of the same algorithm
    elsewhere; ``TILEATTN_BACKEND=triton|torch`` forces one.

    Example:
        >>> q = torch.randn(2, 128, 8, 64)
        >>> k = v = torch.randn(2, 128, 2, 64)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 128, 8, 64])
    """
    _check_qkv(q, k, v)
    _check_features(dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = ops.fwd(q, k, v, scale, bool(causal), bool(deterministic))
    return (out, lse, None) if return_attn_probs else out


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
    _check_packed("kv", kv, 2)
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
    _check_packed("qkv", qkv, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def _check_packed(name: str, x, parts: int) -> None:
    _check_tensor(name, x)
    if x.dim() != 5 or x.shape[2] != parts:
        raise ValueError(f"{name} must have shape (batch, seqlen, {parts}, heads, head_dim), got {tuple(x.shape)}")
