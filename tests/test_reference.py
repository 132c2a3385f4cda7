"""The oracle against identities that hold for exact attention, independent of any kernel."""

import math

import torch

from tileattn.reference import attention_ref, causal_mask

from .helpers import make_qkv


def test_constant_values_pass_through():
    # softmax rows sum to 1, so attending over identical value rows returns that row
    q, k, _ = make_qkv(2, 7, 11, 4, 2, 8, torch.float64, device="cpu")
    v = torch.ones(2, 11, 2, 8, dtype=torch.float64) * torch.arange(8)
    out, _ = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(out, torch.ones_like(out) * torch.arange(8, dtype=torch.float64))


def test_permuting_key_value_pairs_changes_nothing():
    q, k, v = make_qkv(1, 5, 9, 2, 2, 16, torch.float64, device="cpu")
    perm = torch.randperm(9)
    out, lse = attention_ref(q, k, v)
    out_p, lse_p = attention_ref(q, k[:, perm], v[:, perm])
    torch.testing.assert_close(out, out_p)
    torch.testing.assert_close(lse, lse_p)


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = make_qkv(1, 3, 4, 1, 1, 4, torch.float64, device="cpu")
    _, lse = attention_ref(q, k, v, softmax_scale=0.7)
    scores = 0.7 * q[0, :, 0] @ k[0, :, 0].T
    torch.testing.assert_close(lse[0, 0], torch.logsumexp(scores, -1))


def test_gqa_equals_repeated_heads():
    q, k, v = make_qkv(1, 6, 6, 4, 2, 8, torch.float64, device="cpu")
    out, _ = attention_ref(q, k, v)
    rep, _ = attention_ref(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2))
    torch.testing.assert_close(out, rep)


def test_causal_mask_bottom_right():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 1).tolist() == [[False], [False], [True]]


def test_row_without_keys_is_zero_with_minus_inf_lse():
    q, k, v = make_qkv(1, 3, 1, 1, 1, 4, torch.float64, device="cpu")
    out, lse = attention_ref(q, k, v, causal=True)
    assert torch.equal(out[0, :2], torch.zeros(2, 1, 4, dtype=torch.float64))
    assert lse[0, 0, :2].tolist() == [-math.inf, -math.inf]
