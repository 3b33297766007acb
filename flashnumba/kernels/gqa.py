"""Grouped-query attention in the backward pass: dK and dV of a K/V head sum over its query heads.

The backward kernels write one dK_j, dV_j per *query* head into (B, Nk, Hq, d)
buffers; this kernel then sums each group of Hq // Hkv heads into
(B, Nk, Hkv, d). A plain sum in a fixed order: deterministic, no atomics.
"""

from numba import cuda

from flashnumba.geometry import num_tiles

THREADS = 128


@cuda.jit
def sum_head_groups(dX_per_q_head, dX):
    """dX[b, n, g, k] = sum over h in group g of dX_per_q_head[b, n, h, k]."""
    B, N, Hkv, d = dX.shape
    group = dX_per_q_head.shape[2] // Hkv
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if idx >= B * N * Hkv * d:
        return
    k = idx % d
    g = (idx // d) % Hkv
    n = (idx // (d * Hkv)) % N
    b = idx // (d * Hkv * N)
    total = dX_per_q_head[b, n, g * group, k]        # starts in float32, stays float32
    for h in range(g * group + 1, (g + 1) * group):
        total += dX_per_q_head[b, n, h, k]
    dX[b, n, g, k] = total


def reduce_groups(dX_per_q_head, Hkv):
    """(B, N, Hq, d) device array -> (B, N, Hkv, d) device array; returns the input if Hq == Hkv."""
    B, N, Hq, d = dX_per_q_head.shape
    if Hq == Hkv:
        return dX_per_q_head
    dX = cuda.device_array((B, N, Hkv, d), dtype=dX_per_q_head.dtype)
    n = B * N * Hkv * d
    sum_head_groups[num_tiles(n, THREADS), THREADS](dX_per_q_head, dX)
    return dX


def targets():
    """(label, dispatcher, argtypes) for the resource check: the GQA reduction."""
    from numba import types
    array4 = types.Array(types.float32, 4, "C")
    return [("sum_head_groups", sum_head_groups, (array4, array4))]
