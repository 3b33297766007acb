"""The register-tiled FA2 backward (fa2_fast_backward) against the float64 reference.

Simulator-sized: the shipped d_pad = 64 config is a 128-thread block with 32 x 32
tiles (d_pad = 32: 64 threads), so each (K/V tile, Q tile) pair costs a few hundred milliseconds here;
cases keep B * H * Tr * Tc small. Relative error <= 1e-5 for dq, dk and dv.

L and O come from the float64 reference (cast to float32), except in one case
that runs the fast forward first, as the benchmark does.
"""

import numpy as np
import pytest
from conftest import attention_inputs, rel_err

from flashnumba import geometry, reference
from flashnumba.kernels import common, smem_limit
from flashnumba.kernels import fa2_fast_backward as fast_bwd
from flashnumba.kernels import fa2_fast_forward as fast_fwd
from flashnumba.kernels.common import ConfigError, TileConfig

TOL = 1e-5


def _forward(q, k, v, causal, softmax_scale=None):
    out, L = reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return out.astype(np.float32), L.astype(np.float32)


def _check(grads, refs):
    for name, x, r in zip(("dq", "dk", "dv"), grads, refs):
        assert x.shape == r.shape, name
        assert x.dtype == np.float32, name
        assert not np.isnan(x).any(), name
        err = rel_err(x, r)
        assert err <= TOL, f"{name}: relative error {err:.2e}"


# (B, Nq, Nk, Hq, Hkv, d, causal): the awkward sizes. The shipped config for 32 < d <= 64 has
# Br = 32, Bc = 64; d = 40 runs that d_pad = 64 kernel with zero padding, d = 24 the d_pad = 32 one
# (Br = Bc = 32), d = 128 the d_pad = 128 one (Br = 16, Bc = 32), d = 200 and 256 the d_pad = 256
# one (Br = Bc = 16). A simulated launch costs about (tile pairs visited) x B x Hq: GQA is tested
# where the id says so (4:2 with B = 2 tests the head and batch indexing together).
CASES = [
    pytest.param(1, 64, 64, 1, 1, 64, False, id="N=64 multiple of the tile"),
    pytest.param(1, 50, 50, 1, 1, 64, True, id="N=50 not a multiple, causal"),
    pytest.param(1, 20, 20, 1, 1, 64, False, id="N=20 below the tile"),
    pytest.param(1, 24, 70, 1, 1, 64, True, id="Nq=24 < Nk=70 causal"),
    pytest.param(1, 70, 24, 1, 1, 40, True, id="Nq=70 > Nk=24 causal, 46 fully masked rows, d=40"),
    pytest.param(2, 20, 28, 4, 2, 40, False, id="d=40 (d_pad=64), B=2, GQA 4:2"),
    pytest.param(1, 40, 36, 1, 1, 24, True, id="d=24 (d_pad=32) causal"),
    pytest.param(1, 20, 20, 1, 1, 128, True, id="d=128 causal"),
    pytest.param(1, 10, 14, 2, 1, 256, True, id="d=256 (Br = Bc = 16) causal Nq < Nk, GQA 2:1"),
    pytest.param(1, 20, 17, 1, 1, 200, False, id="d=200 (d_pad=256) Nq > Nk, two tiles each way"),
    pytest.param(1, 100, 130, 1, 1, 64, True, id="Nq=100 Nk=130 causal: three K/V tiles, whole and edge Q tiles"),
]


@pytest.mark.parametrize("B, Nq, Nk, H_q, H_kv, d, causal", CASES)
def test_fast_backward_matches_reference(rng, B, Nq, Nk, H_q, H_kv, d, causal):
    q, k, v, dout = attention_inputs(rng, B, Nq, Nk, H_q, H_kv, d)
    out, L = _forward(q, k, v, causal)
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, causal=causal)
    _check(grads, reference.attention_backward(dout, q, k, v, causal=causal))


@pytest.mark.parametrize("Nq, Nk, d", [
    pytest.param(24, 70, 64, id="Nq=24 < Nk=70: keys past row 23 get dK = dV = 0"),
    pytest.param(70, 24, 40, id="Nq=70 > Nk=24, d=40"),
])
def test_top_left_causal(rng, Nq, Nk, d):
    """PyTorch's diagonal (key c visible to row r iff c <= r), with the reference's O and L."""
    q, k, v, dout = attention_inputs(rng, 1, Nq, Nk, 1, 1, d)
    out, L = reference.attention(q, k, v, causal=True, alignment=geometry.TOP_LEFT)
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out.astype(np.float32), L.astype(np.float32),
                                       causal=True, alignment=geometry.TOP_LEFT)
    _check(grads, reference.attention_backward(dout, q, k, v, causal=True, alignment=geometry.TOP_LEFT))
    if Nk > Nq:
        assert np.all(grads[1][0, Nq:] == 0.0) and np.all(grads[2][0, Nq:] == 0.0)


def test_fully_masked_rows_get_zero_dq(rng):
    """Nq > Nk under bottom-right causal: query rows r < Nq - Nk see no key (L = -inf); their dQ
    is exactly 0, and no NaN reaches dK or dV."""
    q, k, v, dout = attention_inputs(rng, 1, 40, 8, 1, 1, 64)
    out, L = _forward(q, k, v, causal=True)
    assert np.isneginf(L[0, 0, :32]).all()
    dq, dk, dv = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, causal=True)
    assert np.all(dq[0, :32] == 0.0)
    _check((dq, dk, dv), reference.attention_backward(dout, q, k, v, causal=True))


def test_after_the_fast_forward_with_softmax_scale(rng):
    """The benchmark's pipeline: fa2_fast_forward's O and L (natural log) feed the backward, here
    with the forward's fully masked rows (causal Nq > Nk: L = -inf, O = 0) in the d_pad = 32 kernels."""
    q, k, v, dout = attention_inputs(rng, 1, 45, 20, 1, 1, 32)
    out, L = fast_fwd.fa2_fast_forward(q, k, v, causal=True, softmax_scale=0.3)
    assert np.isneginf(L[0, 0, :25]).all() and np.isfinite(L[0, 0, 25:]).all()
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, causal=True, softmax_scale=0.3)
    assert np.all(grads[0][0, :25] == 0.0)
    _check(grads, reference.attention_backward(dout, q, k, v, causal=True, softmax_scale=0.3))


@pytest.mark.parametrize("config", [
    TileConfig(Br=16, Bc=32, d_pad=64, num_warps=2),
    TileConfig(Br=32, Bc=32, d_pad=64, num_warps=2),
    TileConfig(Br=32, Bc=32, d_pad=64, num_warps=4),          # 3 blocks per SM (the default runs 4)
    TileConfig(Br=32, Bc=64, d_pad=64, num_warps=4),          # 70 KB of shared memory
    TileConfig(Br=64, Bc=64, d_pad=64, num_warps=8, blocks_per_sm=2),
], ids=lambda c: f"Br={c.Br} Bc={c.Bc} w={c.num_warps} b={c.blocks_per_sm}")
def test_alternative_configs(rng, config):
    q, k, v, dout = attention_inputs(rng, 1, 40, 40, 1, 1, 64)
    out, L = _forward(q, k, v, causal=True)
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, causal=True, config=config)
    _check(grads, reference.attention_backward(dout, q, k, v, causal=True))


def _truncated_backward(dout, q, k, v, out, causal, Br, Bc, steps):
    """float64 gradients when K/V block j only visits Q tiles i in [start_j, start_j + steps):
    the pairs (i, j) outside that window contribute nothing to dQ, dK or dV."""
    _, Nq, _, d = q.shape
    Nk = k.shape[1]
    scale = 1.0 / np.sqrt(d)
    offset = Nk - Nq
    Q, K, V, dO, O = (np.moveaxis(x.astype(np.float64), 2, 1) for x in (q, k, v, dout, out))
    S = scale * Q @ np.swapaxes(K, -1, -2)
    if causal:
        S = np.where(reference.causal_mask(Nq, Nk), S, -np.inf)
    P = np.exp(S - S.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    D = (dO * O).sum(axis=-1, keepdims=True)
    dS = P * (dO @ np.swapaxes(V, -1, -2) - D)
    visited = np.zeros((Nq, Nk), dtype=bool)
    for j in range(geometry.num_tiles(Nk, Bc)):
        start = geometry.q_tile_start(j, Br, Bc, Nq, offset) if causal else 0
        visited[start * Br:(start + steps) * Br, j * Bc:(j + 1) * Bc] = True
    P, dS = np.where(visited, P, 0.0), np.where(visited, dS, 0.0)
    dQ = scale * dS @ K
    dK = scale * np.swapaxes(dS, -1, -2) @ Q
    dV = np.swapaxes(P, -1, -2) @ dO
    return tuple(np.moveaxis(x, 1, 2) for x in (dQ, dK, dV))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_limit_is_the_truncated_sum(rng, causal):
    """limit=1: each K/V block adds the gradients of its first visited Q tile only."""
    q, k, v, dout = attention_inputs(rng, 1, 64, 64, 1, 1, 64)
    out, L = _forward(q, k, v, causal)
    grads = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, causal=causal, limit=1)
    config = fast_bwd.default_config(64)            # the tiles decide which pairs are visited
    _check(grads, _truncated_backward(dout, q, k, v, out, causal, config.Br, config.Bc, 1))

    zeros = fast_bwd.fa2_fast_backward(dout, q, k, v, out, L, causal=causal, limit=0)
    assert all(np.all(x == 0.0) for x in zeros)


def test_device_arrays_and_relaunch(rng):
    """Device arrays in, device arrays out; launch() twice gives the same dq (it is zeroed
    inside launch, not only at allocation)."""
    q, k, v, dout = attention_inputs(rng, 1, 40, 24, 1, 1, 64)
    out, L = _forward(q, k, v, causal=False)
    arrays = common.Arrays(dout, q, k, v, out, L)
    on_device = [arrays.to_device(x) for x in (dout, q, k, v, out, L)]
    launch, dq, dk, dv = fast_bwd.launcher(*on_device)
    assert common.is_device_array(dq) and common.is_device_array(dk)
    launch()
    first = [x.copy_to_host() for x in (dq, dk, dv)]
    launch()
    second = [x.copy_to_host() for x in (dq, dk, dv)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    _check(second, reference.attention_backward(dout, q, k, v))


def test_configs_are_checked():
    for config in fast_bwd.shipped_configs():
        fast_bwd.check_config(config)
        assert fast_bwd.smem_bytes(config) <= smem_limit.MAX_BLOCK_BYTES
    assert ([fast_bwd.default_config(d).d_pad for d in (1, 32, 33, 64, 65, 128, 129, 200, 256)]
            == [32, 32, 64, 64, 128, 128, 256, 256, 256])
    with pytest.raises(ConfigError, match="bytes of shared memory per block"):
        fast_bwd.check_config(TileConfig(Br=128, Bc=128, d_pad=128, num_warps=32))
    with pytest.raises(ConfigError, match="would spill"):
        fast_bwd.check_config(TileConfig(Br=64, Bc=64, d_pad=64, num_warps=4))
    with pytest.raises(ConfigError, match="do not fit on one SM"):
        fast_bwd.check_config(TileConfig(Br=32, Bc=32, d_pad=64, num_warps=4, blocks_per_sm=6))
    with pytest.raises(ConfigError, match="even"):
        fast_bwd.check_config(TileConfig(Br=32, Bc=32, d_pad=64, num_warps=1))
    with pytest.raises(ConfigError, match="cannot serve"):
        fast_bwd.resolve_config(64, config=fast_bwd.default_config(32))
    with pytest.raises(ValueError, match=r"head dim d=257 is not supported: expected 1 <= d <= 256"):
        fast_bwd.default_config(257)


def test_wrong_inputs_are_rejected(rng):
    q, k, v, dout = attention_inputs(rng, 1, 8, 8, 1, 1, 16)
    out, L = _forward(q, k, v, causal=False)
    with pytest.raises(ValueError, match="L must have shape"):
        fast_bwd.fa2_fast_backward(dout, q, k, v, out, L[:, :, :4])
    with pytest.raises(TypeError, match="dout must be float32"):
        fast_bwd.fa2_fast_backward(dout.astype(np.float64), q, k, v, out, L)
