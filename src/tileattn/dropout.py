"""Attention dropout's random bits, defined once for both backends and the tests.

Element (batch b, head h, query i, key j) is kept iff u >= dropout_p, where u is the top 24
bits of output word j % 4 of Philox-4x32-10 (Triton's ``tl.philox``) with key ``seed`` and
counter (j // 4, i, b * heads + h, offset), scaled to [0, 1): one Philox evaluation (ten rounds
of 32-bit multiplies) serves four neighbouring keys. The kernels regenerate the bits in the
backward instead of storing a mask; this module computes the same bits in PyTorch for the CPU
backend and for ``return_attn_probs``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def new_seed() -> tuple[int, int]:
    """(seed, offset) from torch's default CPU generator, so torch.manual_seed reproduces runs."""
    seed, offset = torch.randint(0, 2**31 - 1, (2,)).tolist()
    return seed, offset


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values held in int64 (16-bit halves: no overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    mid = a_hi * b_lo + a_lo * b_hi
    low_full = a_lo * b_lo + ((mid & 0xFFFF) << 16)
    high = (a_hi * b_hi + (mid >> 16) + (low_full >> 32)) & _MASK32
    return high, low_full & _MASK32


def philox(seed: int, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox-4x32-10 (uint32 values in int64) for key ``seed`` (its
    low and high 32 bits) and counters c0..c3: int tensors (broadcast together) or ints."""
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    counters = (torch.as_tensor(c, dtype=torch.int64, device=device) & _MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(*counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform(word: torch.Tensor) -> torch.Tensor:
    """A Philox word's top 24 bits as a float32 in [0, 1), as the kernels compute it."""
    return (word >> 8).to(torch.float32) * 2.0**-24


def keep_mask(dropout_p: float, seed: int, offset: int, batch_head, rows, first_col: int, num_cols: int
              ) -> torch.Tensor:
    """True where the attention probability (batch*heads + head, query row, key col) is kept,
    for keys [first_col, first_col + num_cols) along a new last dim; batch_head and rows are
    int tensors (or ints) that broadcast together. Each Philox call serves four keys here too."""
    device = next((x.device for x in (batch_head, rows) if isinstance(x, torch.Tensor)), None)
    first = first_col // 4
    counters = torch.arange(first, (first_col + num_cols + 3) // 4, device=device)
    rows, batch_head = (torch.as_tensor(x, device=device).unsqueeze(-1) for x in (rows, batch_head))
    words = philox(seed, counters, rows, batch_head, offset)
    word = torch.stack(words, -1).flatten(-2)  # key 4 * c + w is word w of counter c
    start = first_col - 4 * first
    return uniform(word[..., start : start + num_cols]) >= dropout_p


def dropout_mask(dropout_p: float, seed: int, offset: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                 device=None) -> torch.Tensor:
    """The whole (batch, heads, seqlen_q, seqlen_k) keep mask of one dense call."""
    bh = torch.arange(batch * heads, device=device).view(batch, heads, 1)
    i = torch.arange(seqlen_q, device=device).view(1, 1, -1)
    return keep_mask(dropout_p, seed, offset, bh, i, 0, seqlen_k)
