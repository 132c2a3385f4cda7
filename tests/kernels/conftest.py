"""Fixtures of the kernel tests."""

import importlib

import pytest


@pytest.fixture(params=["tma", "pointers"])
def tma(request, monkeypatch):
    """Both ways of moving tiles: TMA descriptors (where alignment allows) and pointer tiles."""
    monkeypatch.setenv("TILEATTN_TMA", "1" if request.param == "tma" else "0")
    return request.param


class _Recorder:
    """Stands in for a launcher (``kernel[grid](*args, **kwargs)`` or ``.recorded(record, grid,
    *args, **kwargs)``): notes the keyword arguments, then launches."""

    def __init__(self, launcher, seen: list):
        self.launcher, self.seen = launcher, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs)
            return self.launcher[grid](*args, **kwargs)

        return launch

    def recorded(self, record, grid, *args, **kwargs):
        self.seen.append(kwargs)
        return self.launcher.recorded(record, grid, *args, **kwargs)


@pytest.fixture
def launch_flags(monkeypatch):
    """record(module, *launcher names) -> one list collecting the keyword arguments (the
    constexpr switches) of every launch of those launchers, in order."""
    seen = []

    def record(module: str, *names: str) -> list:
        mod = importlib.import_module(module)
        for name in names:
            monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), seen))
        return seen

    return record
