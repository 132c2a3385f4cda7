"""`tileattn bench`: correctness at real sizes, speed against every attention backend present,
and peak memory against standard attention. Writes bench.md and PNG plots to --out.

Speed uses the FlashAttention grid: batch * seqlen = 16k tokens, heads * head_dim = 2048.
FLOPs: forward 4 * B * H * Sq * Sk * D (halved when causal), backward 2.5x forward.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..api import flash_attn_func
from ..testing import check_attention
from .bench_decode import chunk_table, decode_bench, decode_table, dense_chunk_bench, packed_paged_bench, packed_table
from .bench_kernels import step_kernels_bench, step_kernels_table
from .bench_profile import step_profile_bench, step_profile_table
from .bench_ring import ring_bench, ring_table
from .bench_variants import variants_bench, variants_plot, variants_table

TOKENS = 16 * 1024
HIDDEN = 2048
# tileattn.generation's paths the generation bench can time: generate()'s options for each
FAST_PATHS = {"plain": dict(cuda_graph=False), "graph": dict(cuda_graph=True),
              "compile": dict(cuda_graph=True, compile=True)}


def _positive(text: str) -> int:
    """argparse type: an int >= 1 (a length, count or head dim of 0 divides by zero downstream)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _decode_config(text: str) -> tuple[int, int, int]:
    """argparse type: a decode tile config BLOCK_N,WARPS,STAGES, e.g. 32,1,4."""
    try:
        config = tuple(int(x) for x in text.split(","))
    except ValueError:
        config = ()
    if len(config) != 3 or min(config) < 1:
        raise argparse.ArgumentTypeError(f"expected BLOCK_N,WARPS,STAGES (three positive integers), got {text!r}")
    return config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="run the accuracy matrix at real sizes first")
    p.add_argument("--no-speed", action="store_true", help="skip the speed grid")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory comparison")
    p.add_argument("--seqlens", type=_positive, nargs="+", help="speed-grid sequence lengths (default 512..16k on GPU)")
    p.add_argument("--head-dims", type=_positive, nargs="+", default=[64, 128], help="speed-grid head dims")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="speed-grid dtype")
    p.add_argument("--tma-ab", action="store_true",
                   help="also time tileattn with TMA descriptors off (pointer tiles), in the same run")
    p.add_argument("--check-filter", default="", help="run only accuracy cases whose name contains this text")
    p.add_argument("--generation", action="store_true",
                   help="also time generation with the Phi-2 architecture (random bf16 weights): "
                        "tileattn vs sdpa vs eager")
    p.add_argument("--prompt-lengths", type=_positive, nargs="+", default=[2048, 8192, 16384],
                   help="prompt lengths for --generation")
    p.add_argument("--new-tokens", type=_positive, default=256, help="decode tokens for --generation")
    p.add_argument("--batch", type=_positive, default=1, help="prompts per generate call for --generation")
    p.add_argument("--compile-step", action="store_true",
                   help="--generation on CUDA: also the fast path with prefill and decode step through torch.compile")
    p.add_argument("--fast-paths", nargs="*", choices=list(FAST_PATHS),
                   help="--generation: only these tileattn fast paths (plain: no CUDA graph; graph: each step "
                        "replayed from one; compile: graphed steps through torch.compile); default plain and "
                        "graph, and compile with --compile-step")
    p.add_argument("--overlap-ab", action="store_true",
                   help="--generation: also each tileattn fast path on one stream (no MLP beside the attention)")
    p.add_argument("--generation-attns", nargs="*", default=["tileattn", "sdpa", "eager"],
                   help="attentions timed through transformers' generate for --generation")
    p.add_argument("--step-profile", type=int, default=0, metavar="STEPS",
                   help="CUDA: every kernel of STEPS graphed decode steps of the Phi-2 architecture after each "
                        "--prompt-lengths prompt, per step (compiled with --compile-step)")
    p.add_argument("--step-kernels", action="store_true",
                   help="a Phi-2 decode step's attention and GEMVs alone at each --prompt-lengths prompt, beside a "
                        "device copy, then once more each inside a cudaProfilerStart/Stop range (for ncu)")
    p.add_argument("--decode-configs", type=_decode_config, nargs="+", default=[], metavar="BLOCK_N,WARPS,STAGES",
                   help="--step-kernels: also the attention with each decode tile config forced, at each "
                        "--decode-splits count")
    p.add_argument("--decode-splits", type=_positive, nargs="+", default=[8, 16, 32],
                   help="split counts for --decode-configs")
    p.add_argument("--decode", action="store_true",
                   help="also measure KV-cache decode bandwidth (dense, paged, transformers' layout) against "
                        "SDPA flash/cuDNN")
    p.add_argument("--rounds", type=_positive,
                   help="--decode, --variants and --step-kernels: time the implementations in turn this many "
                        "times and report each one's median (default 3); --generation: measure the steady "
                        "decode rate this many times and report the mean (default 1)")
    p.add_argument("--paged-varlen", action="store_true",
                   help="packed queries over a paged cache (flash_attn_varlen_func's block_table) against "
                        "flash_attn_with_kvcache and the dense varlen kernel, and prefill chunks over a dense "
                        "cache against flash_attn_func")
    p.add_argument("--variants", action="store_true",
                   help="cost of sliding window, softcap, ALiBi, sinks and dropout against plain causal attention")
    p.add_argument("--ring", action="store_true",
                   help="ring attention over all visible GPUs vs one GPU (causal fwd+bwd, 32k-128k tokens)")
    p.add_argument("--ring-seqlens", type=_positive, nargs="+", default=[32768, 65536, 131072],
                   help="total sequence lengths for --ring on GPUs (a run over 2 s is timed once, not averaged)")
    p.add_argument("--out", default="bench-out", help="folder for bench.md and the PNG plots")


# ----------------------------------------------------------------------------- timing


def _bench(fn, device: torch.device, grad_to_none=(), graph: bool = False) -> float:
    """Median milliseconds of fn(). graph: on the GPU, time fn replayed from a CUDA graph, for
    kernels of microseconds whose launch overhead would hide their memory time (decode)."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none), return_mode="median")
    fn()
    times = []
    for _ in range(5):
        for x in grad_to_none:
            x.grad = None
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attn(q, k, v, causal):
        # SDPA wants (B, H, S, D); GQA through enable_gqa
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                enable_gqa=q.shape[2] != k.shape[2],
            )
        return out.transpose(1, 2)

    return attn


def _without_tma(q, k, v, causal):
    """tileattn with pointer tiles instead of TMA descriptors (TILEATTN_TMA=0 for this call)."""
    saved = os.environ.get("TILEATTN_TMA")
    os.environ["TILEATTN_TMA"] = "0"
    try:
        return flash_attn_func(q, k, v, causal=causal)
    finally:
        if saved is None:
            del os.environ["TILEATTN_TMA"]
        else:
            os.environ["TILEATTN_TMA"] = saved


def attention_backends(device: torch.device, tma_ab: bool = False) -> dict:
    """Every implementation present: name -> fn(q, k, v, causal) -> out (B, S, H, D)."""
    impls = {"tileattn": lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)}
    if tma_ab:
        impls["tileattn-no-tma"] = _without_tma
    if device.type == "cuda":
        impls.update({
            "sdpa-flash": _sdpa("FLASH_ATTENTION"),
            "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
            "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
        })
        with contextlib.suppress(Exception):
            from flash_attn import flash_attn_func as fa2

            impls["flash-attn"] = lambda q, k, v, causal: fa2(q, k, v, causal=causal)
        with contextlib.suppress(Exception):
            from flash_attn.cute import flash_attn_func as fa4

            impls["flash-attn-4"] = lambda q, k, v, causal: fa4(q, k, v, causal=causal)[0]
    impls["sdpa-math"] = _sdpa("MATH")  # standard attention: materializes the scores
    return impls


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal) -> float:
    f = 4 * batch * heads * seqlen_q * seqlen_k * head_dim
    return f / 2 if causal else f


@dataclass
class Cell:
    head_dim: int
    causal: bool
    seqlen: int
    tflops: dict = field(default_factory=dict)  # (impl, "fwd"|"bwd") -> TFLOP/s or None
    max_diff: float | None = None  # tileattn vs the first other backend that ran, for sanity


def speed_grid(device, dtype, seqlens, head_dims, log, tma_ab: bool = False, tokens: int = TOKENS) -> list[Cell]:
    impls = attention_backends(device, tma_ab)
    cells = []
    for head_dim in head_dims:
        heads = HIDDEN // head_dim
        for causal in (False, True):
            for seqlen in seqlens:
                batch = max(1, tokens // seqlen)
                cell = Cell(head_dim, causal, seqlen)
                flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal)
                q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn_like(q)
                outs = {}
                for name, fn in impls.items():
                    try:
                        out = fn(q, k, v, causal)
                        outs[name] = out.detach()
                        fwd_ms = _bench(lambda: fn(q, k, v, causal), device)
                        bwd_ms = _bench(lambda o=out: o.backward(dout, retain_graph=True), device, (q, k, v))
                        cell.tflops[(name, "fwd")] = flops / fwd_ms / 1e9
                        cell.tflops[(name, "bwd")] = 2.5 * flops / bwd_ms / 1e9
                    except Exception as e:  # OOM for standard attention, unsupported shapes
                        cell.tflops[(name, "fwd")] = cell.tflops[(name, "bwd")] = None
                        log(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    finally:
                        q.grad = k.grad = v.grad = None
                        out = None  # free the autograd graph before the next backend
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                others = [n for n in outs if n != "tileattn"]
                if "tileattn" in outs and others:
                    cell.max_diff = (outs["tileattn"].float() - outs[others[0]].float()).abs().max().item()
                cells.append(cell)
                log(_cell_line(cell, impls))
    return cells


def _fmt(x):
    return "OOM/—" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def _cell_line(cell: Cell, impls) -> str:
    parts = [f"d{cell.head_dim} {'causal' if cell.causal else 'full  '} S={cell.seqlen:>5}"]
    for name in impls:
        parts.append(f"{name} {_fmt(cell.tflops.get((name, 'fwd')))}/{_fmt(cell.tflops.get((name, 'bwd')))}")
    return " | ".join(parts) + (f" | maxdiff {cell.max_diff:.1e}" if cell.max_diff is not None else "")


# ----------------------------------------------------------------------------- memory


def peak_memory(device, dtype, seqlens, log, head_dim=80, heads=32) -> list[tuple]:
    """Peak memory of forward + backward at batch 1: standard attention vs tileattn."""
    rows = []
    impls = {"standard (sdpa-math)": _sdpa("MATH"), "tileattn": attention_backends(device)["tileattn"]}
    for seqlen in seqlens:
        row = [seqlen]
        for name, fn in impls.items():
            q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            inputs = 4 * q.numel() * q.element_size()  # q, k, v, dout
            try:
                # once untimed: a first call may autotune, whose timing buffer (256 MB in Triton's
                # do_bench) is no part of attention's memory
                fn(q, k, v, True).backward(torch.randn_like(q))
                q.grad = k.grad = v.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(q, k, v, True).backward(torch.randn_like(q))
                torch.cuda.synchronize()
                row.append((torch.cuda.max_memory_allocated() - base + inputs) / 2**20)
            except torch.OutOfMemoryError:
                row.append(None)
            del q, k, v
            torch.cuda.empty_cache()
        rows.append(tuple(row))
        log(f"memory S={seqlen}: " + ", ".join(f"{n} {_fmt(m)} MiB" for n, m in zip(impls, row[1:])))
    return rows


# ----------------------------------------------------------------------------- accuracy


def accuracy_matrix(device, log, only: str = "") -> bool:
    """The 2x-PyTorch-error rule (tileattn.testing) at real sizes, every head dim we claim."""
    cases = []
    for head_dim in (16, 32, 64, 80, 96, 128, 256):
        for seqlens in ((1, 1), (113, 203), (1023, 1024), (1025, 4096), (4096, 1025)):
            cases.append((2, *seqlens, 8, 2, head_dim, torch.bfloat16))
    for seqlen in (2048, 8192):
        cases += [(1, seqlen, seqlen, 4, 4, d, torch.bfloat16) for d in (64, 80, 128)]
    cases += [(2, 1000, 1000, 4, 1, d, dt) for d in (64, 128, 256) for dt in (torch.float16, torch.float32)]
    cases = [(*case, "", {}) for case in cases]
    # each variant's own score code, softcap's one-instruction tanh included (GPU only)
    gen = torch.Generator().manual_seed(0)
    variants = {"softcap 30": dict(softcap=30.0), "window (100, 20)": dict(window_size=(100, 20)),
                "alibi": dict(alibi_slopes=(torch.rand(8, generator=gen) * 0.1).to(device)),
                "sink": dict(learnable_sink=torch.randn(8, generator=gen).to(device)),
                "softcap 5 alibi": dict(softcap=5.0, alibi_slopes=(torch.rand(2, 8, generator=gen)).to(device))}
    cases += [(2, 1025, 1023, 8, 2, d, dt, f" {n}", variant) for n, variant in variants.items()
              for d, dt in ((64, torch.bfloat16), (80, torch.float16), (128, torch.bfloat16))]
    ok = True
    for batch, sq, sk, h, hk, d, dtype, variant_name, variant in cases:
        for causal in (False, True):
            q, k, v = (torch.randn(batch, s, n, d, device=device, dtype=dtype)
                       for s, n in ((sq, h), (sk, hk), (sk, hk)))
            name = (f"B{batch} Sq{sq} Sk{sk} H{h}/{hk} D{d} {str(dtype)[6:]} {'causal' if causal else 'full'}"
                    f"{variant_name}")
            if only not in name:
                continue
            try:
                checks = check_attention(flash_attn_func, q, k, v, causal=causal, **variant)
            except Exception as e:
                ok = False
                log(f"FAIL {name} | {type(e).__name__}: {str(e)[:300]}")
                continue
            good = all(c.ok for c in checks)
            ok &= good
            worst = max(checks, key=lambda c: c.err / (2 * c.torch_err + c.atol))
            log(f"{'ok  ' if good else 'FAIL'} {name} | worst {worst}")
            if not good:
                log("     " + "; ".join(str(c) for c in checks if not c.ok))
    return ok


# ----------------------------------------------------------------------------- generation


def phi2_config():
    """microsoft/phi-2's architecture: hidden 2560, 32 layers, 32 heads of dim 80, partial rotary 0.4."""
    import transformers

    return transformers.PhiConfig(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, partial_rotary_factor=0.4, max_position_embeddings=32768, rope_theta=10000.0,
        layer_norm_eps=1e-5, resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
    )


def phi2_model(device):
    """The Phi-2 architecture with seeded random bf16 weights on device, in eval mode."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(phi2_config(), dtype=torch.bfloat16).eval()


def generation_bench(device, prompt_lengths, new_tokens, log, batch: int = 1, compile_step: bool = False,
                     attns=("tileattn", "sdpa", "eager"), overlap_ab: bool = False, fast_paths=None,
                     rounds: int = 1) -> list[tuple]:
    """Prefill and decode speed and peak memory: transformers' generate under each attention, and
    tileattn's fast paths (static cache, KV-cache kernel; fast_paths names FAST_PATHS entries,
    default plain and graph, and compile with compile_step; CUDA graphs need CUDA). overlap_ab:
    each fast path also on one stream (generate(overlap=False)), right after it. rounds: how many
    times the steady decode rate is measured; the row holds the mean step's rate."""
    from .generate import fast_label, timed_fast_generate, timed_generate

    model = phi2_model(device)
    if fast_paths is None:
        fast_paths = ["plain"] + (["graph"] + (["compile"] if compile_step else []) if device.type == "cuda" else [])
    fast = []
    for name in fast_paths:
        if FAST_PATHS[name].get("cuda_graph") and device.type != "cuda":
            log(f"   fast path {name}: skipped, CUDA graphs need CUDA")
        else:
            fast.append(FAST_PATHS[name])
    if overlap_ab:
        fast = [twin for options in fast for twin in (options, dict(options, overlap=False))]
    runs = [(fast_label(**options), "tileattn", dict(options, fast=True)) for options in fast]
    runs += [(attn, attn, dict(fast=False)) for attn in attns]

    def run(ids, tokens, fast=False, cuda_graph=False, compile=False, overlap=True):
        if fast:
            with torch.inference_mode():
                return timed_fast_generate(model, ids, tokens, device, eos_token_id=[], cuda_graph=cuda_graph,
                                           compile=compile, overlap=overlap)  # every step timed: no eos
        return timed_generate(model, ids, tokens, device)

    rows = []
    for label, attn, options in runs:
        model.set_attn_implementation(attn)
        run(torch.randint(0, model.config.vocab_size, (batch, 64), device=device), 4, **options)  # warm-up
        for n in prompt_lengths:
            ids = torch.randint(0, model.config.vocab_size, (batch, n), device=device)
            try:
                # first call at a length pays for kernel selection (tileattn's autotuning, cuDNN plans)
                run(ids, 3, **options)
                # one prefill is tens of ms, where the host's jitter shows (the same forward read 36 and
                # 44 ms in one run): the median of five time-to-first-token runs
                prefill_s = statistics.median(run(ids, 1, **options).prefill_s for _ in range(5))
                # steady: without the first step's warm-up and a graph's capture, which the decode
                # rate counts; from a quarter-length run, whose prefill and first step cancel
                pairs = [(run(ids, new_tokens, **options), run(ids, max(2, new_tokens // 4), **options))
                         for _ in range(rounds)]
                r = pairs[0][0]
                steps = [(long.total_s - short.total_s) / (len(long.tokens) - len(short.tokens))
                         for long, short in pairs]
                if rounds > 1:
                    log(f"   prompt {n} x{batch} {label}: steady step ms per round "
                        + ", ".join(f"{t * 1e3:.3f}" for t in steps) + f", mean {statistics.mean(steps) * 1e3:.3f}")
                steady = batch / statistics.mean(steps)
                row = (n, label, batch * n / prefill_s, batch * r.decode_tok_s, steady, r.peak_mib / 1024)
            except torch.OutOfMemoryError:
                row = (n, label, None, None, None, None)
            # reserved beside allocated: an out-of-memory row with allocated headroom left points at
            # the caching allocator's fragmentation
            reserved = ""
            if device.type == "cuda":
                reserved = f", reserved {torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB"
                torch.cuda.empty_cache()
            rows.append(row)
            log(f"prompt {n} x{batch} {label}: prefill {_fmt(row[2])} tok/s, decode {_fmt(row[3])} tok/s "
                f"(steady {_fmt(row[4])}), peak {_fmt(row[5])} GiB{reserved}")
    return rows


def large_batch_check(device, log) -> bool:
    """A batch whose tensors pass 2**31 elements (64-bit batch offsets): the last entry must
    match the same entry run alone, forward and backward."""
    batch, seqlen, heads, head_dim = 68, 8192, 32, 128  # 2.28e9 elements per tensor
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    last = [x[-1:].detach().clone().requires_grad_() for x in (q, k, v)]
    solo = flash_attn_func(*last, causal=True)
    solo.backward(dout[-1:])
    pairs = [(out[-1:], solo)] + [(x.grad[-1:], s.grad) for x, s in zip((q, k, v), last)]
    ok = all(torch.equal(a, b) for a, b in pairs)
    log(f"{'ok  ' if ok else 'FAIL'} B{batch} S{seqlen} H{heads} D{head_dim} bfloat16 causal, "
        f"{q.numel():.2e} elements: last batch entry bit-identical to running it alone (out, dq, dk, dv)")
    return ok


# ----------------------------------------------------------------------------- report


def write_report(out_dir, device, dtype, cells, memory_rows, accuracy_ok, generation_rows=(), decode_rows=(),
                 ring_rows=(), variant_rows=(), packed_rows=(), chunk_rows=(), step_profiles=(), kernel_rows=()) -> str:
    os.makedirs(out_dir, exist_ok=True)
    impls = sorted({name for c in cells for (name, _) in c.tflops}, key=lambda n: (n != "tileattn", n))
    lines = [f"Device: {_device_name(device)}; torch {torch.__version__}; triton {_triton_version()}; "
             f"dtype {str(dtype)[6:]}; TFLOP/s, median of triton.testing.do_bench.", ""]
    if accuracy_ok is not None:
        lines += [f"Accuracy matrix (--check): {'all cells pass' if accuracy_ok else 'FAILURES, see log'}", ""]
    if cells:
        lines += ["| head dim | causal | seqlen | " + " | ".join(f"{n} fwd / bwd" for n in impls)
                  + " | tileattn / cuDNN fwd, bwd |",
                  "|---|---|---|" + "---|" * (len(impls) + 1)]
        for c in cells:
            vals = [f"{_fmt(c.tflops.get((n, 'fwd')))} / {_fmt(c.tflops.get((n, 'bwd')))}" for n in impls]
            ratio = []
            for d in ("fwd", "bwd"):
                ours, ref = c.tflops.get(("tileattn", d)), c.tflops.get(("sdpa-cudnn", d))
                ratio.append(f"{ours / ref:.2f}" if ours and ref else "—")
            lines.append(f"| {c.head_dim} | {'yes' if c.causal else 'no'} | {c.seqlen} | " + " | ".join(vals)
                         + f" | {', '.join(ratio)} |")
        lines.append("")
    if memory_rows:
        lines += ["Peak memory, forward + backward, batch 1, 32 heads, head dim 80, causal (MiB):", "",
                  "| seqlen | standard attention (sdpa-math) | tileattn |", "|---|---|---|"]
        lines += [f"| {s} | {_fmt(a)} | {_fmt(b)} |" for s, a, b in memory_rows]
        lines.append("")
    if generation_rows:
        lines += ["Generation, Phi-2 architecture (2.7B, head dim 80), random weights, greedy; tokens/s over the "
                  "whole batch; tileattn-fast is tileattn.generation, the others transformers' generate; decode "
                  "over one run of all new tokens (its first step and a graph's capture included), steady decode "
                  "the tokens it has over a quarter-length run per extra second (with --rounds N, at the mean of N "
                  "such steps):", "",
                  "| prompt | path | prefill tok/s | decode tok/s | steady decode tok/s | peak GiB |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {attn} | {_fmt(p)} | {_fmt(d)} | {_fmt(st)} | {_fmt(m)} |"
                  for n, attn, p, d, st, m in generation_rows]
        lines.append("")
    if step_profiles:
        lines += step_profile_table(step_profiles)
    if kernel_rows:
        lines += step_kernels_table(kernel_rows)
    if decode_rows:
        lines += decode_table(decode_rows)
    if packed_rows:
        lines += packed_table(packed_rows)
    if chunk_rows:
        lines += chunk_table(chunk_rows)
    if ring_rows:
        lines += ring_table(ring_rows)
    if variant_rows:
        lines += variants_table(variant_rows)
        variants_plot(out_dir, variant_rows)
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(text)
    _plot(out_dir, cells, memory_rows, impls)
    return text


def _plot(out_dir, cells, memory_rows, impls) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if cells:
        configs = sorted({(c.head_dim, c.causal) for c in cells})
        fig, axes = plt.subplots(2, len(configs), figsize=(4.5 * len(configs), 7), squeeze=False)
        for col, (d, causal) in enumerate(configs):
            for row, direction in enumerate(("fwd", "bwd")):
                ax = axes[row][col]
                sel = [c for c in cells if (c.head_dim, c.causal) == (d, causal)]
                for name in impls:
                    pts = [(c.seqlen, c.tflops.get((name, direction))) for c in sel]
                    pts = [(s, t) for s, t in pts if t]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=name, linewidth=2.5 if name == "tileattn" else 1.2)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{direction} d{d} {'causal' if causal else 'non-causal'}")
                ax.set_xlabel("seqlen")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "speed.png"), dpi=110)
        plt.close(fig)
    if memory_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, name in enumerate(("standard attention (sdpa-math)", "tileattn")):
            pts = [(r[0], r[i + 1]) for r in memory_rows if r[i + 1] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("seqlen")
        ax.set_ylabel("peak MiB (fwd + bwd)")
        ax.set_title("Peak memory, H=32, D=80, causal")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "memory.png"), dpi=110)
        plt.close(fig)


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def run(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gpu = device.type == "cuda"

    def log(msg):
        print(msg, flush=True)

    log(f"tileattn bench on {_device_name(device)}")
    accuracy_ok = None
    if args.check:
        log("== accuracy (2x PyTorch's own error vs the fp64 oracle)")
        accuracy_ok = accuracy_matrix(device, log, args.check_filter) if gpu else None
        if gpu and args.check_filter in "int64 offsets":
            accuracy_ok &= large_batch_check(device, log)
        if not gpu:
            log("   skipped: the CPU accuracy matrix is the test suite (pytest)")
    cells = []
    if not args.no_speed:
        seqlens = args.seqlens or ([512, 1024, 2048, 4096, 8192, 16384] if gpu else [128, 256])
        tokens = TOKENS if gpu else 1024  # the CPU run only shows the command works
        log(f"== speed, TFLOP/s fwd/bwd, {tokens} tokens, heads*head_dim={HIDDEN}")
        cells = speed_grid(device, dtype if gpu else torch.float32, seqlens, args.head_dims, log, args.tma_ab, tokens)
    memory_rows = []
    if gpu and not args.no_memory:
        log("== peak memory")
        memory_rows = peak_memory(device, dtype, [1024, 2048, 4096, 8192, 16384], log)
    generation_rows = []
    if args.generation:
        log(f"== generation, Phi-2 architecture, random weights, batch {args.batch}")
        generation_rows = generation_bench(device, args.prompt_lengths, args.new_tokens, log, args.batch,
                                           args.compile_step, args.generation_attns, args.overlap_ab,
                                           args.fast_paths, args.rounds or 1)
    step_profiles = []
    if args.step_profile:
        log(f"== decode step profile, Phi-2 architecture, {args.step_profile} steps")
        step_profiles = step_profile_bench(device, args.prompt_lengths, args.step_profile, log, args.compile_step)
    kernel_rows = []
    if args.step_kernels:
        log("== a decode step's big kernels alone")
        kernel_rows = step_kernels_bench(device, args.prompt_lengths, log, lambda fn: _bench(fn, device, graph=True),
                                         args.rounds or 3, args.decode_configs, args.decode_splits)
    decode_rows, packed_rows, chunk_rows = [], [], []
    if args.decode:
        log("== KV-cache decode bandwidth")
        decode_rows = decode_bench(device, log, lambda fn: _bench(fn, device, graph=True), rounds=args.rounds or 3)
    if args.paged_varlen:
        log("== packed queries over a paged cache (flash_attn_varlen_func's block_table)")
        packed_rows = packed_paged_bench(device, log, lambda fn: _bench(fn, device, graph=True))
        log("== prefill chunks over a dense cache (flash_attn_with_kvcache)")
        chunk_rows = dense_chunk_bench(device, log, lambda fn: _bench(fn, device, graph=True))
    ring_rows = []
    if args.ring:
        log("== ring attention")
        if gpu:
            ring_rows = ring_bench(log, seqlens=sorted(args.ring_seqlens))
        else:  # gloo on two CPU processes: a toy size
            ring_rows = ring_bench(log, seqlens=(256,), head_dim=32, reps=1)
    variant_rows = ()
    if args.variants:
        log("== attention variants against plain causal attention")
        variant_rows = variants_bench(device, log, _bench, args.rounds or 3)
    text = write_report(args.out, device, dtype, cells, memory_rows, accuracy_ok, generation_rows, decode_rows,
                        ring_rows, variant_rows, packed_rows, chunk_rows, step_profiles, kernel_rows)
    log("\n" + text)
    return 0 if accuracy_ok in (None, True) else 1

