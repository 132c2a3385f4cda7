"""`tileattn bench`: it runs, the other backends agree with tileattn, and it writes its report."""

import importlib
import os

import pytest
import torch

from tileattn.cli import bench, main
from tileattn.cli.bench import attention_backends, attention_flops

bench_generate = importlib.import_module("tileattn.cli.generate")


def test_flop_convention():
    assert attention_flops(2, 3, 5, 7, 11, causal=False) == 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(2, 3, 5, 7, 11, causal=True) == 2 * 2 * 3 * 5 * 7 * 11


def test_bench_writes_table_and_plot(tmp_path, capsys):
    assert main(["bench", "--seqlens", "64", "--head-dims", "32", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "bench.md").read_text()
    assert "| 32 | no | 64 |" in report and "| 32 | yes | 64 |" in report
    assert (tmp_path / "speed.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "maxdiff" in out
    diffs = [float(line.rsplit("maxdiff", 1)[1]) for line in out.splitlines() if "maxdiff" in line]
    # the CPU runs fp32 against sdpa-math; the GPU runs bf16 against sdpa-flash
    assert diffs and max(diffs) < (5e-2 if torch.cuda.is_available() else 1e-4)


def test_tma_ab_adds_tileattn_without_tma(monkeypatch):
    monkeypatch.setenv("TILEATTN_BACKEND", "triton")
    impls = attention_backends(torch.device("cpu"), tma_ab=True)
    q, k, v = (torch.randn(1, 40, 2, 32) for _ in range(3))
    seen = []
    monkeypatch.setattr(bench, "flash_attn_func", lambda *a, **kw: seen.append(os.environ.get("TILEATTN_TMA")))
    impls["tileattn-no-tma"](q, k, v, True)
    assert seen == ["0"] and "TILEATTN_TMA" not in os.environ


def test_ring_bench_runs_on_two_cpu_processes(tmp_path, capsys):
    assert main(["bench", "--no-speed", "--ring", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "bench.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| 256 | 2 |"))
    assert float(row.split("|")[-2]) < 1e-4  # ring and one process agree (fp32)


def test_variants_bench_reports_every_variant(tmp_path):
    assert main(["bench", "--no-speed", "--variants", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "bench.md").read_text()
    for name in ("causal, window (31, 0)", "softcap 30", "ALiBi", "window (127, 0), one corner cut", "sinks",
                 "dropout 0.1"):
        assert f"| {name}" in report, name
    assert (tmp_path / "variants.png").stat().st_size > 1000


def test_decode_bench_reports_each_layout(tmp_path):
    """The CPU runs toy shapes: a GQA cache dense and paged, and a transformers-layout head dim 80."""
    assert main(["bench", "--no-speed", "--no-memory", "--decode", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "bench.md").read_text()
    for row in ("| 1 | 96 | 4 (2) | 32 | dense |", "| 1 | 96 | 4 (2) | 32 | paged 16 |",
                "| 2 | 48 | 2 (2) | 80 | transformers |"):
        line = next(line for line in report.splitlines() if line.startswith(row))
        assert float(line.split("|")[6]) > 0, line  # tileattn's bandwidth was measured


def test_step_kernels_bench_times_each_kernel_beside_a_copy(tmp_path):
    """Toy shapes on the CPU (4 heads of dim 32, fp32): the attention reads K and V up to the
    prompt's length, not the cache's capacity."""
    assert main(["bench", "--no-speed", "--no-memory", "--step-kernels", "--prompt-lengths", "40", "--rounds", "1",
                 "--out", str(tmp_path)]) == 0
    rows = [line.split(" | ") for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| 40 |")]
    assert [r[1].split(" ")[0] for r in rows] == ["attention", "q/k/v", "down", "device", "read"]
    assert float(rows[0][2]) == 2 * 4 * 40 * 32 * 4 / 1e6
    assert all(float(r[3]) > 0 for r in rows)


def test_step_kernels_bench_times_forced_decode_configs_at_each_split_count(tmp_path):
    """--decode-configs adds a row per (config, split count), checked against the tuned
    attention before it is timed (the CPU path has no tiles: the rows only show the plumbing)."""
    assert main(["bench", "--no-speed", "--no-memory", "--step-kernels", "--prompt-lengths", "40", "--rounds", "1",
                 "--decode-configs", "32,1,4", "64,4,3", "--decode-splits", "2", "4", "--out", str(tmp_path)]) == 0
    rows = [line.split(" | ") for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| 40 |")]
    forced = [r[1] for r in rows if "config" in r[1]]
    assert forced == [f"attention, config {c}, {n} splits" for c in ("(32, 1, 4)", "(64, 4, 3)") for n in (2, 4)]
    assert all(float(r[3]) > 0 for r in rows)


@pytest.mark.parametrize("value", ["32,1", "32,0,3", "a,1,3"])
def test_a_malformed_decode_config_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--decode-configs", value])
    assert exit_info.value.code == 2 and "BLOCK_N,WARPS,STAGES" in capsys.readouterr().err


def test_paged_varlen_bench_times_three_ways(tmp_path):
    """Packed queries over pages: the varlen call, flash_attn_with_kvcache and packed K/V, each
    checked against the packed kernel before it is timed; and a prefill chunk over a dense
    cache beside flash_attn_func (toy shapes on the CPU)."""
    assert main(["bench", "--no-speed", "--no-memory", "--paged-varlen", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "bench.md").read_text()
    for row, timed in (("| 3 | 1 | 64 | 16 |", 3), ("| 2 | 17 | 48 | 16 |", 3), ("| 2 | 40 | 64 | 4 (2) | 32 |", 2)):
        line = next(line for line in report.splitlines() if line.startswith(row))
        assert line.count("(") == timed + row.count("(") and "—" not in line, line


def test_generation_bench_reports_a_steady_decode_rate(tmp_path, monkeypatch):
    """A tiny Phi in place of Phi-2 (the CPU runs the fast path, on one stream too, and
    transformers' sdpa); the one-stream row must not fork."""
    from ..helpers import fork_every_mlp, record_forks
    from ..tiny_models import CONFIGS

    monkeypatch.setattr(bench, "phi2_config", CONFIGS["phi"])
    fork_every_mlp(monkeypatch)
    forks = record_forks(monkeypatch)
    runs = []
    timed = bench_generate.timed_fast_generate

    def counting(*args, **kwargs):
        forks.clear()
        result = timed(*args, **kwargs)
        runs.append((kwargs["overlap"] and args[2] > 1, bool(forks)))  # one new token: no decode step
        return result

    monkeypatch.setattr(bench_generate, "timed_fast_generate", counting)
    args = ["bench", "--no-speed", "--no-memory", "--generation", "--prompt-lengths", "12", "--new-tokens", "8",
            "--generation-attns", "sdpa", "--overlap-ab", "--out", str(tmp_path)]
    assert main(args) == 0
    assert {overlapped for overlapped, _ in runs} == {True, False}
    assert all(forked == overlapped for overlapped, forked in runs)
    report = (tmp_path / "bench.md").read_text()
    assert "| prompt | path | prefill tok/s | decode tok/s | steady decode tok/s | peak GiB |" in report
    for path in ("tileattn-fast", "tileattn-fast one stream", "sdpa"):
        cells = next(line for line in report.splitlines() if line.startswith(f"| 12 | {path} |")).split("|")
        assert float(cells[5]) > 0  # steady decode tok/s


def test_generation_bench_times_the_named_fast_paths_for_rounds(tmp_path, monkeypatch, capsys):
    """--fast-paths picks the paths (a graphed one is skipped, with a word, off CUDA) and
    --rounds repeats the steady measurement: a long and a quarter-length run per round, the
    row at the mean step's rate."""
    from ..tiny_models import CONFIGS

    monkeypatch.setattr(bench, "phi2_config", CONFIGS["phi"])
    lengths = []
    timed = bench_generate.timed_fast_generate

    def counting(*args, **kwargs):
        lengths.append(args[2])
        return timed(*args, **kwargs)

    monkeypatch.setattr(bench_generate, "timed_fast_generate", counting)
    args = ["bench", "--no-speed", "--no-memory", "--generation", "--prompt-lengths", "12", "--new-tokens", "8",
            "--generation-attns", "--fast-paths", "plain", "graph", "--rounds", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    # warm-up, the length's first call, five prefills, then three (8, 2) pairs
    assert lengths == [4, 3] + [1] * 5 + [8, 2] * 3
    out = capsys.readouterr().out
    assert "fast path graph: skipped" in out
    per_round = next(line for line in out.splitlines() if "steady step ms per round" in line)
    steps = [float(t) for t in per_round.split("per round ")[1].split(", mean")[0].split(", ")]
    assert len(steps) == 3 and all(t > 0 for t in steps)
    rows = [line for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith("| 12 |")]
    assert len(rows) == 1 and rows[0].startswith("| 12 | tileattn-fast |")
    assert float(rows[0].split("|")[5]) == pytest.approx(1e3 / (sum(steps) / 3), rel=2e-2)  # the mean step's rate


@pytest.mark.parametrize("flag", ["--seqlens", "--head-dims", "--prompt-lengths", "--rounds", "--decode-splits"])
def test_lengths_and_counts_below_one_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", flag, "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
