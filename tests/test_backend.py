"""Backend selection through TILEATTN_BACKEND."""

import pytest
import torch

from tileattn import backend, kernels, torch_backend


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TILEATTN_BACKEND", raising=False)
    assert backend.get_backend(torch.device("cpu")) is torch_backend


def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.setenv("TILEATTN_BACKEND", "auto")
    assert backend.get_backend(torch.device("cuda")) is kernels


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.get_backend(torch.device("cpu"))


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("TILEATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TILEATTN_BACKEND must be one of"):
        backend.get_backend(torch.device("cpu"))
