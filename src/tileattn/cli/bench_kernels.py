"""The big kernels of a batch-1 decode step, alone (``tileattn bench --step-kernels``).

A Phi-2 step at a long prompt is two families of memory-bound kernels: the KV-cache attention
(split kernel and merge) reading the cache, and the GEMVs reading the weights; what separates
the step from its memory ceiling is their read rate. Each is timed here replayed from a CUDA
graph over enough copies of its operands that L2 does not serve them (a step reads every byte
once), in turn with the ceilings, so all figures come from the same rounds: a device copy and
a plain read (a Triton kernel summing the bytes; a read outruns a copy, which also writes).
(``--step-profile`` shows the same kernels inside the step, between the small ones.)

Then one more call of each runs between cudaProfilerStart and cudaProfilerStop, so that

    ncu --profile-from-start off --set full -o step tileattn bench --no-speed --no-memory --step-kernels

profiles exactly those kernels: DRAM throughput, occupancy and where the warps stall, which no
timing can show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..generation import CAPACITY_STEP
from ..kernels.config import only_config
from ..kernels.gemv import gemv
from ..kvcache import flash_attn_with_kvcache
from .bench_decode import _rotating, check_agrees, copies_past_l2, l2_bytes
from .rounds import timed_rounds

NEW_TOKENS = 256  # the cache holds the prompt and the tokens the generation bench decodes
TOY = dict(heads=4, hidden=128, intermediate=512)  # CPU (interpreter) runs only show the command works


@dataclass
class KernelRow:
    kernel: str
    mbytes: float  # MB read (a copy: read + written)
    us: float | None

    @property
    def tbps(self) -> float | None:
        return self.mbytes / self.us if self.us else None


READ_PROGRAMS, READ_BLOCK = 528, 4096  # 4 programs of 8 warps an SM: 3.06 TB/s on an H100 (BENCHMARKS.md)


@triton.jit
def _read_kernel(X, Out, n, per_program, BLOCK: tl.constexpr):
    """Each program sums its contiguous share of X: a read at the rate memory serves one."""
    start = tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, per_program, BLOCK, num_stages=4):
        offs = start + i + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(Out + tl.program_id(0), tl.sum(acc))


def _read(x: torch.Tensor, out: torch.Tensor) -> None:
    """Read every element of x once (on the CPU, a sum: the command only shows it runs there)."""
    if x.device.type != "cuda":
        out[0] = x.sum()
        return
    per = triton.cdiv(triton.cdiv(x.numel(), READ_PROGRAMS), READ_BLOCK) * READ_BLOCK
    _read_kernel[(READ_PROGRAMS,)](x, out, x.numel(), per, BLOCK=READ_BLOCK, num_warps=8)


def _shapes(device) -> dict:
    if device.type != "cuda":
        return TOY
    from .bench import phi2_config

    cfg = phi2_config()
    return dict(heads=cfg.num_attention_heads, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size)


def step_kernels(device, prompt: int, decode_configs=(), splits=(8, 16, 32)) -> dict:
    """{name: (fn, bytes read)} of one layer's big decode-step kernels at this prompt length,
    each fn rotating over its operand copies; a device copy and a plain read (the ceilings) move
    at least the attention's bytes.
    decode_configs: also the attention with each (BLOCK_N, num_warps, num_stages) forced (the
    GPU's decode kernel; the CPU path has no tiles) at each split count, checked first against
    the tuned attention."""
    shapes = _shapes(device)
    heads, hidden, inter = shapes["heads"], shapes["hidden"], shapes["intermediate"]
    dim, qkv = hidden // heads, 3 * hidden
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = torch.finfo(dtype).bits // 8

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=dtype, device=device) * scale

    capacity = -(-(prompt + NEW_TOKENS) // CAPACITY_STEP) * CAPACITY_STEP
    kv_bytes = 2 * heads * prompt * dim * size
    q = randn(1, 1, heads, dim)
    lens = torch.full((1,), prompt, dtype=torch.int32, device=device)
    leftpad = torch.zeros(1, dtype=torch.int32, device=device)
    # transformers' cache layout, (batch, heads, capacity, dim), seen through a transpose
    caches = [tuple(randn(1, heads, capacity, dim).transpose(1, 2) for _ in range(2))
              for _ in range(copies_past_l2(kv_bytes, device))]

    def attention(k, v, config=None, num_splits=0):
        if config is None:
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, cache_leftpad=leftpad, causal=True)
        with only_config("decode", (None, *config)):
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, cache_leftpad=leftpad, causal=True,
                                           num_splits=num_splits)

    forced = {}
    tuned = attention(*caches[0]) if decode_configs else None
    for config in decode_configs:
        for n in splits:
            check_agrees(attention(*caches[0], config, n), tuned, f"decode config {config} at {n} splits",
                         "the tuned attention", f"{prompt} keys")
            forced[f"attention, config {tuple(config)}, {n} splits"] = (
                _rotating(lambda k, v, config=config, n=n: attention(k, v, config, n), caches), kv_bytes)

    x, act = randn(hidden), randn(inter)
    joined_bytes = (qkv + inter) * hidden * size
    joined = [(randn(qkv + inter, hidden, scale=0.02), randn(qkv + inter))
              for _ in range(copies_past_l2(joined_bytes, device))]
    summed_bytes = (inter + hidden) * hidden * size
    summed = [(randn(hidden, inter, scale=0.02), randn(hidden), randn(hidden, hidden, scale=0.02), randn(hidden))
              for _ in range(copies_past_l2(summed_bytes, device))]
    copied = max(kv_bytes, 2 * l2_bytes(device))  # past L2 at short prompts too
    src = randn(copied // size)
    dst = torch.empty_like(src)
    sums = torch.empty(READ_PROGRAMS, dtype=torch.float32, device=device)
    return {
        f"attention over {prompt} keys (split + merge)": (_rotating(attention, caches), kv_bytes),
        **forced,
        "q/k/v + up GEMV, GELU": (_rotating(lambda w, b: gemv(x, w, b, activation="gelu_tanh", activation_from=qkv),
                                            joined), joined_bytes),
        "down + output GEMV, summed": (_rotating(lambda w, b, w2, b2: gemv(act, w, b, x2=x, weight2=w2, bias2=b2),
                                                 summed), summed_bytes),
        f"device copy of {copied / 1e6:.3g} MB": (lambda: dst.copy_(src), 2 * copied),
        f"read of {copied / 1e6:.3g} MB": (lambda: _read(src, sums), copied),
    }


def step_kernels_bench(device, prompt_lengths, log, timer, rounds: int, decode_configs=(),
                       splits=(8, 16, 32)) -> list[tuple[int, KernelRow]]:
    """Rows (prompt, KernelRow); timer(fn) -> ms. Ends with one profiler-range call of each.
    decode_configs, splits: as step_kernels takes them."""
    rows, probes = [], []
    for prompt in prompt_lengths:
        kernels = step_kernels(device, prompt, decode_configs, splits)
        for fn, _ in kernels.values():
            fn()  # compile and tune outside the timing
        ms = timed_rounds(timer, {name: fn for name, (fn, _) in kernels.items()}, rounds, log)
        for name, (_, nbytes) in kernels.items():
            row = KernelRow(name, nbytes / 1e6, None if ms[name] is None else ms[name] * 1e3)
            rows.append((prompt, row))
            log(f"   {prompt}: {name}: {_fmt(row.us, '.1f')} us, {_fmt(row.tbps, '.2f')} TB/s")
        probes += [fn for fn, _ in kernels.values()]
    if device.type == "cuda":  # the kernels a profiler started from the API sees
        torch.cuda.synchronize(device)
        torch.cuda.cudart().cudaProfilerStart()
        for fn in probes:
            fn()
        torch.cuda.synchronize(device)
        torch.cuda.cudart().cudaProfilerStop()
    return rows


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def step_kernels_table(rows) -> list[str]:
    lines = ["A decode step's big kernels alone, Phi-2's shapes (a toy size on the CPU), batch 1, each replayed "
             "from a CUDA graph over operand copies past L2 (median of the rounds; a copy's MB count read + "
             "written):", "",
             "| prompt | kernel | MB read | us | TB/s |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {r.kernel} | {r.mbytes:.4g} | {_fmt(r.us, '.1f')} | {_fmt(r.tbps, '.2f')} |" for p, r in rows]
    return lines + [""]
