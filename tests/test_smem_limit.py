"""kernels.smem_limit: a block with more than 48 KB of dynamic shared memory (the GPU test is the
one that matters; on the simulator the launch runs with no limit and the checks still apply)."""

import numpy as np
import pytest
from numba import cuda, float32

import flashnumba
from flashnumba.kernels import smem_limit

FLOATS = 100 * 1024 // 4           # 100 KB: twice the default limit
THREADS = 128


@cuda.jit
def _reverse_through_shared(src, dst):
    """dst = src reversed, through one 100 KB dynamic shared array (every float of it used)."""
    buf = cuda.shared.array(0, float32)
    tid = cuda.threadIdx.x
    i = tid
    while i < FLOATS:
        buf[i] = src[i]
        i += THREADS
    cuda.syncthreads()  # the whole buffer written before any thread reads another thread's floats
    i = tid
    while i < FLOATS:
        dst[i] = buf[FLOATS - 1 - i]
        i += THREADS


def test_a_block_gets_100_kb_of_dynamic_shared_memory():
    src = np.arange(FLOATS, dtype=np.float32)
    d_src, d_dst = cuda.to_device(src), cuda.device_array(FLOATS, np.float32)
    nbytes = FLOATS * 4
    smem_limit.raise_dynamic_limit(_reverse_through_shared, (d_src, d_dst), nbytes)
    _reverse_through_shared[1, THREADS, 0, nbytes](d_src, d_dst)
    np.testing.assert_array_equal(d_dst.copy_to_host(), src[::-1])


def test_opt_in_limits():
    assert smem_limit.opt_in_limit((9, 0)) == 227 * 1024
    assert smem_limit.opt_in_limit((8, 0)) == 163 * 1024
    assert smem_limit.opt_in_limit((5, 2)) == smem_limit.STATIC_LIMIT


@pytest.mark.skipif(flashnumba.on_simulator(), reason="the simulator enforces no shared-memory limit")
def test_too_much_is_refused_by_name():
    with pytest.raises(ValueError, match="bytes of shared memory per block"):
        smem_limit.raise_dynamic_limit(_reverse_through_shared, (), 10 ** 9)
