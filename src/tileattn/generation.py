"""Fast generation for transformers causal LMs: a static KV cache, decode steps through the
KV-cache kernel with no host synchronization, optionally replayed from one CUDA graph.

transformers' ``generate`` spends a decode step's time in Python and in the padding-mask logic
(which reads device values); the GPU work of a small model's step is a fraction of it. Here
the prompt is prefilled once through the dense/varlen kernels into a ``StaticCache``; each
decode step then runs the model on one token per sequence with no attention mask: the
attention function reads each sequence's cache fill and left padding from device tensors (a
decode context, below) and calls the KV-cache kernel, so a step has a fixed shape and no host
reads, and can be captured in a CUDA graph.

    from tileattn.generation import generate
    out = generate(model, input_ids, attention_mask=mask, max_new_tokens=64)   # greedy
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import weakref
from dataclasses import dataclass

import torch

from . import overlap
from .projections import fused
from .scoped import ScopedValue

CAPACITY_STEP = 256
CAPTURE_PRIORITY = -1  # CUDA stream priority of the decode step's graph (lower is higher; side streams 0)

# Set during decode steps: (seqlens_k (B,) int32, cache_leftpad (B,) int32) on the model's device.
_DECODE = ScopedValue("tileattn_decode")


@dataclass
class DecodeContext:
    seqlens_k: torch.Tensor  # cache slots filled per sequence, the new token included
    cache_leftpad: torch.Tensor  # slots before each sequence's first real token
    prefill: bool = False  # prefill of unpadded prompts into a fresh cache: attend to the first Sq slots
    slot: torch.Tensor | None = None  # decode steps: (1,) int64, the cache slot the new token goes to


def decode_context() -> DecodeContext | None:
    """The current decode step's cache bounds, or None outside fast-generation decode steps."""
    return _DECODE.get()


def _decoding(ctx: DecodeContext):
    return _DECODE.bind(ctx)


def sample(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, vocab): argmax, or a draw after temperature, top-k and
    top-p (nucleus) filtering, from ``generator`` when given."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_sampling(temperature, top_k, top_p) -> None:
    """Sampling's knobs, checked before any work (greedy decoding ignores them, as transformers
    does): a non-positive temperature or top_p would otherwise draw from NaN or all -inf logits."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
    if not (number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1 = no nucleus filter), got {top_p!r}")


def _model_kwargs(model, cache) -> dict:
    """The cache under the name the model's forward takes (transformers renamed past_key_values to
    cache in 5.2x), and logits for the last position only where the model can skip the rest (a
    prompt's full logits cost more than its attention)."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _check_model(model):
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"fast generation serves decoder-only causal LMs; {type(model).__name__} is an "
                         "encoder-decoder model: use its generate() (attn_implementation='tileattn' works there)")
    if model.config._attn_implementation != "tileattn":
        raise ValueError(f"fast generation needs attn_implementation='tileattn', the model has "
                         f"{model.config._attn_implementation!r}; call model.set_attn_implementation('tileattn')")


@functools.cache
def _slot_layer_class():
    """transformers' StaticLayer, except that a decode step writes its token at the step's slot
    (the decode context's) instead of at the layer's own fill counter. The counter is a device
    scalar each layer bumps with ``add_`` per step; compiled, each bump became a copy-back kernel
    at the end of the step (Phi-2: 32 kernels of 1.1-1.4 us, each with its gap, in a 4.3 ms step
    on an H100). The steps never read the counter: the kernel takes each sequence's fill from
    the decode context, and generate passes the positions. Made once, so compiled steps see one
    class."""
    from transformers.cache_utils import StaticLayer

    class SlotLayer(StaticLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            ctx = decode_context()
            if ctx is None or ctx.slot is None or not self.is_initialized:
                return super().update(key_states, value_states, *args, **kwargs)
            self.keys.index_copy_(2, ctx.slot, key_states)
            self.values.index_copy_(2, ctx.slot, value_states)
            return self.keys, self.values

    return SlotLayer


def _static_cache(model, max_cache_len: int):
    """A preallocated cache with one full-length static layer per decoder layer. Sliding-window
    layers get full-length slots too (transformers' sliding static layers are ring buffers,
    whose slot order the kernel can't read); the kernel applies their window instead."""
    from transformers.cache_utils import Cache

    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_slot_layer_class()(max_cache_len=max_cache_len) for _ in range(layers)])


def _left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row count of leading pad tokens; refuses masks that are not left padding."""
    batch, length = attention_mask.shape
    leftpad = (attention_mask == 0).sum(1)
    expected = torch.arange(length, device=attention_mask.device)[None, :] >= leftpad[:, None]
    if not torch.equal(attention_mask.bool(), expected):
        raise ValueError("attention_mask must be left padding (zeros, then ones) for fast generation; "
                         "tokenize with padding_side='left'")
    return leftpad.to(torch.int32)


def _forward_call(model, model_kwargs: dict, tokens, cache_position, position_ids):
    out = model(input_ids=tokens, cache_position=cache_position, position_ids=position_ids, **model_kwargs)
    return out.logits[:, -1]


class _State:
    """The decode loop's device buffers: the step's input tokens and positions, every token
    generated so far and which sequences have stopped. A step reads and advances them on the
    device, so a greedy step chooses its own next token inside the CUDA graph: no argmax, copy
    or fill kernels launched from the host between two replays (on an H100 those took about
    40 us of a 4.3 ms Phi-2 step after a 16k prompt)."""

    def __init__(self, batch: int, leftpad: torch.Tensor, prompt_len: int, max_new_tokens: int,
                 eos: torch.Tensor, pad: int, greedy: bool):
        device = leftpad.device
        self.greedy = greedy
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        self.position_ids = (prompt_len - leftpad.long())[:, None]
        self.ctx = DecodeContext(torch.full((batch,), prompt_len + 1, dtype=torch.int32, device=device), leftpad,
                                 slot=self.cache_position)
        self.generated = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = eos if eos.numel() else None
        self.pad = torch.tensor(pad, dtype=torch.long, device=device)

    def record(self, tokens: torch.Tensor):
        """Take the chosen tokens (B,): stopped sequences get the pad token; the result is the
        next step's input."""
        tokens = torch.where(self.finished, self.pad, tokens)
        self.generated.index_copy_(1, self.column, tokens[:, None])
        self.column.add_(1)
        if self.eos is not None:
            self.finished |= torch.isin(tokens, self.eos)
        self.tokens.copy_(tokens[:, None])

    def advance(self):
        """Move the step's input positions to the next cache slot."""
        self.cache_position.add_(1)
        self.position_ids.add_(1)
        self.ctx.seqlens_k.add_(1)

    def end(self, steps: int) -> int:
        """Columns to return after ``steps`` tokens: up to the one where the last sequence
        stopped, as a loop checking after every token would have ended."""
        if self.eos is None or steps == 0:
            return steps
        hit = torch.isin(self.generated[:, :steps], self.eos)
        if not bool(hit.any(1).all()):
            return steps
        return int(hit.int().argmax(1).max()) + 1


ARGMAX_CHUNK = 1024


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for (B, vocab) logits, in two passes: the first maximum of each
    1024-logit chunk, then the first chunk holding the largest. The same index (the first
    maximum, a NaN first), but compiled into a decode step it is a reduction over many programs
    and a small one, where one argmax was a single program: 11.9 us over Phi-2's 51200 logits on
    an H100, about a quarter of a percent of a 16k step."""
    batch, vocab = logits.shape
    if vocab <= ARGMAX_CHUNK:
        return logits.argmax(-1)
    chunks = -(-vocab // ARGMAX_CHUNK)
    padded = torch.nn.functional.pad(logits, (0, chunks * ARGMAX_CHUNK - vocab), value=float("-inf"))
    values, index = padded.view(batch, chunks, ARGMAX_CHUNK).max(-1)
    chunk = values.argmax(-1, keepdim=True)
    return (chunk * ARGMAX_CHUNK + index.gather(-1, chunk)).squeeze(-1)


def _step_call(model, model_kwargs: dict, state: _State):
    """One decode step on the state's buffers: the logits (B, vocab) of the next token, chosen
    and recorded here when greedy. Its own code object, so its compile keeps its own options."""
    logits = _forward_call(model, model_kwargs, state.tokens, state.cache_position, state.position_ids)
    state.advance()
    if state.greedy:
        state.record(greedy_choice(logits))
    return logits


_compiled_calls = {}


def _compiled_call(decode: bool = False):
    """One torch.compile per phase for every model and call: dynamo keeps its graphs on the
    function's code and guards on the model's structure and the tensors' shapes, not on which
    cache or context object it gets. The prefill (prompt length marked dynamic) and the decode
    step (one token) are one graph each; the cache length is dynamic in both, so new lengths
    reuse them. The decode step's compile does not reorder for peak memory (a step's buffers
    are a few kilobytes): that pass would sink the parallel blocks' MLP forks to just before
    their joins, leaving nothing to overlap (tileattn.overlap). It does combine independent
    small kernels into one launch (inductor's combo kernels): Phi-2's k and v cache writes
    became one kernel per layer, its 16k step 4.39 -> 4.35 ms on an H100 (same tokens)."""
    if decode not in _compiled_calls:
        import torch._inductor.config

        options = {}
        if decode:  # options this torch has (both are inductor's names in torch 2.11-2.13)
            wanted = {"reorder_for_peak_memory": False, "combo_kernels": True}
            options = {k: v for k, v in wanted.items() if hasattr(torch._inductor.config, k)}
        _compiled_calls[decode] = torch.compile(_step_call if decode else _forward_call, dynamic=False,
                                                options=options or None)
    return _compiled_calls[decode]


def _mark_cache_dynamic(cache):
    for layer in cache.layers:
        torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
        torch._dynamo.maybe_mark_dynamic(layer.values, 2)


_facts_of = weakref.WeakKeyDictionary()


def _facts(model, device: torch.device):
    """(each layer's K/V heads, head dims and dtype; the parallel blocks) from one token run
    through the model into a scratch dynamic cache, once per model: configs name the K/V sizes
    in too many ways, and whether a layer feeds its attention and MLP one input shows only in
    its forward (tileattn.overlap)."""
    from transformers.cache_utils import DynamicCache

    facts = _facts_of.get(model)
    if facts is None:
        scratch = DynamicCache()
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        with overlap.probing(model) as blocks:
            model(input_ids=one, position_ids=one, cache_position=one[0], **(_model_kwargs(model, scratch)))
        shapes = [(layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1], layer.keys.dtype)
                  for layer in scratch.layers]
        facts = _facts_of[model] = (shapes, blocks)
    return facts


def _allocate(cache, model, batch: int, device: torch.device):
    """Allocate the static cache's layers before a compiled prefill, so the cache enters the
    graph as an input (its length dynamic) instead of being created inside it with its length
    baked in."""
    for layer, (heads, k_dim, v_dim, dtype) in zip(cache.layers, _facts(model, device)[0], strict=True):
        layer.lazy_initialization(torch.empty(batch, heads, 0, k_dim, dtype=dtype, device=device),
                                  torch.empty(batch, heads, 0, v_dim, dtype=dtype, device=device))


def _fusing(model, device):
    """q/k/v and gate/up as one matmul each (tileattn.projections), on the GPU, for the compiled
    prefill and the decode steps, whose GEMVs are launch-bound. The eager prefill is not, and
    stays as transformers runs it (with fusion it ran out of memory at batch 8 x 16k on an H100,
    cause not isolated; unfused, the same prefill peaked at 58 GiB in an earlier run). The CPU
    has no launch cost to save and keeps eager generate's exact arithmetic."""
    return fused(model) if device.type == "cuda" else contextlib.nullcontext()


def _overlap_blocks(model, device, batch: int, capacity: int, compiled: bool) -> list:
    """The parallel blocks whose MLP goes on the side stream: every one in uncompiled steps, in
    compiled ones those whose MLP weights outweigh the KV cache their attention reads. Phi-2 on
    an H100, batch 1, CUDA-graphed steps, MLP forked or not: compiled, after a 2k prompt (cache
    0.22x the MLP's bytes) a step took 2.19-2.32 ms instead of 2.83-2.89, after 16k (1.6x)
    4.36-4.54 instead of 4.34-4.39, the MLP's programs slowing the longer attention as much as
    they hide; uncompiled, whose steps leave more gaps between small kernels, 3.78-3.83 instead
    of 4.37-4.41 after 2k and 5.09-5.28 instead of 5.91-6.16 after 16k. Between those two
    ratios the compiled rule is untested."""
    shapes, blocks = _facts(model, device)
    if not compiled:
        return blocks
    cache_bytes = max((batch * capacity * heads * (k_dim + v_dim) * dtype.itemsize
                       for heads, k_dim, v_dim, dtype in shapes), default=0)
    return [block for block in blocks if block.weight_bytes >= cache_bytes]


OVERLAP_DEVICES = ("cuda",)  # the CPU has one stream: nothing to overlap (tests add it)


def _overlapping(model, device, compile: bool, batch: int, capacity: int, enabled: bool):
    """Parallel blocks' MLPs on a second stream during decode steps, on the GPU, where a step's
    kernels leave bandwidth idle between them."""
    if not enabled or device.type not in OVERLAP_DEVICES:
        return contextlib.nullcontext()
    return overlap.overlapped(_overlap_blocks(model, device, batch, capacity, compile), compiled=compile)


class _Step:
    """One decode step on a _State's buffers: eager or compiled (torch.compile fuses the model's
    small elementwise kernels: rotary, activations, norms, residuals, and the step's token choice
    and position updates), run as is or captured once in a CUDA graph and replayed."""

    def __init__(self, model, cache, state: _State, use_graph: bool, compile: bool):
        self.model, self.model_kwargs, self.state = model, _model_kwargs(model, cache), state
        self.call = _step_call
        if compile:
            self.call = _compiled_call(decode=True)
            _mark_cache_dynamic(cache)
            torch._dynamo.maybe_mark_dynamic(state.generated, 1)  # any max_new_tokens: one graph
        self.use_graph = use_graph
        self.graph = None
        self.logits = None

    def _forward(self):
        with _decoding(self.state.ctx):
            return self.call(self.model, self.model_kwargs, self.state)

    def __call__(self) -> torch.Tensor:
        """Logits (B, vocab) of the token after the state's input tokens, which move on to the
        next slot (and, greedy, to the chosen tokens)."""
        if not self.use_graph:
            return self._forward()
        if self.graph is None and self.logits is not None:  # the first step ran eagerly (warm-up)
            self.graph = torch.cuda.CUDAGraph()
            # captured on a high-priority stream: torch instantiates graphs with per-node priorities,
            # so a parallel block's MLP on its default-priority side stream (tileattn.overlap) gets
            # the SMs the attention path leaves instead of delaying it
            stream = torch.cuda.Stream(self.state.tokens.device, priority=CAPTURE_PRIORITY)
            with torch.cuda.graph(self.graph, stream=stream):  # recorded, not run: the replay below runs it
                self.logits = self._forward()
        if self.graph is None:
            self.logits = self._forward()
            return self.logits
        self.graph.replay()
        return self.logits


EOS_CHECK_EVERY = 16  # tokens between host reads of "all stopped" when nobody watches each token


def _stop_tokens(model, eos_token_id, pad_token_id, device) -> tuple[torch.Tensor, int]:
    """(eos ids as a tensor, pad id): None reads the model's generation_config, as transformers'
    generate does (a user switching from model.generate gets the same stops)."""
    config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    return eos, pad


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             cuda_graph: bool = False, compile: bool = False, overlap: bool = True, on_token=None) -> torch.Tensor:
    """Generate with a static cache and the KV-cache kernel; returns (B, prompt + new) token ids.

    Args:
        model: a transformers causal LM loaded with attn_implementation="tileattn" (sliding
            windows, softcap and sinks included: the kernels apply them).
        input_ids: (B, prompt) prompts, left-padded when their lengths differ.
        attention_mask: (B, prompt) 1 for tokens, 0 for left padding; None = no padding.
        eos_token_id: a sequence that produces one of these stops; later positions get
            pad_token_id. None takes the model's generation_config, as transformers' generate
            does; [] never stops early. Generation ends when all have stopped (the host looks
            every 16 tokens when there is no on_token, and returns the same).
        pad_token_id: None takes the generation_config's, else the first eos id, else 0.
        do_sample, temperature, top_k, top_p, seed: sampling (greedy by default); seed makes
            draws reproducible.
        cuda_graph: capture one decode step in a CUDA graph and replay it per token (CUDA
            only; the first step runs eagerly and warms up the kernels).
        compile: run the prefill of unpadded prompts and the decode steps through torch.compile
            (fused norms, activations, rotary and residuals; the first call per batch size
            compiles, tens of seconds for a 2.7B model; later calls and other prompt lengths
            reuse it). Combines with cuda_graph, which then captures the compiled step.
        overlap: on CUDA, run parallel layers' MLPs (Phi, GPT-J, Cohere, Falcon) on a second
            stream beside their attention in decode steps (below); False keeps one stream.
        on_token: optional callback receiving each step's tokens (B,) as they are chosen (a
            view of the output; greedy steps choose them on the device).

    On CUDA the compiled prefill and the decode steps run each layer's q/k/v (and gate/up)
    projections as one matmul (tileattn.projections): the model's parameters become views of
    one buffer per group, with the same names, values and Parameter objects; batch-1 steps
    multiply through a GEMV that also applies a GELU/SiLU/ReLU MLP's activation. The decode steps
    of parallel layers (attention and MLP reading one input, as in Phi) run the MLP on a second
    CUDA stream beside the attention (tileattn.overlap; in compiled steps only where the MLP's
    weights outweigh the KV cache the attention reads).

    Greedy tokens equal transformers' generate with eager attention up to floating-point ties.
    """
    _check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, prompt) tensor of at least one token, got {shape}")
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample:
        _check_sampling(temperature, top_k, top_p)
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model and inputs on a CUDA device")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    leftpad = _left_padding(attention_mask)
    # probe before anything is traced or fused: the probe installs the parallel blocks' forwards,
    # and fusion joins their MLPs' up projections to the attentions' q/k/v products
    _facts(model, device)
    # capacity in whole 256-slot steps: the kernels see one stride pattern (Triton compiles a
    # variant per divisibility of its integer arguments: a first call at prompt + new = 2304 after
    # one at 2051 spent 1.7 s compiling inside its first decode step, H200)
    capacity = -(-(prompt_len + max_new_tokens) // CAPACITY_STEP) * CAPACITY_STEP
    cache = _static_cache(model, capacity)
    eos, pad = _stop_tokens(model, eos_token_id, pad_token_id, device)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    # prefill: unpadded prompts through the dense kernel over the filled slots (compiled when
    # asked); left-padded ones through the padding mask (varlen kernel); positions counted per row
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache_position = torch.arange(prompt_len, device=device)
    if bool((leftpad == 0).all()):
        call, scope = _forward_call, contextlib.nullcontext()
        if compile and prompt_len > 1:
            call, scope = _compiled_call(), _fusing(model, device)
            _allocate(cache, model, batch, device)
            _mark_cache_dynamic(cache)
            for x in (input_ids, positions):
                torch._dynamo.maybe_mark_dynamic(x, 1)
            torch._dynamo.maybe_mark_dynamic(cache_position, 0)
        with _decoding(DecodeContext(leftpad + prompt_len, leftpad, prefill=True)), scope:
            logits = call(model, _model_kwargs(model, cache), input_ids, cache_position, positions)
    else:
        out = model(attention_mask=attention_mask, input_ids=input_ids, position_ids=positions,
                    cache_position=cache_position, **_model_kwargs(model, cache))
        logits = out.logits[:, -1]
    greedy = not do_sample
    state = _State(batch, leftpad, prompt_len, max_new_tokens, eos, pad, greedy)
    state.record(sample(logits, do_sample, temperature, top_k, top_p, generator))
    # without a callback the host reads "all stopped" only now and then, not after every token,
    # so it queues the next steps without waiting for the GPU; state.end trims the extra columns
    check_every = 1 if on_token is not None else EOS_CHECK_EVERY
    with _fusing(model, device), _overlapping(model, device, compile, batch, capacity, overlap):
        step = _Step(model, cache, state, cuda_graph, compile)
        done = 1
        while True:
            if on_token is not None:
                on_token(state.generated[:, done - 1])
            if done == max_new_tokens:
                break
            if state.eos is not None and done % check_every == 0 and bool(state.finished.all()):
                break
            logits = step()
            if not greedy:
                state.record(sample(logits, do_sample, temperature, top_k, top_p, generator))
            done += 1
    return torch.cat([input_ids, state.generated[:, :state.end(done)]], dim=1)
