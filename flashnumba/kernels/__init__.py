"""Numba CUDA kernels, one module per algorithm.

fa1_forward, fa1_backward: FlashAttention Algorithms 1 and 2 (Dao et al. 2022).
fa2_forward, fa2_backward: FlashAttention-2 (Dao 2023), warps splitting the rows of a tile.
"""
