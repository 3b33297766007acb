"""The NumPy mirrors against the float64 reference: outputs, log-sum-exp and gradients.

Every mirror runs tile by tile; the reference forms the whole score matrix. They
must agree to 1e-12 (relative) in float64 on awkward shapes: N a multiple of the
block and not, N smaller than a block, Nq != Nk both ways, odd head dims, causal
masks that leave rows with no visible key, and dropout.
"""

import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from flashnumba import reference as ref
from flashnumba import registry
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT
from flashnumba.mirror import (
    fa1_backward,
    fa1_forward,
    fa2_backward,
    fa2_forward,
    standard_backward,
    standard_forward,
)

TOL = 1e-12
ALGORITHMS = tuple(a.name for a in registry.ALGORITHMS)


def lse_from(m, l):
    """FA1 keeps m and l; the log-sum-exp is L = m + log(l) (-inf where l = 0)."""
    with np.errstate(divide="ignore"):
        return np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf)


def mirror_forward(algorithm, Q, K, V, **options):
    """(O, L) from one mirror (L is None for standard attention, which keeps P instead)."""
    if algorithm == "fa1":
        O, l, m = fa1_forward(Q, K, V, **options)
        return O, lse_from(m, l)
    if algorithm == "fa2":
        return fa2_forward(Q, K, V, **options)
    options = {k: v for k, v in options.items() if k not in ("Br", "Bc", "M")}
    O, _ = standard_forward(Q, K, V, **options)
    return O, None


def mirror_backward(algorithm, dO, Q, K, V, **options):
    """(dQ, dK, dV) from one mirror, after its own forward."""
    if algorithm == "fa1":
        O, l, m = fa1_forward(Q, K, V, **options)
        return fa1_backward(dO, Q, K, V, O, l, m, **options)
    if algorithm == "fa2":
        O, L = fa2_forward(Q, K, V, **options)
        return fa2_backward(dO, Q, K, V, O, L, **options)
    options = {k: v for k, v in options.items() if k not in ("Br", "Bc", "M")}
    _, P = standard_forward(Q, K, V, **options)
    return standard_backward(dO, Q, K, V, P, **options)


def reference(Q, K, V, dO, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
              keep=None, dropout_p=0.0, **_tiles):
    """One head through flashnumba.reference: (O, L, dQ, dK, dV)."""
    head = lambda X: X[None, :, None, :]                   # (N, d) -> (1, N, 1, d)
    options = dict(causal=causal, alignment=alignment, softmax_scale=softmax_scale,
                   dropout_p=dropout_p, dropout_mask=None if keep is None else keep[None, None])
    out, lse = ref.attention(head(Q), head(K), head(V), **options)
    dq, dk, dv = ref.attention_backward(head(dO), head(Q), head(K), head(V), **options)
    return out[0, :, 0], lse[0, 0], dq[0, :, 0], dk[0, :, 0], dv[0, :, 0]


def assert_lse_equal(L, L_ref):
    np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_ref))
    assert not np.isnan(L).any()
    finite = np.isfinite(L_ref)
    assert rel_err(L[finite], L_ref[finite]) <= TOL


def problem(rng, Nq, Nk, d, dropout):
    Q, K, V, dO = (rng.standard_normal((N, d)) for N in (Nq, Nk, Nk, Nq))
    keep = rng.random((Nq, Nk)) >= 0.3 if dropout else None
    return Q, K, V, dO, dict(keep=keep, dropout_p=0.3 if dropout else 0.0)


SHAPES = [  # Nq, Nk, d, tiles
    pytest.param(64, 64, 16, dict(Br=16, Bc=16), id="N-multiple-of-block"),
    pytest.param(50, 50, 8, dict(Br=16, Bc=16), id="N-not-multiple"),
    pytest.param(5, 7, 8, dict(Br=16, Bc=16), id="N-below-one-block"),
    pytest.param(20, 47, 8, dict(Br=8, Bc=16), id="Nq<Nk"),
    pytest.param(47, 20, 8, dict(Br=8, Bc=16), id="Nq>Nk"),
    pytest.param(33, 29, 59, dict(Br=16, Bc=8), id="d59-small-tiles"),
] + [
    pytest.param(40, 33, d, {}, id=f"d{d}-default-M") for d in (1, 2, 40, 59, 64, 128)
] + [
    pytest.param(24, 40, 16, dict(M=256), id="M256"),     # Bc = 4, Br = 4
]

MASKS = [
    pytest.param(dict(causal=False), id="full"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(causal=True, alignment=TOP_LEFT), id="causal-top-left"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("Nq, Nk, d, tiles", SHAPES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
def test_forward_matches_reference(rng, algorithm, Nq, Nk, d, tiles, mask, dropout):
    Q, K, V, dO, drop = problem(rng, Nq, Nk, d, dropout)
    options = dict(tiles, **mask, **drop)
    O, L = mirror_forward(algorithm, Q, K, V, **options)
    O_ref, L_ref, *_ = reference(Q, K, V, dO, **options)
    assert O.dtype == np.float64 and O.shape == (Nq, d)
    assert rel_err(O, O_ref) <= TOL
    if L is not None:
        assert_lse_equal(L, L_ref)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("Nq, Nk, d, tiles", SHAPES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
def test_backward_matches_reference(rng, algorithm, Nq, Nk, d, tiles, mask, dropout):
    Q, K, V, dO, drop = problem(rng, Nq, Nk, d, dropout)
    options = dict(tiles, **mask, **drop)
    grads = mirror_backward(algorithm, dO, Q, K, V, **options)
    _, _, *grads_ref = reference(Q, K, V, dO, **options)
    for name, g, g_ref in zip(("dQ", "dK", "dV"), grads, grads_ref):
        assert g.shape == g_ref.shape
        assert rel_err(g, g_ref) <= TOL, name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_softmax_scale_is_used(rng, algorithm):
    Q, K, V, dO, _ = problem(rng, 9, 11, 5, dropout=False)
    options = dict(Br=4, Bc=4, causal=True, softmax_scale=2.5)
    O, _ = mirror_forward(algorithm, Q, K, V, **options)
    O_ref, *_ = reference(Q, K, V, dO, **options)
    O_default, *_ = reference(Q, K, V, dO, causal=True)
    assert rel_err(O, O_ref) <= TOL
    assert rel_err(O, O_default) > 1e-3


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
def test_fully_masked_rows(rng, algorithm, dropout):
    # bottom-right causal, Nq = 21 > Nk = 6: rows r < 15 see no key at all
    Nq, Nk = 21, 6
    Q, K, V, dO, drop = problem(rng, Nq, Nk, 4, dropout)
    options = dict(Br=4, Bc=4, causal=True, **drop)
    masked = np.arange(Nq) < Nq - Nk
    O, L = mirror_forward(algorithm, Q, K, V, **options)
    dQ, dK, dV = mirror_backward(algorithm, dO, Q, K, V, **options)
    for x in (O, dQ, dK, dV):
        assert not np.isnan(x).any()
    assert (O[masked] == 0).all() and (dQ[masked] == 0).all()
    assert (O[~masked] != 0).any()
    if L is not None:
        assert np.isneginf(L[masked]).all() and np.isfinite(L[~masked]).all()
    if algorithm == "fa1":
        _, l, m = fa1_forward(Q, K, V, **options)
        assert (l[masked] == 0).all() and np.isneginf(m[masked]).all()


@pytest.mark.parametrize("algorithm", ("fa1", "fa2"))
def test_float32_inputs_compute_in_float32(rng, algorithm):
    Q, K, V, dO, _ = problem(rng, 30, 37, 16, dropout=False)
    f32 = [X.astype(np.float32) for X in (Q, K, V, dO)]
    O, L = mirror_forward(algorithm, *f32[:3], Br=8, Bc=16, causal=True)
    dQ, dK, dV = mirror_backward(algorithm, f32[3], *f32[:3], Br=8, Bc=16, causal=True)
    O_ref, L_ref, *grads_ref = reference(*[X.astype(np.float64) for X in f32[:3]],
                                         f32[3].astype(np.float64), causal=True)
    assert O.dtype == np.float32 and dQ.dtype == np.float32
    assert rel_err(O, O_ref) <= 1e-5 and rel_err(L, L_ref) <= 1e-5
    for g, g_ref in zip((dQ, dK, dV), grads_ref):
        assert rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("algorithm", ("fa1", "fa2"))
def test_bad_arguments_are_refused(rng, algorithm):
    Q, K, V, _, _ = problem(rng, 4, 5, 3, dropout=False)
    with pytest.raises(ValueError, match="keep"):
        mirror_forward(algorithm, Q, K, V, dropout_p=0.2)
    with pytest.raises(ValueError, match="keep must have shape"):
        mirror_forward(algorithm, Q, K, V, keep=np.ones((5, 4), bool))
    with pytest.raises(ValueError, match="head dim"):
        mirror_forward(algorithm, Q, K[:, :2], V[:, :2])
    with pytest.raises(ValueError, match="limit"):
        mirror_forward(algorithm, Q, K, V, limit=-1)


@settings(deadline=None, max_examples=60)
@given(algorithm=st.sampled_from(ALGORITHMS),
       Nq=st.integers(1, 24), Nk=st.integers(1, 24), d=st.integers(1, 12),
       Br=st.integers(1, 12), Bc=st.integers(1, 12),
       mask=st.sampled_from([dict(causal=False), dict(causal=True),
                             dict(causal=True, alignment=TOP_LEFT)]),
       dropout=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_shapes_match_reference(algorithm, Nq, Nk, d, Br, Bc, mask, dropout, seed):
    rng = np.random.default_rng(seed)
    Q, K, V, dO, drop = problem(rng, Nq, Nk, d, dropout)
    options = dict(Br=Br, Bc=Bc, **mask, **drop)
    O, L = mirror_forward(algorithm, Q, K, V, **options)
    grads = mirror_backward(algorithm, dO, Q, K, V, **options)
    O_ref, L_ref, *grads_ref = reference(Q, K, V, dO, **options)
    assert rel_err(O, O_ref) <= TOL
    if L is not None:
        assert_lse_equal(L, L_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) <= TOL
