"""The tile geometry of ``flashnumba.geometry``, compiled as CUDA device functions.

The kernels call exactly the functions the mirrors and figures call, so the
causal tile skipping cannot drift between them.
"""

from numba import cuda

from flashnumba import geometry

num_tiles = cuda.jit(device=True)(geometry.num_tiles)
kv_tile_end = cuda.jit(device=True)(geometry.kv_tile_end)
q_tile_start = cuda.jit(device=True)(geometry.q_tile_start)
kv_tile_start = cuda.jit(device=True)(geometry.kv_tile_start)
q_tile_end = cuda.jit(device=True)(geometry.q_tile_end)
