"""FlashAttention-2 in blocked PyTorch: the backend for CPU and any non-CUDA device.

The same algorithm as the Triton kernels, one K/V chunk at a time: scores for a chunk, fold it
into a running (max, sum, accumulator), never the full (seqlen_q, seqlen_k) matrix. Under a
causal mask or a window the forward walks blocks of query rows, each over only the key chunks
its rows can see. The backward recomputes each chunk's probabilities from the saved LSE. Work
is done in float32 whatever the input dtype (as the kernels accumulate), and GQA is handled by
viewing the query heads as (heads_kv, group) so K/V are never repeated in memory.
"""

from __future__ import annotations

import torch

from .dropout import keep_mask
from .layout import gather_pages, lse_shape, pages_in_use

BLOCK_K = 256
# query rows per block where a causal mask or a window lets whole key chunks be skipped, as the
# kernels skip tiles (a causal prefill then does half the work)
BLOCK_Q = 256
# the forward's key chunk holds at most this many scores per (batch, head) with at least BLOCK_K
# keys: a few query rows (decoding) take the whole cache in one chunk, as every extra chunk
# costs a dozen more small tensor ops (on a CPU, ~5 us each) for a handful of scores
_SCORES_PER_CHUNK = 1 << 16


def _chunk_keys(seqlen_q: int) -> int:
    return max(BLOCK_K, _SCORES_PER_CHUNK // max(seqlen_q, 1) // BLOCK_K * BLOCK_K)


def _window(causal: bool, window_size) -> tuple[int, int]:
    """(left, right) with the causal mask folded into right; -1 is unbounded."""
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _key_span(m0: int, m1: int, seqlen_q: int, seqlen_k: int, causal: bool, window_size) -> tuple[int, int]:
    """Keys [lo, hi) that query rows [m0, m1) may see under the causal mask and window."""
    left, right = _window(causal, window_size)
    offset = seqlen_k - seqlen_q  # bottom-right alignment: row i's diagonal is key i + offset
    lo = 0 if left < 0 else min(seqlen_k, max(0, m0 + offset - left))
    hi = seqlen_k if right < 0 else min(seqlen_k, max(0, m1 + offset + right))
    return lo, max(lo, hi)


def _query_span(n0: int, n1: int, seqlen_q: int, seqlen_k: int, causal: bool, window_size) -> tuple[int, int]:
    """Query rows [r0, r1) that see at least one key of [n0, n1) under the causal mask and window
    (the backward's counterpart of _key_span)."""
    left, right = _window(causal, window_size)
    offset = seqlen_k - seqlen_q
    r0 = 0 if right < 0 else min(seqlen_q, max(0, n0 - offset - right))
    r1 = seqlen_q if left < 0 else min(seqlen_q, max(0, n1 - offset + left))
    return r0, max(r0, r1)


def _visible(m0: int, m1: int, n0: int, n1: int, seqlen_q: int, seqlen_k: int, causal: bool, window_size) -> bool:
    """Whether rows [m0, m1) see every key of [n0, n1) under the causal mask and window."""
    first_row_hi = _key_span(m0, m0 + 1, seqlen_q, seqlen_k, causal, window_size)[1]
    last_row_lo = _key_span(m1 - 1, m1, seqlen_q, seqlen_k, causal, window_size)[0]
    return last_row_lo <= n0 and n1 <= first_row_hi  # rows' spans only move right as rows grow


def _split_heads(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, S, H, D) -> float32 (B, heads_kv, group, S, D)."""
    b, s, h, d = x.shape
    return x.float().reshape(b, s, heads_kv, h // heads_kv, d).permute(0, 2, 3, 1, 4)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads_kv, group, S, D) -> (B, S, H, D)."""
    b, hk, g, s, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, s, hk * g, d)


def _group_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, group, R, K) @ y (B, Hkv, K, N) -> (B, Hkv, group, R, N): a group's rows as one
    matrix per K/V head, so one batched matmul serves GQA without repeating y (einsum's parsing
    and permutes cost more than the product itself at decoding's sizes)."""
    b, hk, g, r, k = x.shape
    return torch.matmul(x.reshape(b, hk, g * r, k), y).view(b, hk, g, r, y.shape[-1])


def _chunk_scores(q, k_chunk, n0, seqlen_q, seqlen_k, causal, bounds=None, window_size=(-1, -1), softcap=0.0,
                  alibi=None, m0: int = 0, visible: bool = False):
    """Scores of query rows [m0, m0 + rows of q), q already multiplied by the softmax scale,
    against keys [n0, n0 + chunk): softcapped, ALiBi-biased and masked to -inf. visible: the
    caller knows the causal mask and window hide none of them (_visible). Returns (scores, tanh
    of the softcap argument or None).

    bounds: optional (k_lo, k_hi), int tensors (B,): batch entry b sees keys [k_lo, k_hi) only
    and its diagonal is aligned to k_hi (a KV cache's per-sequence fill). alibi: slopes shaped to
    broadcast against (B, Hkv, group, 1, 1)."""
    s = _group_matmul(q, k_chunk.transpose(-1, -2))
    th = None
    if softcap:
        th = torch.tanh(s / softcap)
        s = softcap * th
    if visible and bounds is None and alibi is None:
        return s, th
    i = torch.arange(m0, m0 + q.shape[-2], device=q.device)[:, None]
    j = torch.arange(n0, n0 + k_chunk.shape[2], device=q.device)[None, :]
    end = seqlen_k
    if bounds is not None:
        k_lo, end = (x.view(-1, 1, 1, 1, 1) for x in bounds)
        s = s.masked_fill((j < k_lo) | (j >= end), float("-inf"))
    diag = i + (end - seqlen_q)
    if alibi is not None:
        s = s - alibi * (diag - j).abs()
    left, right = _window(causal, window_size)
    if right >= 0 and not visible:
        s = s.masked_fill(j > diag + right, float("-inf"))
    if left >= 0 and not visible:
        s = s.masked_fill(j < diag - left, float("-inf"))
    return s, th


def _keep(dropout, first_batch: int, batch: int, heads_kv: int, group: int, m0: int, rows: int, n0: int, chunk: int,
          device):
    """1 / (1 - p) where kept, 0 where dropped, for query rows [m0, m0 + rows) and keys
    [n0, n0 + chunk): (B, Hkv, group, rows, chunk), the bits the kernels draw (tileattn.dropout)."""
    p, seed, offset = dropout
    b = torch.arange(first_batch, first_batch + batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads_kv * group, device=device).view(1, heads_kv, group, 1)
    i = torch.arange(m0, m0 + rows, device=device).view(1, 1, 1, -1)
    return keep_mask(p, seed, offset, b * heads_kv * group + h, i, n0, chunk).float() / (1.0 - p)


def _alibi(alibi_slopes, batch: int, heads_kv: int):
    """(heads,) or (batch, heads) slopes -> float32 broadcastable to (B, Hkv, group, 1, 1)."""
    if alibi_slopes is None:
        return None
    return alibi_slopes.float().expand(batch, -1).reshape(batch, heads_kv, -1, 1, 1)


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q_start, q_end, k_start, k_end) of each packed sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return zip(cq[:-1], cq[1:], ck[:-1], ck[1:])


def forward(q, k, v, softmax_scale: float, causal: bool, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q: int = 0, max_seqlen_k: int = 0, window_size=(-1, -1), softcap: float = 0.0,
            alibi_slopes=None, learnable_sink=None, dropout=(0.0, 0, 0)):
    """Dense: out (B, Sq, H, D), lse (B, H, Sq). Varlen (packed (total, H, D) inputs split by
    cu_seqlens): out (total_q, H, D), lse (H, total_q). lse is float32."""
    variants = dict(window_size=window_size, softcap=softcap, learnable_sink=learnable_sink, dropout=dropout)
    if cu_seqlens_q is None:
        return _dense_forward(q, k, v, softmax_scale, causal, alibi_slopes=alibi_slopes, **variants)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(lse_shape(q, varlen=True), dtype=torch.float32, device=q.device)
    for b, (qs, qe, ks, ke) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        o, row_lse = _dense_forward(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], softmax_scale, causal,
                                    alibi_slopes=_row(alibi_slopes, b), first_batch=b, **variants)
        out[qs:qe], lse[:, qs:qe] = o[0], row_lse[0]
    return out, lse


def backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q: int = 0, max_seqlen_k: int = 0, window_size=(-1, -1), softcap: float = 0.0,
             alibi_slopes=None, dropout=(0.0, 0, 0)):
    """Gradients (dq, dk, dv) in the inputs' layouts and dtypes."""
    variants = dict(window_size=window_size, softcap=softcap, dropout=dropout)
    if cu_seqlens_q is None:
        return _dense_backward(dout, q, k, v, out, lse, softmax_scale, causal, alibi_slopes=alibi_slopes, **variants)
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    for b, (qs, qe, ks, ke) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        grads = _dense_backward(dout[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], out[None, qs:qe],
                                lse[None, :, qs:qe], softmax_scale, causal, alibi_slopes=_row(alibi_slopes, b),
                                first_batch=b, **variants)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (g[0] for g in grads)
    return dq, dk, dv


def _row(alibi_slopes, b: int):
    """Sequence b's slopes: per-batch slopes (batch, heads) are indexed, (heads,) shared."""
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[b]


def decode(q, k_cache, v_cache, seqlens_k, softmax_scale: float, causal: bool, cache_batch_idx=None,
           cache_leftpad=None, block_table=None, num_splits: int = 0, window_size=(-1, -1), softcap: float = 0.0,
           alibi_slopes=None, learnable_sink=None, cu_seqlens_q=None, max_seqlen_q: int = 0):
    """Attention of q (B, Sq, H, D) over a KV cache, as :func:`tileattn.kernels.decode.decode`
    (packed queries too: cu_seqlens_q given, seqlens_k is then cu_seqlens_k).

    The batch's cache rows (pages, or cache_batch_idx rows) are gathered into one dense tensor
    and attended in chunks; num_splits only matters to the GPU kernel."""
    if cu_seqlens_q is not None:  # the sequences' keys packed, then the varlen forward
        pages = block_table if block_table is not None else torch.arange(
            k_cache.shape[0], dtype=torch.int32, device=q.device)[:, None]  # a dense cache row is one page
        k, v = (gather_pages(cache, pages, seqlens_k, None) for cache in (k_cache, v_cache))
        return forward(q, k, v, softmax_scale, causal, cu_seqlens_q, seqlens_k, window_size=window_size,
                       softcap=softcap, alibi_slopes=alibi_slopes, learnable_sink=learnable_sink)
    batch = q.shape[0]
    if block_table is not None:
        # pages past a sequence's fill may hold anything (-1 pads many tables): the GPU kernel
        # never reads them, so gather page 0 in their place; masked below like any unfilled slot
        idx = torch.where(pages_in_use(block_table, seqlens_k, k_cache.shape[1]), block_table, 0).long()
        k = k_cache[idx].flatten(1, 2)  # (B, max_blocks * page_size, Hkv, D)
        v = v_cache[idx].flatten(1, 2)
    elif cache_batch_idx is not None:
        k, v = k_cache[cache_batch_idx.long()], v_cache[cache_batch_idx.long()]
    else:
        k, v = k_cache[:batch], v_cache[:batch]
    # slots past every sequence's fill hold no key: skip them where reading the fill is free
    # (host memory; not while tracing, and never a sync in a CUDA graph's capture)
    per_sequence = True
    if seqlens_k.device.type == "cpu" and not torch.compiler.is_compiling():
        # read as lists: three reductions (max, min, any) cost ~30 us a decode call on a small CPU
        lengths = seqlens_k.tolist()
        filled = max(lengths, default=0)
        k, v = k[:, :filled], v[:, :filled]
        # every sequence filled alike and none left-padded (batch 1 always): the slots are exactly
        # the keys, aligned as a dense call aligns them, and need no per-sequence masks
        padded = cache_leftpad is not None and (cache_leftpad.device.type != "cpu" or any(cache_leftpad.tolist()))
        per_sequence = padded or min(lengths, default=0) != filled
    bounds = None
    if per_sequence:
        k_lo = cache_leftpad if cache_leftpad is not None else torch.zeros_like(seqlens_k)
        bounds = (k_lo.long(), seqlens_k.long())
    return _dense_forward(q, k, v, softmax_scale, causal, bounds=bounds, window_size=window_size, softcap=softcap,
                          alibi_slopes=alibi_slopes, learnable_sink=learnable_sink)


def _dense_forward(q, k, v, softmax_scale: float, causal: bool, bounds=None, window_size=(-1, -1),
                   softcap: float = 0.0, alibi_slopes=None, learnable_sink=None, dropout=(0.0, 0, 0),
                   first_batch: int = 0):
    """Returns out (B, Sq, H, D) in q's dtype and lse (B, H, Sq) float32."""
    b, seqlen_q, heads, d = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    qf = _split_heads(q, heads_kv)
    alibi = _alibi(alibi_slopes, b, heads_kv)
    kf = k.float().permute(0, 2, 1, 3)  # (B, Hkv, Sk, D)
    vf = v.float().permute(0, 2, 1, 3)
    masked = bounds is None and max(_window(causal, window_size)) >= 0
    if masked and seqlen_q > BLOCK_Q:  # row blocks, each over the keys its mask leaves it
        blocks = [(m0, min(m0 + BLOCK_Q, seqlen_q)) for m0 in range(0, seqlen_q, BLOCK_Q)]
        spans = [_key_span(m0, m1, seqlen_q, seqlen_k, causal, window_size) for m0, m1 in blocks]
    else:
        blocks, spans = [(0, seqlen_q)], [(0, seqlen_k)]
    parts = []
    every_row_sees_a_key = True  # then no row is empty and the guards against -inf can go
    for (m0, m1), (lo, hi) in zip(blocks, spans):
        m = row_sum = acc = None  # the first chunk sets them: nothing to rescale yet
        seen = False
        q_rows, chunk = qf[..., m0:m1, :] * softmax_scale, _chunk_keys(m1 - m0)
        for n0 in range(lo, hi, chunk):
            n1 = min(n0 + chunk, hi)
            visible = bounds is None and _visible(m0, m1, n0, n1, seqlen_q, seqlen_k, causal, window_size)
            s, _ = _chunk_scores(q_rows, kf[:, :, n0:n1], n0, seqlen_q, seqlen_k, causal, bounds, window_size,
                                 softcap, alibi, m0, visible)
            m_new = s.amax(-1) if m is None else torch.maximum(m, s.amax(-1))
            seen |= visible  # every chunk of the loop holds at least one key
            # a row that has seen only masked keys keeps m = -inf; shift by 0 so exp gives 0, not NaN
            m_safe = m_new if seen else torch.where(m_new == float("-inf"), 0.0, m_new)
            p = s.sub_(m_safe[..., None]).exp_()  # in place: s is this chunk's own tensor
            p_sum = p.sum(-1)
            if dropout[0] > 0:  # the output sees dropped probabilities; the LSE the undropped ones
                p = p * _keep(dropout, first_batch, b, heads_kv, qf.shape[2], m0, m1 - m0, n0, n1 - n0, q.device)
            pv = _group_matmul(p, vf[:, :, n0:n1])
            if m is None:
                row_sum, acc = p_sum, pv
            else:
                alpha = torch.exp(m - m_safe)
                row_sum = row_sum.mul_(alpha).add_(p_sum)
                acc = acc.mul_(alpha[..., None]).add_(pv)
            m = m_new
        every_row_sees_a_key &= seen
        if m is None:  # no keys for these rows
            m = torch.full(q_rows.shape[:-1], float("-inf"), device=q.device)
            row_sum = torch.zeros_like(m)
            acc = torch.zeros_like(q_rows)
        parts.append((m, row_sum, acc))
    m, row_sum, acc = parts[0]
    if len(parts) > 1:
        m, row_sum, acc = (torch.cat([part[i] for part in parts], dim) for i, dim in enumerate((-1, -1, -2)))
    if learnable_sink is not None:  # one more logit per head, with no value row
        sink = learnable_sink.float().view(1, heads_kv, -1, 1)
        m_new = torch.maximum(m, sink)
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - m_safe)
        row_sum = row_sum * alpha + torch.exp(sink - m_safe)
        acc = acc * alpha[..., None]
        m = m_new
    if every_row_sees_a_key:
        out, lse = acc / row_sum[..., None], m + torch.log(row_sum)
    else:
        empty = row_sum == 0
        out = acc / torch.where(empty, 1.0, row_sum)[..., None]
        lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, row_sum)))
    return _merge_heads(out).to(q.dtype), lse.reshape(b, heads, seqlen_q)


def _dense_backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, window_size=(-1, -1),
                    softcap: float = 0.0, alibi_slopes=None, dropout=(0.0, 0, 0), first_batch: int = 0):
    """Gradients (dq, dk, dv) in the inputs' dtypes, recomputing probabilities from lse."""
    b, seqlen_q, heads, d = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    qf = _split_heads(q, heads_kv)
    alibi = _alibi(alibi_slopes, b, heads_kv)
    dof = _split_heads(dout, heads_kv)
    kf = k.float().permute(0, 2, 1, 3)
    vf = v.float().permute(0, 2, 1, 3)
    delta = (dof * _split_heads(out, heads_kv)).sum(-1)
    lse = lse.reshape(qf.shape[:-1])
    # rows that saw no key have lse = -inf; +inf makes their probabilities exactly 0
    lse = torch.where(lse == float("-inf"), float("inf"), lse)
    q_scaled = qf * softmax_scale  # the scores rounded as the forward rounded them, so p matches its LSE
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for n0 in range(0, seqlen_k, BLOCK_K):
        n1 = min(n0 + BLOCK_K, seqlen_k)
        r0, r1 = _query_span(n0, n1, seqlen_q, seqlen_k, causal, window_size)
        if r0 >= r1:  # no row sees these keys: their dk, dv stay 0
            continue
        kc, vc = kf[:, :, n0:n1], vf[:, :, n0:n1]
        q_rows, do_rows = qf[..., r0:r1, :], dof[..., r0:r1, :]
        s, th = _chunk_scores(q_scaled[..., r0:r1, :], kc, n0, seqlen_q, seqlen_k, causal, None, window_size, softcap,
                              alibi, r0)
        p = s.sub_(lse[..., r0:r1, None]).exp_()  # in place, as below: each is this chunk's own tensor
        dp = _group_matmul(do_rows, vc.transpose(-1, -2))
        if dropout[0] > 0:
            keep = _keep(dropout, first_batch, b, heads_kv, qf.shape[2], r0, r1 - r0, n0, n1 - n0, q.device)
            dv[:, :, n0:n1] = torch.einsum("bhgqk,bhgqd->bhkd", p * keep, do_rows)
            dp.mul_(keep)
        else:
            dv[:, :, n0:n1] = torch.einsum("bhgqk,bhgqd->bhkd", p, do_rows)
        ds = dp.sub_(delta[..., r0:r1, None]).mul_(p)
        if th is not None:  # d(cap * tanh(x / cap)) / dx
            ds.mul_(1 - th * th)
        dq[..., r0:r1, :] += _group_matmul(ds, kc) * softmax_scale
        dk[:, :, n0:n1] = torch.einsum("bhgqk,bhgqd->bhkd", ds, q_rows) * softmax_scale
    return (
        _merge_heads(dq).to(q.dtype),
        dk.permute(0, 2, 1, 3).to(k.dtype),
        dv.permute(0, 2, 1, 3).to(v.dtype),
    )
