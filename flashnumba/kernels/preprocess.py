"""Before an FA2 backward: D_i = rowsum(dO_i * O_i) (FA2 Alg. 2 l. 4) and dQ = 0 (l. 3).

    preprocess           D_i                     (the readable kernels; zero_fill zeroes dQ)
    preprocess_zero_dq   D_i and dQ = 0          one launch (fa2_fast_backward)

and the device functions they are made of (``row_of_lane``, ``sum_over_row_lanes``,
``zero_flat``), which fa2_tc_backward's 16-bit preprocess shares.

Shared by every FA2 backward kernel version, so no version imports another's
module. D_i is the rowsum of dO_i o O_i, which equals rowsum(P_ij o dP_ij) over
all j: the softmax's backward needs it for every tile of row i, so it is
computed once, before the main kernel, by 8 lanes per row reducing with a
shuffle butterfly.
"""

from numba import cuda, float32

from flashnumba.kernels.hardware import FULL_MASK, WARP_SIZE

# preprocess: 8 lanes per row, 4 rows per warp, 4 warps per block
LANES_PER_ROW = 8
ROWS_PER_PRE_WARP = WARP_SIZE // LANES_PER_ROW
PRE_WARPS = 4
PRE_THREADS = PRE_WARPS * WARP_SIZE
PRE_ROWS_PER_BLOCK = PRE_WARPS * ROWS_PER_PRE_WARP


# ---------------------------------------------------------------------------
# Kernel 1: D_i = rowsum(dO_i * O_i) (Alg. 2 l. 4), with a sub-warp shuffle butterfly
# ---------------------------------------------------------------------------

@cuda.jit(device=True)
def row_of_lane(H_q):
    """(b, h, row, sub): the batch, head and query row this thread sums a part of (blockIdx.x:
    PRE_ROWS_PER_BLOCK rows, blockIdx.y: b, h), and its place among the row's LANES_PER_ROW lanes."""
    tid = cuda.threadIdx.x
    row = cuda.blockIdx.x * PRE_ROWS_PER_BLOCK + tid // LANES_PER_ROW
    return cuda.blockIdx.y // H_q, cuda.blockIdx.y % H_q, row, tid % LANES_PER_ROW


@cuda.jit(device=True)
def sum_over_row_lanes(partial):
    """The sum of `partial` over the LANES_PER_ROW lanes of this thread's row, in each of them: a
    butterfly whose xor offsets (< LANES_PER_ROW) never leave the group. Every lane of the warp
    must call it (also those past Nq), so the full mask is right."""
    offset = LANES_PER_ROW // 2
    while offset > 0:
        partial += cuda.shfl_xor_sync(FULL_MASK, partial, offset)
        offset //= 2
    return partial


@cuda.jit(device=True)
def zero_flat(x):
    """x[:] = 0 for a 1-D array, by a grid-stride loop over the whole (2-D) grid of 1-D blocks."""
    threads = cuda.gridDim.x * cuda.gridDim.y * cuda.blockDim.x
    idx = (cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    for i in range(idx, x.size, threads):
        x[i] = 0.0


@cuda.jit(device=True)
def rowsum(dout, out, D_rows):
    """This thread's part of D = rowsum(dO o O) for the block (``row_of_lane``)."""
    _, Nq, H_q, d = out.shape
    b, h, row, sub = row_of_lane(H_q)
    partial = float32(0.0)
    if row < Nq:
        for x in range(sub, d, LANES_PER_ROW):
            partial += dout[b, row, h, x] * out[b, row, h, x]
    partial = sum_over_row_lanes(partial)
    if sub == 0 and row < Nq:
        D_rows[b, h, row] = partial


@cuda.jit
def preprocess(dout, out, D_rows):
    """D_rows[b, h, r] = sum_x dout[b, r, h, x] * out[b, r, h, x]: D = rowsum(dO o O), Alg. 2 l. 4."""
    rowsum(dout, out, D_rows)


@cuda.jit
def preprocess_zero_dq(dout, out, D_rows, dq_flat):
    """``preprocess`` and dQ = 0 (Alg. 2 l. 3) in one launch: dq_flat (1-D, dQ's floats and any
    spare ones after them) zeroed by a grid-stride loop over the whole grid."""
    rowsum(dout, out, D_rows)
    zero_flat(dq_flat)


@cuda.jit
def zero_fill(x):
    """x[...] = 0 for a 4-D array: dQ starts at zero (Alg. 2 l. 3) before the atomics add into it."""
    B, N, H, d = x.shape
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if idx < B * N * H * d:
        x[idx // (N * H * d), (idx // (H * d)) % N, (idx // d) % H, idx % d] = 0.0
