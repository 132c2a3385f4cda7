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

HEADS, HEAD_DIM = 16, 128
_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _step_ms(fn, reps: int, device, barrier=None) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if barrier:
        barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps * 1e3


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
            gen = torch.Generator().manual_seed(seqlen)  # the same sequence on every rank
            q, k, v, dout = (torch.randn(1, seqlen, HEADS, head_dim, generator=gen).to(device, dtype) for _ in range(4))
            local = [shard(x, rank, world).clone().requires_grad_() for x in (q, k, v)]
            local_dout = shard(dout, rank, world)

            def ring_step():
                ring_flash_attn_func(*local, causal=True).backward(local_dout)

            out = ring_flash_attn_func(*local, causal=True)
            out.backward(local_dout)
            whole = [x.clone().requires_grad_() for x in (q, k, v)]
            ref = flash_attn_func(*whole, causal=True)
            ref.backward(dout)
            pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(local, whole)]
            err = torch.tensor(max((a.float() - shard(b, rank, world).float()).abs().max().item() for a, b in pairs))
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            del whole, ref, out

            ring_ms = _step_ms(ring_step, reps, device, dist.barrier)
            one_ms = None
            if rank == 0:
                full = [x.clone().requires_grad_() for x in (q, k, v)]
                one_ms = _step_ms(lambda: flash_attn_func(*full, causal=True).backward(dout), reps, device)
                del full
            dist.barrier()
            rows.append((seqlen, world, head_dim, one_ms, ring_ms, float(err)))
        if rank == 0:
            torch.save(rows, out_file)
    finally:
        dist.destroy_process_group()


def ring_bench(log, seqlens=(32768, 65536, 131072), world: int | None = None, head_dim: int = HEAD_DIM,
               reps: int = 5) -> list[tuple]:
    """Rows (total seqlen, devices, head dim, one-device ms, ring ms, max |ring - one device|)."""
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
    for seqlen, n, _, one_ms, ring_ms, err in rows:
        log(f"   S{seqlen} causal fwd+bwd: one device {one_ms:.1f} ms, {n} devices (ring) {ring_ms:.1f} ms "
            f"= {one_ms / ring_ms:.2f}x; max |ring - one device| {err:.2e}")
    return rows


def ring_table(rows) -> list[str]:
    lines = [f"Ring attention (zigzag), causal, batch 1, {HEADS} heads, forward + backward:", "",
             "| total seqlen | devices | head dim | one device ms | ring ms | speedup | TFLOP/s per device (ring) | "
             "max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for seqlen, n, head_dim, one_ms, ring_ms, err in rows:
        flops = 3.5 * 2 * seqlen * seqlen * HEADS * head_dim  # causal: half of 4·S²·H·D, backward 2.5x
        lines.append(f"| {seqlen} | {n} | {head_dim} | {one_ms:.1f} | {ring_ms:.1f} | {one_ms / ring_ms:.2f} | "
                     f"{flops / (ring_ms / 1e3) / n / 1e12:.2g} | {err:.1e} |")
    return lines + [""]
