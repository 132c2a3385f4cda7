"""Ring attention over gloo with 2 and 4 processes against one process on the whole sequence."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tileattn import flash_attn_func, flash_attn_varlen_func
from tileattn.distributed import ring_flash_attn_func, shard, unshard

BATCH, SEQLEN, HEADS, HEADS_KV, DIM = 2, 48, 4, 2, 16


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, SEQLEN, HEADS, DIM, generator=gen)
    k, v = (torch.randn(BATCH, SEQLEN, HEADS_KV, DIM, generator=gen) for _ in range(2))
    return q, k, v, torch.randn(BATCH, SEQLEN, HEADS, DIM, generator=gen)


def _worker(rank, world, init_file, layout, causal, out_dir):
    os.environ["TILEATTN_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, v, dout = _inputs()
        leaves = [shard(x, rank, world, layout).clone().requires_grad_() for x in (q, k, v)]
        out, lse = ring_flash_attn_func(*leaves, causal=causal, layout=layout, return_attn_probs=True)
        out.backward(shard(dout, rank, world, layout))
        torch.save({"out": out.detach(), "lse": lse, "grads": [x.grad for x in leaves]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# each case spawns `world` processes (seconds each on 2 cores): the informative corners only
CASES = [(2, "zigzag", True), (2, "contiguous", False), (4, "zigzag", True), (4, "contiguous", True)]


@pytest.mark.parametrize("world,layout,causal", CASES, ids=[f"{w}ranks-{lay}-{'causal' if c else 'full'}"
                                                            for w, lay, c in CASES])
def test_ring_matches_single_process(tmp_path, world, layout, causal):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), layout, causal, str(tmp_path)), nprocs=world)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    q, k, v, dout = _inputs()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True)
    ref_out.backward(dout)
    torch.testing.assert_close(unshard([p["out"] for p in parts], layout), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(unshard([p["lse"] for p in parts], layout, dim=2), ref_lse, atol=1e-5, rtol=0)
    for i, name in enumerate("qkv"):
        got = unshard([p["grads"][i] for p in parts], layout)
        torch.testing.assert_close(got, leaves[i].grad, atol=1e-5, rtol=0, msg=f"d{name}")


DOCS = [0, 5, 22, 25, 48]  # packed documents of 5, 17, 3 and 23 tokens, crossing shard edges


def _varlen_worker(rank, world, init_file, layout, causal, out_dir):
    os.environ["TILEATTN_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, v, dout = (x[:1] for x in _inputs())
        leaves = [shard(x, rank, world, layout).clone().requires_grad_() for x in (q, k, v)]
        cu = torch.tensor(DOCS, dtype=torch.int32)
        out, lse = ring_flash_attn_func(*leaves, causal=causal, layout=layout, return_attn_probs=True, cu_seqlens=cu)
        out.backward(shard(dout, rank, world, layout))
        torch.save({"out": out.detach(), "lse": lse, "grads": [x.grad for x in leaves]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,layout,causal", [(2, "zigzag", True), (2, "contiguous", False)],
                         ids=["2ranks-zigzag-causal", "2ranks-contiguous-full"])
def test_ring_keeps_packed_documents_apart(tmp_path, world, layout, causal):
    mp.spawn(_varlen_worker, args=(world, str(tmp_path / "init"), layout, causal, str(tmp_path)), nprocs=world)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    q, k, v, dout = (x[0] for x in _inputs())  # the packed sequence as (total, heads, dim)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cu = torch.tensor(DOCS, dtype=torch.int32)
    longest = max(b - a for a, b in zip(DOCS, DOCS[1:]))
    ref_out, ref_lse, _ = flash_attn_varlen_func(*leaves, cu, cu, longest, longest, causal=causal,
                                                 return_attn_probs=True)
    ref_out.backward(dout)
    torch.testing.assert_close(unshard([p["out"] for p in parts], layout)[0], ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(unshard([p["lse"] for p in parts], layout, dim=2)[0], ref_lse, atol=1e-5, rtol=0)
    for i, name in enumerate("qkv"):
        got = unshard([p["grads"][i] for p in parts], layout)[0]
        torch.testing.assert_close(got, leaves[i].grad, atol=1e-5, rtol=0, msg=f"d{name}")


def test_document_bounds_are_checked():
    from tileattn.distributed import _document_bounds

    assert _document_bounds(torch.tensor([0, 3, 8], dtype=torch.int32), 8) == [0, 3, 8]
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        _document_bounds(torch.tensor([0, 8]), 8)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        _document_bounds(torch.tensor([[0, 8]], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"whole sequence's length \(local length x world size\) 8, got 6"):
        _document_bounds(torch.tensor([0, 3, 6], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="never decrease"):
        _document_bounds(torch.tensor([0, 5, 3, 8], dtype=torch.int32), 8)


def test_shard_unshard_roundtrip_and_zigzag_order():
    x = torch.arange(16).view(1, 16)
    assert shard(x, 0, 4).tolist() == [[0, 1, 14, 15]] and shard(x, 3, 4).tolist() == [[6, 7, 8, 9]]
    for layout in ("zigzag", "contiguous"):
        assert torch.equal(unshard([shard(x, r, 4, layout) for r in range(4)], layout), x)


def test_odd_zigzag_shard_is_refused():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="local seqlen must be even"):
        ring_flash_attn_func(q, q, q)


def _model_worker(rank, world, init_file, out_dir):
    import transformers

    from tileattn.distributed import context_parallel

    from .tiny_models import CONFIGS

    os.environ["TILEATTN_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="tileattn")
        ids = torch.randint(1, 96, (1, 32), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(32)[None]
        with context_parallel():
            logits = model(input_ids=shard(ids, rank, world), position_ids=shard(positions, rank, world),
                           use_cache=False).logits
        logits.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
        torch.save({"logits": logits.detach(), "grads": grads}, f"{out_dir}/model{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_transformers_model_under_context_parallel_matches_one_process(tmp_path):
    transformers = pytest.importorskip("transformers")
    import tileattn  # noqa: F401  (registers "tileattn")

    from .tiny_models import CONFIGS

    mp.spawn(_model_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"model{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="tileattn")
    ids = torch.randint(1, 96, (1, 32), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids, use_cache=False).logits
    logits.square().sum().backward()
    torch.testing.assert_close(unshard([p["logits"] for p in parts]), logits, atol=1e-4, rtol=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(parts[0]["grads"][name], param.grad, atol=1e-4, rtol=1e-4, msg=name)
