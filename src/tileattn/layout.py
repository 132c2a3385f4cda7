"""Tensor layouts shared by the ops, the public functions and both backends."""

import torch


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """LSE for q: dense q (B, Sq, H, D) -> (B, H, Sq); varlen q (total_q, H, D) -> (H, total_q)."""
    if varlen:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor,
                 cu_values: list[int] | None) -> torch.Tensor:
    """(total_k, heads_kv, head_dim): each sequence's keys from its pages, packed one sequence
    after another as cu_seqlens_k counts them; differentiable (the index's backward sums into
    pages that sequences share). cu_values: cu_seqlens_k read on the host (None: read here)."""
    lengths = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    total = cu_values[-1] if cu_values is not None else int(cu_seqlens_k[-1])
    seq = torch.repeat_interleave(torch.arange(lengths.shape[0], device=cache.device), lengths.long(),
                                  output_size=total)
    pos = torch.arange(total, device=cache.device) - cu_seqlens_k[seq]
    page_size = cache.shape[1]
    return cache[block_table[seq, pos // page_size].long(), pos % page_size]


def pages_in_use(block_table: torch.Tensor, lengths: torch.Tensor, page_size: int) -> torch.Tensor:
    """(batch, max_blocks) bool: the block_table entries holding each sequence's first lengths[b]
    positions; the entries past them may hold anything (tables are often padded with -1)."""
    pages = (lengths.long().to(block_table.device)[:, None] + page_size - 1) // page_size
    return torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages
