"""The Triton backward launcher directly, with poisoned gradients so unwritten elements show."""

import pytest
import torch

from tileattn import kernels
from tileattn.reference import attention_ref

from ..helpers import DEVICE, make_qkv, shape_id

SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 65, 33, 4, 2, 80),  # head dim split 64 + 16
    (1, 40, 70, 2, 1, 72),  # split 64 + 16, second part masked
    (1, 37, 37, 2, 2, 96),  # split 64 + 32
    (1, 33, 130, 3, 1, 5),
    (1, 129, 64, 2, 2, 64),  # causal: keys no query sees must get dk = dv = 0, written
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_backward_writes_every_element(shape, causal):
    head_dim = shape[-1]
    q, k, v = make_qkv(*shape)
    out, lse = kernels.forward(q, k, v, head_dim**-0.5, causal)
    dout = torch.randn_like(out)
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    kernels.backward(dout, q, k, v, out, lse, head_dim**-0.5, causal, dq=grads[0], dk=grads[1], dv=grads[2])

    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = attention_ref(*leaves, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout.double())
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert not g.isnan().any(), f"d{name} has unwritten elements"
        torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=5e-5, msg=f"d{name}")


def test_varlen_backward_writes_every_element():
    lq, lk = [3, 0, 40], [9, 5, 33]  # the middle sequence has keys but no queries
    cu_q = torch.tensor([0, 3, 3, 43], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 14, 47], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lq), 2, 24, device=DEVICE)
    k, v = (torch.randn(sum(lk), 1, 24, device=DEVICE) for _ in range(2))
    out, lse = kernels.forward(q, k, v, 0.2, True, cu_q, cu_k, 40, 33)
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    kernels.backward(torch.randn_like(out), q, k, v, out, lse, 0.2, True, cu_q, cu_k, 40, 33,
                     dq=grads[0], dk=grads[1], dv=grads[2])
    for name, g in zip("qkv", grads):
        assert not g.isnan().any(), f"d{name} has unwritten elements"
    assert torch.equal(grads[1][9:14], torch.zeros_like(grads[1][9:14]))
