"""Attention dropout's random bits, defined once for both backends and the tests.

Element (batch b, head h, query i, key j) is kept iff u >= dropout_p. Philox-4x32-7 (Triton's
``tl.philox`` with seven rounds) with key ``seed`` and counter (4 * (j // 32) + (j % 8) // 2, i,
b * heads + h, offset) gives four 32-bit words; u is 16-bit part j % 2 (low half first) of word
(j % 32) // 8, scaled to [0, 1). So one Philox call serves keys 8w + 2t and 8w + 2t + 1 (w = 0..3)
of a 32-key group: the columns that one thread of the tensor cores' accumulator layout holds
(thread t of a quad holds column pairs 8k + 2t), so the kernels draw every bit in the thread that
uses it (see tileattn.kernels.tile.dropout_words). Seven rounds, the fewest with which
Philox-4x32 passes TestU01's BigCrush (Salmon et al., SC11), are what flash-attn's dropout runs:
30% less integer work than the recommended ten, for bits that only pick which probabilities to
drop. One Philox evaluation (the forward's most expensive work per score when each key had its
own word) so serves eight keys, and p is resolved to 2**-16: the keep rate is 1 - p within
1.6e-5, while the kept probabilities are scaled by exactly 1 / (1 - p). The kernels regenerate
the bits in the backward instead of storing a mask; this module computes the same bits in
PyTorch for the CPU backend and for ``return_attn_probs``.
"""

from __future__ import annotations

import torch

KEY_BITS = 16  # random bits per key (8 bits cannot drop a p below 1/256: measured 0.0039 for 0.001)
KEYS_PER_WORD = 32 // KEY_BITS
KEYS_PER_CALL = 4 * KEYS_PER_WORD
CALLS_PER_GROUP = 4  # Philox calls whose bits interleave: one per column pair t of every 8 keys
KEY_GROUP = CALLS_PER_GROUP * KEYS_PER_CALL
ROUNDS = 7
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


def philox(seed: int, c0, c1, c2, c3, rounds: int = ROUNDS) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox-4x32 with ``rounds`` rounds (uint32 values in int64) for
    key ``seed`` (its low and high 32 bits) and counters c0..c3: int tensors (broadcast together)
    or ints."""
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    counters = (torch.as_tensor(c, dtype=torch.int64, device=device) & _MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(*counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform(part: torch.Tensor) -> torch.Tensor:
    """A key's KEY_BITS random bits as a float32 in [0, 1) (exact: the kernels compare the
    integer with ceil(p * 2**KEY_BITS), the same test)."""
    return part.to(torch.float32) * 2.0**-KEY_BITS


def keep_mask(dropout_p: float, seed: int, offset: int, batch_head, rows, first_col: int, num_cols: int
              ) -> torch.Tensor:
    """True where the attention probability (batch*heads + head, query row, key col) is kept,
    for keys [first_col, first_col + num_cols) along a new last dim; batch_head and rows are
    int tensors (or ints) that broadcast together."""
    device = next((x.device for x in (batch_head, rows) if isinstance(x, torch.Tensor)), None)
    first = first_col // KEY_GROUP
    groups = torch.arange(first, -(-(first_col + num_cols) // KEY_GROUP), device=device)
    counters = (groups[:, None] * CALLS_PER_GROUP + torch.arange(CALLS_PER_GROUP, device=device)).flatten()
    rows, batch_head = (torch.as_tensor(x, device=device).unsqueeze(-1) for x in (rows, batch_head))
    words = torch.stack(philox(seed, counters, rows, batch_head, offset), -1)  # [..., group * pair, word]
    words = words.unflatten(-2, (-1, CALLS_PER_GROUP)).transpose(-1, -2)  # [..., group, word, pair]
    low = (1 << KEY_BITS) - 1
    parts = torch.stack([(words >> (KEY_BITS * s)) & low for s in range(KEYS_PER_WORD)], -1)
    parts = parts.flatten(-4)  # key 32 g + 8 w + 2 t + s at [..., g, w, t, s]
    start = first_col - KEY_GROUP * first
    return uniform(parts[..., start : start + num_cols]) >= dropout_p


def dropout_mask(dropout_p: float, seed: int, offset: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                 device=None) -> torch.Tensor:
    """The whole (batch, heads, seqlen_q, seqlen_k) keep mask of one dense call."""
    bh = torch.arange(batch * heads, device=device).view(batch, heads, 1)
    i = torch.arange(seqlen_q, device=device).view(1, 1, -1)
    return keep_mask(dropout_p, seed, offset, bh, i, 0, seqlen_k)
