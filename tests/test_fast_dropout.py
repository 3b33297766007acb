"""Dropout in the fast (register-tiled) FA2 kernels, against the float64 reference, on the simulator.

The kernels regenerate the keep-mask from Philox4x32-10 (``flashnumba.philox``)
on chip; the reference gets the same mask from ``philox.keep_mask(seed, p, B, Hq,
Nq, Nk)``. A single element kept or dropped differently moves the output by
about 1e-2 relative at these sizes, so rel_err <= 1e-5 checks the mask bit for
bit, besides the arithmetic.

Simulator-sized (B * H <= 2, N <= 100, few tiles): the forward's d_pad=64 block is
128 threads with 64 x 64 tiles, the backward's 128 threads with 32 x 64 tiles;
each thread runs its Philox calls in Python here. The backward cases take O and
L from the float64 reference (cast to float32), so they test the backward alone.
"""

import numpy as np
import pytest
from conftest import attention_inputs, check_forward, rel_err
from numba import types
from test_fast_backward import _check as _check_backward

from flashnumba import geometry, philox, reference
from flashnumba.kernels import fa2_fast_backward as fast_bwd
from flashnumba.kernels import fa2_fast_forward as fast_fwd
from flashnumba.kernels.common import TileConfig

TOL = 1e-5
P = 0.17
SEED = 20240917
BR, TL = geometry.BOTTOM_RIGHT, geometry.TOP_LEFT


def _options(q, k, causal, alignment, p=P, seed=SEED):
    """Keywords for the reference: the same Philox mask the kernels regenerate."""
    B, Nq, H_q, _ = q.shape
    mask = philox.keep_mask(seed, p, B, H_q, Nq, k.shape[1])
    return {"causal": causal, "alignment": alignment, "dropout_p": p, "dropout_mask": mask}


# (B, Nq, Nk, Hq, Hkv, d, causal, alignment). Forward tiles are 64 x 64 (d <= 64) or
# 32 x 32 (d = 128): N not a multiple of the tile, Nq != Nk both ways, odd head dims
# (17 in the d_pad=32 kernel, 40 in the d_pad=64 one), GQA 2:1 (the mask is the query head's),
# and fully masked rows (bottom-right, Nq > Nk).
# A simulated launch costs about (tile pairs visited) x B x Hq: GQA where the id says so.
FORWARD_CASES = [
    pytest.param(1, 40, 67, 1, 1, 64, False, BR, id="Nq=40, Nk=67 not multiples, two K tiles, full"),
    pytest.param(1, 40, 70, 2, 1, 40, True, BR, id="causal Nq=40 < Nk=70, d=40, GQA 2:1"),
    pytest.param(1, 100, 40, 1, 1, 17, True, BR, id="causal Nq=100 > Nk=40, fully masked rows, d=17"),
    pytest.param(1, 40, 100, 1, 1, 64, True, TL, id="top-left Nq=40 < Nk=100"),
    pytest.param(1, 100, 40, 1, 1, 40, True, TL, id="top-left Nq=100 > Nk=40, d=40"),
    pytest.param(1, 40, 50, 1, 1, 128, True, BR, id="d=128 (32 x 32 tiles), causal"),
    pytest.param(1, 20, 33, 1, 1, 256, True, BR, id="d=256 (32 x 64 tiles), causal"),
]


@pytest.mark.parametrize("B, Nq, Nk, H_q, H_kv, d, causal, alignment", FORWARD_CASES)
def test_forward_dropout_matches_reference(rng, B, Nq, Nk, H_q, H_kv, d, causal, alignment):
    q, k, v, _ = attention_inputs(rng, B, Nq, Nk, H_q, H_kv, d)
    out, L = fast_fwd.fa2_fast_forward(q, k, v, causal=causal, alignment=alignment,
                                       dropout_p=P, seed=SEED)
    ref_out, ref_L = reference.attention(q, k, v, **_options(q, k, causal, alignment))
    check_forward(out, L, ref_out, ref_L)
    undropped, undropped_L = reference.attention(q, k, v, causal=causal, alignment=alignment)
    assert rel_err(out, undropped) > 0.05, "dropout must change the output"
    np.testing.assert_array_equal(np.isneginf(L), np.isneginf(undropped_L))   # L is the undropped one


def test_forward_dropout_other_config_and_softmax_scale(rng):
    """The 2-warp 32 x 32 alternative for d_pad=64: other thread tiles (TN = 4, one group of 4 keys)."""
    q, k, v, _ = attention_inputs(rng, 1, 40, 45, 1, 1, 64)
    config = TileConfig(Br=32, Bc=32, d_pad=64, num_warps=2)
    out, L = fast_fwd.fa2_fast_forward(q, k, v, causal=True, softmax_scale=0.3, dropout_p=0.4,
                                       seed=7, config=config)
    ref_out, ref_L = reference.attention(q, k, v, softmax_scale=0.3, **_options(q, k, True, BR, 0.4, 7))
    check_forward(out, L, ref_out, ref_L)


def test_forward_same_seed_same_bits_other_seed_differs(rng):
    q, k, v, _ = attention_inputs(rng, 1, 20, 20, 1, 1, 17)
    first = fast_fwd.fa2_fast_forward(q, k, v, causal=True, dropout_p=P, seed=SEED)
    again = fast_fwd.fa2_fast_forward(q, k, v, causal=True, dropout_p=P, seed=SEED)
    other = fast_fwd.fa2_fast_forward(q, k, v, causal=True, dropout_p=P, seed=SEED + 2 ** 32)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert rel_err(other[0], first[0]) > 0.05, "another seed (its high word) must drop other elements"
    np.testing.assert_array_equal(other[1], first[1])           # L does not depend on the mask


def test_forward_p_zero_is_the_plain_kernel(rng):
    """p = 0 launches the kernel without Philox code, whatever the seed: the same bits as no dropout."""
    q, k, v, _ = attention_inputs(rng, 1, 20, 20, 1, 1, 17)
    plain = fast_fwd.fa2_fast_forward(q, k, v, causal=True)
    seeded = fast_fwd.fa2_fast_forward(q, k, v, causal=True, dropout_p=0.0, seed=12345)
    for a, b in zip(plain, seeded):
        np.testing.assert_array_equal(a, b)


# (B, Nq, Nk, Hq, Hkv, d, causal, alignment). Backward tiles are 32 x 32 (d_pad = 32), 32 x 64
# (d_pad = 64), 16 x 32 (d_pad = 128) or 16 x 16 (d_pad = 256).
BACKWARD_CASES = [
    pytest.param(1, 50, 50, 1, 1, 64, False, BR, id="N=50 not a multiple, full"),
    pytest.param(1, 24, 70, 2, 1, 40, True, BR, id="causal Nq=24 < Nk=70, d=40, GQA 2:1"),
    pytest.param(1, 70, 24, 1, 1, 17, True, BR, id="causal Nq=70 > Nk=24, fully masked rows, d=17"),
    pytest.param(1, 24, 70, 1, 1, 64, True, TL, id="top-left Nq=24 < Nk=70"),
    pytest.param(1, 70, 24, 1, 1, 40, True, TL, id="top-left Nq=70 > Nk=24, d=40"),
    pytest.param(1, 20, 28, 1, 1, 128, True, BR, id="d=128 (16 x 32 tiles), causal"),
    pytest.param(1, 20, 17, 1, 1, 200, True, BR, id="d=200 (d_pad=256, 16 x 16 tiles), causal Nq=20 > Nk=17"),
]


@pytest.mark.parametrize("B, Nq, Nk, H_q, H_kv, d, causal, alignment", BACKWARD_CASES)
def test_backward_dropout_matches_reference(rng, B, Nq, Nk, H_q, H_kv, d, causal, alignment):
    q, k, v, dout = attention_inputs(rng, B, Nq, Nk, H_q, H_kv, d)
    options = _options(q, k, causal, alignment)
    out, L = reference.attention(q, k, v, **options)
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out.astype(np.float32), L.astype(np.float32),
                                       causal=causal, alignment=alignment, dropout_p=P, seed=SEED)
    _check_backward(grads, reference.attention_backward(dout, q, k, v, **options))
    masked = np.isneginf(L[0, 0])
    if masked.any():                                       # rows that see no key: dQ exactly 0
        assert np.all(grads[0][0, masked] == 0.0)


@pytest.mark.parametrize("config", [
    TileConfig(Br=32, Bc=32, d_pad=64, num_warps=2),
    TileConfig(Br=32, Bc=32, d_pad=64, num_warps=4),     # shipped: 3 blocks per SM, one dQ chunk per trip
], ids=lambda c: f"Br={c.Br} Bc={c.Bc} w={c.num_warps}")
def test_backward_dropout_other_configs(rng, config):
    q, k, v, dout = attention_inputs(rng, 1, 40, 40, 1, 1, 64)
    options = _options(q, k, True, BR)
    out, L = reference.attention(q, k, v, **options)
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out.astype(np.float32), L.astype(np.float32),
                                       causal=True, dropout_p=P, seed=SEED, config=config)
    _check_backward(grads, reference.attention_backward(dout, q, k, v, **options))


def test_backward_after_the_fast_forward(rng):
    """The training pipeline: the fast forward's dropped O and its L feed the backward, one seed."""
    q, k, v, dout = attention_inputs(rng, 1, 45, 45, 1, 1, 40)
    out, L = fast_fwd.fa2_fast_forward(q, k, v, causal=True, dropout_p=P, seed=SEED)
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, causal=True, dropout_p=P, seed=SEED)
    _check_backward(grads, reference.attention_backward(dout, q, k, v, **_options(q, k, True, BR)))


def test_backward_same_seed_same_bits_other_seed_differs(rng):
    """dK and dV are sums in a fixed order: bitwise the same for the same seed. dQ adds one
    float32 atomic per (i, j): bitwise on the simulator, only to rounding on a GPU."""
    q, k, v, dout = attention_inputs(rng, 1, 20, 20, 1, 1, 64)
    options = _options(q, k, False, BR)
    out, L = (x.astype(np.float32) for x in reference.attention(q, k, v, **options))
    first = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, dropout_p=P, seed=SEED)
    again = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, dropout_p=P, seed=SEED)
    other = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, dropout_p=P, seed=SEED + 1)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[2], again[2])
    np.testing.assert_allclose(first[0], again[0], rtol=1e-6, atol=1e-7)
    for name, a, b in zip(("dq", "dk", "dv"), first, other):
        assert rel_err(b, a) > 0.05, f"{name}: another seed must drop other elements"


# ---------------------------------------------------------------- the variants and their checks

@pytest.mark.parametrize("module", [fast_fwd, fast_bwd], ids=["forward", "backward"])
def test_dropout_is_a_separate_cached_variant(module):
    for config in module.shipped_configs():
        assert module.build(config) is module.build(config, dropout=False)
        assert module.build(config, dropout=True) is not module.build(config)
        targets = module.compile_targets(config)
        labels = [label for label, _, _ in targets]
        assert len(set(labels)) == len(labels) and sum(label.endswith("_dropout") for label in labels) == 1
        for label, _, argtypes in targets:
            if label.endswith("_preprocess_zero_dq"):      # the backward's D_i and dQ = 0 launch
                continue
            # ..., windowed, lo, hi, dropout_p (float64), seed (uint64), limit (int64), cap, slopes
            a2 = types.Array(types.float32, 2, "C")
            assert tuple(argtypes[-8:]) == (types.boolean, types.int32, types.int32, types.float64,
                                            types.uint64, types.int64, types.float32, a2)


def test_backward_dropout_launch_bounds():
    """The dropout kernel asks for fewer blocks per SM only where listed (their plain kernels leave
    no registers for the Philox state); everywhere else it runs as many as the plain kernel."""
    listed = fast_bwd._DROPOUT_BLOCKS_PER_SM
    assert (16, 16, 128, 2, 0) in listed
    for config in fast_bwd.shipped_configs():
        plain = fast_bwd.min_blocks_per_sm(config)
        key = (config.Br, config.Bc, config.d_pad, config.num_warps, config.blocks_per_sm)
        if key in listed:
            assert listed[key] < plain
            assert fast_bwd.min_blocks_per_sm(config, dropout=True) == listed[key]
        else:
            assert fast_bwd.min_blocks_per_sm(config, dropout=True) == plain


@pytest.mark.parametrize("bad, error", [({"dropout_p": 1.0}, ValueError), ({"dropout_p": -0.1}, ValueError),
                                        ({"dropout_p": True}, TypeError), ({"seed": -1}, ValueError),
                                        ({"seed": 2 ** 64}, ValueError), ({"seed": 1.5}, TypeError)])
def test_bad_dropout_arguments_are_refused(rng, bad, error):
    q, k, v, dout = attention_inputs(rng, 1, 8, 8, 1, 1, 16)
    with pytest.raises(error):
        fast_fwd.fa2_fast_forward(q, k, v, **({"dropout_p": P} | bad))
    out, L = (x.astype(np.float32) for x in reference.attention(q, k, v))
    with pytest.raises(error):
        fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, **({"dropout_p": P} | bad))
