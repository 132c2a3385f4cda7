"""A value bound for the duration of a ``with`` block, readable from code torch.compile traces.

torch.compile (dynamo) cannot trace ``ContextVar.get`` and breaks the graph there; generation's
decode context and context parallel's process group are read inside every attention call, so
each read would split a compiled decode step into pieces. Outside compilation reads go through
a ContextVar (right per thread and per task); while compiling they see a plain mirror of the
process's most recent binding, so compile from one thread at a time.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch


class ScopedValue:
    def __init__(self, name: str):
        self._var = contextvars.ContextVar(name, default=None)
        self._mirror = None

    @contextlib.contextmanager
    def bind(self, value):
        token = self._var.set(value)
        previous, self._mirror = self._mirror, value
        try:
            yield value
        finally:
            self._var.reset(token)
            self._mirror = previous

    def get(self):
        if torch.compiler.is_compiling():
            return self._mirror
        return self._var.get()
