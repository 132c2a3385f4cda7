"""flash_attn_func and its packed variants: semantics, layouts, validation of bad input."""

import re

import pytest
import torch

from tileattn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from tileattn.reference import attention_ref

from .helpers import DEVICE, make_qkv


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def test_return_attn_probs_gives_lse(backend):
    q, k, v = make_qkv(2, 17, 33, 4, 2, 32)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    ref_out, ref_lse = attention_ref(q, k, v)
    assert lse.shape == (2, 4, 17) and lse.dtype == torch.float32 and probs is None
    _close(out, ref_out)
    _close(lse, ref_lse)


def test_default_scale_is_inverse_sqrt_head_dim(backend):
    q, k, v = make_qkv(1, 9, 9, 2, 2, 48)
    _close(flash_attn_func(q, k, v), flash_attn_func(q, k, v, softmax_scale=48 ** -0.5), tol=0)


def test_causal_is_bottom_right_aligned(backend):
    # Sq < Sk: the last query sees every key; the first sees Sk - Sq + 1 keys
    q, k, v = make_qkv(1, 3, 8, 1, 1, 16)
    out = flash_attn_func(q, k, v, causal=True)
    first = flash_attn_func(q[:, :1], k[:, :6], v[:, :6])
    last = flash_attn_func(q[:, 2:], k, v)
    _close(out[:, :1], first)
    _close(out[:, 2:], last)


def test_query_rows_that_see_no_key_give_zero_and_minus_inf(backend):
    # Sq > Sk with causal: the first Sq - Sk rows see nothing
    q, k, v = make_qkv(1, 9, 4, 2, 1, 16)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, causal=True, return_attn_probs=True)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isinf(lse[:, :, :5]).all() and (lse[:, :, :5] < 0).all()
    assert torch.isfinite(lse[:, :, 5:]).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :5], torch.zeros_like(q.grad[:, :5]))
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize(
    "layout",
    ["transposed", "head_dim_slice", "batch_stride", "expanded_kv"],
)
def test_non_contiguous_inputs_match_contiguous(backend, layout):
    b, s, h, d = 2, 37, 4, 24
    if layout == "transposed":  # stored (B, H, S, D), viewed as (B, S, H, D)
        q, k, v = (torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2) for _ in range(3))
    elif layout == "head_dim_slice":  # every row strided past unused columns
        q, k, v = (torch.randn(b, s, h, 2 * d, device=DEVICE)[..., :d] for _ in range(3))
    elif layout == "batch_stride":  # every other batch element
        q, k, v = (torch.randn(2 * b, s, h, d, device=DEVICE)[::2] for _ in range(3))
    else:  # one K/V for the whole batch, broadcast with a zero batch stride
        q = torch.randn(b, s, h, d, device=DEVICE)
        k, v = (torch.randn(1, s, h, d, device=DEVICE).expand(b, s, h, d) for _ in range(2))
    assert not (q.is_contiguous() and k.is_contiguous())
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    dense = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    out = flash_attn_func(*leaves, causal=True)
    ref = flash_attn_func(*dense, causal=True)
    _close(out, ref, tol=0)
    dout = torch.randn_like(out).transpose(0, 1).contiguous().transpose(0, 1)  # strided dout too
    for g, rg in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, dense, dout)):
        _close(g, rg, tol=0)


def test_qkvpacked_matches_unpacked(backend):
    qkv = torch.randn(2, 21, 3, 4, 32, device=DEVICE, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (qkv[:, :, i].detach().requires_grad_() for i in range(3))
    ref = flash_attn_func(q, k, v, causal=True)
    _close(out, ref, tol=0)
    out.sum().backward()
    ref.sum().backward()
    _close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2), tol=0)


def test_kvpacked_matches_unpacked_with_gqa(backend):
    q = torch.randn(1, 13, 6, 16, device=DEVICE)
    kv = torch.randn(1, 19, 2, 3, 16, device=DEVICE)
    out, lse, _ = flash_attn_kvpacked_func(q, kv, return_attn_probs=True)
    ref_out, ref_lse = attention_ref(q, kv[:, :, 0], kv[:, :, 1])
    _close(out, ref_out)
    _close(lse, ref_lse)


@pytest.mark.parametrize(
    "shapes",
    [(0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)],
    ids=["batch0", "seqlen_q0", "seqlen_k0", "both0"],
)
def test_empty_inputs(backend, shapes):
    b, sq, sk = shapes
    q, k, v = (x.requires_grad_() for x in make_qkv(b, sq, sk, 2, 1, 16))
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == (b, sq, 2, 16) and lse.shape == (b, 2, sq)
    assert torch.equal(out, torch.zeros_like(out))  # no key: zeros, never NaN
    assert (lse == float("-inf")).all()
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad.shape == x.shape and torch.equal(x.grad, torch.zeros_like(x.grad))


def _qkv(**over):
    """Valid small inputs, with single entries replaced."""
    q, k, v = make_qkv(1, 4, 4, 2, 1, 8)
    args = dict(q=q, k=k, v=v)
    args.update(over)
    return args


BAD_INPUTS = {
    "q_not_tensor": (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    "q_rank3": (dict(q=torch.randn(4, 2, 8)), ValueError, "q must have 4 dims"),
    "k_rank5": (dict(k=torch.randn(1, 4, 1, 1, 8)), ValueError, "k must have 4 dims"),
    "int_dtype": (dict(q=torch.ones(1, 4, 2, 8, dtype=torch.int32)), TypeError,
                  "q must be float16, bfloat16 or float32"),
    "bool_dtype": (dict(v=torch.ones(1, 4, 1, 8, dtype=torch.bool)), TypeError,
                   "v must be float16, bfloat16 or float32"),
    "float64": (dict(q=torch.randn(1, 4, 2, 8, dtype=torch.float64)), TypeError, "got torch.float64"),
    "mixed_dtypes": (dict(k=torch.randn(1, 4, 1, 8, dtype=torch.float16)), TypeError, "q, k, v must share one dtype"),
    "kv_shape_mismatch": (dict(v=torch.randn(1, 5, 1, 8)), ValueError, "k and v must have the same shape"),
    "batch_mismatch": (dict(k=torch.randn(2, 4, 1, 8), v=torch.randn(2, 4, 1, 8)), ValueError, "same batch size"),
    "head_dim_mismatch": (dict(k=torch.randn(1, 4, 1, 16), v=torch.randn(1, 4, 1, 16)), ValueError, "same head_dim"),
    "heads_not_multiple": (
        dict(q=torch.randn(1, 4, 3, 8), k=torch.randn(1, 4, 2, 8), v=torch.randn(1, 4, 2, 8)),
        ValueError, r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)",
    ),
    "head_dim_too_big": (
        dict(q=torch.randn(1, 2, 1, 257), k=torch.randn(1, 2, 1, 257), v=torch.randn(1, 2, 1, 257)),
        ValueError, "head_dim must be between 1 and 256, got 257",
    ),
    "head_dim_zero": (
        dict(q=torch.randn(1, 2, 1, 0), k=torch.randn(1, 2, 1, 0), v=torch.randn(1, 2, 1, 0)),
        ValueError, "head_dim must be between 1 and 256, got 0",
    ),
    "zero_kv_heads": (
        dict(k=torch.randn(1, 4, 0, 8), v=torch.randn(1, 4, 0, 8)), ValueError, "at least one head",
    ),
    "dropout_out_of_range": (dict(dropout_p=1.5), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    "scale_not_number": (dict(softmax_scale="big"), TypeError, "softmax_scale must be a finite number"),
    "scale_nan": (dict(softmax_scale=float("nan")), TypeError, "softmax_scale must be a finite number"),
    "window_not_pair": (dict(window_size=(1, 2, 3)), ValueError, r"window_size must be a pair"),
    "window_below_minus_one": (dict(window_size=(-2, 0)), ValueError, "window_size left must be an int >= 0"),
    "window_float": (dict(window_size=(4.5, 0)), ValueError, "window_size left"),
    "softcap_negative": (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    "alibi_fp16": (dict(alibi_slopes=torch.ones(2, dtype=torch.float16)), TypeError, "alibi_slopes must be float32"),
    "alibi_wrong_heads": (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_rejected_with_a_clear_message(case):
    over, exc, message = BAD_INPUTS[case]
    args = _qkv(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in over.items()})
    with pytest.raises(exc, match=message):
        flash_attn_func(**args)


def test_tensors_on_different_devices_are_rejected():
    q, k, v = make_qkv(1, 4, 4, 2, 1, 8, device="cpu")
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        flash_attn_func(q, k.to("meta"), v.to("meta"))


def test_packed_shapes_are_checked():
    with pytest.raises(ValueError, match=re.escape("qkv must have shape (batch, seqlen, 3, heads, head_dim)")):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 8))
    with pytest.raises(ValueError, match=re.escape("kv must have shape (batch, seqlen, 2, heads, head_dim)")):
        flash_attn_kvpacked_func(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 1, 8))
