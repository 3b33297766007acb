"""Numba CUDA kernels: one module per algorithm (see each module\x27s docstring)."""
