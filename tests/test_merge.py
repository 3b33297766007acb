"""flashnumba.merge: attention over disjoint key blocks, merged by log-sum-exp, equals attention
over all keys (float64 reference), with empty blocks, fully masked rows and NaN."""

import numpy as np
import pytest

from flashnumba import reference
from flashnumba.merge import merge, merge_pair


def _parts(q, k, v, cuts, causal=False):
    """(O_p, L_p) per key block [cuts[p], cuts[p+1]), in (Nq, d) and (Nq,) for one head."""
    Nq, Nk = q.shape[1], k.shape[1]
    O_parts, L_parts = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        mask = np.zeros((Nq, Nk), dtype=bool)
        mask[:, a:b] = True
        if causal:
            mask &= np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + Nk - Nq
        S = (q[0, :, 0] @ k[0, :, 0].T) / np.sqrt(q.shape[-1])
        S = np.where(mask, S, -np.inf)
        m = S.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        P = np.exp(S - m)
        l = P.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            O_parts.append(np.where(l[:, None] > 0, (P @ v[0, :, 0]) / l[:, None], 0.0))
            L_parts.append(np.log(l) + m[:, 0])
    return O_parts, L_parts


@pytest.mark.parametrize("cuts,causal", [((0, 7, 20, 33), False), ((0, 0, 33), False),
                                         ((0, 5, 6, 33), True), ((0, 16, 33), True)])
def test_merge_equals_attention_over_all_keys(cuts, causal):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 40, 1, 8))               # Nq > Nk: causal rows 0..6 see no key
    k, v = rng.standard_normal((2, 1, 33, 1, 8))
    O_ref, L_ref = reference.attention(q, k, v, causal=causal)
    O, L = merge(*_parts(q, k, v, cuts, causal))
    np.testing.assert_allclose(O, O_ref[0, :, 0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_ref[0, 0]))
    finite = np.isfinite(L_ref[0, 0])
    np.testing.assert_allclose(L[finite], L_ref[0, 0][finite], rtol=1e-13)
    if causal:
        assert np.isneginf(L).sum() == 7 and not np.any(O[np.isneginf(L)])


def test_merge_pair_nan_and_empty_parts():
    O_a, L_a = np.array([[1.0, 2.0], [np.nan, np.nan]]), np.array([0.0, -np.inf])
    O_b, L_b = np.array([[3.0, 4.0], [5.0, 6.0]]), np.array([np.nan, 1.0])
    O, L = merge_pair(O_a, L_a, O_b, L_b)
    assert np.isnan(L[0]) and np.all(np.isnan(O[0]))            # a NaN L_p poisons its row
    assert L[1] == 1.0 and np.array_equal(O[1], [5.0, 6.0])     # an empty part (its NaN O too) is ignored


def test_merge_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    O_parts = [rng.standard_normal((3, 5, 4)) for _ in range(3)]
    L_parts = [rng.standard_normal((3, 5)) for _ in range(3)]
    L_parts[1][0, 0] = -np.inf
    O_np, L_np = merge(O_parts, L_parts)
    O_t, L_t = merge([torch.from_numpy(x) for x in O_parts], [torch.from_numpy(x) for x in L_parts])
    # float64 throughout; torch's exp and log may differ from NumPy's by a few ulps (2.2e-16 each)
    np.testing.assert_allclose(O_t.numpy(), O_np, rtol=1e-14, atol=0)
    np.testing.assert_allclose(L_t.numpy(), L_np, rtol=1e-14, atol=0)


def test_merge_bad_input():
    with pytest.raises(ValueError, match="L_p.shape"):
        merge([np.zeros((3, 4))], [np.zeros(4)])
    with pytest.raises(ValueError, match="as many outputs"):
        merge([], [])
