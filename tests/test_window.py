"""Sliding windows (flash-attn's window_size): the geometry's band, the reference, the FA2 mirror
(steps and HBM counts) and the fast kernels, forward and backward, at awkward sizes.

Query r sees key c when r + Nk - Nq - left <= c <= r + Nk - Nq + right (-1: unbounded).
"""

import numpy as np
import pytest
from conftest import attention_inputs, check_forward, rel_err

import flashnumba
from flashnumba import geometry, reference
from flashnumba.hbm import HBM
from flashnumba.mirror import fa2_backward, fa2_forward

TOL = 1e-5


def brute_band(Nq, Nk, causal, window_size):
    """The visible pairs, written out from flash-attn's definition."""
    left, right = window_size
    if causal:
        right = 0
    visible = np.zeros((Nq, Nk), dtype=bool)
    for r in range(Nq):
        for c in range(Nk):
            centre = r + Nk - Nq
            visible[r, c] = (left < 0 or c >= centre - left) and (right < 0 or c <= centre + right)
    return visible


BANDS = [(37, 53, False, (5, 3)), (53, 37, False, (0, 0)), (40, 40, True, (7, -1)),
         (40, 40, False, (-1, 2)), (9, 70, False, (3, 3)), (20, 20, False, (100, 100)),
         (30, 12, True, (2, 5))]


@pytest.mark.parametrize("Nq, Nk, causal, window_size", BANDS)
def test_band_mask_and_tiles(Nq, Nk, causal, window_size):
    visible = brute_band(Nq, Nk, causal, window_size)
    assert np.array_equal(reference.window_mask(Nq, Nk, causal, window_size), visible)
    t = geometry.Tiling(Nq, Nk, 8, 8, causal=causal, window_size=window_size)
    for i in range(t.Tr):
        for j in range(t.Tc):
            tile = visible[t.rows(i), t.cols(j)]
            kind = t.kind(i, j)
            expected = geometry.SKIPPED if not tile.any() else (
                geometry.FULL if tile.all() else geometry.PARTIAL)
            assert kind == expected, (i, j, kind, expected)
            assert (j in t.kv_range(i)) == tile.any()
            assert (i in t.q_range(j)) == tile.any()
            if kind == geometry.PARTIAL:
                assert np.array_equal(t.mask(i, j), tile)


def test_window_wider_than_the_sequence_hides_nothing(rng):
    q, k, v, _ = attention_inputs(rng, 1, 9, 9, 1, 1, 4)
    wide, _ = reference.attention(q, k, v, window_size=(50, 50))
    full, _ = reference.attention(q, k, v)
    assert np.allclose(wide, full)


@pytest.mark.parametrize("Nq, Nk, causal, window_size", BANDS[:5])
def test_mirror_matches_reference(rng, Nq, Nk, causal, window_size):
    Q, K, V, dO = (x[0, :, 0] for x in attention_inputs(rng, 1, Nq, Nk, 1, 1, 5))
    Q, K, V, dO = (x.astype(np.float64) for x in (Q, K, V, dO))
    O, L = fa2_forward(Q, K, V, Br=8, Bc=8, causal=causal, window_size=window_size)
    ref_O, ref_L = reference.attention(*(x[None, :, None] for x in (Q, K, V)), causal=causal,
                                       window_size=window_size)
    assert np.allclose(O, ref_O[0, :, 0], atol=1e-12)
    assert np.array_equal(np.isneginf(L), np.isneginf(ref_L[0, 0]))
    grads = fa2_backward(dO, Q, K, V, O, L, Br=8, Bc=8, causal=causal, window_size=window_size)
    ref_grads = reference.attention_backward(*(x[None, :, None] for x in (dO, Q, K, V)), causal=causal,
                                             window_size=window_size)
    for g, r in zip(grads, ref_grads):
        assert np.allclose(g, r[0, :, 0], atol=1e-12)


def test_mirror_reads_O_of_N_w_keys(rng):
    """A window of w keys reads K and V about N (w + Bc) times, not N^2 / Br."""
    N, d, Br, w = 256, 4, 16, 16
    Q, K, V = (rng.standard_normal((N, d)) for _ in range(3))
    windowed, full = HBM(), HBM()
    fa2_forward(Q, K, V, Br=Br, Bc=Br, window_size=(w, 0), hbm=windowed)
    fa2_forward(Q, K, V, Br=Br, Bc=Br, hbm=full)
    assert full.reads["K"] == N * d * (N // Br)
    # w = Br: Q tile i reads K tiles i - 1 and i (tile 0 only itself)
    assert windowed.reads["K"] == (2 * (N // Br) - 1) * Br * d
    assert windowed.reads["K"] < full.reads["K"] / 7


# the fast kernels: a window narrower than a tile, one wider, Nq != Nk both ways, GQA
KERNEL_CASES = [
    pytest.param(1, 37, 83, 2, 1, 8, False, (5, 3), id="Nq<Nk window narrower than a tile, GQA"),
    pytest.param(1, 45, 30, 1, 1, 20, True, (40, -1), id="Nq>Nk causal + left window, rows see nothing"),
]


@pytest.mark.parametrize("B, Nq, Nk, Hq, Hkv, d, causal, window_size", KERNEL_CASES)
def test_fast_kernels_match_reference(rng, B, Nq, Nk, Hq, Hkv, d, causal, window_size):
    q, k, v, dout = attention_inputs(rng, B, Nq, Nk, Hq, Hkv, d)
    out, lse = flashnumba.flash_attn_func(q, k, v, causal=causal, window_size=window_size,
                                          return_attn_probs=True)[:2]
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal, window_size=window_size)
    check_forward(out, lse, ref_out, ref_lse)
    grads = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, causal=causal,
                                           window_size=window_size)
    for g, r in zip(grads, reference.attention_backward(dout, q, k, v, causal=causal,
                                                        window_size=window_size)):
        assert rel_err(g, r) <= TOL


@pytest.mark.parametrize("window_size, error, match", [
    ((-2, 3), ValueError, "window_size left must be -1"),
    ((3, 1.5), TypeError, "window_size right must be an integer"),
    (4, TypeError, "window_size must be a pair"),
])
def test_bad_window_is_refused(rng, window_size, error, match):
    q, k, v, _ = attention_inputs(rng, 1, 4, 4, 1, 1, 4)
    with pytest.raises(error, match=match):
        flashnumba.flash_attn_func(q, k, v, window_size=window_size)


def test_readable_kernel_refuses_a_window_naming_the_algorithm(rng):
    q, k, v, _ = attention_inputs(rng, 1, 4, 4, 1, 1, 4)
    with pytest.raises(ValueError, match="algorithm='fa2' does not implement window_size"):
        flashnumba.flash_attn_func(q, k, v, window_size=(1, 1), algorithm="fa2")
