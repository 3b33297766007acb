"""Kernels and mirrors agree at every step; a divergence is found and named."""

import numpy as np
import pytest

from flashnumba import dtypes, registry, stepping
from flashnumba.stepping import compare, make_problem

# (Nq, Nk, d, causal, Br, Bc): Nq != Nk both ways, tiles that do not divide N,
# fully masked rows (Nq > Nk, causal), small tiles so there are several steps.
CASES = [
    (40, 70, 24, False, 16, 32),
    (50, 33, 16, True, 16, 32),
]


# the float32 kernels; the tensor-core ones (bfloat16 only, slow on the simulator) step below
FP32_KERNELS = [k for k in registry.kernels() if registry.kernel(k)[0].reads(dtypes.FLOAT32)]
HALF_KERNELS = [k for k in registry.kernels() if k not in FP32_KERNELS]


def _tiles(algorithm, Br, Bc):
    """(Br, Bc, num_warps) for the case. The fast forward stores P_ij in K_j's shared array,
    so its tiles are square, and 32 x 32 tiles take 2 warps (4 x 8 register tiles)."""
    return (Bc, Bc, 2) if algorithm == "fa2_fast_forward" else (Br, Bc, None)


@pytest.mark.parametrize("algorithm", FP32_KERNELS)
@pytest.mark.parametrize("Nq, Nk, d, causal, Br, Bc", CASES)
def test_kernel_and_mirror_agree_at_every_step(algorithm, Nq, Nk, d, causal, Br, Bc):
    Br, Bc, warps = _tiles(algorithm, Br, Bc)
    p = make_problem(Nq, Nk, d, causal=causal, seed=Nq + Nk, Br=Br, Bc=Bc, algorithm=algorithm,
                     num_warps=warps)
    report = compare(algorithm, p)
    assert report.agrees, report.table()
    assert [k for k, _ in report.rows] == list(range(1, stepping.block_loop_length(algorithm, p.tiling) + 1))
    assert len(report.rows) >= 2, "the case should take several steps"
    for _, errs in report.rows:
        assert set(errs) == set(report.names)


def _faulty(algorithm, at_step, variable, row):
    """A 'kernel' that is the mirror, except one entry of one variable goes wrong from `at_step` on."""
    def kernel(alg, p, k):
        state = {n: np.array(x, dtype=np.float64) for n, x in stepping.mirror_state(alg, p, k).items()}
        if k >= at_step:
            state[variable][row] += 1.0
        return state
    return kernel


@pytest.mark.parametrize("algorithm, variable, row, expect", [
    ("fa1_forward", "O", 20, ("(b=0, h=0)", 1, 1)),         # row 20 is in Q tile 1; outer step j=1
    ("fa2_forward", "l", 37, ("i=2", 2, 1)),                # block i=2 (rows 32..47), its 2nd K/V tile
    ("fa2_backward", "dK", 40, ("j=1", 1, 1)),              # block j=1 (cols 32..63), its 2nd Q tile
    ("fa1_backward", "dQ", 5, ("(b=0, h=0)", 0, 1)),
    ("fa2_fast_forward", "L", 37, ("i=2", 2, 1)),
    ("fa2_fast_backward", "dV", 40, ("j=1", 1, 1)),
])
def test_first_divergence_is_named(algorithm, variable, row, expect):
    p = make_problem(60, 70, 8, seed=1, Br=16, Bc=32, algorithm=algorithm)
    report = compare(algorithm, p, kernel=_faulty(algorithm, 2, variable, row))
    assert not report.agrees
    k, block, i, j, name, err = report.divergence
    assert (k, name) == (2, variable)
    assert (block, i, j) == expect
    assert err > stepping.TOL
    assert "first divergence: step k=2" in report.table()


def test_error_counts_mismatched_infinities():
    assert stepping.error(np.array([0.0, -np.inf]), np.array([0.0, -np.inf])) == 0.0
    assert stepping.error(np.array([0.0, 1.0]), np.array([0.0, -np.inf])) == np.inf
    assert stepping.error(np.array([np.nan]), np.array([1.0])) == np.inf


def test_unknown_algorithm_is_refused():
    p = make_problem(8, 8, 4, algorithm="fa2_forward")
    with pytest.raises(ValueError, match="kernel must be one of fa1_forward.*got 'fa3'"):
        compare("fa3", p)


# (Nq, Nk, d, causal, alignment, dropout_p, Br, Bc): PyTorch's top-left diagonal with dropout
# (Nq < Nk: keys 64.. are seen by no query), and dropout where rows see no key (Nq > Nk).
OPTION_CASES = [
    (40, 70, 24, True, "top-left", 0.2, 16, 32),
    (50, 33, 16, True, "bottom-right", 0.15, 16, 32),
]


@pytest.mark.parametrize("algorithm", FP32_KERNELS)
@pytest.mark.parametrize("Nq, Nk, d, causal, alignment, dropout_p, Br, Bc", OPTION_CASES)
def test_kernel_and_mirror_agree_with_top_left_and_dropout(algorithm, Nq, Nk, d, causal, alignment,
                                                          dropout_p, Br, Bc):
    Br, Bc, warps = _tiles(algorithm, Br, Bc)
    p = make_problem(Nq, Nk, d, causal=causal, seed=Nq, Br=Br, Bc=Bc, algorithm=algorithm,
                     alignment=alignment, dropout_p=dropout_p, dropout_seed=Nk, num_warps=warps)
    assert p.tiling.alignment == alignment
    assert p.keep.shape == (Nq, Nk) and not p.keep.all()
    report = compare(algorithm, p)
    assert report.agrees, report.table()
    assert len(report.rows) >= 2, "the case should take several steps"
    assert f"dropout_p={dropout_p}" in report.table() and alignment in report.table()


def test_step_command_takes_dropout_and_top_left(capsys):
    from flashnumba.cli import main
    status = main(["step", "fa2_forward", "--Nq", "20", "--Nk", "40", "--d", "8", "--Br", "16",
                   "--Bc", "32", "--causal", "--top-left", "--dropout", "0.3", "--seed", "5"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "(top-left) dropout_p=0.3 seed=5" in out
    assert "agree at every step" in out


@pytest.mark.parametrize("algorithm", HALF_KERNELS)
def test_half_kernels_step_against_the_mirror_at_bf16_tolerance(algorithm):
    """A 16-bit-only version (fa2_tc) steps on bfloat16 inputs at HALF_TOL, tile by tile."""
    p = make_problem(40, 23, 16, causal=True, seed=3, Br=16, Bc=16, algorithm=algorithm)
    assert p.dtype == dtypes.BFLOAT16 and stepping.tolerance(algorithm) == stepping.HALF_TOL
    assert np.array_equal(p.Q, dtypes.round_to(p.Q, dtypes.BFLOAT16))
    report = compare(algorithm, p)
    assert report.agrees, report.table()
    assert len(report.rows) >= 2
    assert "tolerance 2e-02" in report.table()
