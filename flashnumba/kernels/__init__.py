"""Numba CUDA kernels: each registry version's forward and backward, and the device code they share.

    <version>_forward.py, <version>_backward.py   the kernels of each version in
                                                  ``flashnumba.registry`` (fa1, fa2, fa2_fast)
    common        what every wrapper shares: input checks, head-dim buckets, TileConfig
    hardware      the GPU's numbers that bound a tile (warp size, shared memory, registers)
    geometry      ``flashnumba.geometry``'s tile geometry compiled as device functions
    preprocess    D_i = rowsum(dO_i * O_i) and dQ = 0, before every FA2 backward
    philox        the dropout mask's Philox4x32-10, on the device
    fast_math     exp2 as one ex2.approx.ftz, and the -0.0 test on the bits
    smem_limit    more than 48 KB of dynamic shared memory per block
    gqa           dK, dV summed over each group of query heads
    lse, cast, dropout_mask, naive   small elementwise kernels and the naive baseline

No kernel module imports another version's module; none runs a subprocess (the
resource check, which compiles them all, is ``flashnumba.tools.resources``).
"""
