"""`attn_implementation="tileattn"` for Hugging Face transformers.

Importing tileattn registers an attention function in transformers' AttentionInterface and a
mask function in AttentionMaskInterface (without a mask function, padded batches would arrive
with attention_mask=None). The mask function hands over the 2-D padding mask, or None when
nothing is padded; the attention function only reshapes and routes:

- cu_seq_lens_q/k + max_length_q/k given (padding-free training): varlen kernel;
- a padding mask: the valid tokens are gathered and run through the varlen kernel, so no work
  is spent on padding; padded query rows come back as zeros, as with flash-attn. Without causal
  masking or a window the mask is taken for the keys alone (a cross-attention's mask is the
  encoder's, and says nothing of the decoder's queries), and every query row runs. A mask with
  gaps (masked tokens between kept ones) keeps causal order when packed, but not the distances
  a sliding window counts: layers whose window bites refuse it (ValueError);
- position_ids that restart inside one row (packed sequences): varlen kernel;
- decode steps (a few queries against a longer cache, no gradient): the KV-cache kernel, which
  splits the keys across SMs and reads each K/V head once for its whole GQA group;
- otherwise: the dense kernel. K/V arrive un-repeated for GQA and are never repeated.

Sliding windows (Mistral, Qwen2, Gemma 2), logit softcapping (Gemma 2), attention sinks
(gpt-oss's s_aux) and attention dropout (transformers passes it only while training) pass
through to the kernels. Chunked attention (Llama 4's chunked layers) is not implemented: such
a layer runs while its keys lie in the first chunk, where it is causal attention, and raises
NotImplementedError past it.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from .. import ops
from ..api import flash_attn_func
from ..distributed import current_context, ring_flash_attn_func
from ..generation import decode_context
from ..validation import resolve_scale
from ..varlen import flash_attn_varlen_func

NAME = "tileattn"
DECODE_ROWS = 64  # queries x GQA group up to one decode-kernel tile


def _widens(mask_function, depth: int = 0) -> bool:
    """Whether transformers' mask function ORs a mask of the model's into the causal one
    (transformers' or_masks: Gemma 3's bidirectional attention and image-token blocks), looking
    through the and_masks / remapping closures that wrap it."""
    if not callable(mask_function) or depth > 8:
        return False
    if getattr(mask_function, "__name__", "") == "or_mask":
        return True
    for cell in getattr(mask_function, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if any(_widens(f, depth + 1) for f in (inner if isinstance(inner, (tuple, list)) else (inner,))):
            return True
    return False


def tileattn_mask(batch_size: int, *args, attention_mask: torch.Tensor | None = None, kv_length: int | None = None,
                  mask_function=None, **kwargs) -> torch.Tensor | None:
    """The (batch, kv_length) bool padding mask, or None when no token is padded. The kernels
    apply causal masking, windows and padding; a model that widens the causal mask with one of
    its own is refused rather than run causally (in eager calls: a first, uncompiled forward
    catches it, as tileattn.generation's probe of the model does)."""
    # read eagerly only: closures are opaque to torch.compile's tracer (each look a graph break)
    if not torch.compiler.is_compiling() and _widens(mask_function):
        raise NotImplementedError("tileattn applies causal, sliding-window and padding masks; this model widens the "
                                  "causal mask with one of its own (bidirectional attention, image-token blocks). "
                                  "Use attn_implementation='sdpa' or 'eager'")
    if attention_mask is None:
        return None
    if kv_length is not None:
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
    return attention_mask.bool()


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """transformers' sliding window w lets a query see the w - 1 keys before it (and, without
    causal, the w - 1 after), as its own mask functions and flash-attn integration do."""
    if sliding_window is None:
        return (-1, -1)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _unpad(x: torch.Tensor, mask: torch.Tensor):
    """Gather the rows of x (B, S, H, D) where mask (B, S) is True -> (nnz, H, D), indices, cu."""
    indices = mask.flatten().nonzero().flatten()
    lengths = mask.sum(-1, dtype=torch.int32)
    return x.reshape(-1, *x.shape[2:])[indices], indices, _cu_seqlens(lengths), int(lengths.max())


def _has_gaps(mask: torch.Tensor) -> bool:
    """Whether a row's kept tokens are not one run (masked tokens between kept ones)."""
    runs = mask[:, :1].int() + (mask[:, 1:] & ~mask[:, :-1]).sum(1, dtype=torch.int32, keepdim=True)
    return bool((runs > 1).any())


def _padded(q, k, v, mask, scale, causal, variants):
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    mask_q = None  # every query row runs: a cross-attention's mask is the encoder's, not its queries'
    if causal or variants["window_size"] != (-1, -1):  # self-attention: queries are the newest tokens
        mask_q = mask[:, -seqlen_q:]
    if mask.shape[1] < seqlen_k:  # a static cache: slots past the mask are not filled yet
        mask = F.pad(mask, (0, seqlen_k - mask.shape[1]), value=False)
    mask = mask[:, -seqlen_k:]
    left, right = variants["window_size"]
    if (0 <= left < seqlen_k - 1 or (not causal and 0 <= right < seqlen_k - 1)) and _has_gaps(mask):
        # the kept tokens are packed before the kernel, so a window would count kept tokens, not
        # positions as transformers' masks do: a wider window than the model's, without a word
        raise ValueError("tileattn: attention_mask masks tokens between kept ones (not left or right padding) in a "
                         "layer with a sliding window, whose span the packed tokens would not keep; use "
                         "attn_implementation='sdpa' or 'eager' for such masks")
    k_unpad, idx_k, cu_k, max_k = _unpad(k, mask)
    v_unpad = v.reshape(-1, *v.shape[2:])[idx_k]
    if mask_q is None:
        q_unpad, max_q = q.reshape(-1, heads, head_dim), seqlen_q
        cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
    else:
        q_unpad, idx_q, cu_q, max_q = _unpad(q, mask_q)
    out_unpad = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k,
                                       softmax_scale=scale, causal=causal, **variants)
    if mask_q is None:
        return out_unpad.view(batch, seqlen_q, heads, head_dim)
    out = q.new_zeros(batch * seqlen_q, heads, head_dim)
    out[idx_q] = out_unpad
    return out.view(batch, seqlen_q, heads, head_dim)


def _dense(q, k, v, scale, causal, variants):
    step = decode_context()
    batch, seqlen_q, heads, head_dim = q.shape
    if step is not None and step.prefill:  # tileattn.generation's prefill: a fresh cache filled to Sq
        k, v = k[:, :seqlen_q], v[:, :seqlen_q]
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    decoding = seqlen_k > seqlen_q and seqlen_q * (heads // heads_kv) <= DECODE_ROWS and not variants["dropout_p"]
    if decoding and not (q.requires_grad or k.requires_grad or v.requires_grad):
        if step is not None:  # tileattn.generation: a static cache filled to seqlens_k, left-padded
            seqlens, leftpad = step.seqlens_k, step.cache_leftpad
        else:  # the cache is full to seqlen_k; built on the device, so nothing synchronizes
            seqlens, leftpad = torch.full((batch,), seqlen_k, dtype=torch.int32, device=q.device), None
        left, right = variants["window_size"]
        return ops.fwd_kvcache(q, k, v, seqlens, None, leftpad, None, resolve_scale(scale, head_dim), causal, 0, left,
                               right, float(variants["softcap"]), None, variants["learnable_sink"])[0]
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, **variants)


_last_packing: tuple = (None, -1, None)  # (weakref to position_ids, its version, result)


def _packed_cu_seqlens(position_ids: torch.Tensor | None, batch: int, seqlen_q: int, seqlen_k: int):
    """(cu_seqlens, longest) when one row holds several sequences (position ids restart at 0),
    else (None, None).

    Finding the restarts reads the ids on the host; every layer of a forward gets the same
    position_ids tensor, so the answer is kept for it and the host waits once per forward, not
    once per layer."""
    global _last_packing
    if position_ids is None or batch != 1 or seqlen_q != seqlen_k or seqlen_q < 2:
        return None, None
    # inference tensors have no version counter (and are not edited in place between layers)
    version = None if position_ids.is_inference() else position_ids._version
    ref, last_version, result = _last_packing
    if ref is not None and ref() is position_ids and version == last_version:
        return result
    result = None, None
    pos = position_ids.reshape(-1)
    if pos.shape[0] == seqlen_q:
        starts = (pos == 0).nonzero().flatten()
        if starts.numel() >= 2 and int(starts[0]) == 0:
            cu = torch.cat([starts, starts.new_tensor([seqlen_q])]).to(torch.int32)
            result = cu, int((cu[1:] - cu[:-1]).max())
    _last_packing = (weakref.ref(position_ids), version, result)
    return result


def _chunk_size(module) -> int | None:
    """The chunk of a chunked-attention layer (Llama 4: tokens attend within fixed chunks of
    positions), else None. transformers builds that mask; the attention function is not told."""
    config = getattr(module, "config", None)
    types, index = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if not types or index is None or index >= len(types) or types[index] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def tileattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: query (B, H, Sq, D), key/value (B, Hkv, Sk, D) with the
    cache already updated; returns (out (B, Sq, H, D), None)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"tileattn expects the 2-D padding mask made by its registered mask function, got shape "
            f"{tuple(attention_mask.shape)}; this model builds its own masks, use attn_implementation='sdpa'"
        )
    if kwargs.get("output_attentions"):
        warnings.warn("tileattn never forms the attention weights (that is the memory it saves), so "
                      "output_attentions=True gets none; use attn_implementation='eager' for them", stacklevel=2)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D) views, no copies
    chunk = _chunk_size(module)
    if chunk is not None and k.shape[1] >= chunk:
        # fewer keys than a chunk all lie in the first one, where chunked attention is causal
        # attention; past it (or a sliding cache of a chunk's size, which hides the positions) not
        raise NotImplementedError(f"tileattn: chunked attention (chunks of {chunk} positions) is not implemented; "
                                  f"it equals causal attention only while fewer than {chunk} keys are seen, and this "
                                  f"layer sees {k.shape[1]}. Use attn_implementation='sdpa' or 'flex_attention'")
    v_head_dim = v.shape[-1]
    if v_head_dim != q.shape[-1]:  # e.g. MLA: pad V to the QK head dim, slice the output back
        v = F.pad(v, (0, q.shape[-1] - v_head_dim))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    batch, seqlen_q = q.shape[:2]
    variants = dict(window_size=_window(sliding_window, causal), softcap=float(softcap or 0.0), learnable_sink=s_aux,
                    dropout_p=float(dropout or 0.0))

    ring = current_context()
    if ring is not None and attention_mask is None and seqlen_q == k.shape[1]:
        if variants["window_size"] != (-1, -1) or variants["softcap"] or s_aux is not None or variants["dropout_p"]:
            raise NotImplementedError("context-parallel attention supports plain (causal) attention only so far")
        # packed documents: cu_seq_lens_q must describe the whole (unsharded) sequence
        cu = kwargs.get("cu_seq_lens_q")
        out = ring_flash_attn_func(q, k, v, group=ring[0], causal=causal, softmax_scale=scaling, layout=ring[1],
                                   cu_seqlens=None if cu is None else cu.to(torch.int32))
        return out[..., :v_head_dim], None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is None and attention_mask is None:
        cu_q, max_q = _packed_cu_seqlens(kwargs.get("position_ids"), batch, seqlen_q, k.shape[1])
        cu_k, max_k = cu_q, max_q
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        out = flash_attn_varlen_func(
            q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
            cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), softmax_scale=scaling, causal=causal,
            **variants,
        ).view(batch, seqlen_q, *q.shape[2:])
    elif attention_mask is not None:
        out = _padded(q, k, v, attention_mask, scaling, causal, variants)
    else:
        out = _dense(q, k, v, scaling, causal, variants)
    return out[..., :v_head_dim], None


def register() -> bool:
    """Register "tileattn" with transformers; False when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, tileattn_attention_forward)
    AttentionMaskInterface.register(NAME, tileattn_mask)
    return True
