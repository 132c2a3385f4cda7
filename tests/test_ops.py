"""The custom ops: torch.library.opcheck and torch.compile(fullgraph=True)."""

import pytest
import torch

import tileattn
from tileattn import ops

from .helpers import DEVICE, make_qkv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_forward_and_backward(backend, causal):
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 19, 23, 4, 2, 16))
    args = (q, k, v, None, None, 0, 0, 0.25, causal, False, -1, -1, 0.0, 0.0, 0, 0, None, None)
    torch.library.opcheck(ops.fwd_op, args)
    out, lse = ops.fwd(*args)
    dout = torch.randn_like(out)
    detached = [x.detach() for x in (q, k, v, out)]
    no_variants = (-1, -1, 0.0, 0.0, 0, 0, None)
    torch.library.opcheck(ops.bwd, (dout, *detached, lse, None, None, 0, 0, 0.25, causal, False, *no_variants))


def test_lse_carries_no_gradient(backend):
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 5, 5, 1, 1, 8))
    out, lse, _ = tileattn.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad


def test_eager_backward_gets_no_materialized_lse_gradient(backend, monkeypatch):
    """A zero LSE gradient would be one more fill launch per backward: host time eager training
    steps feel. Using the LSE in the loss changes nothing (it is non-differentiable)."""
    seen = []
    backward = ops._backward
    monkeypatch.setattr(ops, "_backward", lambda ctx, dout, dlse, **kw: seen.append(dlse) or backward(ctx, dout, dlse,
                                                                                                    **kw))
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 7, 7, 2, 1, 8))
    out, lse, _ = tileattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    (out.sum() + lse.sum()).backward()
    assert seen == [None] and q.grad is not None


def test_compile_fullgraph(backend):
    def block(q, k, v, w):
        return (tileattn.flash_attn_func(q @ w, k, v, causal=True) * 2).sum()

    q, k, v = make_qkv(1, 33, 33, 2, 1, 16)
    w = torch.randn(16, 16, device=q.device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, w)
    (grad,) = torch.autograd.grad(loss, w)
    ref_loss = block(q, k, v, w)
    (ref_grad,) = torch.autograd.grad(ref_loss, w)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_eager_calls_skip_the_dispatcher(backend, monkeypatch):
    """No gradient: the implementation directly; eager autograd: a plain autograd.Function
    (torch.compile keeps the registered op: test_compile_fullgraph)."""
    q, k, v = make_qkv(1, 9, 9, 2, 1, 16)
    args = (None, None, 0, 0, 0.25, True, False, -1, -1, 0.0, 0.0, 0, 0, None, None)
    want = ops.fwd_op(q, k, v, *args)
    dispatched = []
    op = ops.fwd_op
    monkeypatch.setattr(ops, "fwd_op", lambda *a: dispatched.append(1) or op(*a))
    got = ops.fwd(q, k, v, *args)
    assert not dispatched and all(torch.equal(a, b) for a, b in zip(got, want))
    out, _ = ops.fwd(q.requires_grad_(), k, v, *args)
    assert not dispatched and type(out.grad_fn).__name__ == "_EagerAttentionBackward"
    with torch.no_grad():
        ops.fwd(q, k, v, *args)
    assert not dispatched


def test_eager_autograd_matches_the_registered_op(backend):
    """The eager autograd.Function and the op's registered autograd give the same gradients,
    the sink's included."""
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 13, 17, 4, 2, 16))
    sink = torch.randn(4, device=q.device, requires_grad=True)
    args = (None, None, 0, 0, 0.25, True, False, -1, -1, 0.0, 0.0, 0, 0, None, sink)
    dout = torch.randn(q.shape, device=q.device)
    grads = [torch.autograd.grad(f(q, k, v, *args)[0], (q, k, v, sink), dout) for f in (ops.fwd, ops.fwd_op)]
    for eager, registered in zip(*grads):
        torch.testing.assert_close(eager, registered, rtol=0, atol=0)


def test_opcheck_packed_queries_over_pages(backend):
    """fwd_kvcache with packed queries (flash_attn_varlen_func's paged path): schema, fake
    shapes (LSE (heads, total_q)) and the registered op agree."""
    q = torch.randn(9, 4, 16, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 4, 16, 2, 16, device=DEVICE).unbind(0)
    cu_q = torch.tensor([0, 2, 9], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 30, 37], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, cu_k, None, None, table, 0.25, True, 0, -1, -1, 0.0, None, None, cu_q, 7)
    torch.library.opcheck(ops.fwd_kvcache_op, args)
    out, lse = ops.fwd_kvcache_op(*args)
    assert out.shape == q.shape and lse.shape == (4, 9)


def test_compile_fullgraph_packed_queries_over_pages(backend):
    """flash_attn_varlen_func with block_table traces whole (value checks skipped while tracing)."""
    q = torch.randn(9, 4, 16, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 4, 16, 2, 16, device=DEVICE).unbind(0)
    cu_q = torch.tensor([0, 2, 9], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 30, 37], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=DEVICE)

    def block(q, k, v):
        return tileattn.flash_attn_varlen_func(q * 2, k, v, cu_q, cu_k, 7, 30, causal=True, block_table=table)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k_cache, v_cache), block(q, k_cache, v_cache), rtol=0, atol=0)
