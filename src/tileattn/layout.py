"""Tensor layouts shared by the ops and both backends."""

import torch


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """LSE for q: dense q (B, Sq, H, D) -> (B, H, Sq); varlen q (total_q, H, D) -> (H, total_q)."""
    if varlen:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])
