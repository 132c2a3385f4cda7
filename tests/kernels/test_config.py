"""Tile-config helpers."""

import pytest
import torch

from tileattn.dropout import KEY_GROUP
from tileattn.kernels import config


def test_head_block_pads_to_a_power_of_two_of_at_least_16():
    assert [config.head_block(d) for d in (1, 16, 17, 80, 96, 128, 129, 256)] == [16, 16, 32, 128, 128, 128, 256, 256]


def test_head_dims_split_where_two_blocks_are_narrower_than_the_padded_one():
    def parts(d):
        b = config.head_blocks(d)
        return (b["BLOCK_D"], b["BLOCK_D2"]) if b["SPLIT_D"] else (b["BLOCK_D"],)

    assert {d: parts(d) for d in (16, 40, 64, 72, 80, 96, 112, 128, 160, 192, 256)} == {
        16: (16,), 40: (32, 16), 64: (64,), 72: (64, 16), 80: (64, 16), 96: (64, 32), 112: (128,), 128: (128,),
        160: (128, 32), 192: (128, 64), 256: (256,)}
    assert config.head_blocks(80)["EVEN_D"] and not config.head_blocks(72)["EVEN_D"]


def test_tma_leaves_expanded_tensors_to_pointer_tiles():
    x = torch.zeros(2, 64, 4, 128, dtype=torch.bfloat16)
    blocks = config.head_blocks(128)
    for expanded in (x[:1].expand(2, 64, 4, 128), x[:, :, :1].expand(2, 64, 4, 128)):
        assert not config.use_tma(blocks, x, expanded)
    if config.interpreting():  # the GPU's answer also depends on the card
        assert config.use_tma(blocks, x, x.clone())


def test_seqlen_bucket_groups_powers_of_two():
    assert config.seqlen_bucket(1000, 4000) == config.seqlen_bucket(1024, 4096)
    assert config.seqlen_bucket(1024, 4096) != config.seqlen_bucket(1025, 4096)
    assert config.seqlen_bucket(1024, 4096) != config.seqlen_bucket(4096, 1024)


def test_fp32_is_never_computed_in_tf32():
    assert config.dot_precision(torch.float32) == "ieee"


def test_every_head_class_has_configs():
    for kind in ("fwd", "bwd_dkdv", "bwd_dq", "decode"):
        for block_d in (16, 32, 64, 128, 256):
            for precision in ("tf32", "ieee"):
                assert config.configs(kind, block_d, precision)
    for block_d in (16, 32, 64, 128):  # tall decode tiles: fp16/bf16 up to head dim 128 only
        assert config.configs("decode_tall", block_d)


def test_pdl_is_on_for_hopper_unless_turned_off(monkeypatch):
    cuda = torch.device("cuda", 0)
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    config._hopper_index.cache_clear()  # the capability is cached per device; this test changes it
    monkeypatch.setattr(config, "_INTERPRETED", False)
    monkeypatch.delenv("TILEATTN_PDL", raising=False)
    assert config.use_pdl(cuda)
    assert config.pdl_launch(cuda) == dict(PDL=True, launch_pdl=True)
    assert not config.use_pdl(torch.device("cpu"))
    capability = (8, 0)
    config._hopper_index.cache_clear()
    assert not config.use_pdl(cuda)
    assert config.pdl_launch(cuda) == dict(PDL=False)  # no launch_pdl for Tritons without it
    capability = (9, 0)
    config._hopper_index.cache_clear()
    monkeypatch.setenv("TILEATTN_PDL", "0")
    assert not config.use_pdl(cuda)
    monkeypatch.setenv("TILEATTN_PDL", "1")
    monkeypatch.setattr(config, "_INTERPRETED", True)
    assert not config.use_pdl(cuda)
    config._hopper_index.cache_clear()  # leave no fake capability behind


class _FakeKernel:
    """Records launches; arg_names as a JITFunction has them."""

    arg_names = ["Q", "K", "SEQ_BUCKET", "CAUSAL", "WINDOW", "SOFTCAP", "ALIBI", "SINK", "DROPOUT", "VARLEN",
                 "BLOCK_D", "BLOCK_D2", "SPLIT_D", "DOT_PRECISION", "TMA", "BLOCK_M", "BLOCK_N"]

    def __init__(self, too_big=lambda kwargs: False):
        self.launches, self.too_big = [], too_big

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.too_big(kwargs):
                raise config.OutOfResources(300000, 232448, "shared memory")
            self.launches.append((grid, args, dict(kwargs)))
        return launch


_FLAGS = dict(CAUSAL=True, WINDOW=False, SOFTCAP=0, ALIBI=False, SINK=False, DROPOUT=False, VARLEN=False, TMA=0,
              **config.head_blocks(128), DOT_PRECISION="tf32")


def test_tuned_configs_are_reused_without_the_autotuner(monkeypatch):
    """After Triton's autotuner has picked a config for a key, launches with that key go to the
    kernel directly with the pick (and the prepare hook sees it); a new key value, positional or
    keyword (packed sequences and sinks included), or a new input dtype tunes again."""
    kernel, tuned, hooked = _FakeKernel(), [], []

    class FakeTuner:
        def __init__(self, configs):
            self.configs, self.best_config = configs, None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                tuned.append(args[2])
                self.best_config = self.configs[-1]
            return run

    monkeypatch.setattr(config, "autotuning", lambda: True)
    monkeypatch.setattr(config.triton, "autotune", lambda configs, key, do_bench: lambda fn: FakeTuner(configs))
    launch = config.autotuned(kernel, "fwd", prepare=lambda meta: hooked.append(meta["BLOCK_N"]))
    flags = _FLAGS
    q = torch.zeros(2, dtype=torch.bfloat16)
    last = config._GPU_CONFIGS["fwd"][128][-1]
    launch["grid"](q, q, 7, **flags)
    assert tuned == [7] and kernel.launches == []
    launch["grid"](q, q, 7, **flags)
    launch["grid"](q, q, 7, **flags)
    assert tuned == [7] and len(kernel.launches) == 2
    grid, args, kwargs = kernel.launches[-1]
    assert grid == "grid" and args == (q, q, 7)
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == last
    assert hooked == [last[1], last[1]]
    launch["grid"](q, q, 8, **flags)  # another SEQ_BUCKET (positional)
    launch["grid"](q, q, 7, **(flags | dict(CAUSAL=False)))
    launch["grid"](q, q, 7, **(flags | dict(DROPOUT=True)))
    launch["grid"](q.half(), q.half(), 7, **flags)
    launch["grid"](q, q, 7, **(flags | dict(VARLEN=True)))
    launch["grid"](q, q, 7, **(flags | dict(SINK=True)))
    assert tuned == [7, 8, 7, 7, 7, 7, 7] and len(kernel.launches) == 2


def test_a_config_one_variant_cannot_fit_stays_first_for_the_others(monkeypatch):
    """Untuned launches take the first config that fits; a variant that needs the next one
    (here: dropout, out of shared memory at the first) does not move the others' choice."""
    first = config._GPU_CONFIGS["fwd"][128][0]
    kernel = _FakeKernel(too_big=lambda kw: kw["DROPOUT"] and (kw["BLOCK_M"], kw["BLOCK_N"]) == first[:2])
    monkeypatch.setattr(config, "autotuning", lambda: False)
    monkeypatch.setattr(config, "interpreting", lambda: False)
    launch = config.autotuned(kernel, "fwd")
    q = torch.zeros(2, dtype=torch.bfloat16)
    for dropout in (True, False, True):
        launch["grid"](q, q, 7, **(_FLAGS | dict(DROPOUT=dropout)))
    picked = [(kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) for _, _, kw in kernel.launches]
    second = config._GPU_CONFIGS["fwd"][128][1]
    assert picked == [second, first, second]


def test_graph_bench_waits_for_the_callers_queued_work(monkeypatch):
    """do_bench_cudagraph runs fn on a stream of its own: without a synchronize first, its first
    call could read what the caller's stream has yet to write."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append("synchronize"))
    monkeypatch.setattr(config.triton.testing, "do_bench_cudagraph",
                        lambda fn, rep, quantiles: calls.append("bench") or 1.0)
    assert config.graph_bench(lambda: None) == 1.0
    assert calls == ["synchronize", "bench"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_bench_sees_what_the_callers_stream_wrote_on_the_gpu():
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # tens of milliseconds of queued work before x is written
    x.fill_(1.0)
    seen = []
    config.graph_bench(lambda: seen.append(x.clone()))
    assert seen[0].item() == 1.0


@pytest.mark.parametrize("kind, head_dim, precision", [("bwd_dq", 128, "tf32"), ("bwd_dq", 256, "ieee"),
                                                      ("bwd_dkdv", 256, "ieee")])
def test_dropout_never_gets_a_key_tile_narrower_than_its_bit_groups(monkeypatch, kind, head_dim, precision):
    """Dropout's bits come in groups of KEY_GROUP keys (tile.dropout_words): the lists' 16-key
    tiles stay for the other variants and never reach a dropout launch."""
    monkeypatch.setattr(config, "interpreting", lambda: False)
    monkeypatch.setattr(config, "autotuning", lambda: True)
    tuned = []

    class FakeTuner:
        def __init__(self, configs):
            tuned.append({c.kwargs["BLOCK_N"] for c in configs})
            self.best_config = None

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(config.triton, "autotune", lambda configs, key, do_bench: lambda fn: FakeTuner(configs))
    launch = config.autotuned(_FakeKernel(), kind)
    q = torch.zeros(2, dtype=torch.bfloat16)
    flags = _FLAGS | config.head_blocks(head_dim) | dict(DOT_PRECISION=precision)
    launch["grid"](q, q, 7, **(flags | dict(DROPOUT=True)))
    launch["grid"](q, q, 7, **flags)
    dropout_tiles, plain_tiles = tuned
    assert dropout_tiles and all(n % KEY_GROUP == 0 for n in dropout_tiles)
    assert 16 in plain_tiles


def test_only_config_lists_one_config_inside_its_block_and_restores_the_lists():
    before = config.configs("decode", 64)
    with pytest.raises(KeyError), config.only_config("decode", (None, 32, 1, 2)):
        assert config.configs("decode", 64) == config.configs("decode", 128) == [(None, 32, 1, 2)]
        raise KeyError("the lists come back after an error too")
    assert config.configs("decode", 64) == before
