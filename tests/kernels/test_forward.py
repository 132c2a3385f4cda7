"""The Triton forward launcher directly, with poisoned outputs so unwritten elements show."""

import pytest
import torch

from tileattn import kernels
from tileattn.reference import attention_ref

from ..helpers import make_qkv, shape_id

SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 65, 33, 4, 2, 80),  # ragged tiles both ways, head dim padded 80 -> 128
    (1, 33, 130, 3, 1, 5),  # tiny odd head dim, MQA
    (1, 129, 64, 2, 2, 64),  # Sq > Sk causal: whole query tiles see no key
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_forward_writes_every_element(shape, causal):
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    q, k, v = make_qkv(*shape)
    out = torch.full((batch, seqlen_q, heads, head_dim), float("nan"))
    lse = torch.full((batch, heads, seqlen_q), float("nan"))
    kernels.forward(q, k, v, head_dim**-0.5, causal, out=out, lse=lse)
    ref_out, ref_lse = attention_ref(q, k, v, causal=causal)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
