"""The fast (register-tiled) FA2 kernels against the float64 reference, on the simulator.

Sizes are simulator-sized: a 128-thread block with 64 x 64 tiles costs about
a millisecond per thread per tile here. Relative error <= 1e-5 everywhere.
"""

import pytest
from conftest import attention_inputs, check_forward, rel_err

from flashnumba import geometry, reference
from flashnumba.kernels import fa2_fast_forward as fast
from flashnumba.kernels import smem_limit
from flashnumba.kernels.common import ConfigError, TileConfig

# (B, Nq, Nk, Hq, Hkv, d, causal): tile multiple, not a multiple, N < tile, Nq != Nk both ways
# (fully masked rows when Nq > Nk under causal), GQA, and other head dims (buckets 32, 128, 256).
# Tiles are 64 x 64 for d_pad <= 64, 32 x 32 for d_pad = 128, 32 x 64 for d_pad = 256; a simulated
# launch costs about (tile pairs visited) x B x Hq, so each case has the fewest tiles and heads
# its id needs (67 = one tile + 3 rows).
FORWARD_CASES = [
    pytest.param(1, 64, 64, 1, 1, 64, False, id="N=64 one whole tile"),
    pytest.param(1, 67, 67, 1, 1, 64, True, id="N=67 not a multiple, causal"),
    pytest.param(1, 20, 20, 1, 1, 64, False, id="N=20 below the tile"),
    pytest.param(1, 40, 100, 1, 1, 64, True, id="Nq=40 < Nk=100 causal"),
    pytest.param(1, 100, 40, 1, 1, 64, True, id="Nq=100 > Nk=40 causal, fully masked rows"),
    pytest.param(2, 20, 40, 4, 2, 24, False, id="d=24 (bucket 32), B=2, GQA 4:2"),
    pytest.param(1, 40, 40, 1, 1, 128, True, id="d=128 causal"),
    pytest.param(1, 20, 70, 1, 1, 256, True, id="d=256 (dynamic shared memory) causal Nq < Nk, two K/V tiles"),
    pytest.param(1, 30, 20, 2, 1, 200, True, id="d=200 (d_pad=256) causal Nq > Nk, fully masked rows, GQA 2:1"),
]


@pytest.mark.parametrize("B, Nq, Nk, H_q, H_kv, d, causal", FORWARD_CASES)
def test_fast_forward_matches_reference(rng, B, Nq, Nk, H_q, H_kv, d, causal):
    q, k, v, _ = attention_inputs(rng, B, Nq, Nk, H_q, H_kv, d)
    out, L = fast.fa2_fast_forward(q, k, v, causal=causal)
    ref_out, ref_L = reference.attention(q, k, v, causal=causal)
    check_forward(out, L, ref_out, ref_L)


# (Nq, Nk, d): PyTorch's top-left diagonal (key c visible to row r iff c <= r), both shapes
TOP_LEFT_CASES = [
    pytest.param(40, 100, 64, id="Nq=40 < Nk=100: keys past row 39 seen by no row"),
    pytest.param(70, 40, 40, id="Nq=70 > Nk=40, d=40: no fully masked row"),
]


@pytest.mark.parametrize("Nq, Nk, d", TOP_LEFT_CASES)
def test_fast_forward_top_left_causal(rng, Nq, Nk, d):
    q, k, v, _ = attention_inputs(rng, 1, Nq, Nk, 1, 1, d)
    out, L = fast.fa2_fast_forward(q, k, v, causal=True, alignment=geometry.TOP_LEFT)
    ref_out, ref_L = reference.attention(q, k, v, causal=True, alignment=geometry.TOP_LEFT)
    check_forward(out, L, ref_out, ref_L)
    bottom_right, _ = reference.attention(q, k, v, causal=True)
    assert rel_err(out, bottom_right) > 0.1, "the two alignments must differ for Nq != Nk"


def test_fast_forward_alignment_is_checked(rng):
    q, k, v, _ = attention_inputs(rng, 1, 8, 8, 1, 1, 16)
    with pytest.raises(ValueError, match="alignment"):
        fast.fa2_fast_forward(q, k, v, causal=True, alignment="top-right")


def test_fast_forward_softmax_scale_and_other_config(rng):
    q, k, v, _ = attention_inputs(rng, 1, 40, 40, 1, 1, 64)          # two 32 x 32 tiles each way
    config = TileConfig(Br=32, Bc=32, d_pad=64, num_warps=2)
    out, L = fast.fa2_fast_forward(q, k, v, causal=True, softmax_scale=0.3, config=config)
    ref_out, ref_L = reference.attention(q, k, v, causal=True, softmax_scale=0.3)
    check_forward(out, L, ref_out, ref_L)


def test_fast_forward_configs_are_checked():
    with pytest.raises(ConfigError, match="Br=64 must be <= Bc=32"):
        fast.check_config(TileConfig(Br=64, Bc=32, d_pad=64, num_warps=4))
    with pytest.raises(ConfigError, match="shared memory per block"):
        fast.check_config(TileConfig(Br=128, Bc=128, d_pad=256, num_warps=16))   # 384 KB
    for config in fast.shipped_configs():
        fast.check_config(config)
        # static: 48 KB at most; dynamic (d_pad = 256 only): what an A100 gives a block
        assert fast.static_smem_bytes(config) <= 48 * 1024
        assert fast.smem_bytes(config) <= smem_limit.opt_in_limit((8, 0))
        assert fast.is_dynamic(config) == (config.d_pad == 256)
    assert ([fast.default_config(d).d_pad for d in (1, 16, 17, 64, 65, 100, 128, 129, 200, 256)]
            == [32, 32, 32, 64, 128, 128, 128, 256, 256, 256])
    with pytest.raises(ValueError, match=r"head dim d=257 is not supported: expected 1 <= d <= 256"):
        fast.default_config(257)


# The fast backward, fed this forward's O and L (fully masked rows included), is tested in
# test_fast_backward.py (test_after_the_fast_forward_with_softmax_scale).
