"""The steppable mirrors: one record per visited tile, in the algorithm's loop order,
with a state that ends at the output, and `limit` matching a hand-truncated computation.
"""

import numpy as np
import pytest
from conftest import rel_err

from flashnumba import registry
from flashnumba.geometry import FULL, PARTIAL, SKIPPED, TOP_LEFT, Tiling, causal_offset
from flashnumba.hbm import HBM
from flashnumba.mirror import (
    Step,
    fa1_backward,
    fa1_backward_steps,
    fa1_forward,
    fa1_forward_steps,
    fa2_backward,
    fa2_backward_steps,
    fa2_forward,
    fa2_forward_steps,
    nth,
    run,
    standard_backward_steps,
    standard_forward,
    standard_forward_steps,
)

TOL = 1e-12


def problem(rng, Nq, Nk, d=4):
    return [rng.standard_normal((N, d)) for N in (Nq, Nk, Nk, Nq)]      # Q, K, V, dO


def steps_of(algorithm, Q, K, V, dO, **options):
    """The steps generator of `algorithm`, with the forward a backward needs already run."""
    if algorithm == "fa1_forward":
        return fa1_forward_steps(Q, K, V, **options)
    if algorithm == "fa2_forward":
        return fa2_forward_steps(Q, K, V, **options)
    forward_options = {k: v for k, v in options.items() if k not in ("limit", "hbm")}
    if algorithm == "fa1_backward":
        O, l, m = fa1_forward(Q, K, V, **forward_options)
        return fa1_backward_steps(dO, Q, K, V, O, l, m, **options)
    O, L = fa2_forward(Q, K, V, **forward_options)
    return fa2_backward_steps(dO, Q, K, V, O, L, **options)


def loop_order(algorithm, t):
    """The visited tiles (i, j) in loop order, from tile kinds alone: FA2 forward is
    Q-tile-outer, the other three are K/V-tile-outer."""
    visited = lambda i, j: t.kind(i, j) != SKIPPED
    if algorithm == "fa2_forward":
        return [(i, j) for i in range(t.Tr) for j in range(t.Tc) if visited(i, j)]
    return [(i, j) for j in range(t.Tc) for i in range(t.Tr) if visited(i, j)]


ALGORITHMS = registry.mirrors()
GEOMETRIES = [  # Nq, Nk, Br, Bc, causal, alignment
    pytest.param(13, 13, 4, 4, False, "bottom-right", id="square"),
    pytest.param(13, 13, 4, 4, True, "bottom-right", id="causal-square"),
    pytest.param(9, 23, 4, 3, True, "bottom-right", id="causal-Nq<Nk"),
    pytest.param(23, 9, 3, 4, True, "bottom-right", id="causal-Nq>Nk"),
    pytest.param(9, 23, 4, 3, True, TOP_LEFT, id="causal-top-left-Nq<Nk"),
    pytest.param(23, 9, 2, 4, True, TOP_LEFT, id="causal-top-left-Nq>Nk"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal, alignment", GEOMETRIES)
def test_one_record_per_visited_tile_in_loop_order(rng, algorithm, Nq, Nk, Br, Bc, causal,
                                                   alignment):
    t = Tiling(Nq, Nk, Br, Bc, causal=causal, alignment=alignment)
    records, _ = run(steps_of(algorithm, *problem(rng, Nq, Nk), Br=Br, Bc=Bc, causal=causal,
                              alignment=alignment))
    assert len(records) == t.Tr * t.Tc - t.count(SKIPPED)
    assert [(s.i, s.j) for s in records] == loop_order(algorithm, t)
    assert [s.step for s in records] == list(range(len(records)))
    for s in records:
        assert isinstance(s, Step) and s.algorithm == algorithm
        assert s.kind == t.kind(s.i, s.j) and s.kind in (FULL, PARTIAL)
        assert (s.rows, s.cols) == ((t.rows(s.i).start, t.rows(s.i).stop),
                                    (t.cols(s.j).start, t.cols(s.j).stop))
        assert s.S_ij.shape == s.P_ij.shape == (s.rows[1] - s.rows[0], s.cols[1] - s.cols[0])
        # the causal mask: -inf exactly where the key is hidden, P = 0 there
        np.testing.assert_array_equal(np.isneginf(s.S_ij), ~t.mask(s.i, s.j))
        assert (s.P_ij[~t.mask(s.i, s.j)] == 0).all()
    if causal:
        assert t.count(SKIPPED) > 0                    # the cases do skip tiles


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal, alignment", GEOMETRIES)
def test_tiles_loaded_when_the_paper_loads_them(rng, algorithm, Nq, Nk, Br, Bc, causal,
                                                alignment):
    records, _ = run(steps_of(algorithm, *problem(rng, Nq, Nk), Br=Br, Bc=Bc, causal=causal,
                              alignment=alignment))
    outer = "i" if algorithm == "fa2_forward" else "j"
    first_of_outer = [n == 0 or getattr(s, outer) != getattr(records[n - 1], outer)
                      for n, s in enumerate(records)]
    loaded_once = {"fa1_forward": ("K_j", "V_j"), "fa1_backward": ("K_j", "V_j"),
                   "fa2_forward": ("Q_i",), "fa2_backward": ("K_j", "V_j")}[algorithm]
    every_step = {"fa1_forward": ("Q_i", "O_i", "l_i", "m_i"),
                  "fa1_backward": ("Q_i", "O_i", "dO_i", "dQ_i", "l_i", "m_i"),
                  "fa2_forward": ("K_j", "V_j"),
                  "fa2_backward": ("Q_i", "dO_i", "dQ_i", "L_i", "D_i")}[algorithm]
    for s, first in zip(records, first_of_outer):
        assert s.reads == (loaded_once if first else ()) + every_step
    last_of_outer = first_of_outer[1:] + [True]
    for s, last in zip(records, last_of_outer):
        expected = {"fa1_forward": ("O_i", "l_i", "m_i"),
                    "fa1_backward": ("dQ_i",) + (("dK_j", "dV_j") if last else ()),
                    "fa2_forward": ("O_i", "L_i") if last else (),
                    "fa2_backward": ("dQ_i",) + (("dK_j", "dV_j") if last else ())}[algorithm]
        assert s.writes == expected


@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal, alignment", GEOMETRIES)
def test_fa1_forward_state_is_the_hbm_arrays(rng, Nq, Nk, Br, Bc, causal, alignment):
    Q, K, V, _ = problem(rng, Nq, Nk)
    records, (O, l, m) = run(fa1_forward_steps(Q, K, V, Br=Br, Bc=Bc, causal=causal,
                                               alignment=alignment))
    last = records[-1].state
    np.testing.assert_array_equal(last["O"], O)
    np.testing.assert_array_equal(last["l"], l)
    np.testing.assert_array_equal(last["m"], m)
    # online softmax: after tile (i, j), m_i is the row max of S over the keys of tiles 0..j
    t = Tiling(Nq, Nk, Br, Bc, causal=causal, alignment=alignment)
    S = dense_scores(Q, K, t)
    for s in records:
        rows, seen = slice(*s.rows), slice(0, s.cols[1])
        np.testing.assert_allclose(s.state["m"][rows], S[rows, seen].max(axis=1), rtol=1e-15)
    assert records[0].state["O"] is not records[1].state["O"]        # copies, not views


@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal, alignment", GEOMETRIES)
def test_fa2_forward_state_is_the_on_chip_tile(rng, Nq, Nk, Br, Bc, causal, alignment):
    Q, K, V, _ = problem(rng, Nq, Nk)
    records, (O, L) = run(fa2_forward_steps(Q, K, V, Br=Br, Bc=Bc, causal=causal,
                                            alignment=alignment))
    t = Tiling(Nq, Nk, Br, Bc, causal=causal, alignment=alignment)
    S = dense_scores(Q, K, t)
    finished = []
    for s in records:
        rows, seen = slice(*s.rows), slice(0, s.cols[1])
        m_i = S[rows, seen].max(axis=1)                           # m_i = rowmax over keys so far
        l_i = np.exp(S[rows, seen] - np.where(np.isneginf(m_i), 0, m_i)[:, None]).sum(axis=1)
        np.testing.assert_allclose(s.state["m_i"], m_i, rtol=1e-15)
        np.testing.assert_allclose(s.state["l_i"], l_i, rtol=1e-13)
        # O_i is unnormalised: diag(l_i)^-1 O_i is attention over the keys seen so far
        O_so_far = np.exp(S[rows, seen] - np.where(np.isneginf(m_i), 0, m_i)[:, None]) @ V[seen]
        assert rel_err(s.state["O_i"], O_so_far) <= TOL
        if "O_i_final" in s.state:
            np.testing.assert_array_equal(s.state["O_i_final"], O[rows])
            np.testing.assert_array_equal(s.state["L_i"], L[rows])
            finished.append(s.i)
    assert finished == sorted({s.i for s in records})             # each Q tile finished once


@pytest.mark.parametrize("algorithm", ("fa1_backward", "fa2_backward"))
@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal, alignment", GEOMETRIES)
def test_backward_state_ends_at_the_gradients(rng, algorithm, Nq, Nk, Br, Bc, causal, alignment):
    records, (dQ, dK, dV) = run(steps_of(algorithm, *problem(rng, Nq, Nk), Br=Br, Bc=Bc,
                                         causal=causal, alignment=alignment))
    np.testing.assert_array_equal(records[-1].state["dQ"], dQ)
    for s in records:
        if "dK_j" in s.writes:
            np.testing.assert_array_equal(s.state["dK_j"], dK[slice(*s.cols)])
            np.testing.assert_array_equal(s.state["dV_j"], dV[slice(*s.cols)])


def dense_scores(Q, K, t, visible=None):
    """S = scale Q K^T over the whole matrix, -inf where hidden (causal mask and `visible`)."""
    S = (Q @ K.T) / np.sqrt(Q.shape[1])
    r, c = np.arange(t.Nq)[:, None], np.arange(t.Nk)[None, :]
    hidden = (c > r + causal_offset(t.Nq, t.Nk, t.alignment)) if t.causal else np.zeros(S.shape, bool)
    if visible is not None:
        hidden |= ~visible
    return np.where(hidden, -np.inf, S)


def dense_attention(Q, K, V, t, visible=None):
    """O, L of attention restricted to `visible` (rows that see nothing: O = 0, L = -inf)."""
    S = dense_scores(Q, K, t, visible)
    m = S.max(axis=1)
    m_safe = np.where(np.isneginf(m), 0.0, m)
    E = np.exp(S - m_safe[:, None])
    l = E.sum(axis=1)
    O = (E / np.where(l > 0, l, 1.0)[:, None]) @ V
    with np.errstate(divide="ignore"):
        return O, np.where(l > 0, m_safe + np.log(np.where(l > 0, l, 1.0)), -np.inf)


def lse_from(m, l):
    with np.errstate(divide="ignore"):
        return np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf)


def test_fa2_forward_limit_1_is_attention_over_the_first_Bc_keys(rng):
    Q, K, V, _ = problem(rng, 20, 30)
    O, L = fa2_forward(Q, K, V, Br=4, Bc=8, limit=1)
    t = Tiling(20, 8, 4, 8)
    O_ref, L_ref = dense_attention(Q, K[:8], V[:8], t)
    assert rel_err(O, O_ref) <= TOL and rel_err(L, L_ref) <= TOL


@pytest.mark.parametrize("algorithm", ("fa1_forward", "fa2_forward"))
@pytest.mark.parametrize("limit", [0, 1, 2, 3, 100])
@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal, alignment", GEOMETRIES)
def test_forward_limit_is_a_truncated_computation(rng, algorithm, limit, Nq, Nk, Br, Bc, causal,
                                                  alignment):
    # FA1 stops after K/V tiles 0..limit-1; FA2 stops each Q tile after its first `limit`
    # K/V tiles, which are also 0..limit-1: both see keys c < limit * Bc only.
    Q, K, V, _ = problem(rng, Nq, Nk)
    t = Tiling(Nq, Nk, Br, Bc, causal=causal, alignment=alignment)
    options = dict(Br=Br, Bc=Bc, causal=causal, alignment=alignment, limit=limit)
    records, out = run(steps_of(algorithm, Q, K, V, None, **options))
    O, L = (out[0], lse_from(out[2], out[1])) if algorithm == "fa1_forward" else out
    keys_seen = np.broadcast_to(np.arange(Nk)[None, :] < limit * Bc, (Nq, Nk))
    O_ref, L_ref = dense_attention(Q, K, V, t, keys_seen)
    assert rel_err(O, O_ref) <= TOL
    np.testing.assert_array_equal(np.isneginf(L), np.isneginf(L_ref))
    assert rel_err(L[np.isfinite(L)], L_ref[np.isfinite(L_ref)]) <= TOL
    assert [(s.i, s.j) for s in records] == [(i, j) for i, j in loop_order(algorithm, t)
                                             if j < limit]


@pytest.mark.parametrize("algorithm", ("fa1_backward", "fa2_backward"))
@pytest.mark.parametrize("limit", [0, 1, 2, 100])
@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal, alignment", GEOMETRIES)
def test_backward_limit_is_a_truncated_computation(rng, algorithm, limit, Nq, Nk, Br, Bc, causal,
                                                   alignment):
    # FA1 stops after K/V tiles 0..limit-1; FA2 stops each K/V tile j after the first
    # `limit` Q tiles that see it. The gradients then sum over those tiles (i, j) only.
    Q, K, V, dO = problem(rng, Nq, Nk)
    t = Tiling(Nq, Nk, Br, Bc, causal=causal, alignment=alignment)
    records, (dQ, dK, dV) = run(steps_of(algorithm, Q, K, V, dO, Br=Br, Bc=Bc, causal=causal,
                                         alignment=alignment, limit=limit))
    if algorithm == "fa1_backward":
        done = [(i, j) for i, j in loop_order(algorithm, t) if j < limit]
    else:
        done = [(i, j) for j in range(t.Tc)
                for i in [i for i in range(t.Tr) if t.kind(i, j) != SKIPPED][:limit]]
    assert sorted((s.i, s.j) for s in records) == sorted(done)

    W = np.zeros((Nq, Nk), dtype=bool)                  # entries of the tiles that ran
    for i, j in done:
        W[t.rows(i), t.cols(j)] = True
    # dense backward from the full forward: P, D = rowsum(dO * O), dS = P (dP - D)
    S = dense_scores(Q, K, t)
    O, L = dense_attention(Q, K, V, t)
    P = np.exp(S - np.where(np.isneginf(L), 0, L)[:, None])
    dS = P * (dO @ V.T - (dO * O).sum(axis=1)[:, None])
    scale = 1 / np.sqrt(Q.shape[1])
    np.testing.assert_allclose(dV, (P * W).T @ dO, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dK, scale * (dS * W).T @ Q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dQ, scale * (dS * W) @ K, rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nth_is_the_kth_record_and_prints_for_a_lesson(rng, algorithm):
    args = problem(rng, 16, 16)
    records, _ = run(steps_of(algorithm, *args, Br=4, Bc=4, causal=True))
    step_7 = nth(steps_of(algorithm, *args, Br=4, Bc=4, causal=True), 7)
    assert (step_7.i, step_7.j, step_7.step) == (records[7].i, records[7].j, 7)
    for name, value in records[7].state.items():
        np.testing.assert_array_equal(step_7.state[name], value)
    text = str(step_7)
    assert text.startswith(f"{algorithm} step 7: tile (i={step_7.i}, j={step_7.j})")
    assert "reads" in text and "HBM so far" in text and len(text.splitlines()) <= 10
    with pytest.raises(IndexError, match="only 10 steps"):
        nth(steps_of(algorithm, *args, Br=4, Bc=4, causal=True), 10)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hbm_passed_in_is_filled_and_matches_the_records(rng, algorithm):
    args = problem(rng, 11, 14)
    hbm = HBM()
    records, _ = run(steps_of(algorithm, *args, Br=4, Bc=4, causal=True, hbm=hbm))
    assert (records[-1].hbm_reads, records[-1].hbm_writes) == hbm.snapshot()
    assert records[-1].hbm_total == hbm.total > 0
    # cumulative: never decreasing, step by step
    totals = [s.hbm_total for s in records]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    # the plain function counts the same
    plain = HBM()
    Q, K, V, dO = args
    if algorithm == "fa1_forward":
        fa1_forward(Q, K, V, Br=4, Bc=4, causal=True, hbm=plain)
    elif algorithm == "fa2_forward":
        fa2_forward(Q, K, V, Br=4, Bc=4, causal=True, hbm=plain)
    elif algorithm == "fa1_backward":
        fa1_backward(dO, Q, K, V, *fa1_forward(Q, K, V, Br=4, Bc=4, causal=True), Br=4, Bc=4,
                     causal=True, hbm=plain)
    else:
        fa2_backward(dO, Q, K, V, *fa2_forward(Q, K, V, Br=4, Bc=4, causal=True), Br=4, Bc=4,
                     causal=True, hbm=plain)
    assert plain.snapshot() == hbm.snapshot()


def test_standard_attention_steps_are_its_passes(rng):
    Q, K, V, dO = problem(rng, 6, 9)
    records, (O, _) = run(standard_forward_steps(Q, K, V, causal=True))
    assert [s.writes for s in records] == [("S",), ("P",), ("O",)]
    assert all(s.i is None and s.j is None for s in records)
    np.testing.assert_array_equal(records[-1].state["O"], O)
    assert str(records[1]).startswith("standard_forward step 1: whole matrix")
    records, _ = run(standard_backward_steps(dO, Q, K, V, standard_forward(Q, K, V)[1]))
    assert [s.writes for s in records] == [("dV",), ("dP",), ("dS",), ("dQ",), ("dK",)]
