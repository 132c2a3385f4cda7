"""Input builders shared by the tests."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, dtype=torch.float32, device=DEVICE):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device)
    return q, k, v


def shape_id(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim):
    return f"B{batch}-Sq{seqlen_q}-Sk{seqlen_k}-H{heads}-Hkv{heads_kv}-D{head_dim}"
