"""The ring's geometry and its NumPy mirror: P simulated ranks against the float64 reference on the
full sequence (1e-12), contiguous and zigzag, causal and not, GQA, dropout keyed by global positions."""

import numpy as np
import pytest

from flashnumba import philox, reference
from flashnumba.geometry import FULL, PARTIAL, SKIPPED
from flashnumba.mirror.ring import (
    ring_backward,
    ring_backward_steps,
    ring_forward,
    ring_forward_steps,
)
from flashnumba.mirror.trace import run
from flashnumba.ring_geometry import (
    CONTIGUOUS,
    LAYOUTS,
    ZIGZAG,
    check_split,
    piece,
    positions,
    schedule,
    shard,
    unshard,
)

TOL = 1e-12


def _problem(rng, B, N, H_q, H_kv, d):
    q = rng.standard_normal((B, N, H_q, d))
    k, v = rng.standard_normal((2, B, N, H_kv, d))
    dout = rng.standard_normal((B, N, H_q, d))
    return q, k, v, dout


# ---------------------------------------------------------------- geometry

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_positions_cover_the_sequence_once(layout, world):
    n = 6
    every = sorted(pos for r in range(world) for pos in positions(r, world, n, layout))
    assert every == list(range(n * world))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_pieces_cover_exactly_the_visible_pairs(layout, causal, world):
    """Over the whole ring, the pieces computed (masked inside where PARTIAL) are the causal
    (or full) mask of the sequence in global positions: every visible pair once, no hidden one."""
    n = 6
    N = n * world
    covered = np.zeros((N, N), dtype=int)
    for step_pieces in schedule(world, n, layout, causal):
        for p in step_pieces:
            if p.kind == SKIPPED:
                assert p.rows == p.cols == (0, 0)
                continue
            rows = positions(p.rank, world, n, layout)[slice(*p.rows)]
            cols = positions(p.src, world, n, layout)[slice(*p.cols)]
            local = np.ones((len(rows), len(cols)), dtype=bool)
            if p.kind == PARTIAL:
                assert p.rank == p.src and p.rows == p.cols == (0, n)
                local = np.arange(len(cols))[None, :] <= np.arange(len(rows))[:, None]
            pairs = np.array(cols)[None, :] <= np.array(rows)[:, None]
            if not causal:
                pairs[:] = True
            assert (local <= pairs).all(), f"{p} computes a pair the mask hides"
            covered[np.ix_(rows, cols)] += local
    expected = reference.causal_mask(N, N) if causal else np.ones((N, N), dtype=bool)
    np.testing.assert_array_equal(covered, expected.astype(int))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_and_contiguous_does_not(world):
    n = 8
    work = {layout: [sum(piece(r, s, world, n, layout, True).visible for s in range(world))
                     for r in range(world)] for layout in LAYOUTS}
    assert len(set(work[ZIGZAG])) == 1                                   # every rank the same
    assert work[CONTIGUOUS] == [n * (n + 1) // 2 + r * n * n for r in range(world)]   # rank r: r full + 1 diagonal
    assert sum(work[ZIGZAG]) == sum(work[CONTIGUOUS]) == (n * world) * (n * world + 1) // 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_round_trip_numpy_and_torch(layout):
    torch = pytest.importorskip("torch")
    x = np.arange(2 * 12 * 3).reshape(2, 12, 3)
    parts = [shard(x, r, 3, layout) for r in range(3)]
    np.testing.assert_array_equal(parts[1][0, :, 0], np.array(positions(1, 3, 4, layout)) * 3)
    np.testing.assert_array_equal(unshard(parts, layout), x)
    t = torch.from_numpy(x)
    t_parts = [shard(t, r, 3, layout) for r in range(3)]
    assert all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(t_parts, parts))
    assert torch.equal(unshard(t_parts, layout), t)
    L = np.arange(2 * 3 * 12).reshape(2, 3, 12)                         # lse: the sequence at dim 2
    np.testing.assert_array_equal(unshard([shard(L, r, 3, layout, dim=2) for r in range(3)], layout, dim=2), L)


@pytest.mark.parametrize("N,world,layout,expected", [
    (10, 3, CONTIGUOUS, "multiple of the world size 3"),
    (12, 4, ZIGZAG, "multiple of the 2 x world size = 8 chunks"),
    (8, 2, "striped", "layout must be one of 'contiguous', 'zigzag', got 'striped'"),
])
def test_bad_split_is_a_clear_error(N, world, layout, expected):
    with pytest.raises(ValueError, match=expected):
        check_split(N, world, layout)


# ---------------------------------------------------------------- the mirror against the reference

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_mirror_equals_reference_on_the_full_sequence(layout, causal, world, rng):
    q, k, v, dout = _problem(rng, B=2, N=6 * world, H_q=4, H_kv=2, d=5)     # GQA, odd head dim
    options = {"world": world, "layout": layout, "causal": causal, "Br": 4, "Bc": 4}
    O, L = ring_forward(q, k, v, **options)
    O_ref, L_ref = reference.attention(q, k, v, causal=causal)
    np.testing.assert_allclose(O, O_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(L, L_ref, rtol=0, atol=TOL)
    for got, want in zip(ring_backward(dout, q, k, v, O, L, **options),
                         reference.attention_backward(dout, q, k, v, causal=causal)):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_mirror_dropout_is_the_full_sequences_mask(layout, rng):
    """Each visit takes the keep-mask at its global rows and columns: the ring drops exactly
    what one call on the whole sequence drops."""
    world, B, N, H_q = 3, 1, 12, 2
    q, k, v, dout = _problem(rng, B=B, N=N, H_q=H_q, H_kv=1, d=4)
    keep = philox.keep_mask(7, 0.3, B, H_q, N, N)
    options = {"world": world, "layout": layout, "causal": True, "keep": keep, "dropout_p": 0.3,
               "Br": 4, "Bc": 4}
    O, L = ring_forward(q, k, v, **options)
    O_ref, L_ref = reference.attention(q, k, v, causal=True, dropout_p=0.3, dropout_mask=keep)
    np.testing.assert_allclose(O, O_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(L, L_ref, rtol=0, atol=TOL)
    for got, want in zip(ring_backward(dout, q, k, v, O, L, **options),
                         reference.attention_backward(dout, q, k, v, causal=True, dropout_p=0.3,
                                                      dropout_mask=keep)):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


# ---------------------------------------------------------------- the steps it yields

@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_steps_follow_the_ring(layout, rng):
    world, n = 4, 4
    q, k, v, _ = _problem(rng, B=1, N=n * world, H_q=1, H_kv=1, d=4)
    records, (O, _) = run(ring_forward_steps(q, k, v, world=world, layout=layout, causal=True))
    assert len(records) == world * world
    assert [s.step for s in records] == list(range(world * world))
    for count, s in enumerate(records):
        step, rank = divmod(count, world)
        p = piece(rank, step, world, n, layout, True)
        assert (s.i, s.j, s.kind, s.rows, s.cols) == (rank, (rank - step) % world, p.kind, p.rows, p.cols)
        assert s.reads == (() if step == 0 else ("K_j", "V_j"))
        assert s.writes == (("K_j", "V_j") if step < world - 1 else ())
    kinds = [s.kind for s in records]
    if layout == CONTIGUOUS:                          # blocks from later ranks are wholly hidden
        assert kinds.count(SKIPPED) == world * (world - 1) // 2
    else:                                             # zigzag: every visit does work
        assert SKIPPED not in kinds and kinds.count(PARTIAL) == world
    assert kinds.count(PARTIAL) == world and FULL in kinds
    for rank in range(world):                         # the last state of each rank is its output
        last = records[(world - 1) * world + rank]
        np.testing.assert_array_equal(last.state["O_r"], shard(O, rank, world, layout))


def test_backward_steps_carry_the_sums_home(rng):
    """The travelling dK_j, dV_j of block j, summed over the ranks it visited, arrive home as
    dK, dV: the record of the rank block j visits last holds the finished sums."""
    world, n, layout = 3, 4, ZIGZAG
    q, k, v, dout = _problem(rng, B=1, N=n * world, H_q=2, H_kv=1, d=4)
    O, L = ring_forward(q, k, v, world=world, layout=layout, causal=True)
    records, (_, dK, dV) = run(ring_backward_steps(dout, q, k, v, O, L, world=world, layout=layout,
                                                    causal=True))
    for s in records[-world:]:                        # last step: only the sums leave, going home
        assert s.writes == ("dK_j", "dV_j")
        np.testing.assert_array_equal(s.state["dK_j"], shard(dK, s.j, world, layout))
        np.testing.assert_array_equal(s.state["dV_j"], shard(dV, s.j, world, layout))
    assert records[world].reads == ("K_j", "V_j", "dK_j", "dV_j")


def test_mirror_bad_input_is_a_clear_error(rng):
    q, k, v, _ = _problem(rng, B=1, N=10, H_q=2, H_kv=1, d=4)
    with pytest.raises(ValueError, match="N=10 must be a positive multiple of the world size 4"):
        ring_forward(q, k, v, world=4)
    with pytest.raises(ValueError, match="K .* must match Q"):
        ring_forward(q, k[:, :8], v[:, :8], world=2)
    with pytest.raises(ValueError, match="dropout_p > 0 needs keep"):
        ring_forward(q, k, v, world=2, dropout_p=0.1)


# ---------------------------------------------------------------- the schedule figure

def test_ring_schedule_figure_draws_the_mirrors_schedule():
    import matplotlib
    matplotlib.use("Agg")
    from flashnumba.viz.ring import ring_schedule_figure
    from flashnumba.viz.style import png_bytes
    world, n = 4, 8
    fig = ring_schedule_figure(world=world, n=n)
    panels = {panel["layout"]: panel for panel in fig.flashnumba_data["panels"]}
    for layout, panel in panels.items():
        for (step, rank), cell in panel["cells"].items():
            p = piece(rank, step, world, n, layout, True)
            assert (cell["block"], cell["kind"]) == (p.src, p.kind)
            assert cell["work"] == p.visible / (n * n)
        computed = panel["owner"] >= 0                   # every visible pair, by one step, no other
        np.testing.assert_array_equal(computed, reference.causal_mask(world * n, world * n))
    assert len(set(panels[ZIGZAG]["work"])) == 1
    assert panels[CONTIGUOUS]["work"] == sorted(panels[CONTIGUOUS]["work"])
    assert png_bytes(fig).startswith(b"\x89PNG")
