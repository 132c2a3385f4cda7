"""Repeating a kernel launch without re-deriving its arguments (the eager path's host time).

An eager training step calls attention with the same shapes in every layer, and each call paid
in Python for everything around the kernels: the launcher deriving ~60 arguments from the
inputs (strides, switches, tile shapes, descriptors), then Triton's launch binding and
specializing every argument to find the binary. On the H100's host an eager forward + backward
cost 1.1-1.5 ms of CPU against SDPA's 0.25-0.36 (BENCHMARKS.md), more than its kernels take
below ~2k tokens.

A launcher keys a call on everything that decides its arguments except the tensors' addresses
and a few per-call scalars (shapes, strides, dtypes, 16-byte alignment, switches); the first
launch with a settled tile config is kept as a ``Recorded`` launch, and later calls with the
same key swap their tensors and scalars into its argument list and call the binary's launcher
directly, as Triton's ``JITFunction.run`` does after its cache lookup. Triton specializes a
binary on argument dtypes, 16-byte alignment of pointers and integer values (== 1, % 16): the
key fixes all of them, and the integers that vary per call (dropout's seed and offset) are
``do_not_specialize`` in the kernels.

Only where that lookup is known: Triton releases whose launch path this mirrors (``_MIRRORED``),
never under the interpreter; ``TILEATTN_REPLAY=0`` turns it off.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..environment import env

try:  # launch hooks (profilers) ride along as Triton's launch passes them; absent before 3.4
    from triton import knobs
except ImportError:
    knobs = None

# JITFunction.run's launch call, kernel.run(grid, stream, function, packed_metadata, launch
# metadata, hooks, *every bound argument), read in these releases
_MIRRORED = {(3, 6)}
_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
_MAX_PLANS = 512  # per launcher; shapes that never repeat just start over


@functools.lru_cache(maxsize=None)
def _replayable() -> bool:
    """Whether this process can replay at all (fixed once Triton is imported)."""
    from .config import interpreting  # config imports this module

    return _VERSION in _MIRRORED and knobs is not None and not interpreting()


def switches() -> tuple:
    """The current device and the environment switches a launcher reads per call, as part of a
    plan key, or None when plans are off (an older or newer Triton, the interpreter,
    TILEATTN_REPLAY=0)."""
    if not _replayable() or env("TILEATTN_REPLAY", "1") == "0":
        return None
    return torch.cuda.current_device(), env("TILEATTN_TMA"), env("TILEATTN_PDL"), env("TILEATTN_AUTOTUNE")


def plan_key(tensors: tuple, dropout, *settings):
    """A launcher's plan key: switches(), each tensor's tensor_key, whether dropout is on and
    its seed and offset fit the 32-bit ints the binaries take them as (they are not specialized
    on otherwise), and the launcher's other settings; None while plans are off."""
    toggles = switches()
    if toggles is None:
        return None
    p, seed, offset = dropout
    return toggles, *map(tensor_key, tensors), p > 0, seed < 2**31 and offset < 2**31, *settings


def tensor_key(t: torch.Tensor | None):
    """What a tensor argument decides in a binary and its launcher's arguments."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0


class Plans(dict):
    """key -> Recorded, bounded."""

    def keep(self, key, recorded: Recorded | None) -> None:
        if key is None or recorded is None:
            return
        if len(self) >= _MAX_PLANS:
            self.clear()
        self[key] = recorded


class Recorded:
    """One launch of a compiled kernel, repeatable with its tensors (and any other argument)
    replaced by name. It keeps no tensor of the recorded call alive (a plan outlives the
    activations it was made with): every tensor argument and host descriptor must be given
    again on each replay, or it raises rather than launch on a null pointer."""

    __slots__ = ("_kernel", "_grid", "_values", "_slots", "_descriptors", "_tensors", "_scratch")

    def __init__(self, compiled, grid: tuple, values: list, names: list, scratch: bool = False):
        self._kernel = compiled
        self._scratch = scratch
        self._grid = tuple(grid) + (1,) * (3 - len(grid))
        self._slots = {name: i for i, name in enumerate(names)}
        # host TMA descriptors: replayed as a copy over the new tensor (same shape, strides, block)
        self._descriptors = {n: _rebased(v, None) for n, v in zip(names, values) if _is_descriptor(v)}
        self._tensors = frozenset(n for n, v in zip(names, values) if isinstance(v, torch.Tensor))
        self._values = [None if isinstance(v, torch.Tensor) or _is_descriptor(v) else v for v in values]

    @staticmethod
    def of(compiled, grid, names: list, bound: dict) -> Recorded | None:
        """A Recorded launch from a finished one, or None where it cannot be repeated this way."""
        needed = ("run", "function", "packed_metadata", "launch_metadata", "metadata")
        if compiled is None or not all(hasattr(compiled, n) for n in needed) or any(n not in bound for n in names):
            return None
        meta = compiled.metadata
        if getattr(meta, "profile_scratch_size", 0):
            return None  # Triton's instrumentation: its own allocator, not ours
        values = [bound[n] for n in names]
        if callable(grid):
            grid = grid(dict(bound))
        return Recorded(compiled, grid, values, names, scratch=getattr(meta, "global_scratch_size", 0) > 0)

    def __call__(self, descriptors: dict | None = None, **changes) -> None:
        """Launch again with the named arguments replaced; descriptors (name -> tensor) moves
        the recorded host descriptors of those names, where there were any, to new tensors."""
        values = self._values.copy()
        slots = self._slots
        for name, value in changes.items():
            values[slots[name]] = value
        descriptors = descriptors or {}
        for name, desc in self._descriptors.items():
            values[slots[name]] = _rebased(desc, descriptors[name])
        if not self._tensors <= changes.keys():
            raise ValueError(f"a replayed launch needs every tensor argument: {sorted(self._tensors - changes.keys())} "
                             "missing")
        if self._scratch:
            # device-made descriptors: the binary's launcher asks the calling thread's allocator
            # for scratch memory, unset in a new thread (autograd's backward runs in its own)
            from .config import ensure_allocator

            ensure_allocator()
        kernel = self._kernel
        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        meta = None
        if _unhooked(enter) and _unhooked(leave):
            # Triton builds a dict of launch metadata and its launcher calls both (empty) hook
            # chains on every launch; it skips a None hook: ~2.5 us a launch on the dev CPU
            enter = leave = None
        else:  # a profiler's hooks (proton, a user's) see every replay as they see Triton's launches
            meta = kernel.launch_metadata(self._grid, stream, *values)
        kernel.run(*self._grid, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *values)


def _unhooked(hook) -> bool:
    """Whether a Triton launch hook does nothing: None, or a HookChain with no calls (anything
    else assigned there is some caller's hook)."""
    return hook is None or (isinstance(hook, knobs.HookChain) and not hook.calls)


def _is_descriptor(value) -> bool:
    return type(value).__name__ == "TensorDescriptor"


def launch_recorded(record: bool, kernel, grid, *args, **kwargs) -> Recorded | None:
    """``kernel[grid](*args, **kwargs)`` for a plain (not autotuned) JIT kernel; with record,
    returned as a Recorded launch where it can be repeated (not under the interpreter)."""
    from .config import interpreting

    compiled = kernel[grid](*args, **kwargs)
    if not record or interpreting():
        return None
    return recorded_call(compiled, grid, kernel, args, kwargs)


def recorded_call(compiled, grid, kernel, args: tuple, kwargs: dict) -> Recorded | None:
    """Recorded.of for a finished ``kernel[grid](*args, **kwargs)``, its arguments bound by name."""
    return Recorded.of(compiled, grid, kernel.arg_names, {**dict(zip(kernel.arg_names, args)), **kwargs})


def _rebased(desc, tensor):
    """desc over tensor instead (None: over nothing, as kept between calls): the key fixed its
    shape, strides and alignment, which the recorded descriptor's construction checked, so its
    checks are not run again."""
    new = object.__new__(type(desc))
    new.__dict__.update(desc.__dict__)
    new.base = tensor
    return new
