"""Shared fixtures. Without a GPU the Triton kernels run under Triton's interpreter, which must
be switched on before triton.jit decorates them, i.e. before tileattn is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n: the workers split the cores between them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once per backend, forced through TILEATTN_BACKEND."""
    monkeypatch.setenv("TILEATTN_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

