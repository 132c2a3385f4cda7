"""The decode step's linear layers inside tileattn.generation: one matmul for sibling
projections that read the same input (q/k/v, gate/up), and one-row products as a Triton GEMV.

A decode step multiplies one token by every weight matrix. Each product is a GEMV whose launch
and tail cost about as much as its reads for a small model: Phi-2's 2560 x 2560 q, k and v
projections took 7 us each on an H200 (1.9 TB/s), its 2560 x 10240 fc1 16 us (3.3 TB/s). Read
as one 7680 x 2560 matrix, q, k and v are one GEMV.

``fuse(model)`` concatenates each group's weights (and biases) into one buffer and re-points the
modules' parameters at views of it: the same Parameter objects, names and values, so
``state_dict`` is unchanged and no memory is added. Inside ``fused(model)`` the first projection
called with an input computes the whole group's product and the others take their slices of
it (inputs are matched by identity: one edited in place between two members' calls would be
missed; transformers' attention and MLP blocks pass one tensor to all members and edit none);
outside the scope each module runs as the plain ``nn.Linear`` it is.
``fused`` fuses again first if the views stopped aliasing the buffer (``model.to()``, new
parameters assigned).

Inside the scope a product of one row (batch-1 decode) in float16 or bfloat16 on the Triton
backend runs as ``tileattn::gemv`` (tileattn.kernels.gemv), for the groups and for every other
``nn.Linear`` of the model. An MLP that computes down(act(up(x))) (Phi's fc1/activation_fn/fc2,
GPT-J's and GPT-NeoX's names too) with a GELU, SiLU or ReLU gets its activation inside the up
product's GEMV: the up projection returns the activated row and the activation module, handed
that very tensor, returns it as is. ``fuse`` makes sure before it tags an MLP: its forward must
give bit for bit what down(act(up(x))) gives on a probe row, and the activation module must
match one of the kernel's formulas on a sweep of inputs. In a parallel layer (Phi's: attention
and MLP read one input, found by tileattn.overlap's probe) such an up projection joins the
attention's q/k/v group, so one GEMV reads all four matrices and activates the MLP's rows only;
and where that layer adds the attention's output projection and the MLP's down projection (the
probe checks), the output projection returns zeros and the down projection both products as
one two-operand GEMV (``_Sum``).

On an H100, reading each matrix from memory as a decode step does, Phi-2's q/k/v, dense, fc1
and fc2 products took 16.6, 8.0, 21.0 and 23.6 us with cuBLAS and 15.6, 6.7, 19.6 and 19.6 us
as the GEMV (same call).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .backend import backend_name
from .ops import gemv
from .scoped import ScopedValue

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MLPS = (("fc1", "activation_fn", "fc2"), ("fc_in", "act", "fc_out"), ("dense_h_to_4h", "act", "dense_4h_to_h"))
ACTIVATIONS = {  # the GEMV's activations (tileattn.kernels.gemv) as PyTorch computes them
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}

_ACTIVE = ScopedValue("tileattn_fused_projections")


class _Group:
    """One parent's sibling projections: the concatenated weight and bias, each member's rows,
    and the product of the latest input until every member has taken its slice. A group joined
    to a parallel layer's MLP (``_join_parallel``) has the MLP's up projection as its last member, with
    the MLP's activation applied to its rows inside the GEMV."""

    def __init__(self, modules: list[nn.Linear], block=None):
        self.modules = modules
        self.block = block  # joined: the tileattn.overlap.Block whose MLP's up projection is last
        self.bounds = []
        lo = 0
        for m in modules:
            self.bounds.append((lo, lo + m.out_features))
            lo += m.out_features
        self.weight = self.bias = None
        self.input = self.output = None
        self.handed = None  # joined: the activated rows handed to the MLP, until the layer's _Sum takes them
        self.remaining = 0
        self.repoint()

    def repoint(self):
        """Concatenate the members' current parameters and make them views of the result."""
        with torch.no_grad():
            self.weight = torch.cat([m.weight for m in self.modules])
            has_bias = self.modules[0].bias is not None
            self.bias = torch.cat([m.bias for m in self.modules]) if has_bias else None
            for m, (lo, hi) in zip(self.modules, self.bounds):
                m.weight.data = self.weight[lo:hi]
                if has_bias:
                    m.bias.data = self.bias[lo:hi]

    def aliased(self) -> bool:
        for m, (lo, hi) in zip(self.modules, self.bounds):
            pairs = [(m.weight, self.weight[lo:hi])]
            if self.bias is not None:
                pairs.append((m.bias, self.bias[lo:hi]))
            for param, view in pairs:
                if param.device != view.device or param.dtype != view.dtype or param.shape != view.shape or \
                        param.data_ptr() != view.data_ptr():
                    return False
        return True

    def _product(self, x: torch.Tensor, members: int) -> torch.Tensor:
        """x times the first ``members`` members' rows; with a joined MLP among them (always a
        GEMV: see forward), its activation applied to its rows."""
        if members < len(self.modules) or self.block is None:
            hi = self.bounds[members - 1][1]
            return linear(x, self.weight[:hi], None if self.bias is None else self.bias[:hi])
        kind = self.modules[-1]._tileattn_activation.kind
        return gemv(x, self.weight, self.bias, kind, self.bounds[-1][0])

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        last = len(self.modules) - 1
        joined = self.block is not None
        # the MLP's product apart where it runs on the side stream (tileattn.overlap), and for
        # more than one row (a prefill's matmuls are not launch-bound; one output would keep the
        # MLP's activations alive through the attention)
        detached = joined and (self.block.active or not _gemv_fits(x, self.weight))
        if joined and index == last and (detached or self.input is not x or self.remaining == 0):
            return _product_of(self.modules[last], x)  # alone, as unjoined; the attention's state kept
        if self.input is not x or self.remaining == 0:
            self.input, self.remaining = x, last if detached else len(self.modules)
            self.output = self._product(x, self.remaining)
        lo, hi = self.bounds[index]
        out = self.output[..., lo:hi]
        if joined and index == last:  # activated by the GEMV: the activation module passes it through
            self.modules[last]._tileattn_activation.pending = out
            if self.block.summed is not None:
                self.handed = out
        self.remaining -= 1
        if self.remaining == 0:  # every member served: drop the references
            self.input = self.output = None
        return out


class _Sum:
    """A parallel layer's attention output projection and MLP down projection, whose outputs the
    layer adds to its input (tileattn.overlap's probe saw it do so, the attention first). For
    one row on the GEMV the output projection keeps its input and returns zeros, and the down
    projection returns both products from one GEMV over the two matrices: Phi-2's 2560 x 2560
    output projection alone read ~2.0 TB/s on an H100, its 2560 x 10240 fc2 2.7 (a 16k step's
    window 4246 -> 4201 us in one profile; steady steps moved less than their spread). Where
    the MLP runs on the side stream (tileattn.overlap) it comes first: each is its own product
    there. The MLP's activation, where the joined q/k/v + up GEMV made it, was written before the
    attention's kernels: the two-operand GEMV reads it before waiting for the kernel ahead.
    """

    def __init__(self, block, out_proj: nn.Linear, down: nn.Linear):
        self.block, self.out_proj, self.down = block, out_proj, down
        self.input = None  # the output projection's deferred input, until the down projection takes it

    def forward(self, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        o = self.out_proj
        if m is o:
            self.input = None
            # forked, or a later probe no longer saw the layer add them: each its own product
            if self.block.active or self.block.summed is None or not _gemv_fits(x, o.weight):
                return _product_of(o, x)
            self.input = x
            return x.new_zeros(x.shape[:-1] + (o.out_features,))
        a, self.input = self.input, None
        group = _joined_group(self.block)
        # x straight from the q/k/v + up GEMV: written before the attention that wrote a, so the
        # GEMV may read it before waiting for the kernel ahead of it (tileattn.kernels.gemv)
        ready = group is not None and group.handed is x
        if group is not None:
            group.handed = None
        if a is None:
            return _product_of(m, x)
        if not _gemv_fits(x, m.weight):  # an input the GEMV cannot take: the deferred product still owed
            return linear(a, o.weight, o.bias) + linear(x, m.weight, m.bias)
        return gemv(x, m.weight, m.bias, "", 0, a, o.weight, o.bias, ready)

    def __getstate__(self):
        return self.__dict__ | {"input": None}


class _Activation:
    """An activation module computed inside its MLP's up projection: the kind the GEMV applies,
    and the up product's activated output until the module takes it. Shared by every MLP that
    calls the same activation module."""

    def __init__(self, kind: str):
        self.kind = kind
        self.pending = None

    def __getstate__(self):
        return {"kind": self.kind, "pending": None}


def _activation_kind(act: nn.Module, device: torch.device) -> str | None:
    """Which of the GEMV's activations the module computes, judged on a sweep of inputs (its
    class says too little: transformers has several tanh GELUs, hub kernels replace forwards)."""
    try:  # a module that is not an elementwise activation, or weights not on a device: not ours to fuse
        t = torch.linspace(-8, 8, 2001, device=device, dtype=torch.float32)
        out = act(t)
        return next((kind for kind, reference in ACTIVATIONS.items() if isinstance(out, torch.Tensor) and
                     out.shape == t.shape and torch.allclose(out, reference(t), rtol=1e-5, atol=1e-5)), None)
    except Exception:
        return None


def _computes_down_act_up(mlp: nn.Module, up: nn.Linear, act: nn.Module, down: nn.Linear) -> bool:
    """Whether the MLP's class forward gives exactly down(act(up(x))) on a probe row (made
    without the random generator, whose state belongs to the caller)."""
    try:  # any failure (a forward wanting more arguments, offloaded weights) is a no
        x = torch.sin(torch.arange(up.in_features, device=up.weight.device, dtype=torch.float32) * 0.37)
        x = x.to(up.weight.dtype).reshape(1, 1, -1)
        got = type(mlp).forward(mlp, x)
        want = F.linear(act(F.linear(x, up.weight, up.bias)), down.weight, down.bias)
        return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.equal(got, want))
    except Exception:
        return False


_REFUSED = weakref.WeakKeyDictionary()  # up projection -> the activation module judged not fusable with it


def _holder(mlp: nn.Module, up: nn.Linear, act: nn.Module, down: nn.Linear) -> _Activation | None:
    """The _Activation up shares with act, judging the pair once (fused() calls fuse() every
    time); None where the MLP is not down(act(up(x))) with a known activation."""
    holder = getattr(up, "_tileattn_activation", None)
    if holder is not None:
        if getattr(act, "_tileattn_activation", None) is holder:
            return holder
        del up._tileattn_activation  # the activation module was replaced: judge the new one
    if hasattr(up, "_tileattn_group") or not _own_forward(act) or _REFUSED.get(up) is act:
        return None
    holder = getattr(act, "_tileattn_activation", None)
    kind = holder.kind if holder else _activation_kind(act, up.weight.device)
    if kind is None or not _computes_down_act_up(mlp, up, act, down):
        _REFUSED[up] = act
        return None
    if holder is None:
        holder = act._tileattn_activation = _Activation(kind)
    up._tileattn_activation = holder
    return holder


def _tag_activations(model: nn.Module):
    """Give each MLP that computes down(act(up(x))) with a known activation its _Activation, and
    wrap the activation modules' forwards (again after unpickling: see wrap_forward)."""
    with torch.no_grad(), _ACTIVE.bind(False):
        for mlp in model.modules():
            for names in MLPS:
                up, act, down = (getattr(mlp, n, None) for n in names)
                if type(up) is nn.Linear and type(down) is nn.Linear and isinstance(act, nn.Module) and \
                        _holder(mlp, up, act, down) is not None:
                    wrap_forward(act, _activation_forward)


def _fusable(modules) -> bool:
    first = modules[0]
    return all(
        type(m) is nn.Linear and m.in_features == first.in_features and (m.bias is None) == (first.bias is None)
        and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
        for m in modules
    )


def _gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x holds one row of float16/bfloat16 on the Triton backend and no gradient is wanted (the
    GEMV has no backward)."""
    return x.numel() == x.shape[-1] and x.dtype in (torch.float16, torch.bfloat16) and weight.stride(-1) == 1 and \
        not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and \
        backend_name(x.device) == "triton"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, as the GEMV where it fits (``_gemv_fits``)."""
    return gemv(x, weight, bias) if _gemv_fits(x, weight) else F.linear(x, weight, bias)


def _fused_forward(self, x):
    if _ACTIVE.get():
        group, index = self._tileattn_group
        return group.forward(index, x)
    return F.linear(x, self.weight, self.bias)


def _product_of(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """m's product inside ``fused``: ``linear``, or for an MLP's up projection tagged with an
    _Activation, where the GEMV runs, the GEMV with the activation, handed to the activation
    module (which then passes it through)."""
    holder = getattr(m, "_tileattn_activation", None)
    if holder is None or not _gemv_fits(x, m.weight):
        return linear(x, m.weight, m.bias)
    holder.pending = gemv(x, m.weight, m.bias, holder.kind)
    return holder.pending


def _single_forward(self, x):
    if not _ACTIVE.get():
        return F.linear(x, self.weight, self.bias)
    summed = getattr(self, "_tileattn_sum", None)
    if summed is not None:
        return summed.forward(self, x)
    return _product_of(self, x)


def _activation_forward(self, x, *args, **kwargs):
    holder = self._tileattn_activation
    if holder.pending is not None and holder.pending is x and not args and not kwargs:
        holder.pending = None  # taken: a compiled step keeps no reference to it
        return x
    return type(self).forward(self, x, *args, **kwargs)


def wrap_forward(m: nn.Module, function):
    """Make function(m, ...) m's forward, unless it already is (here and in tileattn.overlap).
    Pickled, an instance forward is stored as getattr(module, function.__name__): named
    "forward", the wrappers load as the class's own forward (torch.load of a whole model failed
    on "_fused_forward" before), and whoever wrapped them wraps them again."""
    function.__name__ = "forward"
    if getattr(m.__dict__.get("forward"), "__func__", None) is not function:
        m.forward = function.__get__(m)


def _own_forward(m: nn.Module) -> bool:
    """Whether m runs its class's forward (no instance forward, or the class's own bound to it,
    as unpickling leaves ours) or already ours: no other wrapper that fuse() would replace."""
    forward = getattr(m.__dict__.get("forward"), "__func__", None)
    return "forward" not in m.__dict__ or forward in (type(m).forward, _single_forward, _activation_forward)


def _parallel_blocks(model: nn.Module):
    """The tileattn.overlap Blocks installed in the model, each once (found from its attention)."""
    for m in model.modules():
        block = getattr(m, "_tileattn_block", None)
        if block is not None and block.attention is m:
            yield block


def _qkv_group(block):
    """The _Group of a parallel layer's attention's q/k/v projections, or None."""
    return getattr(getattr(block.attention, "q_proj", None), "_tileattn_group", (None, None))[0]


def _joined_group(block):
    """That group where ``_join_parallel`` joined the MLP's up projection to it, else None."""
    group = _qkv_group(block)
    return group if group is not None and group.block is block else None


def _join_parallel(model: nn.Module):
    """Join each parallel layer's MLP up projection to its attention's q/k/v group: both read
    the one normalized input (tileattn.overlap's probe found the layer and installed its Block
    on both modules), so one GEMV reads all four matrices. Phi-2 at 16k on an H100: q/k/v took
    15.8 us (2.5 TB/s) and fc1 18.9 us as two products."""
    for block in _parallel_blocks(model):
        group = _qkv_group(block)
        ups = [getattr(block.mlp, names[0], None) for names in MLPS]
        up = next((u for u in ups if getattr(u, "_tileattn_activation", None) is not None), None)
        if group is None or group.block is not None or up is None or getattr(up, "_tileattn_group", None) or \
                not _fusable(group.modules + [up]):
            continue
        joined = _Group(group.modules + [up], block)
        for i, m in enumerate(joined.modules):
            m._tileattn_group = (joined, i)
        wrap_forward(up, _fused_forward)


def _join_sums(model: nn.Module):
    """Give each parallel layer that adds its attention's output projection and its MLP's down
    projection (tileattn.overlap's probe found them: Block.summed) a _Sum on both modules."""
    for block in _parallel_blocks(model):
        if block.summed is None:
            continue
        out_proj, down = block.summed
        current = getattr(out_proj, "_tileattn_sum", None)
        if current is not None and current.block is block and getattr(down, "_tileattn_sum", None) is current:
            continue
        pair = [out_proj, down]
        if any(type(m) is not nn.Linear or hasattr(m, "_tileattn_group") or hasattr(m, "_tileattn_activation") or
               getattr(m.__dict__.get("forward"), "__func__", None) is not _single_forward for m in pair) or \
                out_proj.out_features != down.out_features or out_proj.weight.dtype != down.weight.dtype or \
                out_proj.weight.device != down.weight.device:
            continue
        out_proj._tileattn_sum = down._tileattn_sum = _Sum(block, out_proj, down)


_FUSED = weakref.WeakKeyDictionary()  # model -> (weak references to its _layout after fuse, the group count)
_NEVER, _ABSENT = object(), object()


def _layout(model: nn.Module) -> list:
    """Which modules the model holds and which instance forwards they run: what fuse's outcome
    depends on besides the parameters (which ``fused`` checks itself)."""
    return [(m, m.__dict__.get("forward")) for m in model.modules()]


def _weak(obj):
    """A weak reference to obj (None as _ABSENT: a dead reference reads None); for an object that
    takes none, one that never matches (so fuse walks again): a strong one could keep the model
    alive from _FUSED."""
    if obj is None:
        return lambda: _ABSENT
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: _NEVER


def _unchanged(model: nn.Module, saved: list) -> bool:
    now = _layout(model)  # compared by identity through live references: ids of freed modules get reused
    return len(now) == len(saved) and all(rm() is m and rf() is (_ABSENT if f is None else f)
                                          for (rm, rf), (m, f) in zip(saved, now))


def fuse(model: nn.Module) -> int:
    """Group every parent's q/k/v and gate/up projections (plain ``nn.Linear``s with one input
    width, dtype and device), route the other plain ``nn.Linear``s through ``linear`` inside
    ``fused``, move known MLP activations into their up products' GEMVs and join parallel
    layers' up projections to their q/k/v groups; returns the number of groups. Calling it
    again is a no-op, and cheap while the model holds the same modules and forwards (walking
    a 32-layer model for every name took ~25 ms, twice per generate call)."""
    done = _FUSED.get(model)
    if done is not None and _unchanged(model, done[0]):
        return done[1]
    count = 0
    for parent in model.modules():
        for names in GROUPS:
            modules = [getattr(parent, n, None) for n in names]
            if any(m is None for m in modules) or not _fusable(modules):
                continue
            if not hasattr(modules[0], "_tileattn_group"):
                group = _Group(modules)
                for i, m in enumerate(modules):
                    m._tileattn_group = (group, i)
            for m in modules:
                wrap_forward(m, _fused_forward)
            count += 1
    for m in model.modules():
        if type(m) is nn.Linear and not hasattr(m, "_tileattn_group") and _own_forward(m):
            wrap_forward(m, _single_forward)
    _tag_activations(model)
    _join_parallel(model)
    _join_sums(model)
    _FUSED[model] = ([(_weak(m), _weak(f)) for m, f in _layout(model)], count)
    return count


@contextlib.contextmanager
def fused(model: nn.Module):
    """Run the model's fused groups as one matmul each inside this block (see the module doc)."""
    fuse(model)
    for m in model.modules():
        group = m.__dict__.get("_tileattn_group", (None, 1))
        if group[1] == 0:
            if not group[0].aliased():
                group[0].repoint()
            group[0].input = group[0].output = group[0].handed = None
        summed = m.__dict__.get("_tileattn_sum")
        if summed is not None:
            summed.input = None
    with _ACTIVE.bind(True):
        yield
