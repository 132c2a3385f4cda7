"""Triton kernels: the shared tile step (tile.py), forward, backward, and their tile configs."""

from .backward import backward
from .forward import forward

__all__ = ["forward", "backward"]
