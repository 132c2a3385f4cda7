"""The blocked PyTorch backend: chunk boundaries and the no-N^2-memory property."""

import pytest
import torch

from tileattn import torch_backend
from tileattn.reference import attention_ref

from .helpers import make_qkv

_MASKS = {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "window": (False, (9, 4)),
          "causal-window": (True, (20, -1))}


@pytest.mark.parametrize("mask", list(_MASKS))
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(61, 113), (113, 61)], ids=["sq<sk", "sq>sk"])
def test_many_small_chunks_match_reference(monkeypatch, mask, seqlen_q, seqlen_k):
    """16-key chunks (7 full and a ragged one at 113 keys) and, where a mask lets key chunks be
    skipped, 16-row query blocks over only their keys."""
    causal, window = _MASKS[mask]
    monkeypatch.setattr(torch_backend, "BLOCK_K", 16)
    monkeypatch.setattr(torch_backend, "BLOCK_Q", 16)
    monkeypatch.setattr(torch_backend, "_SCORES_PER_CHUNK", 0)  # no wider chunks for few query rows
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 24)
    out, lse = torch_backend.forward(q, k, v, 0.3, causal, window_size=window)
    ref_out, ref_lse = attention_ref(q, k, v, 0.3, causal, window_size=window)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)

    dout = torch.randn_like(out)
    grads = torch_backend.backward(dout, q, k, v, out, lse, 0.3, causal, window_size=window)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad(attention_ref(*leaves, 0.3, causal, window_size=window)[0], leaves,
                                    dout.double())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-5, rtol=1e-5)


def test_query_blocks_draw_the_same_dropout_bits(monkeypatch):
    """Dropout's keep bits belong to (row, key) positions, so blocking the rows changes nothing."""
    q, k, v = make_qkv(2, 50, 70, 4, 2, 16)
    dropout = (0.3, 1234, 5)
    out, lse = torch_backend.forward(q, k, v, 0.3, True, dropout=dropout)
    monkeypatch.setattr(torch_backend, "BLOCK_K", 16)
    monkeypatch.setattr(torch_backend, "BLOCK_Q", 16)
    monkeypatch.setattr(torch_backend, "_SCORES_PER_CHUNK", 0)
    blocked_out, blocked_lse = torch_backend.forward(q, k, v, 0.3, True, dropout=dropout)
    torch.testing.assert_close(blocked_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocked_lse, lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(512, 2048), (1, 4 * 2**16)], ids=["prefill", "decode"])
def test_memory_grows_with_chunk_not_with_sequence(monkeypatch, seqlen_q, seqlen_k):
    """No intermediate is seqlen_q x seqlen_k: the largest tensor the forward creates is
    bounded by seqlen_q x BLOCK_K per head, or for a few query rows (whose chunks are wider)
    by _SCORES_PER_CHUNK."""
    seen = []
    real_matmul = torch.matmul

    def spy(*ops):
        r = real_matmul(*ops)
        seen.append(r.numel())
        return r

    monkeypatch.setattr(torch, "matmul", spy)
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


@pytest.mark.parametrize("leftpad", [None, 0], ids=["no-leftpad", "zero-leftpad"])
@pytest.mark.parametrize("seqlen_q", [1, 3], ids=["one-token", "three-tokens"])
def test_equally_filled_caches_decode_without_masks(monkeypatch, seqlen_q, leftpad):
    """Sequences filled alike with no left padding need no per-sequence masks (one token sees
    every filled slot; more are masked causally as a dense call would): same answer as the fp64
    reference and as the per-sequence masks, without a masked_fill."""
    q, k, v = make_qkv(2, seqlen_q, 64, 4, 2, 16)
    seqlens = torch.tensor([40, 40], dtype=torch.int32)
    k[:, 40:], v[:, 40:] = float("nan"), float("nan")
    zeros = torch.zeros(2, dtype=torch.long)
    masked = torch_backend._dense_forward(q, k[:, :40], v[:, :40], 0.25, True, bounds=(zeros, seqlens.long()))
    fills = []
    real_masked_fill = torch.Tensor.masked_fill
    monkeypatch.setattr(torch.Tensor, "masked_fill", lambda *a: fills.append(1) or real_masked_fill(*a))
    pad = None if leftpad is None else torch.full((2,), leftpad, dtype=torch.int32)
    out, lse = torch_backend.decode(q, k, v, seqlens, 0.25, True, cache_leftpad=pad)
    assert len(fills) == (0 if seqlen_q == 1 else 1)
    ref_out, ref_lse = attention_ref(q.double(), k[:, :40].double(), v[:, :40].double(), 0.25, True)
    for got, want in ((out, ref_out), (lse, ref_lse)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, masked[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, masked[1], atol=1e-6, rtol=1e-6)
