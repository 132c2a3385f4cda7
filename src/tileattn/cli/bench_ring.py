"""`tileattn bench --ring`: ring attention over several devices against one device (issue #6).

One process per GPU over NCCL (on CPUs: gloo and two processes, which is how the tests run it).
Causal, 16 heads of dim 128, bf16 on GPUs (fp32 on CPUs), zigzag shards. For each total length:
forward + backward milliseconds on one device (the whole sequence) and on all of them (ring),
and the largest difference between the two in out, dq, dk and dv. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0 and friends, as the GPU machines require).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from .generate import _sync

HEADS, HEAD_DIM = 16, 128
_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _step_ms(fn, reps: int, device, barrier=None) -> float:
    fn()
    _sync(device)
    if barrier:
        barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps * 1e3


def _timed_once(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _peak_reset(device) -> int:
    """Start a peak-memory count; returns the bytes allocated now (0 on CPUs: no count)."""
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _worker(rank: int, world: int, init_file: str, out_file: str, seqlens: list[int], head_dim: int, reps: int):
    import torch.distributed as dist

    from ..api import flash_attn_func
    from ..distributed import ring_flash_attn_func, shard

    os.environ.update(_NO_MULTICAST)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = []
    try:
        for seqlen in seqlens:
            def whole():  # the same sequence on every rank, made on the device (1M tokens are GBs)
                gen = torch.Generator(device=device).manual_seed(seqlen)
                return [torch.randn(1, seqlen, HEADS, head_dim, generator=gen, device=device, dtype=dtype)
                        for _ in range(4)]

            q, k, v, dout = whole()
            local = [shard(x, rank, world).clone().requires_grad_() for x in (q, k, v)]
            local_dout = shard(dout, rank, world).clone()
            del q, k, v, dout
            _peak_reset(device)  # the ring's footprint: its shards, their gradients, buffers in flight

            out = None

            def ring_step():
                nonlocal out
                for x in local:
                    x.grad = None
                out = ring_flash_attn_func(*local, causal=True)
                out.backward(local_dout)

            ring_step()  # compiles for this length; no timing
            ring_peak = _peak(device)
            ring_grads = [x.grad for x in local]

            full = whole()
            for x in full[:3]:
                x.requires_grad_()
            inputs = sum(x.numel() * x.element_size() for x in full)
            base = _peak_reset(device)
            ref = None

            def one_step():
                nonlocal ref
                for x in full[:3]:
                    x.grad = None
                ref = flash_attn_func(*full[:3], causal=True)
                ref.backward(full[3])

            one_step()
            one_peak = _peak(device) - base + inputs  # whole inputs + what one device adds
            pairs = [(out, ref)] + [(a, b.grad) for a, b in zip(ring_grads, full)]
            # largest difference relative to the tensor's largest value, over out, dq, dk, dv
            err = max(((a.float() - shard(b, rank, world).float()).abs().max() / b.float().abs().max()).item()
                      for a, b in pairs)
            err = torch.tensor(err, device=device)  # NCCL reduces device tensors only
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            del ref, out, ring_grads, pairs

            # the runs above compiled (kernels specialize on sequence length); time warm runs, several
            # when they are short
            # every rank must take the same branch: the ring step is collective
            ring_ms, one_ms = torch.tensor(_timed_once(ring_step, device), device=device), None
            dist.all_reduce(ring_ms, op=dist.ReduceOp.MAX)
            ring_ms = ring_ms.item()
            if ring_ms < 2000:
                ring_ms = _step_ms(ring_step, reps, device, dist.barrier)
            dist.barrier()
            if rank == 0:
                one_ms = _timed_once(one_step, device)
                one_ms = _step_ms(one_step, reps, device) if one_ms < 2000 else one_ms
            full.clear()  # free the whole sequence before the next length
            stats = torch.tensor([ring_peak, one_peak], dtype=torch.float64, device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            rows.append((seqlen, world, head_dim, one_ms, ring_ms, err.item(), *(stats / 2**30).tolist(),
                         _capacity(device)))
        if rank == 0:
            torch.save(rows, out_file)
    finally:
        dist.destroy_process_group()


def _capacity(device) -> float:
    """GiB one device offers (0 on CPUs)."""
    return torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0


def ring_bench(log, seqlens=(32768, 65536, 131072), world: int | None = None, head_dim: int = HEAD_DIM,
               reps: int = 5) -> list[tuple]:
    """Rows (total seqlen, devices, head dim, one-device ms, ring ms, max |ring - one device| /
    max |one device|, peak GiB one device, peak GiB per ring device, GiB per device)."""
    import torch.multiprocessing as mp

    if world is None:
        world = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if world < 2:
        log("   skipped: ring attention needs at least 2 devices")
        return []
    os.environ.update(_NO_MULTICAST)  # inherited by the workers before NCCL starts
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out_file, list(seqlens), head_dim, reps),
                 nprocs=world)
        rows = torch.load(out_file)
    for seqlen, n, _, one_ms, ring_ms, err, one_gib, ring_gib, _ in rows:
        log(f"   S{seqlen} causal fwd+bwd: one device {one_ms:.1f} ms ({one_gib:.1f} GiB), {n} devices (ring) "
            f"{ring_ms:.1f} ms ({ring_gib:.1f} GiB each) = {one_ms / ring_ms:.2f}x; "
            f"max |ring - one device| / max |one device| {err:.1e}")
    if rows and rows[-1][-1]:
        log("   " + longest_line(rows))
    return rows


def longest_line(rows) -> str:
    """The longest sequence one device and the ring would hold, from the longest run's peak
    memory (every buffer grows linearly with the sequence)."""
    seqlen, n, _, _, _, _, one_gib, ring_gib, capacity = max(rows)
    return (f"Longest sequence that fits, scaled from the {seqlen}-token run's peak memory ({capacity:.0f} GiB per "
            f"device): one device {int(seqlen * capacity / one_gib):,} tokens, {n} devices (ring) "
            f"{int(seqlen * capacity / ring_gib):,} tokens.")


def ring_table(rows) -> list[str]:
    lines = [f"Ring attention (zigzag), causal, batch 1, {HEADS} heads, forward + backward:", "",
             "| total seqlen | devices | head dim | one device ms | ring ms | speedup | TFLOP/s per device (ring) | "
             "peak GiB one device | peak GiB per device (ring) | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for seqlen, n, head_dim, one_ms, ring_ms, err, one_gib, ring_gib, _ in rows:
        flops = 3.5 * 2 * seqlen * seqlen * HEADS * head_dim  # causal: half of 4·S²·H·D, backward 2.5x
        lines.append(f"| {seqlen} | {n} | {head_dim} | {one_ms:.1f} | {ring_ms:.1f} | {one_ms / ring_ms:.2f} | "
                     f"{flops / (ring_ms / 1e3) / n / 1e12:.2g} | {one_gib:.1f} | {ring_gib:.1f} | {err:.1e} |")
    if rows and rows[-1][-1]:
        lines += ["", longest_line(rows)]
    return lines + [""]
