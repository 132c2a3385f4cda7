"""Tile-config helpers."""

import torch

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


def test_seqlen_bucket_groups_powers_of_two():
    assert config.seqlen_bucket(1000, 4000) == config.seqlen_bucket(1024, 4096)
    assert config.seqlen_bucket(1024, 4096) != config.seqlen_bucket(1025, 4096)
    assert config.seqlen_bucket(1024, 4096) != config.seqlen_bucket(4096, 1024)


def test_fp32_is_never_computed_in_tf32():
    assert config.dot_precision(torch.float32) == "ieee"


def test_every_head_class_has_configs():
    for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
        for block_d in (16, 32, 64, 128, 256):
            for precision in ("tf32", "ieee"):
                assert config._configs(kind, block_d, precision)


def test_pdl_is_on_for_hopper_unless_turned_off(monkeypatch):
    cuda = torch.device("cuda", 0)
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    config._hopper_index.cache_clear()  # the capability is cached per device; this test changes it
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
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
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not config.use_pdl(cuda)
    config._hopper_index.cache_clear()  # leave no fake capability behind
