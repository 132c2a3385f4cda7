"""The blocked PyTorch backend: chunk boundaries and the no-N^2-memory property."""

import pytest
import torch

from tileattn import torch_backend
from tileattn.reference import attention_ref

from .helpers import make_qkv


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_many_small_chunks_match_reference(monkeypatch, causal):
    monkeypatch.setattr(torch_backend, "BLOCK_K", 16)  # 113 keys: 7 full chunks and a ragged one
    monkeypatch.setattr(torch_backend, "_SCORES_PER_CHUNK", 0)  # no wider chunks for few query rows
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


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(512, 2048), (1, 4 * 2**16)], ids=["prefill", "decode"])
def test_memory_grows_with_chunk_not_with_sequence(monkeypatch, seqlen_q, seqlen_k):
    """No intermediate is seqlen_q x seqlen_k: the largest tensor the forward creates is
    bounded by seqlen_q x BLOCK_K per head, or for a few query rows (whose chunks are wider)
    by _SCORES_PER_CHUNK."""
    seen = []
    real_einsum = torch.einsum

    def spy(eq, *ops):
        r = real_einsum(eq, *ops)
        seen.append(r.numel())
        return r

    monkeypatch.setattr(torch, "einsum", spy)
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 1, 1, 8)
    torch_backend.forward(q, k, v, 0.35, True)
    assert max(seen) <= max(seqlen_q * torch_backend.BLOCK_K, torch_backend._SCORES_PER_CHUNK)
    assert max(seen) <= seqlen_q * seqlen_k // 4


def test_decode_reads_only_the_filled_slots_and_matches_chunked(monkeypatch):
    """Decoding attends over the longest fill, not the cache's capacity, in one chunk; the same
    call forced through 16-key chunks gives the same answer."""
    q, k, v = make_qkv(3, 2, 700, 4, 2, 16)
    seqlens = torch.tensor([5, 333, 0], dtype=torch.int32)
    leftpad = torch.tensor([1, 20, 0], dtype=torch.int32)
    k[:, 333:], v[:, 333:] = float("nan"), float("nan")  # past the longest fill: never read
    out, lse = torch_backend.decode(q, k, v, seqlens, 0.25, True, cache_leftpad=leftpad)
    monkeypatch.setattr(torch_backend, "BLOCK_K", 16)
    monkeypatch.setattr(torch_backend, "_SCORES_PER_CHUNK", 0)
    chunked_out, chunked_lse = torch_backend.decode(q, k, v, seqlens, 0.25, True, cache_leftpad=leftpad)
    torch.testing.assert_close(out, chunked_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, chunked_lse, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out[:2]).all() and (out[2] == 0).all() and torch.isinf(lse[2]).all()
