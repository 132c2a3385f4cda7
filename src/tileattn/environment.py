"""Reading the TILEATTN_* switches (and TRITON_INTERPRET) from the environment, fast.

They are read on every call that depends on one, never cached: tests and users flip them at
run time (``monkeypatch.setenv``, ``os.environ[...] = ...``). ``os.environ.get`` encodes the
name on each read and, for a name that is not set (the usual case), raises and catches a
KeyError inside: 1.2 us a read on the dev CPU against 0.15 here, and an eager forward + backward
reads ten. This looks the encoded name up in the mapping's own store, which every change made
through ``os.environ`` updates.
"""

from __future__ import annotations

import os

_STORE = getattr(os.environ, "_data", None)  # CPython's os._Environ: encoded name -> encoded value
_NAMES: dict = {}
_VALUES: dict = {}


def env(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``."""
    if _STORE is None:
        return os.environ.get(name, default)
    key = _NAMES.get(name)
    if key is None:
        key = _NAMES[name] = os.environ.encodekey(name)
    value = _STORE.get(key)
    if value is None:
        return default
    text = _VALUES.get(value)
    if text is None:
        text = _VALUES[value] = os.environ.decodevalue(value)
    return text
