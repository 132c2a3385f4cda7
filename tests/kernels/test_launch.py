"""Repeated launches (kernels.launch): what a plan key tells apart, how a recorded launch is
replayed, and, on a GPU, that replayed calls give the bits Triton's own launches give."""

import importlib

import pytest
import torch

from tileattn import flash_attn_func
from tileattn.kernels import launch

# the modules, not the launcher functions tileattn.kernels exports under the same names
fwd_module = importlib.import_module("tileattn.kernels.forward")
bwd_module = importlib.import_module("tileattn.kernels.backward")

GPU = torch.cuda.is_available()


class _Compiled:
    """Stands in for Triton's CompiledKernel: notes what its launcher was called with."""

    function, packed_metadata = "function", "packed"

    def __init__(self, scratch=0, profile_scratch=0):
        self.calls = []
        self.metadata = type("Meta", (), {"global_scratch_size": scratch, "profile_scratch_size": profile_scratch})()

    def launch_metadata(self, grid, stream, *values):
        return ("meta", grid, stream) + values

    def run(self, *args):
        self.calls.append(args)


@pytest.fixture
def fake_stream(monkeypatch):
    """The launcher asks for the current CUDA device's stream, which a CPU has none of."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)


def test_a_recorded_launch_replays_with_the_named_arguments_replaced(fake_stream):
    compiled = _Compiled()
    names = ["X", "n", "scale", "BLOCK"]
    recorded = launch.Recorded.of(compiled, lambda meta: (meta["n"] // meta["BLOCK"],), names,
                                  dict(X="x0", n=64, scale=0.5, BLOCK=16))
    recorded(X="x1", scale=0.25)
    recorded(X="x2")
    # grid (n // BLOCK programs), stream, binary, its metadata, launch metadata, then Triton's
    # launch enter and exit hooks (none set: skipped, with the metadata only they read), then
    # every argument in signature order
    assert [call[:9] for call in compiled.calls] == [(4, 1, 1, 7, "function", "packed", None, None, None)] * 2
    assert [call[9:] for call in compiled.calls] == [("x1", 64, 0.25, 16), ("x2", 64, 0.5, 16)]


def test_a_recorded_launch_calls_the_launch_hooks_a_profiler_set(fake_stream):
    from triton import knobs

    compiled = _Compiled()
    recorded = launch.Recorded.of(compiled, (2,), ["X"], dict(X="x0"))

    def hook(metadata):
        pass

    knobs.runtime.launch_exit_hook.add(hook)
    try:
        recorded(X="x1")
    finally:
        knobs.runtime.launch_exit_hook.remove(hook)
    recorded(X="x2")
    with_hook, without = compiled.calls
    assert with_hook[6:9] == (("meta", (2, 1, 1), 7, "x1"), knobs.runtime.launch_enter_hook,
                              knobs.runtime.launch_exit_hook)
    assert without[6:9] == (None, None, None)


def test_a_recorded_launch_keeps_no_tensor_alive_and_wants_each_one_again(fake_stream):
    import gc
    import weakref

    x = torch.zeros(8)
    compiled = _Compiled()
    recorded = launch.Recorded.of(compiled, (1,), ["X", "n"], dict(X=x, n=8))
    gone = weakref.ref(x)
    del x
    gc.collect()
    assert gone() is None  # an activation recorded with must not outlive its step
    with pytest.raises(ValueError, match="X"):
        recorded(n=8)
    assert compiled.calls == []
    y = torch.ones(8)
    recorded(X=y)
    assert compiled.calls[0][9] is y


def test_launches_with_profiler_scratch_or_a_missing_argument_are_not_recorded():
    names = ["X", "n"]
    assert launch.Recorded.of(_Compiled(profile_scratch=64), (1,), names, dict(X=1, n=2)) is None
    assert launch.Recorded.of(_Compiled(), (1,), names, dict(X=1)) is None
    assert launch.Recorded.of(None, (1,), names, dict(X=1, n=2)) is None


def test_a_launch_with_device_made_descriptors_sets_the_threads_allocator_before_each_replay(fake_stream,
                                                                                            monkeypatch):
    from tileattn.kernels import config

    # Triton's launcher takes the scratch those descriptors live in from the calling thread's
    # allocator, which a new thread (autograd's backward) starts without
    order = []
    monkeypatch.setattr(config, "ensure_allocator", lambda: order.append("allocator"))
    compiled = _Compiled(scratch=128)
    compiled.run = lambda *args: order.append("launch")
    recorded = launch.Recorded.of(compiled, (1,), ["X"], dict(X=1))
    recorded(X=2)
    recorded(X=3)
    assert order == ["allocator", "launch"] * 2
    plain = launch.Recorded.of(_Compiled(), (1,), ["X"], dict(X=1))
    order.clear()
    plain(X=2)
    assert order == []


def test_a_host_descriptor_moves_to_the_new_tensor_keeping_its_block(fake_stream):
    from triton.tools.tensor_descriptor import TensorDescriptor

    old, new = torch.zeros(4, 32), torch.ones(4, 32)
    desc = TensorDescriptor(old, list(old.shape), list(old.stride()), [2, 16])
    compiled = _Compiled()
    recorded = launch.Recorded.of(compiled, (1,), ["D", "E"], dict(D=desc, E=None))
    recorded(descriptors=dict(D=new, E=new))
    moved, untouched = compiled.calls[0][-2:]
    assert moved.base is new and moved.block_shape == [2, 16] and moved.strides == desc.strides
    assert desc.base is old and untouched is None  # the recorded one is left alone; E had none


def test_plan_keys_tell_apart_what_triton_specializes_on(monkeypatch):
    monkeypatch.setattr(launch, "switches", lambda: ("on",))
    q = torch.randn(2, 64, 4, 32, dtype=torch.float16)
    lse = torch.empty(2, 4, 64)

    def key(q, causal=True, window=(-1, -1), softcap=0.0, dropout=(0.0, 0, 0)):
        # as the forward launcher keys its calls
        return launch.plan_key((q, q, q, q, lse, None, None), dropout, causal, window, softcap)

    base = key(q)
    assert key(q.clone()) == base  # another tensor of the same layout: same plan
    assert key(q.transpose(1, 2).contiguous().transpose(1, 2)) != base  # strides
    assert key(q.to(torch.bfloat16)) != base
    assert key(q[:, 1:]) != base  # shape
    misaligned = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2 bytes off 16
    assert key(misaligned) != base
    assert key(q, causal=False) != base and key(q, window=(8, 0)) != base and key(q, softcap=5.0) != base
    assert key(q, dropout=(0.1, 3, 4)) != base
    assert key(q, dropout=(0.1, 3, 4)) == key(q, dropout=(0.1, 5, 6))  # seeds are not specialized on
    assert key(q, dropout=(0.1, 2**31, 0)) != key(q, dropout=(0.1, 5, 6))  # but 64-bit ones would be


def test_packed_plan_keys_tell_apart_the_sequence_count_and_longest_lengths(monkeypatch):
    monkeypatch.setattr(launch, "switches", lambda: ("on",))
    q = torch.randn(100, 4, 32, dtype=torch.float16)
    lse = torch.empty(4, 100)

    def key(cu, max_q=60, max_k=60):
        return launch.plan_key((q, q, q, q, lse, None, None, cu, cu), (0.0, 0, 0), True, (-1, -1), 0.0, max_q, max_k)

    cu = torch.tensor([0, 40, 100], dtype=torch.int32)
    base = key(cu)
    assert key(torch.tensor([0, 60, 100], dtype=torch.int32)) == base  # other boundaries, same grid
    assert key(torch.tensor([0, 30, 60, 100], dtype=torch.int32)) != base  # one sequence more
    assert key(cu, max_q=70) != base and key(cu, max_k=70) != base  # the grid, the key loop


def test_no_plans_under_the_interpreter_or_when_switched_off(monkeypatch):
    from tileattn.kernels import config

    if config.interpreting():
        assert launch.switches() is None
    monkeypatch.setenv("TILEATTN_REPLAY", "0")
    assert launch.switches() is None


def _assert_replays_match_triton_launches(attention, inputs, dout, monkeypatch):
    """attention(q, k, v) -> out, forward and backward, run with plans off, then three times with
    them on (the first call records, the others replay): out, dq, dk, dv equal bit for bit."""
    def run():
        leaves = [x.clone().requires_grad_() for x in inputs]
        torch.manual_seed(1)  # the same dropout draw every time
        out = attention(*leaves)
        out.backward(dout)
        return [out, *(x.grad for x in leaves)]

    monkeypatch.setenv("TILEATTN_REPLAY", "0")
    expected = run()
    monkeypatch.setenv("TILEATTN_REPLAY", "1")
    fwd_module._plans.clear()
    bwd_module._plans.clear()
    results = [run() for _ in range(3)]
    assert len(fwd_module._plans) == 1 and len(bwd_module._plans) == 1
    for got in results:
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
            assert torch.equal(a, b), name


@pytest.mark.skipif(not GPU, reason="replays Triton's launches on a CUDA GPU")
@pytest.mark.parametrize("case", ["d128-causal-bf16", "d80-gqa-fp16", "d64-dropout-alibi-sinks"])
def test_replayed_calls_match_triton_launches_bit_for_bit(case, monkeypatch):
    d, dtype = {"d128-causal-bf16": (128, torch.bfloat16), "d80-gqa-fp16": (80, torch.float16),
                "d64-dropout-alibi-sinks": (64, torch.bfloat16)}[case]
    heads_kv = 2 if "gqa" in case else 4
    extra = {}
    if "dropout" in case:
        extra = dict(dropout_p=0.2, alibi_slopes=torch.rand(4, device="cuda"),
                     learnable_sink=torch.randn(4, device="cuda"))
    torch.manual_seed(0)
    q = torch.randn(2, 239, 4, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 113, heads_kv, d, device="cuda", dtype=dtype) for _ in range(2))
    causal = "causal" in case or "dropout" in case
    _assert_replays_match_triton_launches(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, **extra), (q, k, v),
                                          torch.randn_like(q), monkeypatch)


@pytest.mark.skipif(not GPU, reason="replays Triton's launches on a CUDA GPU")
@pytest.mark.parametrize("d", [128, 64], ids=["d128-device-descriptors", "d64-gqa"])
def test_replayed_packed_calls_match_triton_launches_bit_for_bit(d, monkeypatch):
    from tileattn import flash_attn_varlen_func

    torch.manual_seed(0)
    lengths = [113, 1, 239, 64]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    heads_kv = 4 if d == 128 else 2
    q = torch.randn(sum(lengths), 4, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lengths), heads_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    longest = max(lengths)
    _assert_replays_match_triton_launches(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True), (q, k, v),
        torch.randn_like(q), monkeypatch)
