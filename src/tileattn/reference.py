"""Plain materialized attention: the oracle the tests compare every backend against.

Readable on purpose: it builds the full (seqlen_q, seqlen_k) score matrix, so use it only at
test sizes. ``upcast=True`` computes in float64 (the oracle); ``upcast=False`` computes in the
inputs' own dtype, which is "what PyTorch gets in low precision" for the 2x-error rule.
"""

from __future__ import annotations

import math

import torch


def causal_mask(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask, True where query i may see key j (j <= i + Sk - Sq)."""
    return window_mask(seqlen_q, seqlen_k, (-1, 0), device)


def window_mask(seqlen_q: int, seqlen_k: int, window_size: tuple[int, int], device=None) -> torch.Tensor:
    """True where query i may see key j: i + Sk - Sq - left <= j <= i + Sk - Sq + right, with
    -1 meaning unbounded on that side."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + (seqlen_k - seqlen_q)
    left, right = window_size
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    return visible


def alibi_bias(slopes: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """-slope * |i + Sk - Sq - j| as (batch, heads, Sq, Sk); slopes (heads,) or (batch, heads)."""
    i = torch.arange(seqlen_q, device=slopes.device)[:, None]
    j = torch.arange(seqlen_k, device=slopes.device)[None, :]
    dist = (i + (seqlen_k - seqlen_q) - j).abs()
    return -slopes.expand(batch, heads)[:, :, None, None] * dist


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    upcast: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    learnable_sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention.

    Args:
        q: (batch, seqlen_q, heads, head_dim)
        k, v: (batch, seqlen_k, heads_kv, head_dim); heads % heads_kv == 0 (GQA/MQA)
        window_size: (left, right) sliding window, bottom-right aligned; combines with causal.
        softcap: > 0 replaces scores s by softcap * tanh(s / softcap) (after the scale).
        alibi_slopes: (heads,) or (batch, heads); adds -slope * |i + Sk - Sq - j| after softcap.
        learnable_sink: (heads,) one extra logit per head in every row's softmax, with no value
            (gpt-oss's attention sinks); a row that sees no key then outputs 0 with LSE = sink.
    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype (float64 when upcast),
        lse (batch, heads, seqlen_q) natural-log log-sum-exp of the scaled scores; rows that
        see no key give out = 0 and lse = -inf.
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, seqlen_q, heads = q.shape[:3]
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(heads // heads_kv, dim=2)
    v = v.repeat_interleave(heads // heads_kv, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes.to(dtype), batch, heads, seqlen_q, seqlen_k)
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if (left, right) != (-1, -1):
        scores = scores.masked_fill(~window_mask(seqlen_q, seqlen_k, (left, right), q.device), float("-inf"))
    if learnable_sink is not None:
        sink = learnable_sink.to(scores.dtype).view(1, heads, 1, 1).expand(batch, heads, seqlen_q, 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    # softmax of an all -inf row is NaN; such rows attend to nothing and output 0
    probs = torch.softmax(scores.float() if not upcast else scores, dim=-1).nan_to_num(0.0)
    if learnable_sink is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(dtype), v)
    return out, lse.float() if not upcast else lse
