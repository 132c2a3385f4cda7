"""Triton kernels: the shared tile step (tile.py), forward, backward, KV-cache decode, and their tile configs."""

from .backward import backward
from .decode import decode
from .forward import forward

__all__ = ["forward", "backward", "decode"]
