"""The accuracy rule shared by the test suite and ``tileattn bench --check``.

A result is accepted when its error against the float64 oracle is at most twice the error of
PyTorch computing the same attention in the same low precision, plus a small atol (the rounding
error of the dtype at the tensor's scale, as flash-attn's own tests use). Checked for out, LSE,
dq, dk and dv; LSE entries of -inf (rows that see no key) must match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import attention_ref


@dataclass
class Check:
    name: str
    err: float  # max |ours - fp64 oracle|
    torch_err: float  # max |PyTorch in the same dtype - fp64 oracle|
    atol: float

    @property
    def ok(self) -> bool:
        return self.err <= 2 * self.torch_err + self.atol  # False for NaN

    def __str__(self) -> str:
        return f"{self.name}: err {self.err:.2e} vs torch {self.torch_err:.2e} (+atol {self.atol:.1e})"


def _rounding_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the dtype's largest rounding error at the reference's scale (eps * max |ref|, one
    unit in the last place), plus 1e-6. Taken from the scale, not from rounding the reference's
    own values: a handful of them (dsink has one per head) can all round exactly and leave a
    floor of 1e-6 under a bf16 quantity."""
    ref = ref[torch.isfinite(ref)]
    if ref.numel() == 0:
        return 0.0
    return torch.finfo(dtype).eps * ref.abs().max().item() + 1e-6


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref).abs().max().item()


def _lse_err(lse: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error over finite entries; inf if the -inf pattern differs."""
    empty = ref == float("-inf")
    if not torch.equal(lse == float("-inf"), empty):
        return float("inf")
    return _max_err(lse[~empty], ref[~empty])


def check_attention(fn, q, k, v, causal: bool = False, softmax_scale: float | None = None, backward: bool = True,
                    **variants):
    """Run ``fn(q, k, v, causal=..., softmax_scale=..., return_attn_probs=True, **variants)`` and
    judge it; variants (window_size, softcap, alibi_slopes, learnable_sink) go to the oracle too.

    Returns a list of :class:`Check` for out, lse and (with backward) dq, dk, dv, and dsink
    when a learnable_sink is given.
    """
    dout = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    sink = variants.pop("learnable_sink", None)

    def run(f, upcast_to=None):
        tensors = (q, k, v) if sink is None else (q, k, v, sink)
        leaves = [x.detach().to(upcast_to or x.dtype).requires_grad_(backward) for x in tensors]
        out, lse = f(*leaves)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype)) if backward else ()
        return out.detach(), lse.detach(), grads

    def ours(q_, k_, v_, sink_=None):
        out, lse, _ = fn(q_, k_, v_, causal=causal, softmax_scale=softmax_scale, return_attn_probs=True,
                         **variants, **({} if sink_ is None else {"learnable_sink": sink_}))
        return out, lse

    def oracle(q_, k_, v_, sink_=None):
        return attention_ref(q_, k_, v_, softmax_scale, causal, upcast=True, learnable_sink=sink_, **variants)

    def lowp(q_, k_, v_, sink_=None):
        return attention_ref(q_, k_, v_, softmax_scale, causal, upcast=False, learnable_sink=sink_, **variants)

    out, lse, grads = run(ours)
    ref_out, ref_lse, ref_grads = run(oracle, torch.float64)
    pt_out, pt_lse, pt_grads = run(lowp)

    checks = [
        Check("out", _max_err(out, ref_out), _max_err(pt_out, ref_out), _rounding_atol(ref_out, q.dtype)),
        # LSE is float32 in both; its floor is float32 rounding at the LSE's scale
        Check("lse", _lse_err(lse, ref_lse), _lse_err(pt_lse, ref_lse), _rounding_atol(ref_lse, torch.float32)),
    ]
    # dsink is returned in the sink's dtype but, like dq/dk/dv, computed from the low-precision
    # O and dO (rowsum(dO * O), as flash-attn computes delta), so its floor is q's dtype rounding
    for name, g, ref_g, pt_g in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, pt_grads):
        checks.append(Check(name, _max_err(g, ref_g), _max_err(pt_g, ref_g), _rounding_atol(ref_g, q.dtype)))
    return checks
