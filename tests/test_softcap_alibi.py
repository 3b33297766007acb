"""Softcap (S -> softcap tanh(S / softcap)) and ALiBi (S -= slope |r + Nk - Nq - c|): the
reference against finite differences, the FA2 mirror and the fast kernels against the reference."""

import numpy as np
import pytest
from conftest import attention_inputs, check_forward, rel_err

import flashnumba
from flashnumba import reference
from flashnumba.mirror import fa2_backward, fa2_forward

TOL = 1e-5


def test_reference_gradients_match_finite_differences(rng):
    q, k, v, dout = (x.astype(np.float64) for x in attention_inputs(rng, 2, 5, 7, 4, 2, 3))
    options = dict(window_size=(2, 1), softcap=1.5, alibi_slopes=rng.random((2, 4)))
    grads = reference.attention_backward(dout, q, k, v, **options)

    def loss(*qkv):
        return (reference.attention(*qkv, **options)[0] * dout).sum()

    eps = 1e-6
    for which, index in ((0, (1, 2, 1, 0)), (1, (1, 3, 1, 2)), (2, (0, 4, 0, 1))):
        plus, minus = [q, k, v], [q, k, v]
        plus[which], minus[which] = plus[which].copy(), minus[which].copy()
        plus[which][index] += eps
        minus[which][index] -= eps
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert abs(numeric - grads[which][index]) < 1e-7


def test_softcap_bounds_the_scores(rng):
    """With a softcap of c, every score lies in (-c, c): huge logits give a softmax no sharper
    than exp(2c) between the largest and smallest."""
    q, k, v, _ = attention_inputs(rng, 1, 4, 6, 1, 1, 8)
    P, _, _, _ = reference._probabilities(100 * q, k, False, None, "bottom-right", softcap=1.0)
    assert (P.max(axis=-1) / P.min(axis=-1)).max() <= np.exp(2.0) + 1e-9     # within each row


def test_alibi_slope_of_zero_changes_nothing(rng):
    q, k, v, _ = attention_inputs(rng, 1, 5, 5, 2, 2, 4)
    biased, _ = reference.attention(q, k, v, alibi_slopes=np.zeros(2, np.float32))
    assert np.allclose(biased, reference.attention(q, k, v)[0])


def test_mirror_matches_reference(rng):
    Q, K, V, dO = (x[0, :, 0].astype(np.float64) for x in attention_inputs(rng, 1, 21, 30, 1, 1, 5))
    options = dict(causal=True, softcap=2.0)
    O, L = fa2_forward(Q, K, V, Br=8, Bc=8, alibi_slope=0.3, **options)
    batched = [x[None, :, None] for x in (dO, Q, K, V)]
    ref_O, _ = reference.attention(*batched[1:], alibi_slopes=[0.3], **options)
    assert np.allclose(O, ref_O[0, :, 0], atol=1e-12)
    grads = fa2_backward(dO, Q, K, V, O, L, Br=8, Bc=8, alibi_slope=0.3, **options)
    for g, r in zip(grads, reference.attention_backward(*batched, alibi_slopes=[0.3], **options)):
        assert np.allclose(g, r[0, :, 0], atol=1e-12)


# (B, Nq, Nk, Hq, Hkv, d, causal, window, softcap, per-batch slopes)
CASES = [
    pytest.param(1, 20, 13, 2, 1, 8, True, (-1, -1), 1.5, False, id="Nq>Nk causal, softcap, GQA"),
    pytest.param(2, 9, 40, 2, 2, 12, False, (6, 2), 0.0, True, id="B=2 (B, H) slopes, window"),
    pytest.param(1, 33, 33, 1, 1, 8, False, (-1, -1), 0.7, True, id="softcap and ALiBi together"),
    pytest.param(1, 20, 24, 1, 1, 200, False, (9, 4), 1.5, False, id="d=200 (fa2_fast only): window, softcap, ALiBi"),
]


@pytest.mark.parametrize("B, Nq, Nk, Hq, Hkv, d, causal, window_size, softcap, per_batch", CASES)
def test_fast_kernels_match_reference(rng, B, Nq, Nk, Hq, Hkv, d, causal, window_size, softcap,
                                      per_batch):
    q, k, v, dout = attention_inputs(rng, B, Nq, Nk, Hq, Hkv, d)
    slopes = (rng.random((B, Hq) if per_batch else Hq) * 0.5).astype(np.float32)
    options = dict(causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=slopes)
    out, lse = flashnumba.flash_attn_func(q, k, v, return_attn_probs=True, **options)[:2]
    ref_out, ref_lse = reference.attention(q, k, v, **options)
    check_forward(out, lse, ref_out, ref_lse)
    grads = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, **options)
    for g, r in zip(grads, reference.attention_backward(dout, q, k, v, **options)):
        assert rel_err(g, r) <= TOL


@pytest.mark.parametrize("options, error, match", [
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    (dict(softcap="big"), TypeError, "softcap must be a number"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"alibi_slopes must have shape \(2,\)"),
    (dict(alibi_slopes=np.ones(2)), TypeError, "alibi_slopes must be float32"),
    (dict(softcap=1.0, algorithm="fa1"), ValueError, "algorithm='fa1' does not implement softcap"),
])
def test_bad_options_are_refused(rng, options, error, match):
    q, k, v, _ = attention_inputs(rng, 1, 4, 4, 2, 1, 4)
    with pytest.raises(error, match=match):
        flashnumba.flash_attn_func(q, k, v, **options)


def test_slopes_of_one_sequence_have_canonical_strides():
    """(H,) slopes broadcast to B = 1 keep NumPy's stride 0 on the length-1 axis unless copied; a
    device array with that stride is not C-contiguous to numba (a second compiled overload)."""
    from flashnumba.geometry import BOTTOM_RIGHT
    from flashnumba.kernels import common
    _, slopes = common.resolve_features_host(0.0, [0.5, 0.25], 1, 2, BOTTOM_RIGHT)
    assert slopes.strides == (8, 4) and slopes.flags.c_contiguous
