"""torch.library custom ops for the forward and backward passes, with fake impls and autograd.

Bookkeeping only: the math lives in the backend the op dispatches to. Registered as opaque
ops so torch.compile traces through callers (fullgraph=True) without looking inside kernels.

``fwd`` and ``fwd_kvcache`` are what callers use: in eager mode, when no input needs a gradient
(inference, prefill, decode), they call the implementation directly, because the custom-op
dispatcher costs tens of microseconds per call (once per layer per token in generation) and
has nothing to do there; eager calls that want gradients take ``_EagerAttention``, a plain
autograd.Function over the same forward and backward. Compiling, functorch transforms and
tensor subclasses (fake tensors) go through the registered ops ``fwd_op`` and
``fwd_kvcache_op``.
"""

from __future__ import annotations

import torch

from .backend import get_backend
from .layout import lse_shape

# Dense inputs are (B, S, H, D) with cu_seqlens None; packed (varlen) inputs are (total, H, D)
# split by int32 cu_seqlens, with max_seqlen the longest sequence. One op pair serves both.


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # e.g. a model's sinks are Parameters


def _eager(*tensors) -> bool:
    """Whether an op call may bypass the registered op: eager, plain tensors (torch.func
    transforms track gradients without requires_grad, so they take the op)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def wants_grad(*tensors) -> bool:
    """Whether a call must be differentiable: an input requires grad, or a torch.func
    transform (which tracks gradients without requires_grad) is active."""
    return _wants_grad(*tensors) or torch._C._are_functorch_transforms_active()


def _direct(*tensors) -> bool:
    """Whether an op call may skip the dispatcher: eager, plain tensors, no gradient wanted."""
    return _eager(*tensors) and not _wants_grad(*tensors)


def fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, deterministic,
        window_left, window_right, softcap, dropout_p, seed, philox_offset, alibi_slopes, learnable_sink):
    """The tileattn::fwd op (see ``_fwd``), called directly where nothing needs the dispatcher.
    Eager calls that want gradients take a plain autograd.Function: the custom op's autograd
    wrapper re-binds every argument through Python on each call (torch._library's
    fill_defaults: ~120 of the ~160 us a forward cost on a CPU here, the kernel mocked out),
    which short training steps feel."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, deterministic,
            window_left, window_right, softcap, dropout_p, seed, philox_offset, alibi_slopes, learnable_sink)
    tensors = (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, learnable_sink)
    if _eager(*tensors):
        if not _wants_grad(*tensors):
            return _fwd(*args)
        return _EagerAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, args[5:16], alibi_slopes, learnable_sink)
    return fwd_op(*args)


def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
    philox_offset: int,
    alibi_slopes: torch.Tensor | None,
    learnable_sink: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse float32: (B, H, Sq) dense, (H, total_q) varlen). ``deterministic`` is
    carried for the backward; (seed, philox_offset) name the dropout bits (tileattn.dropout)."""
    out, lse = get_backend(q.device).forward(q, k, v, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, window_size=(window_left, window_right),
                                             softcap=softcap, alibi_slopes=alibi_slopes, learnable_sink=learnable_sink,
                                             dropout=(dropout_p, seed, philox_offset))
    return out.contiguous(), lse.contiguous()


fwd_op = torch.library.custom_op("tileattn::fwd", _fwd, mutates_args=())


@fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, deterministic,
      window_left, window_right, softcap, dropout_p, seed, philox_offset, alibi_slopes, learnable_sink):
    return q.new_empty(q.shape), q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


def _bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
    philox_offset: int,
    alibi_slopes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like (q, k, v). Both backends are deterministic by construction."""
    dq, dk, dv = get_backend(q.device).backward(dout, q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q,
                                                cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                window_size=(window_left, window_right), softcap=softcap,
                                                alibi_slopes=alibi_slopes, dropout=(dropout_p, seed, philox_offset))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


bwd = torch.library.custom_op("tileattn::bwd", _bwd, mutates_args=())


@bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      deterministic, window_left, window_right, softcap, dropout_p, seed, philox_offset, alibi_slopes):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    # args: max_seqlen_q/k, scale, causal, deterministic, window_left/right, softcap, dropout_p, seed, offset
    q, k, v, cu_seqlens_q, cu_seqlens_k, *ctx.args, alibi_slopes, learnable_sink = inputs
    out, lse = output
    # flash-attn semantics: the LSE output carries no gradient (requires_grad=False says so)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, learnable_sink)


def _sink_grad(dout, out, lse, sink, varlen: bool):
    """d loss / d sink_h = -sum over rows of p_sink * rowsum(dO * O), p_sink = exp(sink - lse):
    the sink is a key whose value is zero, so only the softmax normalization carries its
    gradient. Summed over batch and queries, in float32."""
    delta = (dout.float() * out.float()).sum(-1)  # (B, Sq, H) dense, (total, H) varlen
    delta = delta.transpose(0, 1) if varlen else delta.transpose(1, 2)  # lse's layout
    sink = sink.float().view(-1, 1) if varlen else sink.float().view(1, -1, 1)
    grad = -(torch.exp(sink - lse) * delta)
    return grad.sum(1) if varlen else grad.sum((0, 2))


def _backward(ctx, dout, dlse, backward_op=bwd):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, learnable_sink = ctx.saved_tensors
    dq, dk, dv = backward_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, alibi_slopes)
    dsink = None
    if learnable_sink is not None and ctx.needs_input_grad[-1]:
        dsink = _sink_grad(dout, out, lse, learnable_sink, cu_seqlens_q is not None).to(learnable_sink.dtype)
    return dq, dk, dv, *([None] * 14), dsink


fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """fwd_op's forward and backward, for eager calls that want gradients (see ``fwd``). The
    eleven non-tensor arguments come as one tuple: autograd's apply handles every argument (and
    every returned gradient) in turn, ~1 us each on a CPU here."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, scalars, alibi_slopes, learnable_sink):
        args = (q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars, alibi_slopes, learnable_sink)
        output = _fwd(*args)
        _setup_context(ctx, args, output)
        # the LSE is non-differentiable: its zero gradient would cost a fill launch per call, and
        # a backward call always has the output's (its only differentiable output)
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv, *_, dsink = _backward(ctx, dout, dlse, backward_op=_bwd)
        return dq, dk, dv, None, None, None, None, dsink


def fwd_kvcache(q, k_cache, v_cache, seqlens_k, cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                num_splits, window_left, window_right, softcap, alibi_slopes, learnable_sink, cu_seqlens_q=None,
                max_seqlen_q=0):
    """The tileattn::fwd_kvcache op (see ``_fwd_kvcache``), called directly where nothing needs the
    dispatcher (every eager decode step)."""
    args = (q, k_cache, v_cache, seqlens_k, cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
            num_splits, window_left, window_right, softcap, alibi_slopes, learnable_sink, cu_seqlens_q, max_seqlen_q)
    if _direct(q, k_cache, v_cache, seqlens_k, cache_batch_idx, cache_leftpad, block_table, alibi_slopes,
               learnable_sink, cu_seqlens_q):
        return _fwd_kvcache(*args)
    return fwd_kvcache_op(*args)


def _fwd_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens_k: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    num_splits: int,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    learnable_sink: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Sq, H, D) over a KV cache (keys [leftpad, seqlens_k) per sequence):
    (out like q, lse (B, H, Sq) float32). With cu_seqlens_q, q is packed (total_q, H, D), lse
    (H, total_q), and seqlens_k is cu_seqlens_k (flash_attn_varlen_func's paged cache). Forward
    only, as in flash-attn."""
    return get_backend(q.device).decode(q, k_cache, v_cache, seqlens_k, softmax_scale, causal, cache_batch_idx,
                                        cache_leftpad, block_table, num_splits, window_size=(window_left, window_right),
                                        softcap=softcap, alibi_slopes=alibi_slopes, learnable_sink=learnable_sink,
                                        cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)


fwd_kvcache_op = torch.library.custom_op("tileattn::fwd_kvcache", _fwd_kvcache, mutates_args=())


@fwd_kvcache_op.register_fake
def _(q, k_cache, v_cache, seqlens_k, cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, num_splits,
      window_left, window_right, softcap, alibi_slopes, learnable_sink, cu_seqlens_q=None, max_seqlen_q=0):
    return q.new_empty(q.shape), q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "",
         activation_from: int = 0, x2: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
         bias2: torch.Tensor | None = None, x_ready: bool = False) -> torch.Tensor:
    """The tileattn::gemv op (one-row ``F.linear`` as a Triton GEMV, plus a second one-row
    product summed in where x2 and weight2 are given, then an optional activation on the outputs
    from ``activation_from`` on; ``x_ready``: x was written before the previous kernel, see
    tileattn.kernels.gemv), called directly where nothing needs the dispatcher. Inference only:
    it has no backward."""
    args = (x, weight, bias, activation, activation_from, x2, weight2, bias2, x_ready)
    if _direct(x, weight, bias, x2, weight2, bias2):
        return _gemv(*args)
    return gemv_op(*args)


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "",
          activation_from: int = 0, x2: torch.Tensor | None = None, weight2: torch.Tensor | None = None,
          bias2: torch.Tensor | None = None, x_ready: bool = False) -> torch.Tensor:
    from .kernels.gemv import gemv as kernel  # triton only where a GEMV runs

    return kernel(x, weight, bias, activation=activation, activation_from=activation_from, x2=x2, weight2=weight2,
                  bias2=bias2, x_ready=x_ready)


gemv_op = torch.library.custom_op("tileattn::gemv", _gemv, mutates_args=())


@gemv_op.register_fake
def _(x, weight, bias, activation="", activation_from=0, x2=None, weight2=None, bias2=None, x_ready=False):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))
