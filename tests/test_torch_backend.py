"""The blocked PyTorch backend: chunk boundaries and the no-N^2-memory property."""

import pytest
import torch

from tileattn import torch_backend
from tileattn.reference import attention_ref

from .helpers import make_qkv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_many_small_chunks_match_reference(monkeypatch, causal):
    monkeypatch.setattr(torch_backend, "BLOCK_K", 16)  # 113 keys: 7 full chunks and a ragged one
    q, k, v = make_qkv(2, 61, 113, 4, 2, 24)
    out, lse = torch_backend.forward(q, k, v, 0.3, causal)
    ref_out, ref_lse = attention_ref(q, k, v, 0.3, causal)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)

    dout = torch.randn_like(out)
    grads = torch_backend.backward(dout, q, k, v, out, lse, 0.3, causal)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad(attention_ref(*leaves, 0.3, causal)[0], leaves, dout.double())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-5, rtol=1e-5)


def test_memory_grows_with_chunk_not_with_sequence(monkeypatch):
    """No intermediate is seqlen_q x seqlen_k: the largest tensor the forward creates is
    bounded by seqlen_q x BLOCK_K per head."""
    seen = []
    real_einsum = torch.einsum

    def spy(eq, *ops):
        r = real_einsum(eq, *ops)
        seen.append(r.numel())
        return r

    monkeypatch.setattr(torch, "einsum", spy)
    q, k, v = make_qkv(1, 512, 2048, 1, 1, 8)
    torch_backend.forward(q, k, v, 0.35, True)
    assert max(seen) <= 512 * torch_backend.BLOCK_K
    assert max(seen) < 512 * 2048 // 4
