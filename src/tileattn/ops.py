"""torch.library custom ops for the forward and backward passes, with fake impls and autograd.

Bookkeeping only: the math lives in the backend the op dispatches to. Registered as opaque
ops so torch.compile traces through callers (fullgraph=True) without looking inside kernels.
"""

from __future__ import annotations

import torch

from .backend import get_backend


@torch.library.custom_op("tileattn::fwd", mutates_args=())
def fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, H, D), lse (B, H, Sq) float32). ``deterministic`` is carried for backward."""
    out, lse = get_backend(q.device).forward(q, k, v, softmax_scale, causal)
    return out.contiguous(), lse.contiguous()


@fwd.register_fake
def _(q, k, v, softmax_scale, causal, deterministic):
    batch, seqlen_q, heads, head_dim = q.shape
    return q.new_empty((batch, seqlen_q, heads, head_dim)), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("tileattn::bwd", mutates_args=())
def bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like (q, k, v). Both backends are deterministic by construction."""
    dq, dk, dv = get_backend(q.device).backward(dout, q, k, v, out, lse, softmax_scale, causal)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, deterministic = inputs
    out, lse = output
    # flash-attn semantics: the LSE output carries no gradient (requires_grad=False says so)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.causal, ctx.deterministic = softmax_scale, causal, deterministic


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.deterministic)
    return dq, dk, dv, None, None, None


fwd.register_autograd(_backward, setup_context=_setup_context)
