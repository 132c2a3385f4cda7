"""The one place that decides which implementation runs: Triton kernels or blocked PyTorch."""

from __future__ import annotations

import torch

from .environment import env

_CHOICES = ("auto", "triton", "torch")


def backend_name(device: torch.device) -> str:
    """'triton' on CUDA, 'torch' elsewhere; ``TILEATTN_BACKEND=triton|torch|auto`` overrides.

    ``TILEATTN_BACKEND=triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (set before
    importing tileattn): that is how the tests run the kernels without a GPU.
    """
    choice = env("TILEATTN_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"TILEATTN_BACKEND must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and env("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"TILEATTN_BACKEND=triton needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 "
            "set before importing tileattn"
        )
    return choice


def get_backend(device: torch.device):
    """The module implementing ``forward(q, k, v, scale, causal)`` and ``backward(...)``."""
    if backend_name(device) == "triton":
        from . import kernels

        return kernels
    from . import torch_backend

    return torch_backend
