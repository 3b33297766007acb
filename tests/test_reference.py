"""The float64 reference against first principles: a per-row loop and finite differences.

Everything else in flashnumba is checked against flashnumba.reference, so the
reference itself is checked against code too simple to be wrong.
"""

import math

import numpy as np
import pytest

from flashnumba import reference as ref
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT


def loop_attention(q, k, v, causal=False, softmax_scale=None, dropout_p=0.0, dropout_mask=None,
                   alignment=BOTTOM_RIGHT):
    """out, lse one query row at a time, straight from the definition."""
    B, Nq, Hq, d = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    offset = Nk - Nq if alignment == BOTTOM_RIGHT else 0
    out = np.zeros((B, Nq, Hq, d))
    lse = np.full((B, Hq, Nq), -np.inf)
    for b in range(B):
        for h in range(Hq):
            h_kv = h // (Hq // Hkv)                        # grouped-query attention
            for r in range(Nq):
                keys = [c for c in range(Nk) if not causal or c <= r + offset]
                if not keys:
                    continue                                # no visible key: out 0, lse -inf
                s = [scale * float(np.dot(q[b, r, h], k[b, c, h_kv])) for c in keys]
                s_max = max(s)
                e = [math.exp(x - s_max) for x in s]
                total = sum(e)
                lse[b, h, r] = s_max + math.log(total)
                for c, e_c in zip(keys, e):
                    p = e_c / total
                    if dropout_mask is not None:
                        p = p * dropout_mask[b, h, r, c] / (1.0 - dropout_p)
                    out[b, r, h] += p * v[b, c, h_kv]
    return out, lse


def random_problem(rng, B, Nq, Nk, Hq, Hkv, d, dropout):
    q = rng.standard_normal((B, Nq, Hq, d))
    k = rng.standard_normal((B, Nk, Hkv, d))
    v = rng.standard_normal((B, Nk, Hkv, d))
    p = 0.3 if dropout else 0.0
    mask = rng.random((B, Hq, Nq, Nk)) >= p if dropout else None
    return q, k, v, p, mask


CASES = [  # B, Nq, Nk, Hq, Hkv, d
    pytest.param(1, 5, 5, 1, 1, 4, id="square"),
    pytest.param(2, 3, 7, 4, 2, 5, id="gqa-Nq<Nk"),
    pytest.param(1, 7, 3, 4, 2, 3, id="gqa-Nq>Nk"),
    pytest.param(1, 1, 1, 2, 1, 1, id="tiny"),
]


@pytest.mark.parametrize("B, Nq, Nk, Hq, Hkv, d", CASES)
@pytest.mark.parametrize("causal, alignment", [(False, BOTTOM_RIGHT), (True, BOTTOM_RIGHT),
                                               (True, TOP_LEFT)])
@pytest.mark.parametrize("dropout", [False, True])
def test_forward_matches_row_loop(rng, B, Nq, Nk, Hq, Hkv, d, causal, alignment, dropout):
    q, k, v, p, mask = random_problem(rng, B, Nq, Nk, Hq, Hkv, d, dropout)
    out, lse = ref.attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=mask,
                             alignment=alignment, softmax_scale=0.7)
    out_loop, lse_loop = loop_attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=mask,
                                        alignment=alignment, softmax_scale=0.7)
    np.testing.assert_allclose(out, out_loop, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_loop))
    finite = np.isfinite(lse_loop)
    np.testing.assert_allclose(lse[finite], lse_loop[finite], rtol=1e-12, atol=1e-13)


def central_differences(f, x, h=1e-6):
    """df/dx for scalar f, one entry of x at a time: (f(x + h) - f(x - h)) / 2h."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + h
        f_plus = f()
        x[index] = saved - h
        f_minus = f()
        x[index] = saved
        grad[index] = (f_plus - f_minus) / (2 * h)
    return grad


@pytest.mark.parametrize("B, Nq, Nk, Hq, Hkv, d", [
    pytest.param(1, 4, 5, 4, 2, 3, id="gqa-Nq<Nk"),
    pytest.param(1, 5, 3, 4, 2, 2, id="gqa-Nq>Nk"),
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_backward_matches_finite_differences(rng, B, Nq, Nk, Hq, Hkv, d, causal, dropout):
    q, k, v, p, mask = random_problem(rng, B, Nq, Nk, Hq, Hkv, d, dropout)
    G = rng.standard_normal(q.shape)                       # loss = sum(out * G), so dout = G
    options = dict(causal=causal, dropout_p=p, dropout_mask=mask)

    def loss():
        return float((ref.attention(q, k, v, **options)[0] * G).sum())

    dq, dk, dv = ref.attention_backward(G, q, k, v, **options)
    for x, dx in ((q, dq), (k, dk), (v, dv)):
        numeric = central_differences(loss, x)
        assert np.linalg.norm(dx - numeric) <= 1e-7 * max(np.linalg.norm(numeric), 1.0)


@pytest.mark.parametrize("alignment, Nq, Nk", [(BOTTOM_RIGHT, 7, 3), (TOP_LEFT, 3, 3)])
def test_fully_masked_rows_give_zero_and_minus_inf(rng, alignment, Nq, Nk):
    # bottom-right, Nq > Nk: query r sees keys c <= r - (Nq - Nk), none for r < Nq - Nk.
    # top-left: every row sees key 0, so no row is fully masked.
    q, k, v, _, _ = random_problem(rng, 1, Nq, Nk, 2, 1, 4, dropout=False)
    out, lse = ref.attention(q, k, v, causal=True, alignment=alignment)
    dq, dk, dv = ref.attention_backward(np.ones_like(q), q, k, v, causal=True, alignment=alignment)
    masked = ~ref.causal_mask(Nq, Nk, alignment).any(axis=1)
    assert masked.sum() == (Nq - Nk if alignment == BOTTOM_RIGHT else 0)
    for x in (out, dq, dk, dv):
        assert not np.isnan(x).any()
    assert (out[:, masked] == 0).all()
    assert np.isneginf(lse[..., masked]).all()
    assert np.isfinite(lse[..., ~masked]).all()
    assert (dq[:, masked] == 0).all()


def test_dropout_scales_kept_probabilities(rng):
    q, k, v, _, _ = random_problem(rng, 1, 4, 6, 2, 2, 3, dropout=False)
    out, lse = ref.attention(q, k, v)
    keep_all = np.ones((1, 2, 4, 6), dtype=bool)
    out_kept, lse_kept = ref.attention(q, k, v, dropout_p=0.25, dropout_mask=keep_all)
    np.testing.assert_allclose(out_kept, out / 0.75, rtol=1e-14)
    np.testing.assert_array_equal(lse_kept, lse)             # lse is of the undropped softmax
    out_none, _ = ref.attention(q, k, v, dropout_p=0.25, dropout_mask=~keep_all)
    assert (out_none == 0).all()

    # dropping one key of one row = removing its weighted value, scaled by 1/(1-p)
    keep = keep_all.copy()
    keep[0, 1, 2, 3] = False
    out_one, _ = ref.attention(q, k, v, dropout_p=0.5, dropout_mask=keep)
    P, _, _, _ = ref._probabilities(q, k, False, None, BOTTOM_RIGHT)
    expected = out[0, 2, 1] / 0.5 - P[0, 1, 2, 3] * v[0, 3, 1] / 0.5
    np.testing.assert_allclose(out_one[0, 2, 1], expected, rtol=1e-13)


def test_dropout_needs_a_mask(rng):
    q, k, v, _, _ = random_problem(rng, 1, 2, 2, 1, 1, 2, dropout=False)
    with pytest.raises(ValueError, match="dropout_mask"):
        ref.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        ref.attention(q, k, v, dropout_p=1.0, dropout_mask=np.ones((1, 1, 2, 2), bool))
