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
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention.

    Args:
        q: (batch, seqlen_q, heads, head_dim)
        k, v: (batch, seqlen_k, heads_kv, head_dim); heads % heads_kv == 0 (GQA/MQA)
    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype (float64 when upcast),
        lse (batch, heads, seqlen_q) natural-log log-sum-exp of the scaled scores; rows that
        see no key give out = 0 and lse = -inf.
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    heads, heads_kv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // heads_kv, dim=2)
    v = v.repeat_interleave(heads // heads_kv, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    lse = torch.logsumexp(scores.float() if not upcast else scores, dim=-1)
    # softmax of an all -inf row is NaN; such rows attend to nothing and output 0
    probs = torch.softmax(scores.float() if not upcast else scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(dtype), v)
    return out, lse.float() if not upcast else lse
