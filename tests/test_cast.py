"""The dtype kernels at the kernels' door (kernels.cast), against NumPy and ml_dtypes' own conversions."""

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

from flashnumba.kernels import cast

BF16 = np.dtype(ml_dtypes.bfloat16)

# float32 values that test rounding: ties (to even both ways), just past ties, the largest
# finite values (bfloat16 and float16 overflow to inf), subnormals, signed zeros, inf, NaN
SPECIAL = np.array([
    1.0, -1.0, 0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan,
    1.00390625,            # 1 + 2^-8: a bfloat16 tie, rounds to even (1.0)
    1.01171875,            # 1 + 3 * 2^-8: a tie, rounds up to even (1.015625)
    1.0039063,             # just past the tie: rounds up
    3.3895314e38,          # the largest bfloat16
    3.4028235e38,          # the largest float32: bfloat16 inf
    65504.0, 65520.0,      # the largest float16, and float16's first inf
    1e-40, -1e-45, 1e-39,  # float32 subnormals
    6.1e-5, 5.96e-8,       # float16 normal / subnormal edge
], dtype=np.float32)


def _values(rng):
    spread = rng.standard_normal(500) * 10.0 ** rng.integers(-6, 6, 500)
    return np.concatenate([SPECIAL, spread.astype(np.float32)])


def _run(kernel, src, dst):
    kernel[cast.blocks(dst.size), cast.THREADS](src, dst)
    return dst.copy_to_host()


def test_narrow_bf16_matches_ml_dtypes_bit_for_bit(rng):
    x = _values(rng)
    bits = _run(cast.narrow_bf16, cuda.to_device(x.view(np.uint32)), cuda.device_array(x.size, np.uint16))
    expected = x.astype(BF16)
    nan = np.isnan(x)
    assert np.array_equal(bits[~nan], expected.view(np.uint16)[~nan])
    assert np.isnan(bits.view(BF16).astype(np.float32)[nan]).all()          # NaN stays NaN


def test_narrow_f16_matches_numpy(rng):
    x = _values(rng)
    out = _run(cast.narrow, cuda.to_device(x), cuda.device_array(x.size, np.float16))
    np.testing.assert_array_equal(out, x.astype(np.float16))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_widen_is_exact_and_reads_strided_views(dtype, rng):
    full = rng.standard_normal((2, 5, 3, 6, 7)).astype(np.float32)       # packed (B, S, 3, H, d)
    stored = full.astype(BF16 if dtype == "bfloat16" else dtype)
    exact = stored.astype(np.float32)
    src_full = cuda.to_device(stored.view(np.uint16) if dtype == "bfloat16" else stored)
    src = src_full[:, :, 1]                                                # a strided slice
    dst = cuda.device_array((2, 5, 6, 7), np.float32)
    if dtype == "bfloat16":
        cast.widen_bf16[cast.blocks(dst.size), cast.THREADS](src, dst.view(np.uint32))
    else:
        cast.widen[cast.blocks(dst.size), cast.THREADS](src, dst)
    np.testing.assert_array_equal(dst.copy_to_host(), exact[:, :, 1])
