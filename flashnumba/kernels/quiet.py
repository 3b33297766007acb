"""No low-occupancy warnings from flashnumba's own launches.

Numba warns ``NumbaPerformanceWarning: Grid size N will likely result in GPU
under-utilization`` whenever a kernel is configured with fewer than 128 blocks.
Small problems (one head, a few tiles) and the small helper kernels launch such
grids on purpose, and a benchmark printed hundreds of these lines. The check
reads ``numba.cuda.core.config.CUDA_LOW_OCCUPANCY_WARNINGS`` when a kernel is
configured (``kernel[grid, block]``); inside ``launches()`` it reads 0. The
user's own kernels, outside, still warn.

    with quiet.launches():
        O, L = module.forward(Q, K, V, ...)
"""

from contextlib import contextmanager

from numba.cuda.core import config


@contextmanager
def launches():
    """Within: kernels configured without the low-occupancy warning (nesting restores the outer value)."""
    saved = config.CUDA_LOW_OCCUPANCY_WARNINGS
    config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    try:
        yield
    finally:
        config.CUDA_LOW_OCCUPANCY_WARNINGS = saved
