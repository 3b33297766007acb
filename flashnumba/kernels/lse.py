"""The log-sum-exp of a row, L_i = m_i + log(l_i), and back: FA1's statistics next to FA2's.

FlashAttention-1 (Algorithm 1) leaves the running max m_i and sum l_i of each
row in HBM; FlashAttention-2 stores only their combination L_i = m_i + log l_i,
which is also what flash-attn returns as ``softmax_lse``. The public calls speak
L; these two elementwise kernels let FA1's kernels join in:

    lse_from_ml(m, l, L)   L = m + log l;  l = 0 (a row that sees no key): L = -inf
    ml_from_lse(L, m, l)   m = L, l = 1;   L = -inf: l = 0

The second is exact for the backward pass: FA1's backward forms
P_ij = exp(S_ij - m_i) / l_i, and exp(S_ij - L_i) / 1 is the same softmax.
A NaN stays NaN both ways (only l == 0 and L == -inf are special cases).
All arrays are flat, float32.
"""

import math

import numpy as np
from numba import cuda, float32, types

from flashnumba.geometry import num_tiles
from flashnumba.kernels.common import is_device_array

THREADS = 256


def blocks(n):
    return num_tiles(n, THREADS)


@cuda.jit
def lse_from_ml(m, l, L):
    """L[i] = m[i] + log(l[i]), -inf where l[i] == 0."""
    i = cuda.grid(1)
    if i < L.size:
        if l[i] == 0.0:
            L[i] = -math.inf
        else:
            L[i] = m[i] + math.log(l[i])


@cuda.jit
def ml_from_lse(L, m, l):
    """m[i] = L[i], l[i] = 1 (0 where L[i] == -inf): the statistics FA1's backward reads."""
    i = cuda.grid(1)
    if i < L.size:
        m[i] = L[i]
        if L[i] == -math.inf:
            l[i] = float32(0.0)
        else:
            l[i] = float32(1.0)


def lse_of(m, l):
    """L = m + log l for FA1's (m, l), on the side they are on (device arrays: the kernel above)."""
    if not is_device_array(m):
        with np.errstate(divide="ignore"):
            return np.where(l == 0, -np.inf, m + np.log(l)).astype(np.float32)
    L = cuda.device_array(l.shape, dtype=np.float32)
    lse_from_ml[blocks(L.size), THREADS](m.reshape(m.size), l.reshape(l.size), L.reshape(L.size))
    return L


def ml_of(L):
    """(m, l) = (L, 1) (l = 0 where L = -inf) for FA1's backward, on the side L is on."""
    if not is_device_array(L):
        L = np.asarray(L, dtype=np.float32)
        return L.copy(), np.where(L == -np.inf, 0.0, 1.0).astype(np.float32)
    m = cuda.device_array(L.shape, dtype=np.float32)
    l = cuda.device_array(L.shape, dtype=np.float32)
    ml_from_lse[blocks(L.size), THREADS](L.reshape(L.size), m.reshape(m.size), l.reshape(l.size))
    return m, l


def targets():
    """(label, dispatcher, argtypes) for the resource check."""
    a1 = types.Array(types.float32, 1, "C")
    return [("lse_from_ml", lse_from_ml, (a1, a1, a1)), ("ml_from_lse", ml_from_lse, (a1, a1, a1))]
