"""Timing implementations in turn: what the benches that compare close figures share.

One implementation timed after another drifts with the GPU's clocks and temperature by more
than the few percent being compared, so each round times every implementation once, the
rounds repeat, and each implementation reports its median; the log keeps every round so a gap
smaller than the rounds' spread shows as such.
"""

from __future__ import annotations

import statistics


def time_or_none(timer, fn) -> float | None:
    """timer(fn) ms; None where the implementation refuses the shape (reported as absent)."""
    try:
        fn()
        return timer(fn)
    except Exception:
        return None


def time_in_turn(timer, impls: dict, rounds: int, absent_ok: bool = True) -> dict:
    """{name: [ms of each round]}: every fn of impls ({name: fn}) timed once per round in turn by
    timer(fn) -> ms. absent_ok: None where one refuses the shape (another library's backend);
    otherwise its error propagates."""
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            times[name].append(time_or_none(timer, fn) if absent_ok else timer(fn))
    return times


def timed_rounds(timer, impls: dict, rounds: int, log) -> dict:
    """{name: median ms over rounds} of time_in_turn; the log shows every round in us."""
    times = time_in_turn(timer, impls, rounds)
    if rounds > 1:
        log("      us per round: " + "; ".join(
            f"{n} " + " ".join("—" if t is None else f"{t * 1e3:.1f}" for t in ts) for n, ts in times.items()))
    return {n: None if None in ts else statistics.median(ts) for n, ts in times.items()}
