"""Where a fast-generation decode step's GPU time goes (``tileattn bench --step-profile``): every
kernel of a run of CUDA-graph-replayed decode steps of the Phi-2 architecture, per step, from
torch's profiler. The steps measured start after a marker kernel that generate's token callback
launches once the graph has been captured, so the prefill, the eager first step and the capture
stay out of the numbers without subtracting one run from another (whose prefills differ by more
than a step's kernels)."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MARKER = "_step_profile_marker"
WARM_TOKENS = 3  # tokens before the marker: the prefill's, the eager first step's, the capturing step's


@triton.jit
def _step_profile_marker(Flag):
    """A kernel that does nothing of note and is named so that a trace can find it."""
    tl.store(Flag, 1)


@dataclass
class StepProfile:
    rows: list  # (kernel name, launches per step, us per step), most time first
    window_us: float  # GPU time per step from the marker's end to the last kernel's end
    busy_us: float  # of that, time with at least one kernel running (streams overlap)


def summarize(events, steps: int) -> StepProfile:
    """events: (name, start_us, end_us) of every kernel of ``steps`` decode steps."""
    if steps < 1 or not events:
        raise ValueError(f"need at least one step and one kernel, got {steps} steps and {len(events)} kernels")
    count, total = collections.Counter(), collections.defaultdict(float)
    for name, start, end in events:
        count[name] += 1
        total[name] += end - start
    rows = sorted(((n, count[n] / steps, total[n] / steps) for n in count), key=lambda r: -r[2])
    busy, span_start, span_end = 0.0, None, None
    for _, start, end in sorted(events, key=lambda e: e[1]):
        if span_end is None or start > span_end:  # a gap: close the span before it
            busy += 0.0 if span_end is None else span_end - span_start
            span_start, span_end = start, end
        else:
            span_end = max(span_end, end)
    busy += span_end - span_start
    first, last = min(e[1] for e in events), max(e[2] for e in events)
    return StepProfile(rows, (last - first) / steps, busy / steps)


def profile_decode_steps(model, input_ids: torch.Tensor, steps: int, compile: bool = True) -> StepProfile:
    """Profile ``steps`` replayed decode steps of tileattn.generation.generate (CUDA graph, and
    torch.compile when asked); call it after a run of the same shapes, so nothing compiles."""
    from torch.profiler import ProfilerActivity, profile

    from ..generation import generate

    tokens_seen = 0
    flag = torch.zeros(1, dtype=torch.int32, device=input_ids.device)

    def on_token(tokens):
        nonlocal tokens_seen
        tokens_seen += 1
        if tokens_seen == WARM_TOKENS:  # queued after the capturing step, before the next replay
            _step_profile_marker[(1,)](flag)

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, input_ids, max_new_tokens=steps + WARM_TOKENS, eos_token_id=[], cuda_graph=True,
                 compile=compile, on_token=on_token)
        torch.cuda.synchronize()
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e[1])
    marks = [i for i, e in enumerate(kernels) if MARKER in e[0]]
    if not marks:
        raise RuntimeError("the profiler recorded no marker kernel: no CUDA activity was traced")
    marker_end = kernels[marks[-1]][2]
    return summarize([e for e in kernels[marks[-1] + 1:] if e[1] >= marker_end], steps)


def step_profile_bench(device, prompt_lengths, steps: int, log, compile: bool = True) -> list:
    """(prompt length, StepProfile) for the Phi-2 architecture (random bf16 weights, batch 1)."""
    if device.type != "cuda":
        log("   skipped: a step profile reads CUDA kernels")
        return []
    from ..generation import generate
    from .bench import phi2_model

    model = phi2_model(device)
    model.set_attn_implementation("tileattn")
    results = []
    for n in prompt_lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        generate(model, ids, max_new_tokens=8, eos_token_id=[], cuda_graph=True, compile=compile)  # compile, tune
        result = profile_decode_steps(model, ids, steps, compile)
        log(f"prompt {n}: {result.window_us:.0f} us a step, {100 * result.busy_us / result.window_us:.1f}% busy, "
            f"{sum(r[1] for r in result.rows):.0f} kernels")
        results.append((n, result))
    return results


def step_profile_table(results, top: int = 16) -> list[str]:
    lines = []
    for n, p in results:
        lines += [f"Decode step kernels, Phi-2 architecture, prompt {n}, batch 1, compiled + graphed: "
                  f"{p.window_us:.0f} us a step on the GPU, {100 * p.busy_us / p.window_us:.1f}% of it with a "
                  f"kernel running:", "", "| kernel | launches a step | us a step |", "|---|---|---|"]
        lines += [f"| {name[:90]} | {per:.1f} | {us:.1f} |" for name, per, us in p.rows[:top]]
        rest = p.rows[top:]
        if rest:
            lines.append(f"| ({len(rest)} others) | {sum(r[1] for r in rest):.1f} | {sum(r[2] for r in rest):.1f} |")
        lines.append("")
    return lines
