"""Fixtures of the kernel tests."""

import pytest


@pytest.fixture(params=["tma", "pointers"])
def tma(request, monkeypatch):
    """Both ways of moving tiles: TMA descriptors (where alignment allows) and pointer tiles."""
    monkeypatch.setenv("TILEATTN_TMA", "1" if request.param == "tma" else "0")
    return request.param
