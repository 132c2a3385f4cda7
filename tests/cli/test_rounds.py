"""Timing in turn: every implementation once per round, medians, absent backends as None."""

import pytest

from tileattn.cli.rounds import time_in_turn, timed_rounds


def _recorder():
    calls = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 9.0, 4.0])}

    def timer(fn):
        name = fn()
        calls.append(name)
        return next(times[name])

    return calls, timer


def test_rounds_alternate_and_report_medians():
    calls, timer = _recorder()
    lines = []
    medians = timed_rounds(timer, {"a": lambda: "a", "b": lambda: "b"}, 3, lines.append)
    assert calls == ["a", "b"] * 3
    assert medians == {"a": 2.0, "b": 5.0}
    assert lines == ["      us per round: a 3000.0 1000.0 2000.0; b 5000.0 9000.0 4000.0"]


def test_a_refusing_backend_is_absent_unless_errors_must_surface():
    def refuses():
        raise RuntimeError("no kernel for this shape")

    assert time_in_turn(lambda fn: 1.0, {"x": refuses}, 2) == {"x": [None, None]}
    assert timed_rounds(lambda fn: 1.0, {"x": refuses}, 2, lambda line: None) == {"x": None}
    with pytest.raises(RuntimeError, match="no kernel"):
        time_in_turn(lambda fn: fn(), {"x": refuses}, 1, absent_ok=False)
