"""Naive attention: the baseline FlashAttention beats. Three kernels, S and P in global memory.

    1. scores:   S = scale Q K^T            one thread per entry of S (B, Hq, Nq, Nk), written to HBM
                                            (-inf where causal hides the key: c > r + Nk - Nq)
    2. softmax:  P = softmax(S) row-wise    one block per row: max, sum of exp, normalise, in place;
                                            also L = logsumexp (natural log), -inf for a row with no key
    3. output:   O = P V                    one thread per entry of O, reading a whole row of P

S is Nq x Nk per head: this is the O(N^2) memory and the 2 + 2 + 1 passes
over it (write S; read S, write P, read P twice more) that FlashAttention
removes. Nothing is tiled or cached on purpose: every dot product reads its
operands from global memory (the L1/L2 caches help a little).

Memory: 4 B H Nq Nk bytes for S (= P, in place); the bench skips shapes
where that does not fit.
"""

import math

import numpy as np
from numba import cuda, float32

from flashnumba.geometry import num_tiles
from flashnumba.kernels import common

SCORE_THREADS = (16, 16)        # a 16 x 16 patch of S per block: (key c, query r)
SOFTMAX_THREADS = 128           # one block per row of S
OUTPUT_THREADS = (64, 4)        # (output dim n, query r)


@cuda.jit
def scores(q, k, S, scale, causal):
    """S[bh, r, c] = scale * sum_n q[b, r, h, n] k[b, c, h_kv, n]; -inf where masked."""
    B, Nq, H_q, d = q.shape
    Nk = k.shape[1]
    H_kv = k.shape[2]
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    bh = cuda.blockIdx.z
    b = bh // H_q
    h = bh % H_q
    h_kv = h // (H_q // H_kv)
    if r >= Nq or c >= Nk:
        return
    if causal and c > r + Nk - Nq:
        S[bh, r, c] = -math.inf
        return
    acc = float32(0.0)
    for n in range(d):
        acc += q[b, r, h, n] * k[b, c, h_kv, n]
    S[bh, r, c] = acc * scale


@cuda.jit
def softmax_rows(S, L):
    """Row bh, r of S becomes softmax(S[bh, r, :]) in place; L[b, h, r] = logsumexp of the row."""
    Nk = S.shape[2]
    H_q = L.shape[1]
    r = cuda.blockIdx.x
    bh = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    partial = cuda.shared.array(SOFTMAX_THREADS, float32)

    # m = max_c S[r, c]: each thread a strided slice, then a tree in shared memory
    m = float32(-math.inf)
    for c in range(tid, Nk, SOFTMAX_THREADS):
        m = max(m, S[bh, r, c])
    partial[tid] = m
    cuda.syncthreads()  # every thread's partial max written before the tree reads them
    step = SOFTMAX_THREADS // 2
    while step > 0:
        if tid < step:
            partial[tid] = max(partial[tid], partial[tid + step])
        cuda.syncthreads()  # this level of the tree finished before the next reads it
        step //= 2
    m = partial[0]
    m_safe = m if m != -math.inf else float32(0.0)     # a row with no visible key: P = 0
    cuda.syncthreads()  # every thread has read partial[0] before it is reused for the sum

    # l = sum_c exp(S[r, c] - m)
    l = float32(0.0)
    for c in range(tid, Nk, SOFTMAX_THREADS):
        l += math.exp(S[bh, r, c] - m_safe)
    partial[tid] = l
    cuda.syncthreads()  # every thread's partial sum written before the tree reads them
    step = SOFTMAX_THREADS // 2
    while step > 0:
        if tid < step:
            partial[tid] += partial[tid + step]
        cuda.syncthreads()  # this level of the tree finished before the next reads it
        step //= 2
    l = partial[0]

    # P = exp(S - m) / l, in place
    inv_l = float32(1.0) / l if l > 0.0 else float32(0.0)
    for c in range(tid, Nk, SOFTMAX_THREADS):
        S[bh, r, c] = math.exp(S[bh, r, c] - m_safe) * inv_l
    if tid == 0:
        L[bh // H_q, bh % H_q, r] = m_safe + math.log(l) if l > 0.0 else -math.inf


@cuda.jit
def output(P, v, out):
    """out[b, r, h, n] = sum_c P[bh, r, c] v[b, c, h_kv, n]."""
    B, Nq, H_q, d = out.shape
    Nk = v.shape[1]
    H_kv = v.shape[2]
    n = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    bh = cuda.blockIdx.z
    b = bh // H_q
    h = bh % H_q
    h_kv = h // (H_q // H_kv)
    if r >= Nq or n >= d:
        return
    acc = float32(0.0)
    for c in range(Nk):
        acc += P[bh, r, c] * v[b, c, h_kv, n]
    out[b, r, h, n] = acc


def scores_bytes(B, H_q, Nq, Nk):
    """Bytes of the score matrix this baseline materialises."""
    return 4 * B * H_q * Nq * Nk


def naive_attention(q, k, v, *, causal=False, softmax_scale=None):
    """Naive attention: returns (O (B, Nq, Hq, d), L (B, Hq, Nq)), like fa2_forward."""
    B, Nq, Nk, H_q, H_kv, d = common.check_qkv(q, k, v)
    scale = common.resolve_scale(softmax_scale, d)
    arrays = common.Arrays(q, k, v)
    q_d, k_d, v_d = arrays.to_device(q), arrays.to_device(k), arrays.to_device(v)
    S = cuda.device_array((B * H_q, Nq, Nk), dtype=np.float32)
    L = arrays.empty((B, H_q, Nq))
    out = arrays.empty((B, Nq, H_q, d))

    tx, ty = SCORE_THREADS
    scores[(num_tiles(Nk, tx), num_tiles(Nq, ty), B * H_q), SCORE_THREADS](
        q_d, k_d, S, np.float32(scale), bool(causal))
    softmax_rows[(Nq, B * H_q), SOFTMAX_THREADS](S, L)
    tx, ty = OUTPUT_THREADS
    output[(num_tiles(d, tx), num_tiles(Nq, ty), B * H_q), OUTPUT_THREADS](S, v_d, out)
    return arrays.result(out), arrays.result(L)


def targets():
    """[(label, dispatcher, argtypes)] for flashnumba.tools.resources (a plain target)."""
    from numba import types
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    return [("scores", scores, (a4, a4, a3, types.float32, types.boolean)),
            ("softmax_rows", softmax_rows, (a3, a3)),
            ("output", output, (a3, a4, a4))]
