"""The window and split-KV figures: each picture's data against the geometry and the reference."""

import matplotlib

matplotlib.use("Agg")

import numpy as np

from flashnumba import figures
from flashnumba.geometry import SKIPPED, Tiling
from flashnumba.viz import split_kv, varlen, window


def test_window_panels_are_the_tilings_band():
    fig = window.window_figure()
    panels = fig.flashnumba_data["panels"]
    assert len(panels) == len(window.CASES)
    for p in panels:
        t = Tiling(p["Nq"], p["Nk"], 8, 8, causal=p["causal"], window_size=p["window_size"])
        for (i, j), kind in p["kind"].items():
            assert kind == t.kind(i, j)
        assert sorted(p["visited"]) == [(i, j) for i in range(t.Tr) for j in t.kv_range(i)]
        assert p["counts"][SKIPPED] > 0
        visited_cols = sum(t.cols(j).stop - t.cols(j).start for i, j in p["visited"])
        assert p["k_reads"] == visited_cols * 4                  # d = 4 floats per key
        assert p["k_reads"] < p["k_reads_full"] / 2


def test_split_kv_merge_is_attention_over_all_keys():
    data = split_kv.split_kv_figure().flashnumba_data
    assert np.allclose(data["O"], data["O_full"], atol=1e-12)
    assert abs(data["L"] - data["L_full"]) < 1e-12
    assert abs(data["weights"].sum() - 1.0) < 1e-12
    assert data["bounds"][0][0] == 0 and data["bounds"][-1][1] == 96


def test_new_figures_are_registered():
    assert figures.function("window_band.png") is window.window_figure
    assert figures.function("split_kv.png") is split_kv.split_kv_figure


def test_varlen_tiles_are_each_sequences_own():
    data = varlen.varlen_figure().flashnumba_data
    row0 = col0 = 0
    computed = 0
    for p, (Nq, Nk) in zip(data["panels"], varlen.LENGTHS):
        assert (p["row0"], p["col0"]) == (row0, col0)            # placed at cu_seqlens offsets
        t = Tiling(Nq, Nk, 8, 8, causal=True)
        assert p["kind"] == {(i, j): t.kind(i, j) for i in range(t.Tr) for j in range(t.Tc)}
        computed += t.Tr * t.Tc - t.count(SKIPPED)
        row0, col0 = row0 + Nq, col0 + Nk
    assert data["computed"] == computed < data["padded_tiles"]
    assert figures.function("varlen_tiles.png") is varlen.varlen_figure
