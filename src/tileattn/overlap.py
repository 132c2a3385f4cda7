"""Parallel blocks in fast-generation decode steps: the MLP on a second CUDA stream beside the
attention.

Phi, GPT-J, Cohere and Falcon's parallel layers feed one normalized input to both the attention
and the MLP and add the two outputs. A batch-1 decode step is a chain of memory-bound kernels,
each ramping up and draining on its own, with small ones (rotary, cache writes, the split
merge) that leave most of the GPU idle; the MLP's products and activation fill those gaps from
a second stream. On an H100, Phi-2's compiled and graphed decode step after a 2k prompt took
2.19-2.32 ms instead of 2.83-2.89 (same tokens); after a 16k prompt, where the attention reads
1.6x the MLP's bytes, the MLP's programs slowed the attention as much as they hid, so
tileattn.generation's compiled steps fork only MLPs that outweigh the cache their attention
reads (uncompiled ones, with more gaps to fill, fork every one: see its _overlap_blocks). The
step is captured on a high-priority stream, so the side stream's programs take the SMs the
attention path leaves (at equal priority the 16k step was about 3% slower still, the 2k one no
different).

``probing`` spots such layers from one probe forward (the MLP called with the very tensor the
attention got, and returning a tensor), and for each also whether the layer adds the attention's
and the MLP's outputs to its input, each the output of one of their ``nn.Linear``s
(``Block.summed``: tileattn.projections then computes both products as one). Inside
``overlapped(blocks)`` each such attention module first launches its MLP on the side stream
(``tileattn::mlp_fork``), and the MLP call then waits for it (``tileattn::mlp_join``, which
also takes the attention's output and the shared input: data dependencies that keep
torch.compile from moving the wait before the attention or freeing the input the side stream
still reads). Off CUDA the fork runs the MLP in place, so the CPU takes the same path (tests)
with the same arithmetic.

Memory: the side stream allocates the MLP's intermediates and output from its own pool; the
output is freed on the main stream after the join, and the side stream's next allocation comes
after its next fork, which waits for the main stream, so no block is reused under a reader.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .projections import wrap_forward

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward")

_BLOCKS: dict[int, weakref.ref] = {}  # fork/join key -> block
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


class Block:
    """One parallel layer's attention and MLP, the original forwards, and one step's state."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, features: int, dtype: torch.dtype):
        self.attention, self.mlp = attention, mlp
        self.attention_forward, self.mlp_forward = attention.forward, mlp.forward
        self.features, self.dtype = features, dtype
        self.weight_bytes = sum(p.numel() * p.element_size() for p in mlp.parameters())
        self.key = _register(self)
        self.summed = None  # (attention's output projection, MLP's down projection) the layer adds: see probing
        self.done = None  # CUDA event the side stream records after the MLP
        self.active = False  # fork the MLP (inside ``overlapped``)
        self.compiled = False  # run the MLP through torch.compile (set by ``overlapped``)
        self.forget()
        self.install()

    def forget(self):
        """Drop one step's tensors: the shared input, the forked MLP's output, the attention's."""
        self.input = self.output = self.after = None

    def install(self):
        """Wrap the modules' forwards (again after unpickling: see wrap_forward). Done at
        once, inert outside ``overlapped``: a compiled prefill traced before the first decode
        step then sees the same modules as the ones after it (no recompile)."""
        self.attention._tileattn_block = self.mlp._tileattn_block = self
        wrap_forward(self.attention, _attention_forward)
        wrap_forward(self.mlp, _mlp_forward)

    def __getstate__(self):
        """A copied or pickled model's blocks (deepcopy goes through here) get keys of their own:
        the fork looks its block up by key. Events and a step's tensors stay behind."""
        state = self.__dict__.copy()
        del state["key"]
        state.update(done=None, active=False, input=None, output=None, after=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.key = _register(self)


def _register(block: Block) -> int:
    key = len(_BLOCKS)
    _BLOCKS[key] = weakref.ref(block)
    return key


def _triples(model: nn.Module):
    for layer in model.modules():
        attention = next((getattr(layer, n) for n in ATTENTION_NAMES if isinstance(getattr(layer, n, None), nn.Module)),
                         None)
        mlp = next((getattr(layer, n) for n in MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
        if attention is not None and mlp is not None:
            yield layer, attention, mlp


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _summed(seen: dict, layer: nn.Module, attention: nn.Module, mlp: nn.Module):
    """(attention's output projection, MLP's down projection) where the probe showed the layer's
    output to be its input plus the attention's and the MLP's outputs, bit for bit in one of the
    orders models add them, each output coming straight from one ``nn.Linear`` child, and the
    attention returning before the MLP starts; else None."""
    x, out = seen.get((id(layer), "in")), _first(seen.get((id(layer), "out")))
    a, m = _first(seen.get((id(attention), "out"))), seen.get((id(mlp), "out"))
    if not all(isinstance(t, torch.Tensor) for t in (x, out, a, m)) or not x.shape == out.shape == a.shape == m.shape:
        return None
    attention_first = seen.get((id(attention), "done"), float("inf")) < seen.get((id(mlp), "start"), -1)
    if not attention_first or not (a.ne(0).any() and m.ne(0).any()):
        return None
    sums = ((a + m) + x, (a + x) + m, (m + x) + a, (a.float() + m.float() + x.float()).to(x.dtype))
    if not any(torch.equal(out, s) for s in sums):
        return None
    out_proj = next((c for c in attention.children() if type(c) is nn.Linear and seen.get((id(c), "out")) is a), None)
    down = next((c for c in mlp.children() if type(c) is nn.Linear and seen.get((id(c), "out")) is m), None)
    return None if out_proj is None or down is None else (out_proj, down)


@contextlib.contextmanager
def probing(model: nn.Module):
    """Watch one forward of the model inside this block; the yielded list then holds a Block
    (installed) for each layer whose attention and MLP got the same input tensor, the one it
    already has if an earlier probe (of this model or the one it was copied from) made it, with
    ``summed`` set from this forward."""
    seen, handles, blocks = {}, [], []
    calls = iter(range(1 << 62))

    def remember(key):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            seen.setdefault(key, x)
            seen.setdefault((key[0], "start"), next(calls))
        return hook

    def output(module, args, kwargs, out):
        seen.setdefault((id(module), "out"), out)
        seen.setdefault((id(module), "done"), next(calls))

    triples = list(_triples(model))
    for layer, attention, mlp in triples:
        linears = [c for parent in (attention, mlp) for c in parent.children() if type(c) is nn.Linear]
        for module in (layer, attention, mlp, *linears):
            handles.append(module.register_forward_pre_hook(remember((id(module), "in")), with_kwargs=True))
            handles.append(module.register_forward_hook(output, with_kwargs=True))
    try:
        yield blocks
    finally:
        for h in handles:
            h.remove()
    for layer, attention, mlp in triples:
        x, out = seen.get((id(attention), "in")), seen.get((id(mlp), "out"))
        if isinstance(x, torch.Tensor) and x is seen.get((id(mlp), "in")) and isinstance(out, torch.Tensor):
            block = getattr(mlp, "_tileattn_block", None)
            if block is None or block.attention is not attention or block.mlp is not mlp:
                block = Block(attention, mlp, out.shape[-1], out.dtype)
            block.summed = _summed(seen, layer, attention, mlp)
            block.install()
            blocks.append(block)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _call(forward, x):
    return forward(x)


_compiled_call = None


def _run_mlp(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP on x; through torch.compile when the step is compiled, so the side stream
    runs the fused kernels (and float32 intermediates) a compiled step would have run in line.
    One compile serves every layer: dynamo guards on the MLP's structure, not its identity."""
    global _compiled_call
    if not block.compiled:
        return block.mlp_forward(x)
    if _compiled_call is None:
        _compiled_call = torch.compile(_call, dynamic=False)
    return _compiled_call(block.mlp_forward, x)


@torch.library.custom_op("tileattn::mlp_fork", mutates_args=("x",))
def mlp_fork(x: torch.Tensor, key: int) -> torch.Tensor:
    """The MLP of block ``key`` on x, launched on the side stream after the work queued so far.
    Declared as writing x (it does not): the attention reads x after it, so a compiled graph
    cannot sink the fork below the attention, where nothing would be left to overlap (inductor
    schedules an op just before its first consumer otherwise; its peak-memory reordering moves
    it regardless, so generation's decode steps compile without that pass)."""
    block = _BLOCKS[key]()
    if not x.is_cuda:
        return _run_mlp(block, x)
    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = _run_mlp(block, x)
        if block.done is None:
            block.done = torch.cuda.Event()
        block.done.record(side)
    return out


@mlp_fork.register_fake
def _(x, key):
    block = _BLOCKS[key]()
    return x.new_empty(x.shape[:-1] + (block.features,), dtype=block.dtype)


@torch.library.custom_op("tileattn::mlp_join", mutates_args=("out",))
def mlp_join(out: torch.Tensor, x: torch.Tensor, after: torch.Tensor, key: int) -> None:
    """Make the current stream wait for block ``key``'s MLP output ``out``. Declared as writing
    out, and reading x (the MLP's input) and after (the attention's output), so that a compiled
    graph orders it after the attention, keeps x alive until here and reads out only after."""
    if out.is_cuda:
        torch.cuda.current_stream(out.device).wait_event(_BLOCKS[key]().done)


@mlp_join.register_fake
def _(out, x, after, key):
    return None


def _attention_forward(self, *args, **kwargs):
    block = self._tileattn_block
    if not block.active:
        return block.attention_forward(*args, **kwargs)
    x = kwargs.get("hidden_states", args[0] if args else None)
    block.input, block.output = x, mlp_fork(x, block.key)
    result = block.attention_forward(*args, **kwargs)
    block.after = _first(result)
    return result


def _mlp_forward(self, x, *args, **kwargs):
    block = self._tileattn_block
    if not block.active or block.output is None or block.input is not x or args or kwargs:
        return block.mlp_forward(x, *args, **kwargs)
    out = block.output
    mlp_join(out, x, block.after, block.key)
    block.forget()
    return out


@contextlib.contextmanager
def overlapped(blocks: list[Block], compiled: bool = False):
    """Inside this block, each of ``blocks`` runs its MLP beside its attention (through
    torch.compile if ``compiled``: for steps that are compiled themselves); other blocks, and
    these outside it, run as they were. A compiled step guards on which blocks fork."""
    for block in blocks:
        block.forget()
        block.active, block.compiled = True, compiled
    try:
        yield
    finally:
        for block in blocks:
            block.active = False
            block.forget()
