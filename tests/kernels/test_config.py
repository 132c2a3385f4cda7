"""Tile-config helpers."""

import torch

from tileattn.kernels import config


def test_head_block_pads_to_a_power_of_two_of_at_least_16():
    assert [config.head_block(d) for d in (1, 16, 17, 80, 96, 128, 129, 256)] == [16, 16, 32, 128, 128, 128, 256, 256]


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
