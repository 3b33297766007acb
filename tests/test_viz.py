"""The figures: each picture's data is checked against the mirror or the geometry it was drawn from."""

import os
from itertools import chain
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from flashnumba import mirror
from flashnumba.geometry import BOTTOM_RIGHT, FULL, PARTIAL, SKIPPED, TOP_LEFT, Tiling
from flashnumba.hbm import HBM
from flashnumba.mirror.trace import run
from flashnumba.viz import causal, io, loop_order, memory, on_chip, online_softmax, warps
from flashnumba.viz.traces import problem, record, tile_of

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- 1. loop order

@pytest.mark.parametrize("Nq, Nk, Br, Bc, causal_", [(32, 32, 8, 8, False), (20, 36, 8, 16, True)])
def test_loop_order_labels_are_the_mirrors_visit_order(Nq, Nk, Br, Bc, causal_):
    fig = loop_order.loop_order_figure(Nq=Nq, Nk=Nk, Br=Br, Bc=Bc, causal=causal_)
    data = fig.flashnumba_data
    fa1 = record("fa1_forward", Nq, Nk, 4, Br, Bc, causal=causal_)
    fa2 = record("fa2_forward", Nq, Nk, 4, Br, Bc, causal=causal_)

    # FA1: one block; the label of a tile is the step at which the mirror computed it
    assert data["fa1"]["order"] == [(s.i, s.j) for s in fa1.steps]
    assert data["fa1"]["label"] == {(s.i, s.j): s.step for s in fa1.steps}
    assert set(data["fa1"]["block"].values()) == {0}
    assert data["fa1"]["order"] == sorted(data["fa1"]["order"], key=lambda t: (t[1], t[0]))  # outer j

    # FA2: one block per Q tile i; the label counts steps within the block
    assert data["fa2"]["order"] == [(s.i, s.j) for s in fa2.steps]
    assert data["fa2"]["block"] == {(s.i, s.j): s.i for s in fa2.steps}
    for (i, j), label in data["fa2"]["label"].items():
        assert label == [s.j for s in fa2.steps if s.i == i].index(j)
    assert data["fa2"]["order"] == sorted(data["fa2"]["order"])                               # outer i

    # tiles not drawn with a label are exactly the skipped ones
    t = data["tiling"]
    unlabelled = {(i, j) for i in range(t.Tr) for j in range(t.Tc)} - set(data["fa2"]["label"])
    assert len(unlabelled) == t.count(SKIPPED)


# ---------------------------------------------------------------- 2. causal skipping

def test_causal_skipping_counts_equal_the_tiling():
    fig = causal.causal_skipping_figure()
    panels = fig.flashnumba_data["panels"]
    assert len(panels) == 2 * len(causal.CASES)
    assert {p["alignment"] for p in panels} == {BOTTOM_RIGHT, TOP_LEFT}
    for p in panels:
        t = Tiling(p["Nq"], p["Nk"], 8, 8, causal=True, alignment=p["alignment"])
        for kind in (FULL, PARTIAL, SKIPPED):
            assert p["counts"][kind] == t.count(kind), (p["Nq"], p["Nk"], p["alignment"], kind)
        assert p["kind"] == {(i, j): t.kind(i, j) for i in range(t.Tr) for j in range(t.Tc)}
    # the square case looks the same under both alignments; the others differ
    by_case = {}
    for p in panels:
        by_case.setdefault((p["Nq"], p["Nk"]), []).append(p["kind"])
    for (Nq, Nk), (bottom_right, top_left) in by_case.items():
        assert (bottom_right == top_left) == (Nq == Nk)


# ---------------------------------------------------------------- 3. on chip at step k

def _tile_size(tensor, n, t, d):
    rows = t.rows(n) if tensor in on_chip.BY_Q_TILE else t.cols(n)
    return (rows.stop - rows.start) * (1 if tensor in on_chip.VECTORS else d)


def test_on_chip_highlights_are_the_steps_reads_and_writes():
    k = 6
    fig = on_chip.on_chip_figure(k=k)
    for algorithm, view in fig.flashnumba_data.items():
        trace = record(algorithm, 32, 32, 8, 8, 8)
        step = trace.steps[k]
        assert (view["i"], view["j"]) == (step.i, step.j)
        # read back from the drawn artists: red edges = this step's reads, hatches = its writes
        assert view["drawn"]["read"] == sorted(tile_of(step, name) for name in step.reads)
        assert view["drawn"]["written"] == sorted(tile_of(step, name) for name in step.writes)
        assert {tensor for tensor, _ in view["drawn"]["on_chip"]} == set(view["tensors"])
        assert all(n == (step.i if x in on_chip.BY_Q_TILE else step.j) for x, n in view["drawn"]["on_chip"])
        assert view["hbm_reads"] == step.hbm_reads and view["hbm_writes"] == step.hbm_writes


@pytest.mark.parametrize("algorithm", ["fa1_forward", "fa2_forward"])
def test_on_chip_per_tile_counts_add_up_to_the_hbm_counter(algorithm):
    trace = record(algorithm, 24, 40, 8, 8, 16, causal=True)
    t = trace.tiling
    for k in range(len(trace.steps)):
        view = on_chip.step_view(trace, k)
        for counts, counter in ((view["tile_reads"], view["hbm_reads"]),
                                (view["tile_writes"], view["hbm_writes"])):
            totals = {}
            for (tensor, n), times in counts.items():
                totals[tensor] = totals.get(tensor, 0) + times * _tile_size(tensor, n, t, trace.d)
            assert totals == {x: c for x, c in counter.items() if c}


# ---------------------------------------------------------------- 4. warps

@pytest.mark.parametrize("num_warps, Br, Bc", [(4, 16, 16), (4, 10, 6), (2, 64, 32)])
def test_warp_assignment_covers_each_entry_once(num_warps, Br, Bc):
    rows = [list(warps.warp_rows(w, num_warps, Br)) for w in range(num_warps)]
    cols = [list(warps.warp_cols(w, num_warps, Bc)) for w in range(num_warps)]
    assert list(chain(*rows)) == list(range(Br))
    assert list(chain(*cols)) == list(range(Bc))
    split_q = warps.owner(warps.SPLIT_Q, num_warps, Br, Bc)
    split_k = warps.owner(warps.SPLIT_K, num_warps, Br, Bc)
    for w in range(num_warps):
        assert np.all(split_q[rows[w], :] == w)      # split-Q: whole rows
        assert np.all(split_k[:, cols[w]] == w)      # split-K: whole columns
    assert warps.exchange(warps.SPLIT_Q, num_warps, Br, 8) == {}
    assert sum(warps.exchange(warps.SPLIT_K, num_warps, Br, 8).values()) == num_warps * Br * (2 + 8)


def test_warp_partition_figure_draws_the_assignment():
    fig = warps.warp_partition_figure(num_warps=4, Br=16, Bc=16, d=8)
    for scheme, drawn in fig.flashnumba_data.items():
        assert np.array_equal(drawn["owner"], warps.owner(scheme, 4, 16, 16))


def test_backward_blocks_come_from_the_fa2_backward_trace():
    fig = warps.backward_blocks_figure(Nq=32, Nk=32, Br=8, Bc=8, causal=True)
    data = fig.flashnumba_data
    t = data["tiling"]
    for j in range(t.Tc):        # dK_j, dV_j: stored once, by block j alone
        assert data["writers"][("dK", j)] == [j]
        assert data["writers"][("dV", j)] == [j]
    for i in range(t.Tr):        # dQ_i: added into by every block whose K/V tile Q tile i sees
        assert data["writers"][("dQ", i)] == [j for j in range(t.Tc) if i in t.q_range(j)]
    assert sorted(data["order"]) == sorted((i, j) for j in range(t.Tc) for i in t.q_range(j))


# ---------------------------------------------------------------- 5. online softmax

@pytest.mark.parametrize("algorithm", ["fa2_forward", "fa1_forward"])
def test_online_softmax_ends_at_the_reference_lse(algorithm):
    fig = online_softmax.online_softmax_figure(algorithm=algorithm)
    data = fig.flashnumba_data
    assert len(data["rows"]) == 3
    for r in data["rows"]:
        np.testing.assert_allclose(data["final_lse"][r], data["reference_lse"][r], rtol=1e-12)
        h = data["history"][r]
        # each step: l = e^(m_old - m_new) l_old + rowsum(exp(S_ij - m_new))
        l_old = 0.0
        for m, l, factor, scores in zip(h["m"], h["l"], h["rescale"], h["scores"]):
            np.testing.assert_allclose(l, factor * l_old + np.exp(scores - m).sum(), rtol=1e-12)
            l_old = l
        assert h["m"] == sorted(h["m"])              # the running max never falls
        assert np.all(h["rescale"] <= 1.0)


# ---------------------------------------------------------------- 6. IO complexity

def test_io_points_are_the_mirrors_hbm_counters():
    d, N_fixed, Ms, M_fixed, Ns = 8, 64, (64, 256), 256, (32, 64)
    fig = io.io_figure(d=d, N_fixed=N_fixed, Ms=Ms, M_fixed=M_fixed, Ns=Ns)
    data = fig.flashnumba_data

    def counted(algorithm, N, M):
        x = problem(N, N, d)
        hbm = HBM()
        if algorithm == "standard_forward":
            mirror.standard_forward(x["Q"], x["K"], x["V"], hbm=hbm)
        else:
            getattr(mirror, algorithm)(x["Q"], x["K"], x["V"], M=M, hbm=hbm)
        return hbm.total

    for algorithm in io.ALGORITHMS:
        assert data["vs_M"][algorithm]["measured"] == [counted(algorithm, N_fixed, M) for M in Ms]
        assert data["vs_N"][algorithm]["measured"] == [counted(algorithm, N, M_fixed) for N in Ns]
    # standard attention does not depend on M; FA1's traffic falls as M grows
    assert len(set(data["vs_M"]["standard_forward"]["measured"])) == 1
    fa1 = data["vs_M"]["fa1_forward"]["measured"]
    assert fa1[0] > fa1[-1]


# ---------------------------------------------------------------- 7. memory footprint

def test_memory_footprint_is_n_squared_against_n():
    Ns = (16, 32)
    fig = memory.memory_figure(Ns=Ns)
    data = fig.flashnumba_data
    assert data["tensors"] == {"standard_forward": ["P", "S"], "fa1_forward": ["l", "m"],
                               "fa2_forward": ["L"]}
    assert data["bytes"]["standard_forward"] == [4 * 2 * N * N for N in Ns]
    assert data["bytes"]["fa1_forward"] == [4 * 2 * N for N in Ns]
    assert data["bytes"]["fa2_forward"] == [4 * N for N in Ns]


def test_extra_elements_counts_each_tile_once():
    x = problem(24, 24, 4)
    steps, _ = run(mirror.fa1_forward_steps(x["Q"], x["K"], x["V"], Br=8, Bc=4))
    # l and m are stored Tc = 6 times per tile, but occupy 24 elements each
    assert memory.extra_elements(steps) == {"l": 24, "m": 24}


# ---------------------------------------------------------------- the command

def test_figures_command_writes_exactly_the_committed_files(tmp_path, capsys):
    from flashnumba import figures

    assert figures.main(["--out", os.fspath(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(figures.FIGURES)
    committed = sorted(p.name for p in (REPO / "figures").iterdir()
                       if p.is_file() and not p.name.startswith("."))   # figures/bench/ is the benchmark's
    assert written == committed
    n = len(figures.FIGURES)
    assert f"{n}/{n}" in capsys.readouterr().err   # the progress bar reached the end

    from PIL import Image
    with Image.open(tmp_path / "on_chip.gif") as gif:
        assert gif.n_frames == len(record("fa1_forward", 32, 32, 8, 8, 8).steps)
