"""kernels.fast_math inside a kernel: exp2 with flush-to-zero and the -0.0 test (on a GPU the
intrinsics, on the simulator their Python equivalents; the same checks apply to both)."""

import numpy as np
from numba import cuda

from flashnumba.kernels.fast_math import SMALLEST_NORMAL, exp2_ftz, is_negative_zero


@cuda.jit
def _apply(x, exp2_out, negzero_out):
    i = cuda.grid(1)
    if i < x.size:
        exp2_out[i] = exp2_ftz(x[i])
        negzero_out[i] = 1 if is_negative_zero(x[i]) else 0


def _run(x):
    x = np.asarray(x, dtype=np.float32)
    e, z = np.zeros_like(x), np.zeros(x.size, dtype=np.int32)
    _apply[(x.size + 63) // 64, 64](x, e, z)
    return e, z


def test_exp2_ftz_matches_exp2_where_the_result_is_normal():
    x = np.linspace(-125.9, 20.0, 4001, dtype=np.float32)
    e, _ = _run(x)
    np.testing.assert_allclose(e, np.exp2(x.astype(np.float64)), rtol=2e-6)


def test_exp2_ftz_flushes_results_below_the_smallest_normal_to_plus_zero():
    e, _ = _run([-127.0, -140.0, -1e30, -np.inf])
    assert np.all(e == 0.0) and not np.any(np.signbit(e))
    assert np.exp2(-127.0) < SMALLEST_NORMAL


def test_exp2_ftz_special_values():
    e, _ = _run([0.0, np.nan, np.inf, 200.0])
    assert e[0] == 1.0 and np.isnan(e[1]) and e[2] == np.inf and e[3] == np.inf


def test_is_negative_zero_only_for_minus_zero():
    _, z = _run([-0.0, 0.0, -1e-45, 1.0, -1.0, np.nan, -np.inf])
    assert z.tolist() == [1, 0, 0, 0, 0, 0, 0]
