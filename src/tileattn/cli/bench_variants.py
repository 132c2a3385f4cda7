"""`tileattn bench --variants`: what each attention variant costs against plain causal attention.

Two tables, forward and backward milliseconds of tileattn alone (no other backend has every
variant): a sliding window against full causal attention on a long sequence (tiles outside the
window are skipped, so the ratio should approach the window's share of the causal triangle),
and each variant's overhead against the plain kernel at one mid-size shape. The backward is
timed as forward + backward minus the forward. Every row of a table is timed in turn, ``rounds``
times, and reports its median: timed one after another, the window's backward ratio read 1.11,
1.22 and 1.15 in three runs, a spread as large as the overheads measured.
"""

from __future__ import annotations

import os
import statistics

import torch

from ..api import flash_attn_func
from .rounds import time_in_turn

# (batch, seqlen, heads, head_dim) on the GPU; the CPU runs a toy size so the command is tested
WINDOW_SHAPE, OVERHEAD_SHAPE, TOY_SHAPE = (1, 32768, 16, 128), (2, 8192, 16, 128), (1, 256, 2, 32)
WINDOW = 4096


def _variants(seqlen: int, heads: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    # a window that cuts nothing runs the plain kernels (kernels.forward.trim_window); this one
    # cuts a 128-key corner, so its bounds and masks are live over almost all of causal's tiles
    corner = seqlen - 129
    return {
        "softcap 30": dict(softcap=30.0),
        "ALiBi slopes (heads,)": dict(alibi_slopes=(torch.rand(heads, generator=gen) * 0.1).to(device)),
        f"window ({corner}, 0), one corner cut": dict(window_size=(corner, 0)),
        "sinks (heads,)": dict(learnable_sink=torch.randn(heads, generator=gen).to(device)),
        "dropout 0.1": dict(dropout_p=0.1),
    }


def _inputs(shape, device, dtype):
    batch, seqlen, heads, head_dim = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    return q, k, v, torch.randn(batch, seqlen, heads, head_dim, generator=gen).to(device, dtype)


def _fwd_bwd_rows(timer, device, dtype, shape, variants: dict, rounds: int, log) -> list:
    """Rows (name, fwd ms, bwd ms) of causal attention with each of variants ({name: kwargs}),
    all timed in turn each round (cli.rounds); bwd = the median over rounds of (forward +
    backward) - forward, each pair from one round."""
    q, k, v, dout = _inputs(shape, device, dtype)

    def fwd(variant):
        def run():
            with torch.no_grad():
                return flash_attn_func(q, k, v, causal=True, **variant)
        return run

    def both(variant):
        return lambda: torch.autograd.grad(flash_attn_func(q, k, v, causal=True, **variant), (q, k, v), dout)

    impls = {}
    for name, variant in variants.items():
        impls[(name, "fwd")] = fwd(variant)
        impls[(name, "fwd+bwd")] = both(variant)
    per_round = time_in_turn(lambda fn: timer(fn, device), impls, rounds, absent_ok=False)
    rows = []
    for name in variants:
        fwds, boths = per_round[(name, "fwd")], per_round[(name, "fwd+bwd")]
        bwds = [max(b - f, 0.0) for f, b in zip(fwds, boths)]
        rows.append((name, statistics.median(fwds), statistics.median(bwds)))
        if rounds > 1:
            log(f"   {shape} {name}, fwd / bwd ms per round: " + "; ".join(f"{f:.3f} / {b:.3f}"
                                                                         for f, b in zip(fwds, bwds)))
        log(f"   {shape} {name}: {rows[-1][1]:.3f} / {rows[-1][2]:.3f} ms")
    return rows


def variants_bench(device, log, timer, rounds: int = 3) -> tuple[list, list]:
    """(window_rows, overhead_rows): rows (name, fwd ms, bwd ms), medians of rounds in which
    every row of a table is timed in turn; timer(fn, device) -> ms."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    window_shape, overhead_shape = (WINDOW_SHAPE, OVERHEAD_SHAPE) if gpu else (TOY_SHAPE, TOY_SHAPE)
    window = WINDOW if gpu else 32
    window_rows = _fwd_bwd_rows(timer, device, dtype, window_shape,
                                {"causal": {}, f"causal, window ({window - 1}, 0)": dict(window_size=(window - 1, 0))},
                                rounds, log)
    overhead_rows = _fwd_bwd_rows(timer, device, dtype, overhead_shape,
                                  {"plain causal": {}, **_variants(overhead_shape[1], overhead_shape[2], device)},
                                  rounds, log)
    return [(window_shape, window, window_rows), (overhead_shape, overhead_rows)]


def _div(x: float, base: float) -> float:
    """x / base; 0 where the base timed as 0 (a toy backward lost in the CPU's timing noise)."""
    return x / base if base > 0 else 0.0


def _ratio(x: float, base: float, digits: int) -> str:
    return f"{x / base:.{digits}f}" if base > 0 else "—"


def variants_table(result) -> list[str]:
    (window_shape, window, window_rows), (overhead_shape, overhead_rows) = result
    seqlen = window_shape[1]
    # share of the causal triangle's (query, key) pairs a window of `window` keys keeps
    ideal = (window * seqlen - window * (window - 1) / 2) / (seqlen * (seqlen + 1) / 2)
    (_, full_f, full_b), (name, win_f, win_b) = window_rows
    lines = [f"Sliding window, batch x seqlen x heads x head dim = {' x '.join(map(str, window_shape))}, causal "
             "(forward / backward ms):", "",
             "| attention | fwd ms | bwd ms | vs full causal fwd, bwd | ideal |", "|---|---|---|---|---|",
             f"| causal | {full_f:.3f} | {full_b:.3f} | | |",
             f"| {name} | {win_f:.3f} | {win_b:.3f} | {_ratio(win_f, full_f, 3)}, {_ratio(win_b, full_b, 3)} | "
             f"{ideal:.3f} |", "",
             f"Overhead against plain causal attention, {' x '.join(map(str, overhead_shape))}:", "",
             "| variant | fwd ms | bwd ms | fwd ratio | bwd ratio |", "|---|---|---|---|---|"]
    (_, plain_f, plain_b), *rest = overhead_rows
    lines.append(f"| plain causal | {plain_f:.3f} | {plain_b:.3f} | 1 | 1 |")
    lines += [f"| {n} | {f:.3f} | {b:.3f} | {_ratio(f, plain_f, 2)} | {_ratio(b, plain_b, 2)} |" for n, f, b in rest]
    return lines + [""]


def variants_plot(out_dir: str, result) -> None:
    """variants.png: each variant's forward and backward time over plain causal attention."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    (window_shape, window, window_rows), (overhead_shape, overhead_rows) = result
    (_, plain_f, plain_b), *rest = overhead_rows
    (_, full_f, full_b), (window_name, win_f, win_b) = window_rows
    names = [n for n, _, _ in rest] + [f"{window_name}\n(vs causal, {window_shape[1]} tokens)"]
    fwd = [_div(f, plain_f) for _, f, _ in rest] + [_div(win_f, full_f)]
    bwd = [_div(b, plain_b) for _, _, b in rest] + [_div(win_b, full_b)]
    fig, ax = plt.subplots(figsize=(8, 4))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], fwd, height=0.4, label="forward")
    ax.barh([i + 0.2 for i in y], bwd, height=0.4, label="backward")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(1.1, color="gray", linestyle="--", linewidth=0.8, label="+10%")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"time / plain causal ({' x '.join(map(str, overhead_shape))})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "variants.png"), dpi=110)
    plt.close(fig)
