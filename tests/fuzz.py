"""Random cross-feature calls against the fp64 oracle: a search for the combinations no
parametrized test names. Not collected by pytest (a fixed case list belongs there); run it as a
script, on the CPU under Triton's interpreter or on a GPU:

    TRITON_INTERPRET=1 python tests/fuzz.py --seed 0 --minutes 10

Each case draws an entry point (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache),
a backend (the Triton kernels or the blocked PyTorch path), a dtype, shapes (lengths 0, 1,
primes, Sq != Sk, GQA/MQA, head dims 1..256, non-contiguous inputs) and variants (windows,
softcap, ALiBi, sinks, scales), and judges out, LSE and gradients on whole tensors by
tileattn.testing's rule. A failure prints the seed, which reproduces it alone (--seed S --cases 1).

Three kinds of failure are not defects of tileattn, and --strict keeps them in the report:
- "zero": a reference that is exactly 0 (one key a row: dq and dk vanish) against which fp32
  rounding of rowsum(dO * out) and dO.v leaves ~1e-6..1e-4, over the rule's floor at scale 0;
- "fp32": fp32 errors under 1e-4 on these unit-scale inputs, where PyTorch's own fp32 error is
  ~1e-7 and the kernels' base-2 exponent (the scale times log2(e), rounded) and summation order
  leave a few times that: 2-8x PyTorch's, seen up to 2.6e-5;
- "delta": a query row dominated by one key, in fp16/bf16. Every FlashAttention backward takes
  rowsum(dO * out) with out rounded to the dtype, where PyTorch's autograd sums p * dP in fp32;
  with one key and a sink, or a softmax that is nearly one-hot, the rounding shows in dq and dk.
  Classified by the same case passing on the other backend with the same error (both run the
  algorithm), so what is left is where the kernels differ from their own CPU path.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(shape, dtype, noncontiguous: bool):
    if noncontiguous and len(shape) == 4:  # (B, S, H, D) seen through a transpose of (B, H, S, D)
        b, s, h, d = shape
        return torch.randn(b, h, s, d).to(dtype).transpose(1, 2)
    if noncontiguous:
        return torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)[..., ::2]
    return torch.randn(*shape).to(dtype)


def _variants(rng, heads: int, batch: int, seqlen_k: int) -> dict:
    v = {}
    if rng.random() < 0.35:
        v["window_size"] = (rng.choice([-1, 0, 1, 3, rng.randint(0, seqlen_k + 5), 10 * seqlen_k]),
                            rng.choice([-1, 0, 1, rng.randint(0, seqlen_k + 5)]))
    if rng.random() < 0.3:
        v["softcap"] = rng.choice([5.0, 20.0, 30.0, 50.0])
    if rng.random() < 0.3:
        v["alibi_slopes"] = torch.rand(*rng.choice([(heads,), (batch, heads)])) * 0.5
    if rng.random() < 0.3:
        v["learnable_sink"] = torch.randn(heads)
    if rng.random() < 0.3:
        v["softmax_scale"] = rng.choice([0.05, 0.3, 1.0])
    return v


def _describe(variants: dict) -> dict:
    return {k: tuple(x.shape) if torch.is_tensor(x) else x for k, x in variants.items()}


def _oracle(q, k, v, causal, variants, b, upcast):
    """attention_ref of one sequence (batch 1) with batch entry b's slopes."""
    from tileattn.reference import attention_ref

    kw = dict(variants)
    slopes, sink, scale = kw.pop("alibi_slopes", None), kw.pop("learnable_sink", None), kw.pop("softmax_scale", None)
    if slopes is not None and slopes.dim() == 2:
        slopes = slopes[b]
    return attention_ref(q, k, v, scale, causal, upcast=upcast, alibi_slopes=slopes, learnable_sink=sink, **kw)


def _sequences(q, k, v, cu_q, cu_k, causal, variants, dout, backward: bool):
    """Per sequence, the oracle (fp64) and PyTorch in the inputs' dtype: {upcast: (out, lse,
    [dq, dk, dv])} over the packed tensors."""
    results = {}
    for upcast in (True, False):
        dtype = torch.float64 if upcast else q.dtype
        out = torch.zeros(q.shape, dtype=dtype)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64 if upcast else torch.float32)
        grads = [torch.zeros(x.shape, dtype=dtype) for x in (q, k, v)]
        for b in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            if qs.start == qs.stop:
                continue
            leaves = [x[s][None].detach().to(dtype).requires_grad_(backward) for x, s in ((q, qs), (k, ks), (v, ks))]
            o, ls = _oracle(*leaves, causal, variants, b, upcast)
            out[qs], lse[:, qs] = o[0].detach(), ls[0].detach()
            if backward:
                for g, x, s in zip(torch.autograd.grad(o, leaves, dout[qs][None].to(dtype)), grads, (qs, ks, ks)):
                    x[s] += g[0]
        results[upcast] = (out, lse, grads)
    return results


def dense_case(rng, dtype, backward):
    from tileattn import flash_attn_func

    batch, heads_kv = rng.choice([1, 2, 3]), rng.choice([1, 2])
    heads, head_dim = heads_kv * rng.choice([1, 2, 3]), rng.choice([1, 8, 16, 24, 32, 40, 64, 80, 96, 128, 160, 256])
    seqlen_q, seqlen_k = rng.choice([1, 2, 17, 63, 64, 65, 113, 130]), rng.choice([1, 5, 64, 113, 129, 200])
    causal, noncontiguous = rng.random() < 0.5, rng.random() < 0.4
    q = _tensor((batch, seqlen_q, heads, head_dim), dtype, noncontiguous)
    k, v = (_tensor((batch, seqlen_k, heads_kv, head_dim), dtype, noncontiguous) for _ in range(2))
    variants = _variants(rng, heads, batch, seqlen_k)
    label = (f"dense B{batch} Sq{seqlen_q} Sk{seqlen_k} H{heads}/{heads_kv} D{head_dim} causal={causal} "
             f"noncontiguous={noncontiguous} {_describe(variants)}")
    # as packed sequences of one batch entry each, so one judge serves both entry points
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    cu_q, cu_k = (list(range(0, (batch + 1) * n, n)) for n in (seqlen_q, seqlen_k))
    leaves = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True, **variants)
    dout = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout) if backward else ()
    ours = (out.reshape(-1, heads, head_dim), lse.permute(1, 0, 2).reshape(heads, -1),
            [g.reshape(-1, *g.shape[2:]) for g in grads])
    return label, ours, _sequences(*flat, cu_q, cu_k, causal, variants, dout.reshape(-1, heads, head_dim), backward)


def varlen_case(rng, dtype, backward):
    from tileattn import flash_attn_varlen_func

    count, heads_kv = rng.choice([1, 2, 3, 4]), rng.choice([1, 2])
    heads, head_dim = heads_kv * rng.choice([1, 2, 4]), rng.choice([16, 32, 48, 64, 80, 96, 128])
    lens_q = [rng.choice([0, 1, 7, 33, 64, 100]) for _ in range(count)]
    lens_k = list(lens_q) if rng.random() < 0.4 else [rng.choice([0, 1, 9, 64, 70, 150]) for _ in range(count)]
    causal = rng.random() < 0.5
    variants = _variants(rng, heads, count, max(lens_k))
    label = (f"varlen lens_q {lens_q} lens_k {lens_k} H{heads}/{heads_kv} D{head_dim} causal={causal} "
             f"{_describe(variants)}")
    q = torch.randn(sum(lens_q), heads, head_dim).to(dtype)
    k, v = (torch.randn(sum(lens_k), heads_kv, head_dim).to(dtype) for _ in range(2))
    cu_q, cu_k = ([0, *torch.tensor(n).cumsum(0).tolist()] for n in (lens_q, lens_k))
    leaves = [x.clone().requires_grad_(backward) for x in (q, k, v)]
    out, lse, _ = flash_attn_varlen_func(*leaves, *(torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_k)),
                                         max(lens_q), max(lens_k), causal=causal, return_attn_probs=True, **variants)
    dout = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout) if backward and out.numel() else ()
    return label, (out, lse, list(grads)), _sequences(q, k, v, cu_q, cu_k, causal, variants, dout, backward)


def kvcache_case(rng, dtype, backward):
    """flash_attn_with_kvcache: dense (optionally through cache_batch_idx, with left padding) or
    paged caches, new keys appended, any split count; forward only. The appended rows are
    checked in the cache too."""
    from tileattn import flash_attn_with_kvcache

    batch, heads_kv = rng.choice([1, 2, 3]), rng.choice([1, 2])
    heads, head_dim = heads_kv * rng.choice([1, 2, 4, 8]), rng.choice([16, 32, 64, 80, 96, 128, 256])
    page = rng.choice([16, 32, 128]) if rng.random() < 0.4 else None
    capacity = page * rng.choice([1, 2, 5]) if page else rng.choice([32, 100, 160, 256])
    seqlen_q = rng.choice([1, 1, 2, 4, 17])
    new = min(rng.choice([0, 0, 1, 3]) if seqlen_q <= 4 else 0, capacity)
    lens = [rng.randint(0, capacity - new) for _ in range(batch)]
    causal, splits = rng.random() < 0.6, rng.choice([0, 0, 1, 2, 3, 7])
    use_idx, use_leftpad = not page and rng.random() < 0.3, not page and rng.random() < 0.3
    leftpad = [rng.randint(0, n) for n in lens] if use_leftpad else [0] * batch
    variants = _variants(rng, heads, batch, capacity)
    if page:
        pages = batch * (capacity // page)
        k_cache, v_cache = (torch.randn(pages + 3, page, heads_kv, head_dim).to(dtype) for _ in range(2))
        table = torch.randperm(pages + 3)[:pages].view(batch, -1).to(torch.int32)
    else:
        k_cache, v_cache = (torch.randn(batch + 2 * use_idx, capacity, heads_kv, head_dim).to(dtype) for _ in range(2))
        table = None
    idx = torch.randperm(batch + 2)[:batch].to(torch.int32) if use_idx else None
    q = torch.randn(batch, seqlen_q, heads, head_dim).to(dtype)
    k_new, v_new = ((torch.randn(batch, new, heads_kv, head_dim).to(dtype) for _ in range(2)) if new else (None, None))
    label = (f"kvcache B{batch} Sq{seqlen_q} new{new} capacity{capacity} lens{lens} leftpad{leftpad} page{page} "
             f"batch_idx={use_idx} H{heads}/{heads_kv} D{head_dim} causal={causal} splits{splits} "
             f"{_describe(variants)}")
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(lens).int(),
                                       cache_batch_idx=idx, cache_leftpad=torch.tensor(leftpad).int() if use_leftpad
                                       else None, block_table=table, causal=causal, num_splits=splits,
                                       return_softmax_lse=True, **variants)

    def keys(cache, b):
        total = lens[b] + new
        rows = cache[table[b].long()].flatten(0, 1) if page else cache[idx[b] if use_idx else b]
        return rows[leftpad[b]:total]

    for b in range(batch):  # the appended rows, where they belong
        if new and not torch.equal(keys(k_cache, b)[-new:], k_new[b]):
            return label, None, f"the new keys of sequence {b} are not where they belong in the cache"
    flat_k, flat_v = (torch.cat([keys(c, b) for b in range(batch)]) for c in (k_cache, v_cache))
    cu_q = list(range(0, (batch + 1) * seqlen_q, seqlen_q))
    cu_k = [0, *torch.tensor([lens[b] + new - leftpad[b] for b in range(batch)]).cumsum(0).tolist()]
    reference = _sequences(q.reshape(-1, heads, head_dim), flat_k, flat_v, cu_q, cu_k, causal, variants, None, False)
    ours = (out.reshape(-1, heads, head_dim), lse.permute(1, 0, 2).reshape(heads, -1), [])
    return label, ours, reference


CASES = {"dense": dense_case, "varlen": varlen_case, "kvcache": kvcache_case}


def judge(ours, reference, dtype) -> list:
    """(name, Check) per output, by tileattn.testing's rule on whole tensors."""
    from tileattn.testing import Check, _lse_err, _max_err, _rounding_atol

    (out, lse, grads), (ref_out, ref_lse, ref_grads) = ours, reference[True]
    pt_out, pt_lse, pt_grads = reference[False]
    checks = [Check("out", _max_err(out, ref_out), _max_err(pt_out, ref_out), _rounding_atol(ref_out, dtype)),
              Check("lse", _lse_err(lse, ref_lse), _lse_err(pt_lse, ref_lse), _rounding_atol(ref_lse, torch.float32))]
    for name, g, ref, pt in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        checks.append(Check(name, _max_err(g, ref), _max_err(pt, ref), _rounding_atol(ref, dtype)))
    return checks


def run_case(seed: int, kinds, backend: str | None = None):
    """(label, backend, dtype, failed checks or a message) of the case this seed draws."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kind, drawn_backend, dtype = rng.choice(kinds), rng.choice(["triton", "torch"]), rng.choice(DTYPES)
    backward = kind != "kvcache" and rng.random() < 0.6
    backend = backend or drawn_backend
    os.environ["TILEATTN_BACKEND"] = backend
    label, ours, reference = CASES[kind](rng, dtype, backward)
    if ours is None:
        return label, backend, dtype, [reference]
    return label, backend, dtype, [c for c in judge(ours, reference, dtype) if not c.ok]


def _kind_of_failure(seed, kinds, backend, dtype, failed) -> str:
    """'zero', 'fp32', 'delta' or 'kernel' (see the module's docstring)."""
    if all(c.torch_err == 0 and c.err < 1e-4 for c in failed):
        return "zero"
    if dtype == torch.float32 and all(c.err < 1e-4 for c in failed):
        return "fp32"
    other = "torch" if backend == "triton" else "triton"
    _, _, _, other_failed = run_case(seed, kinds, other)
    errs = {c.name: c.err for c in other_failed if not isinstance(c, str)}
    if all(not isinstance(c, str) and c.name in errs and c.err <= 2 * errs[c.name] + c.atol for c in failed):
        return "delta"
    return "kernel"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="first seed; case i draws from seed + i")
    parser.add_argument("--cases", type=int, default=10**9, help="at most this many cases")
    parser.add_argument("--minutes", type=float, default=10.0, help="stop starting cases after this long")
    parser.add_argument("--kinds", default="dense,varlen,kvcache", help="entry points to draw from")
    parser.add_argument("--strict", action="store_true", help="report 'zero', 'fp32' and 'delta' failures too")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    start, counts, ran = time.time(), {"zero": 0, "fp32": 0, "delta": 0, "kernel": 0}, 0
    for seed in range(args.seed, args.seed + args.cases):
        if time.time() - start > 60 * args.minutes:
            break
        ran += 1
        try:
            label, backend, dtype, failed = run_case(seed, kinds)
        except Exception as e:  # a crash is a failure like any other; report and go on
            counts["kernel"] += 1
            print(f"seed {seed}: {type(e).__name__}: {e}", flush=True)
            continue
        if not failed:
            continue
        crashed = any(isinstance(c, str) for c in failed)
        kind = "kernel" if crashed else _kind_of_failure(seed, kinds, backend, dtype, failed)
        counts[kind] += 1
        if kind == "kernel" or args.strict:
            print(f"seed {seed} ({kind}): {backend} {str(dtype)[6:]} {label}\n    "
                  + "\n    ".join(str(c) for c in failed), flush=True)
    print(f"{ran} cases in {time.time() - start:.0f} s; failures: {counts}", flush=True)
    return 1 if counts["kernel"] else 0


if __name__ == "__main__":
    sys.exit(main())
