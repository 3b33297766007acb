"""HBM traffic of the mirrors against closed forms read off each algorithm's loops.

Counts are in elements. Tc = ceil(Nk / Bc), Tr = ceil(Nq / Br). Without a causal
mask every tile is visited:

    FA1 forward   K, V read once; Q, O, l, m read Tc times; O, l, m written Tc times
    FA2 forward   Q read once, O and L written once; K, V read Tr times
    FA1 backward  K, V read once; Q, O, dO, dQ, l, m read Tc times; dQ written Tc times
    FA2 backward  D pass (dO, O read, D written); K, V read once; Q, dO, dQ, L, D read
                  Tc times; dQ written Tc times
    standard      Theta(N d + N^2): S and P go through HBM

With a causal mask, the same sums run over the tiles that are not skipped.
Theorem 2 of FlashAttention: FA1 makes Theta(N^2 d^2 / M) accesses; a sweep of
the on-chip size M shows it.
"""

from itertools import pairwise

import numpy as np
import pytest

from flashnumba.geometry import SKIPPED, TOP_LEFT, Tiling
from flashnumba.hbm import HBM
from flashnumba.mirror import (
    fa1_backward,
    fa1_backward_steps,
    fa1_forward,
    fa1_forward_steps,
    fa2_backward,
    fa2_backward_steps,
    fa2_forward,
    fa2_forward_steps,
    run,
    standard_backward,
    standard_forward,
)


def counts(algorithm, Nq, Nk, d, seed=0, **options):
    """(reads, writes) dicts of one run of `algorithm` on random data."""
    rng = np.random.default_rng(seed)
    Q, K, V, dO = (rng.standard_normal((N, d)) for N in (Nq, Nk, Nk, Nq))
    hbm = HBM()
    if algorithm == "fa1_forward":
        fa1_forward(Q, K, V, hbm=hbm, **options)
    elif algorithm == "fa2_forward":
        fa2_forward(Q, K, V, hbm=hbm, **options)
    elif algorithm == "fa1_backward":
        fa1_backward(dO, Q, K, V, *fa1_forward(Q, K, V, **options), hbm=hbm, **options)
    elif algorithm == "fa2_backward":
        fa2_backward(dO, Q, K, V, *fa2_forward(Q, K, V, **options), hbm=hbm, **options)
    elif algorithm == "standard_forward":
        standard_forward(Q, K, V, hbm=hbm, **options)
    elif algorithm == "standard_backward":
        _, P = standard_forward(Q, K, V, **options)
        standard_backward(dO, Q, K, V, P, hbm=hbm, **options)
    return hbm.snapshot()


def closed_form(algorithm, t, d):
    """Expected (reads, writes), summed over the tiles (i, j) the algorithm visits."""
    visited = [(i, j) for i in range(t.Tr) for j in range(t.Tc) if t.kind(i, j) != SKIPPED]
    rows = lambda i: t.rows(i).stop - t.rows(i).start
    cols = lambda j: t.cols(j).stop - t.cols(j).start
    kv_tiles = sorted({j for _, j in visited})           # K/V tiles some Q tile sees
    q_tiles = sorted({i for i, _ in visited})            # Q tiles that see some key
    per_tile_rows = sum(rows(i) for i, _ in visited)     # sum over visited tiles of Br_i
    per_tile_cols = sum(cols(j) for _, j in visited)     # sum over visited tiles of Bc_j
    kv_once = sum(cols(j) for j in kv_tiles)
    Nq, Nk = t.Nq, t.Nk
    if algorithm == "fa1_forward":
        reads = {"K": kv_once * d, "V": kv_once * d, "Q": per_tile_rows * d,
                 "O": per_tile_rows * d, "l": per_tile_rows, "m": per_tile_rows}
        writes = {"O": per_tile_rows * d, "l": per_tile_rows, "m": per_tile_rows}
    elif algorithm == "fa2_forward":
        q_once = sum(rows(i) for i in q_tiles)
        reads = {"Q": q_once * d, "K": per_tile_cols * d, "V": per_tile_cols * d}
        writes = {"O": Nq * d, "L": Nq}                  # every Q tile writes O_i, L_i
    elif algorithm == "fa1_backward":
        reads = {"K": kv_once * d, "V": kv_once * d, "Q": per_tile_rows * d,
                 "O": per_tile_rows * d, "dO": per_tile_rows * d, "dQ": per_tile_rows * d,
                 "l": per_tile_rows, "m": per_tile_rows}
        writes = {"dQ": per_tile_rows * d, "dK": kv_once * d, "dV": kv_once * d}
    elif algorithm == "fa2_backward":
        reads = {"dO": Nq * d + per_tile_rows * d, "O": Nq * d, "K": kv_once * d,
                 "V": kv_once * d, "Q": per_tile_rows * d, "dQ": per_tile_rows * d,
                 "L": per_tile_rows, "D": per_tile_rows}
        writes = {"D": Nq, "dQ": per_tile_rows * d, "dK": Nk * d, "dV": Nk * d}
    elif algorithm == "standard_forward":
        reads = {"Q": Nq * d, "K": Nk * d, "S": Nq * Nk, "P": Nq * Nk, "V": Nk * d}
        writes = {"S": Nq * Nk, "P": Nq * Nk, "O": Nq * d}
    else:
        reads = {"P": 2 * Nq * Nk, "dO": 2 * Nq * d, "V": Nk * d, "dP": Nq * Nk,
                 "dS": 2 * Nq * Nk, "K": Nk * d, "Q": Nq * d}
        writes = {"dV": Nk * d, "dP": Nq * Nk, "dS": Nq * Nk, "dQ": Nq * d, "dK": Nk * d}
    return reads, writes


FLASH = ("fa1_forward", "fa1_backward", "fa2_forward", "fa2_backward")
SHAPES = [  # Nq, Nk, d, Br, Bc
    pytest.param(32, 32, 8, 8, 8, id="multiple"),
    pytest.param(37, 29, 5, 8, 16, id="ragged"),
    pytest.param(3, 50, 4, 4, 7, id="Nq<Nk"),
    pytest.param(50, 3, 4, 6, 4, id="Nq>Nk"),
]


@pytest.mark.parametrize("algorithm", FLASH)
@pytest.mark.parametrize("Nq, Nk, d, Br, Bc", SHAPES)
def test_counts_without_mask_match_the_loops(algorithm, Nq, Nk, d, Br, Bc):
    t = Tiling(Nq, Nk, Br, Bc)
    Tr, Tc = t.Tr, t.Tc
    reads, writes = counts(algorithm, Nq, Nk, d, Br=Br, Bc=Bc)
    assert (reads, writes) == closed_form(algorithm, t, d)
    # the headline numbers, said plainly
    if algorithm == "fa1_forward":
        assert reads["K"] == reads["V"] == Nk * d
        assert reads["Q"] == reads["O"] == writes["O"] == Tc * Nq * d
        assert reads["l"] == reads["m"] == writes["l"] == writes["m"] == Tc * Nq
    if algorithm == "fa2_forward":
        assert reads["Q"] == writes["O"] == Nq * d and writes["L"] == Nq
        assert reads["K"] == reads["V"] == Tr * Nk * d
    if algorithm in ("fa1_backward", "fa2_backward"):
        assert reads["dQ"] == writes["dQ"] == Tc * Nq * d
        assert writes["dK"] == writes["dV"] == Nk * d


@pytest.mark.parametrize("algorithm", ("standard_forward", "standard_backward"))
@pytest.mark.parametrize("Nq, Nk, d, Br, Bc", SHAPES)
def test_standard_attention_counts(algorithm, Nq, Nk, d, Br, Bc):
    for causal in (False, True):                         # masking does not save it any traffic
        assert counts(algorithm, Nq, Nk, d, causal=causal) == closed_form(
            algorithm, Tiling(Nq, Nk, Nq, Nk), d)


CAUSAL = [  # Nq, Nk, d, Br, Bc, alignment
    pytest.param(32, 32, 4, 8, 8, "bottom-right", id="square"),
    pytest.param(37, 29, 4, 8, 6, "bottom-right", id="Nq>Nk"),
    pytest.param(13, 41, 4, 4, 8, "bottom-right", id="Nq<Nk"),
    pytest.param(13, 41, 4, 4, 8, TOP_LEFT, id="top-left-Nq<Nk"),
    pytest.param(41, 13, 4, 8, 4, TOP_LEFT, id="top-left-Nq>Nk"),
]
STEPS = {"fa1_forward": fa1_forward_steps, "fa2_forward": fa2_forward_steps,
         "fa1_backward": fa1_backward_steps, "fa2_backward": fa2_backward_steps}


@pytest.mark.parametrize("algorithm", FLASH)
@pytest.mark.parametrize("Nq, Nk, d, Br, Bc, alignment", CAUSAL)
def test_causal_skipped_tiles_cost_nothing(algorithm, Nq, Nk, d, Br, Bc, alignment):
    t = Tiling(Nq, Nk, Br, Bc, causal=True, alignment=alignment)
    assert t.count(SKIPPED) > 0
    options = dict(Br=Br, Bc=Bc, causal=True, alignment=alignment)
    assert counts(algorithm, Nq, Nk, d, **options) == closed_form(algorithm, t, d)

    # no record for a skipped tile: the records are exactly the tiles not skipped
    rng = np.random.default_rng(1)
    Q, K, V, dO = (rng.standard_normal((N, d)) for N in (Nq, Nk, Nk, Nq))
    if algorithm == "fa1_backward":
        steps = fa1_backward_steps(dO, Q, K, V, *fa1_forward(Q, K, V, **options), **options)
    elif algorithm == "fa2_backward":
        steps = fa2_backward_steps(dO, Q, K, V, *fa2_forward(Q, K, V, **options), **options)
    else:
        steps = STEPS[algorithm](Q, K, V, **options)
    records, _ = run(steps)
    visited = {(s.i, s.j) for s in records}
    assert len(visited) == len(records) == t.Tr * t.Tc - t.count(SKIPPED)
    assert all(t.kind(i, j) == SKIPPED for i in range(t.Tr) for j in range(t.Tc)
               if (i, j) not in visited)
    # and causal traffic is less than full traffic
    full_reads, _ = counts(algorithm, Nq, Nk, d, Br=Br, Bc=Bc)
    assert sum(counts(algorithm, Nq, Nk, d, **options)[0].values()) < sum(full_reads.values())


def total(algorithm, N, d, **options):
    reads, writes = counts(algorithm, N, N, d, **options)
    return sum(reads.values()) + sum(writes.values())


def test_standard_attention_is_theta_Nd_plus_N_squared():
    d = 8
    ratios = [total(kind, N, d) / (N * d + N * N)
              for kind in ("standard_forward", "standard_backward") for N in (16, 64, 256)]
    assert max(ratios) / min(ratios) < 3
    # the N^2 term dominates: quadrupling N multiplies traffic by nearly 16
    assert total("standard_forward", 256, d) / total("standard_forward", 64, d) > 12


def test_fa1_forward_is_theta_N2_d2_over_M():
    # Theorem 2 (FlashAttention): Theta(N^2 d^2 / M) HBM accesses for d <= M <= N d.
    # With Bc = M / 4d, Tc = N / Bc: total = 2Nd + Tc (3Nd + 4N), so
    # total * M / (N^2 d^2) = 8 Bc / N + 12 + 16 / d, within a constant band.
    N, d = 256, 16
    Ms = [4 * d * Bc for Bc in (4, 8, 16, 32, 64)]           # 256 .. 4096 = N d floats
    fa1 = [total("fa1_forward", N, d, M=M) for M in Ms]
    standard = total("standard_forward", N, d)
    fa1_scaled = [T * M / (N * N * d * d) for T, M in zip(fa1, Ms)]
    standard_scaled = [standard * M / (N * N * d * d) for M in Ms]

    for M, scaled in zip(Ms, fa1_scaled):
        Bc = M // (4 * d)
        assert scaled == pytest.approx(8 * Bc / N + 12 + 16 / d)
    assert max(fa1_scaled) / min(fa1_scaled) < 1.5          # Theta(N^2 d^2 / M)
    assert all(a > b for a, b in pairwise(fa1))         # more on-chip memory, less traffic
    assert all(a < b for a, b in pairwise(standard_scaled))  # M does not help it
    assert fa1[-1] < standard / 4                            # at M = N d, FA1 moves far less
