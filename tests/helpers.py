"""Input builders shared by the tests."""

import torch

from tileattn import generation, overlap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype=torch.float32, device=DEVICE):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device)
    return q, k, v


def shape_id(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim):
    return f"B{batch}-Sq{seqlen_q}-Sk{seqlen_k}-H{heads}-Hkv{heads_kv}-D{head_dim}"


def fork_every_mlp(monkeypatch):
    """generation's GPU path on any device, for every parallel block whatever the cache size."""
    monkeypatch.setattr(generation, "OVERLAP_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(generation, "_overlap_blocks", lambda model, device, *_: generation._facts(model, device)[1])


def record_forks(monkeypatch) -> list:
    """The block key of every MLP fork (tileattn.overlap.mlp_fork) from here on, in order."""
    forks = []
    fork = overlap.mlp_fork
    monkeypatch.setattr(overlap, "mlp_fork", lambda *a: forks.append(a[1]) or fork(*a))
    return forks
