"""The custom ops: torch.library.opcheck and torch.compile(fullgraph=True)."""

import pytest
import torch

import tileattn
from tileattn import ops

from .helpers import make_qkv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_forward_and_backward(backend, causal):
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 19, 23, 4, 2, 16))
    torch.library.opcheck(ops.fwd, (q, k, v, None, None, 0, 0, 0.25, causal, False, -1, -1, 0.0, 0.0, 0, 0, None, None))
    out, lse = ops.fwd(q, k, v, None, None, 0, 0, 0.25, causal, False, -1, -1, 0.0, 0.0, 0, 0, None, None)
    dout = torch.randn_like(out)
    detached = [x.detach() for x in (q, k, v, out)]
    no_variants = (-1, -1, 0.0, 0.0, 0, 0, None)
    torch.library.opcheck(ops.bwd, (dout, *detached, lse, None, None, 0, 0, 0.25, causal, False, *no_variants))


def test_lse_carries_no_gradient(backend):
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 5, 5, 1, 1, 8))
    out, lse, _ = tileattn.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.requires_grad and not lse.requires_grad


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
