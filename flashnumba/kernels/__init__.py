"""Numba CUDA kernels: each kernel version's forward and backward, and the device code they share.

The kernels of each version in ``flashnumba.registry`` (fa1, fa2, fa2_fast, fa2_tc):

    fa1_forward, fa1_backward            FlashAttention-1 (Dao et al. 2022, Alg. 1 / 4):
                                         one thread block per head, warps split the keys
    fa2_forward, fa2_backward            FlashAttention-2 (Dao 2023, Alg. 1 / 2), version 1:
                                         one block per tile, warps split the rows; the readable one
    fa2_fast_forward, fa2_fast_backward  version 2: register tiles and vector loads, fp32 FMA
    fa2_tc_forward, fa2_tc_backward      version 3: fp16/bf16 on the tensor cores (mma.sync)

What they share:

    common        what every wrapper shares: input checks, head-dim buckets, device arrays, TileConfig
    hardware      the GPU's numbers that bound a tile (warp size, shared memory, registers)
    geometry      ``flashnumba.geometry``'s tile geometry (num_tiles, causal tile skipping)
                  compiled as device functions
    preprocess    D_i = rowsum(dO_i * O_i) and dQ = 0, before every FA2 backward
    gqa           dK, dV summed over each group of query heads
    philox        the dropout mask's Philox4x32-10, on the device
    fast_math     exp2 as one ex2.approx.ftz, and the -0.0 test on the bits (fast kernels)
    mma           tensor-core instructions: mma.sync, ldmatrix, cp.async, bf16/f16 packing
    half_io       16-bit inputs at the tensor-core kernels' door: dtype, shapes, head dim padded
    cast          float16/bfloat16 in, float32 inside, the input dtype out (fp32 kernels)
    lse           L_i = m_i + log(l_i) and back: FA1's statistics next to FA2's
    dropout_mask  S_dmask: the probabilities with the dropped entries negated, as flash-attn returns them
    smem_limit    more than 48 KB of dynamic shared memory per block
    quiet         no low-occupancy warnings from flashnumba's own launches
    naive         naive attention, S and P in global memory: the baseline

No kernel module imports another version's module; none runs a subprocess (the
resource check, which compiles them all, is ``flashnumba.tools.resources``).
"""
