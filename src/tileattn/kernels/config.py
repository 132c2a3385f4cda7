"""Tile shapes per kernel: an autotuned, pruned list on the GPU, one fixed shape elsewhere.

Autotune results are keyed on (seqlen bucket, variant switches such as causal and dropout, head
block, precision, dtypes), so a new sequence length inside a seen power-of-two bucket reuses the
tuned shape. Under ``TRITON_INTERPRET=1`` (CPU tests) autotuning would run every config through
the interpreter, so one small, deliberately non-square shape is used there;
``TILEATTN_AUTOTUNE=0`` takes the first (heuristic) config on the GPU too.
"""

import contextlib
import functools

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources, PTXASError

from ..dropout import KEY_GROUP
from ..environment import env
from .launch import recorded_call

try:  # programmatic dependent launch's device side; absent from older Tritons (then PDL is off)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M indexes queries, BLOCK_N keys.
# The first entry of each list is the heuristic default (a kernel's select hook may put another
# first: the forward does for split head dims and for host descriptors).
_GPU_CONFIGS = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    },
    # dk/dv: a program owns BLOCK_N keys and streams BLOCK_M-query tiles past them. At 128-wide
    # heads 64 x 64 with 8 warps took 2-2.3x the time of 4 warps (H100, d80 and d128), and 128 x 32
    # with 8 warps 3.4-12x: spilling less (ptxas) was not faster; BENCHMARKS.md has the sweep
    "bwd_dkdv": {
        64: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2)],
        128: [(64, 64, 4, 2), (64, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2), (64, 64, 8, 2)],
        256: [(32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 4, 1)],
    },
    # dq: a program owns BLOCK_M queries and streams BLOCK_N-key tiles past them
    "bwd_dq": {
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
        128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (64, 16, 4, 2)],
        256: [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    },
    # KV-cache decode: BLOCK_M is fixed by the launcher (queries x heads of a GQA group), so
    # only the key tile, warps and pipeline depth are tuned. A 16-row tile is too short to split
    # among warps, so each warp of a program computes the whole tile (Triton lays warps along the
    # rows): one-warp programs, several to an SM, give each warp keys of its own instead
    "decode": {
        64: [(None, 128, 4, 3), (None, 64, 4, 4), (None, 128, 4, 4), (None, 256, 8, 3), (None, 64, 1, 3),
             (None, 32, 1, 4)],
        128: [(None, 128, 4, 3), (None, 64, 4, 4), (None, 128, 8, 3), (None, 64, 4, 3), (None, 64, 2, 3),
              (None, 32, 4, 3), (None, 64, 1, 3), (None, 32, 1, 4)],
        256: [(None, 64, 4, 3), (None, 32, 4, 3), (None, 64, 4, 2)],
    },
    # the KV-cache kernel with TALL_ROWS (query, head) rows a tile (prefill chunks over a cache):
    # the forward's tile height and warps
    "decode_tall": {
        64: [(None, 64, 4, 3), (None, 128, 8, 3), (None, 64, 8, 3)],
        128: [(None, 64, 8, 3), (None, 128, 8, 3), (None, 64, 8, 4)],
    },
}
TALL_ROWS = 128
# fp32 runs as true-fp32 FMA dots (no tensor cores); large tiles only cost compile time and spills
_FP32_CONFIGS = {
    "fwd": {128: [(64, 32, 4, 2), (32, 32, 4, 1)], 256: [(32, 32, 4, 1), (16, 32, 4, 1)]},
    "bwd_dkdv": {128: [(32, 32, 4, 1), (16, 32, 4, 1)], 256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
    "bwd_dq": {128: [(32, 32, 4, 1), (16, 32, 4, 1)], 256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
    "decode": {128: [(None, 32, 4, 2), (None, 16, 4, 1)], 256: [(None, 32, 4, 1), (None, 16, 4, 1)]},
}
_INTERPRETER_CONFIG = {"fwd": (64, 32), "bwd_dkdv": (32, 64), "bwd_dq": (64, 32), "decode": (None, 32)}
# what a tuned config is chosen per (names a kernel lacks are skipped); DROPOUT: its Philox work
# takes registers the plain kernel's pick did not plan for; SINK and VARLEN keep the choices
# apart that the key's scan of every tensor's dtype used to separate (sinks, cu_seqlens)
_KEY = ["SEQ_BUCKET", "CAUSAL", "WINDOW", "SOFTCAP", "BOUNDED", "ALIBI", "SINK", "DROPOUT", "VARLEN", "BLOCK_D",
        "BLOCK_D2", "SPLIT_D", "DOT_PRECISION"]
_EXTRA_KEY = {"fwd": ["TMA"], "decode": ["BLOCK_M", "PAGED", "TMA", "num_splits"]}


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels. Triton decides that when it decorates a
    kernel (TRITON_INTERPRET at import), so this asks a kernel decorated here, once, instead of
    reading the environment several times on every launch."""
    return _INTERPRETED


_INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


def autotuning() -> bool:
    """Whether launch choices are timed on the GPU (off under the interpreter and with
    TILEATTN_AUTOTUNE=0, which take the first config: reproducible, no tuning pause)."""
    return not interpreting() and env("TILEATTN_AUTOTUNE", "1") != "0"


def head_block(head_dim: int) -> int:
    """Head dims are padded in registers to a power of two (>= 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def head_blocks(head_dim: int) -> dict:
    """The head dim's tiling, as kernel meta-parameters: one power-of-two block (BLOCK_D, padded),
    or, where it is narrower, two (BLOCK_D + BLOCK_D2 with SPLIT_D: 80 = 64 + 16, 96 = 64 + 32,
    160 = 128 + 32), so the tensor cores do no work on padding columns. BLOCK_D2 is a
    placeholder when SPLIT_D is off."""
    return dict(_head_blocks(head_dim))  # a copy: callers may add to it


@functools.lru_cache(maxsize=None)
def _head_blocks(head_dim: int) -> tuple:
    padded = head_block(head_dim)
    first = max(16, 1 << (head_dim.bit_length() - 1))  # largest power of two <= head_dim
    second = max(16, triton.next_power_of_2(max(head_dim - first, 1)))
    split = head_dim > first and first + second < padded
    width = first + second if split else padded
    return tuple(dict(BLOCK_D=first if split else padded, BLOCK_D2=second if split else 16, SPLIT_D=split,
                      EVEN_D=width == head_dim).items())


def tile_width(meta: dict) -> int:
    """Columns a kernel's head-dim tiles hold (BLOCK_D, plus BLOCK_D2 when split)."""
    return meta["BLOCK_D"] + (meta["BLOCK_D2"] if meta.get("SPLIT_D") else 0)


def _hopper(device: torch.device) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or later (TMA, programmatic dependent launch)."""
    if device.type != "cuda":
        return False
    return _hopper_index(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _hopper_index(index: int) -> bool:  # asked on every launch; the capability query is not free
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def use_tma(blocks: dict, *tensors: torch.Tensor) -> bool:
    """Whether a kernel streams these (batch, rows, heads, dim) tensors' tiles through Hopper's
    tensor memory accelerator instead of pointer tiles (the kernel's launcher decides whether
    its descriptors are made on the host or, per sequence, on the device).

    Needs an sm_90+ GPU, fp16/bf16, unit stride along the head dim and 16-byte aligned base and
    nonzero strides. On the H100 it paid at head dim 128 (forward +1-14%) and not at 64 or 80 (-5..+7%),
    so the GPU takes it for 128-wide head tiles only; the interpreter takes it wherever it is
    allowed, so the CPU tests cover the path. TILEATTN_TMA=0 turns it off."""
    if env("TILEATTN_TMA", "1") == "0" or not hasattr(triton.language, "make_tensor_descriptor"):
        return False
    if not interpreting():
        x = tensors[0]
        if not _hopper(x.device) or x.dtype == torch.float32 or blocks["BLOCK_D"] != 128 or blocks["SPLIT_D"]:
            return False
    for t in tensors:
        size = t.element_size()
        # a zero stride (an expand()ed batch or head) passes the multiple-of-16 rule, but the
        # driver's tensor maps are not documented for it: pointer tiles read such tensors as they are
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 or st == 0 for st in t.stride()[:-1]):
            return False
    if not interpreting():
        ensure_allocator()
    return True


def host_descriptors(block_d: int, **tensors) -> dict:
    """TMA descriptors over whole (batch, rows, heads, dim) tensors, made on the host once per
    launch (the kernels read [1, rows, 1, dim] blocks at (batch, row, head, 0)); their block
    shapes are set per tile config by desc_block_setter's hook."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return {name: TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 16, 1, block_d])
            for name, x in tensors.items()}


def desc_block_setter(**rows):
    """A prepare hook for autotuned(): gives each host descriptor argument (name -> "BLOCK_M" or
    "BLOCK_N", its rows) the chosen config's block shape. Triton compiles one kernel per block
    shape, so this runs before every launch, the autotuner's trial launches included."""
    def prepare(meta: dict) -> None:
        for name, block in rows.items():
            if meta.get(name) is not None:
                meta[name].block_shape = [1, meta[block], 1, meta["BLOCK_D"]]

    return prepare


def use_pdl(device: torch.device) -> bool:
    """Whether the decode, GEMV and backward kernels launch with programmatic dependent launch
    (sm_90+): the kernel's programs may start while the previous kernel drains and wait
    (griddepcontrol.wait) before reading what it wrote. On by default where the GPU and Triton
    have it; on an H100 it took the split decode kernel and its merge at batch 1 x 8k from 2.70
    to 2.77 TB/s, 1 x 2.3k keys of Phi-2 from 2.32 to 2.51, and the d128 causal 4 x 4k backward
    from 351 to 368 TFLOP/s (BENCHMARKS.md). TILEATTN_PDL=0 turns it off; never under the
    interpreter."""
    return env("TILEATTN_PDL", "1") != "0" and gdc_wait is not None and not interpreting() and \
        _hopper(device)


def pdl_launch(device: torch.device) -> dict:
    """A PDL-aware kernel's PDL flag and launch option; older Tritons never see launch_pdl."""
    return dict(PDL=True, launch_pdl=True) if use_pdl(device) else dict(PDL=False)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Device-made descriptors live in scratch memory that Triton asks an allocator for. The
    allocator is a context variable (unset in new threads, e.g. autograd's), so check per call;
    one the user set stays."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are computed in true fp32 (no tf32 rounding); see tile.py for interpreter_bf16."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "interpreter_bf16"
    return "tf32"


def seqlen_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """One int naming the power-of-two buckets of both lengths (an autotune key)."""
    return (max(seqlen_q, 1) - 1).bit_length() << 8 | (max(seqlen_k, 1) - 1).bit_length()


def _head_class(block_d: int) -> int:
    return min(d for d in (64, 128, 256) if d >= block_d)


def configs(kind: str, block_d: int, precision: str = "tf32") -> list:
    """The GPU's tile configs of a kernel kind for head-dim tiles of block_d columns."""
    if precision == "ieee":
        return _FP32_CONFIGS[kind][128 if block_d <= 128 else 256]
    return _GPU_CONFIGS[kind][_head_class(block_d)]


@contextlib.contextmanager
def only_config(kind: str, config: tuple):
    """Within this block every head-dim class of a kernel kind lists this one config (BLOCK_M,
    BLOCK_N, num_warps, num_stages): benchmarks sweep configs this way. A list is part of the key
    each choice is kept under, so choices made outside the block stay as they were."""
    saved = _GPU_CONFIGS[kind]
    _GPU_CONFIGS[kind] = {head_class: [tuple(config)] for head_class in saved}
    try:
        yield
    finally:
        _GPU_CONFIGS[kind] = saved


def _meta(block_m, block_n) -> dict:
    """Config meta-parameters; BLOCK_M None means the launcher sets it."""
    return {"BLOCK_N": block_n} if block_m is None else {"BLOCK_M": block_m, "BLOCK_N": block_n}


def graph_bench(fn, quantiles=None):
    """Milliseconds of fn replayed from a CUDA graph. A decode launch lasts microseconds: timed
    that way, as generation runs it, or launch overhead decides the choice (autotuned by plain
    timing, batch 1 x 8k decode read 2.52 TB/s on an H100, the first config 2.72).

    Triton's do_bench_cudagraph runs fn on a new stream that does not wait for the caller's:
    its first launch can read inputs that kernels still queued on the caller's stream have not
    written yet (a decode step's cache lengths, read as garbage, send the kernel past the cache)
    and is timed beside them. A compiled Phi-2 generate on an H100 hit an illegal memory access
    in here right after its 16k-token prefill. So the device is synchronized first, as the
    benchmark itself does after its warm-up."""
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles)


def autotuned(kernel, kind: str, prepare=None, select=None):
    """Wrap a kernel taking BLOCK_M/BLOCK_N constexprs with this module's config choice.

    Returns an object used like the kernel: ``wrapped[grid](*args, **kwargs)``, where grid may
    be a function of the chosen meta-parameters. prepare(kwargs), when given, runs before each
    launch with the keyword arguments and the chosen config's meta-parameters; select(configs,
    kwargs), when given, returns the configs these arguments may use, first the untuned default
    (dropping those that cannot serve them before any compiles).
    """
    hook = prepare
    prepare = prepare or (lambda meta: None)
    tuners = {}
    fitting = {}  # variant key -> index of the first config that fits in shared memory
    chosen = {}  # variant key -> the config Triton's autotuner picked
    keys = _KEY + _EXTRA_KEY.get(kind, [])
    positions = {name: kernel.arg_names.index(name) for name in keys if name in kernel.arg_names}

    def configs_for(kwargs) -> tuple:
        listed = configs(kind, tile_width(kwargs), kwargs["DOT_PRECISION"])
        if kwargs.get("DROPOUT"):  # its bits come in groups of KEY_GROUP keys (tile.dropout_words)
            listed = [c for c in listed if c[1] % KEY_GROUP == 0]
        return tuple(listed if select is None else select(listed, kwargs))

    def variant_key(configs, args, kwargs) -> tuple:
        """(config list, the key arguments' values, the inputs' dtype): what a choice is made
        for. Triton's autotuner keys on every tensor argument's dtype; the first argument's (q)
        decides the tiles' operands, and scanning ~50 arguments per launch cost host time."""
        return (configs, *(args[i] if i < len(args) else kwargs[name] for name, i in positions.items()),
                args[0].dtype)

    def launch_fixed(grid, args, kwargs):
        if interpreting():
            kwargs.update(_meta(*_INTERPRETER_CONFIG[kind]))
            prepare(kwargs)
            return kernel[grid](*args, **kwargs)
        configs = configs_for(kwargs)
        key = variant_key(configs, args, kwargs)  # one variant's misfit must not move another's pick
        for i in range(fitting.get(key, 0), len(configs)):
            block_m, block_n, warps, stages = configs[i]
            kwargs.update(_meta(block_m, block_n), num_warps=warps, num_stages=stages)
            prepare(kwargs)
            try:
                result = kernel[grid](*args, **kwargs)
            except (OutOfResources, PTXASError):
                continue  # e.g. fp32 at head dim 256 (too much shared memory): take the next config
            fitting[key] = i
            return result
        raise RuntimeError(f"no {kind} tile config fits this GPU for head-dim tiles of {tile_width(kwargs)} columns")

    def launch_tuned(grid, args, kwargs):
        # Triton's Autotuner.run builds its cache key by scanning every argument name against a
        # list of ~60 (quadratic: ~0.1 ms a launch on the H100 host's CPU), so once it has tuned
        # a key the chosen config is looked up here and the kernel launched directly
        configs = configs_for(kwargs)
        key = variant_key(configs, args, kwargs)
        config = chosen.get(key)
        if config is not None:
            kwargs.update(config.all_kwargs())
            if hook is not None:
                hook(kwargs)
            return kernel[grid](*args, **kwargs)
        if configs not in tuners:
            tuners[configs] = triton.autotune(
                configs=[triton.Config(_meta(m, n), num_warps=w, num_stages=s, pre_hook=hook)
                         for (m, n, w, s) in configs],
                key=keys,
                do_bench=graph_bench if kind == "decode" else None,
            )(kernel)
        result = tuners[configs][grid](*args, **kwargs)
        chosen[key] = tuners[configs].best_config
        return result

    def launch(grid, args, kwargs):
        return (launch_tuned if autotuning() else launch_fixed)(grid, args, kwargs)

    class _Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launch(grid, args, kwargs)

        def recorded(self, record: bool, grid, *args, **kwargs):
            """Launch; with record, return the launch as a launch.Recorded where it can be
            repeated (a settled config: not while tuning, nor under the interpreter), else None."""
            if not record:
                launch(grid, args, kwargs)
                return None
            tuning = autotuning() and variant_key(configs_for(kwargs), args, kwargs) not in chosen
            compiled = launch(grid, args, kwargs)  # kwargs now hold the config's meta-parameters
            if tuning or interpreting():
                return None
            return recorded_call(compiled, grid, kernel, args, kwargs)

    return _Launcher()
