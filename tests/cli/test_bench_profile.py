"""`tileattn bench --step-profile`: the per-step kernel summary and where its window starts."""

import pytest
import torch

from tileattn import generation
from tileattn.cli import bench_profile, main
from tileattn.cli.bench_profile import WARM_TOKENS, StepProfile, step_profile_table, summarize


def test_summarize_counts_per_step_and_merges_overlapping_streams():
    events = []
    for step in range(2):  # a and b in line, c on a side stream under a; 20 us a step
        t = 20 * step
        events += [("a", t, t + 10), ("c", t + 3, t + 8), ("b", t + 12, t + 17)]
    p = summarize(events, steps=2)
    assert p.rows[0] == ("a", 1.0, 10.0) and sorted(p.rows[1:]) == [("b", 1.0, 5.0), ("c", 1.0, 5.0)]
    assert p.window_us == pytest.approx(37 / 2)
    assert p.busy_us == pytest.approx(15.0)  # c hides under a; the 2 us gaps are idle


def test_summarize_refuses_nothing_to_count():
    with pytest.raises(ValueError, match="need at least one step and one kernel, got 0 steps and 1 kernels"):
        summarize([("a", 0, 1)], steps=0)
    with pytest.raises(ValueError, match="got 3 steps and 0 kernels"):
        summarize([], steps=3)


def test_table_folds_the_tail_into_one_row():
    rows = [(f"k{i}", 1.0, float(20 - i)) for i in range(20)]
    lines = step_profile_table([(2048, StepProfile(rows, 250.0, 200.0))], top=16)
    assert "prompt 2048" in lines[0] and "250 us a step" in lines[0] and "80.0%" in lines[0]
    assert "| k0 | 1.0 | 20.0 |" in lines and "| (4 others) | 4.0 | 10.0 |" in lines


def test_the_marker_comes_after_the_capturing_step(monkeypatch):
    """profile_decode_steps counts the steps after its marker (launched by the WARM_TOKENS-th
    token callback): generate must have run the eager first step and the capturing one by then,
    and run exactly ``steps`` more."""
    from ..tiny_models import twin_models

    model, _ = twin_models("llama", "cpu")
    calls = []
    step_call = generation._Step.__call__
    monkeypatch.setattr(generation._Step, "__call__", lambda self, *a: calls.append(1) or step_call(self, *a))
    seen = []
    steps = 5
    generation.generate(model, torch.randint(1, 96, (1, 7)), max_new_tokens=steps + WARM_TOKENS,
                        on_token=lambda tokens: seen.append(len(calls)))
    assert seen[WARM_TOKENS - 1] == 2 and len(calls) - seen[WARM_TOKENS - 1] == steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's path (a GPU would profile Phi-2)")
def test_cpu_run_skips_the_profile(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_profile, "profile_decode_steps", lambda *a, **kw: pytest.fail("profiled on a CPU"))
    assert main(["bench", "--no-speed", "--no-memory", "--step-profile", "4", "--prompt-lengths", "12",
                 "--out", str(tmp_path)]) == 0
    assert "skipped: a step profile reads CUDA kernels" in capsys.readouterr().out
