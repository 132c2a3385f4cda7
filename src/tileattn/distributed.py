"""Context-parallel (ring) attention over torch.distributed.

A sequence too long for one device is split along the sequence across the ranks of a process
group. Each rank keeps its query shard; K/V shards travel around the ring (rank r sends to
r + 1) while the rank attends to the block it holds with the ordinary tileattn op, and the
partial outputs are merged by their LSEs (the split-KV decode merge). The backward sends K/V
around again, each block followed by its dK/dV accumulators, which arrive home after a full
turn. The next K/V block is always in flight while the current one is computed.

Causal attention with contiguous shards leaves rank 0 almost idle and the last rank with all
the work; ``layout="zigzag"`` gives rank r chunks r and 2W - 1 - r of 2W equal chunks, so every
rank does the same work. :func:`shard` and :func:`unshard` cut and reassemble a sequence that
way. GQA sends only the K/V heads.

Packed documents (``cu_seqlens`` over the whole sequence, batch 1) keep their boundaries: each
pair of chunks runs the varlen kernel on the pieces of every document the two chunks share, so
no token attends across a document boundary and no work is spent between documents.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from . import ops
from .scoped import ScopedValue
from .validation import check_cu_type, check_qkv, cu_bounds, resolve_scale

_LAYOUTS = ("contiguous", "zigzag")


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's part of a whole sequence x (sequence along ``dim``)."""
    _check_layout(layout)
    if layout == "contiguous":
        return x.chunk(world_size, dim)[rank]
    chunks = x.chunk(2 * world_size, dim)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim)


def unshard(shards: list[torch.Tensor], layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard, in rank order (inverse of :func:`shard`)."""
    _check_layout(layout)
    if layout == "contiguous":
        return torch.cat(shards, dim)
    world = len(shards)
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))], dim)


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")


def _chunk_ids(rank: int, world: int, layout: str) -> list[int]:
    """Which of the sequence's chunks (counted in units of the layout) a rank holds, in order."""
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def _relation(q_chunk: int, k_chunk: int, causal: bool) -> str | None:
    """'full', 'causal' (the diagonal chunk) or None (keys entirely in the future)."""
    if not causal or k_chunk < q_chunk:
        return "full"
    return "causal" if k_chunk == q_chunk else None


def _block_docs(bounds: list[int] | None, q_chunk: int, k_chunk: int, chunk: int, device):
    """The documents two chunks share, as varlen arguments (cu_q, cu_k, max_q, max_k) in chunk
    coordinates; None without packing. Every document contributes a (possibly empty) piece on
    each side, so the pieces tile both chunks in order."""
    if bounds is None:
        return None
    pieces_q, pieces_k = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        pieces_q.append(min(max(end - q_chunk * chunk, 0), chunk) - min(max(start - q_chunk * chunk, 0), chunk))
        pieces_k.append(min(max(end - k_chunk * chunk, 0), chunk) - min(max(start - k_chunk * chunk, 0), chunk))
    cu = torch.tensor([[0, 0]] + [[q, k] for q, k in zip(pieces_q, pieces_k)], dtype=torch.int32).cumsum(0)
    cu = cu.to(device=device, dtype=torch.int32)
    return cu[:, 0].contiguous(), cu[:, 1].contiguous(), max(pieces_q), max(pieces_k)


def _fwd_block(q, k, v, scale, causal, docs=None):
    if docs is None:
        return ops.fwd(q, k, v, None, None, 0, 0, scale, causal, False, -1, -1, 0.0, 0.0, 0, 0, None, None)
    out, lse = ops.fwd(q[0], k[0], v[0], *docs, scale, causal, False, -1, -1, 0.0, 0.0, 0, 0, None, None)
    return out.unsqueeze(0), lse.unsqueeze(0)  # varlen (total, H, D), (H, total) -> batch 1


def _bwd_block(dout, q, k, v, out, lse, scale, causal, docs=None):
    # the kernels lay delta out like a contiguous LSE: a view of the whole LSE won't do
    if docs is None:
        return ops.bwd(dout, q, k, v, out, lse.contiguous(), None, None, 0, 0, scale, causal, False, -1, -1, 0.0, 0.0,
                       0, 0, None)
    grads = ops.bwd(dout[0], q[0], k[0], v[0], out[0], lse[0].contiguous(), *docs, scale, causal, False, -1, -1,
                    0.0, 0.0, 0, 0, None)
    return tuple(g.unsqueeze(0) for g in grads)


def _merge(acc, block):
    """Fold a block's (out, lse) into the running (out float32, lse) by their log-sum-exps."""
    out_b, lse_b = block
    if acc is None:
        return out_b.float(), lse_b
    out_a, lse_a = acc
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(lse == float("-inf"), 0.0, lse)  # rows no block reached stay 0 / -inf
    w_a = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)  # (B, H, S) -> (B, S, H, 1)
    w_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    return out_a * w_a + out_b.float() * w_b, lse


class _Ring:
    """Send this rank's tensors to the next rank and receive the previous rank's, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next, self.prev = (self._global(group, (rank + d) % self.world) for d in (1, -1))

    @staticmethod
    def _global(group, rank: int) -> int:
        return dist.get_global_rank(group, rank) if group is not None else rank

    def start(self, tensors):
        received = [torch.empty_like(t) for t in tensors]
        ops_ = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops_ += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return dist.batch_isend_irecv(ops_), received

    @staticmethod
    def finish(pending):
        for req in pending:
            req.wait()


def _pieces(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(x.chunk(n, 1)) if n > 1 else [x]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, bounds):
        ring = _Ring(group)
        rank, world = dist.get_rank(group), ring.world
        mine = _chunk_ids(rank, world, layout)
        q_pieces = _pieces(q, len(mine))
        chunk = q_pieces[0].shape[1]
        docs = {}  # (q chunk, k chunk) -> varlen arguments, kept for the backward
        acc = [None] * len(mine)
        kv = (k, v)
        for step in range(world):
            pending, incoming = ring.start(kv) if step + 1 < world else ([], None)
            src = (rank - step) % world
            k_pieces, v_pieces = _pieces(kv[0], len(mine)), _pieces(kv[1], len(mine))
            for i, q_chunk in enumerate(mine):
                for j, k_chunk in enumerate(_chunk_ids(src, world, layout)):
                    rel = _relation(q_chunk, k_chunk, causal)
                    if rel is not None:
                        docs[q_chunk, k_chunk] = _block_docs(bounds, q_chunk, k_chunk, chunk, q.device)
                        acc[i] = _merge(acc[i], _fwd_block(q_pieces[i], k_pieces[j], v_pieces[j], scale,
                                                           rel == "causal", docs[q_chunk, k_chunk]))
            ring.finish(pending)
            if incoming is not None:
                kv = tuple(incoming)
        out = torch.cat([a[0] for a in acc], 1).to(q.dtype)
        lse = torch.cat([a[1] for a in acc], 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.layout, ctx.docs = group, causal, scale, layout, docs
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        rank, world = dist.get_rank(ctx.group), ring.world
        mine = _chunk_ids(rank, world, ctx.layout)
        n = len(mine)
        q_p, do_p, out_p = _pieces(q, n), _pieces(dout.contiguous(), n), _pieces(out, n)
        lse_p = list(lse.chunk(n, 2)) if n > 1 else [lse]
        dq = torch.zeros_like(q, dtype=torch.float32)
        dq_p = _pieces(dq, n)
        # the travelling block: its K/V and the float32 dK/dV accumulated for it so far
        block = (k, v, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
        for step in range(world):
            src = (rank - step) % world
            kb, vb, dkb, dvb = block
            kv_pending, kv_incoming = ring.start((kb, vb))  # K/V travel while this block is computed
            k_p, v_p, dk_p, dv_p = (_pieces(t, n) for t in block)
            for i, q_chunk in enumerate(mine):
                for j, k_chunk in enumerate(_chunk_ids(src, world, ctx.layout)):
                    rel = _relation(q_chunk, k_chunk, ctx.causal)
                    if rel is None:
                        continue
                    g = _bwd_block(do_p[i], q_p[i], k_p[j], v_p[j], out_p[i], lse_p[i], ctx.scale, rel == "causal",
                                   ctx.docs[q_chunk, k_chunk])
                    dq_p[i] += g[0].float()
                    dk_p[j] += g[1].float()
                    dv_p[j] += g[2].float()
            # dK/dV follow once computed; one more hop than the forward brings them home
            grad_pending, grad_incoming = ring.start((dkb, dvb))
            ring.finish(kv_pending + grad_pending)
            block = (*kv_incoming, *grad_incoming)
        dk, dv = block[2], block[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    return_attn_probs: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: (batch, local_seqlen, heads, head_dim), this rank's query shard; k, v: (batch,
            local_seqlen, heads_kv, head_dim). Every rank passes shards of the same length,
            cut by :func:`shard` with the same ``layout``.
        group: the process group (default: the whole world); any backend torch.distributed
            supports for point-to-point (NCCL on GPUs, gloo on CPUs).
        causal: causal over the whole sequence (queries and keys of equal total length).
        layout: "zigzag" (balanced causal work) or "contiguous".
        cu_seqlens: int32 (documents + 1,) boundaries of packed documents over the whole
            (unsharded) sequence, the same on every rank; batch must be 1. Tokens attend only
            within their document (causal within it when causal).
    Returns:
        out like q (this rank's shard of the output); with return_attn_probs, (out, lse) with
        lse (batch, heads, local_seqlen) float32 over the whole sequence's keys.

    Example (each of W ranks, after dist.init_process_group):
        >>> q_local = shard(q, rank, W)  # likewise k, v
        >>> out_local = ring_flash_attn_func(q_local, k_local, v_local, causal=True)
        >>> out = unshard(all_gathered_outputs)
    """
    check_qkv(q, k, v)
    _check_layout(layout)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k shards must have the same length, got {q.shape[1]} and {k.shape[1]}")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: local seqlen must be even, got {q.shape[1]}")
    scale = resolve_scale(softmax_scale, q.shape[-1])
    bounds = None
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens describes one packed sequence: batch must be 1, got {q.shape[0]}")
        bounds = _document_bounds(cu_seqlens, q.shape[1] * dist.get_world_size(group))
    out, lse = _RingAttention.apply(q, k, v, group, bool(causal), scale, layout, bounds)
    return (out, lse) if return_attn_probs else out


def _document_bounds(cu_seqlens, total: int) -> list[int]:
    """cu_seqlens as host ints (one read per call), checked against the whole sequence."""
    check_cu_type("cu_seqlens", cu_seqlens)
    return cu_bounds("cu_seqlens", cu_seqlens, total, "the whole sequence's length (local length x world size)")


_CONTEXT = ScopedValue("tileattn_context_parallel")


@contextlib.contextmanager
def context_parallel(group: dist.ProcessGroup | None = None, layout: str = "zigzag"):
    """Run a transformers model's tileattn attention as ring attention over ``group``.

    Inside the block, every attention call of a model loaded with attn_implementation="tileattn"
    that sees this rank's shard of a whole sequence (no padding mask, no KV cache) goes through
    :func:`ring_flash_attn_func`. Feed each rank ``shard(input_ids)`` with
    ``position_ids=shard(arange(seqlen))`` so rotary positions are the global ones (packed
    documents: pass ``cu_seq_lens_q`` of the whole sequence too, as a shard's position ids
    cannot show where documents start on other ranks); the model's
    per-token outputs are then this rank's shard (reassemble with :func:`unshard`), and
    parameter gradients of a loss summed over ranks are the all-reduced sums.
    """
    _check_layout(layout)
    with _CONTEXT.bind((group, layout)):
        yield


def current_context():
    """(group, layout) inside :func:`context_parallel`, else None."""
    return _CONTEXT.get()
