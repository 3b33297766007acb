"""Split-KV decoding ("flash-decoding"): a few queries against a long KV cache.

With Nq = 1 a FlashAttention-2 grid (Tr, B * Hq) has B * Hq blocks, too few to
fill a GPU, and each walks the whole cache alone. Here the keys are split too:

    grid (num_splits, B * Hq); block (split s, batch b, head h) attends the
    queries of (b, h) over keys [s * keys_per_split, (s + 1) * keys_per_split)
    of its sequence, and writes a partial O_s (normalised) and L_s (its
    log-sum-exp) to HBM;
    combine: O = sum_s exp(L_s - L) O_s, L = log sum_s exp(L_s)   (flashnumba.merge)

Inside a block (T = d_pad threads, thread n owns output dim n):

    for each query row r of (b, h):
        Q_r -> shared (scaled into log2 units)
        m = -inf, l = 0, o_n = 0                           registers (m, l the same in every thread)
        for each chunk of BC keys of the split, inside the row's window:
            K_chunk -> shared (coalesced along the head dim)
            S_c = Q_r . K_c        threads n < BC, key c = c0 + n; softcap, ALiBi, masking
            m_new = max(m, max_c S_c);  P_c = exp2(S_c - m_new)
            l = exp2(m - m_new) l + sum_c P_c
            o_n = exp2(m - m_new) o_n + sum_c P_c V[c, n]  (V read from HBM along n: coalesced)
        O_s[r, n] = o_n / l,  L_s[r] = (m + log2 l) ln 2

Every thread reads all BC scores of a chunk from shared memory (a broadcast): the
row max and sum are computed redundantly by every thread instead of reduced, which
costs what P V costs anyway (BC per thread per chunk) and no extra barriers.

The cache is read through ``cache_rows[b]`` (flash-attn's cache_batch_idx) and
sequence b sees its first ``seqlens_k[b]`` keys; query r of Nq sees key c when
r + Nk - Nq - left <= c <= r + Nk - Nq + right (-1 unbounded; causal: right = 0).
Head dims: compiled for d_pad in SPLIT_HEAD_DIMS, up to 256 (shared memory: Ks is
BC x (d_pad + 1) floats, 33 KB at d_pad = 256).

What bounds it: reading K and V once from HBM; K's chunk is staged in shared
memory, V is read straight from HBM. Not tuned on a GPU (bench/features.py
times it against one read of the cache).

The combine step is ``flashnumba.merge``'s formula on device arrays (merge.py
works on NumPy and PyTorch; this kernel is its device form, tested against it).
"""

import functools
import math

import numpy as np
from numba import cuda, float32

from flashnumba.geometry import num_tiles
from flashnumba.kernels.fast_math import LN_2, LOG2_E

NAME = __name__.rpartition(".")[2]
SPLIT_HEAD_DIMS = (32, 64, 128, 256)
BC = 32                                   # keys per chunk (one per thread of the first warp)
MAX_SPLITS = 128                          # flash-attn's cap on num_splits
COMBINE_THREADS = 128


def head_dim_bucket(d):
    if not 1 <= d <= SPLIT_HEAD_DIMS[-1]:
        raise ValueError(f"head dim d={d} is not supported by split-KV decoding: expected "
                         f"1 <= d <= {SPLIT_HEAD_DIMS[-1]}")
    return next(d_pad for d_pad in SPLIT_HEAD_DIMS if d <= d_pad)


def num_splits_heuristic(blocks, num_sms, num_key_blocks, max_splits=MAX_SPLITS):
    """flash-attn's choice of num_splits (flash_api.cpp): none when B * Hq * Tr blocks already
    fill 80% of the SMs; else the smallest split count whose wave efficiency (blocks * s / SMs
    over its ceiling) is within 85% of the best, counting only split counts that change how
    many key blocks each split gets."""
    if blocks >= 0.8 * num_sms:
        return 1
    max_splits = max(1, min(max_splits, num_sms, num_key_blocks))

    def eligible(s):
        return s == 1 or num_tiles(num_key_blocks, s) != num_tiles(num_key_blocks, s - 1)

    efficiency = {}
    for s in range(1, max_splits + 1):
        if eligible(s):
            waves = blocks * s / num_sms
            efficiency[s] = waves / math.ceil(waves)
    best = max(efficiency.values())
    return next(s for s, e in efficiency.items() if e >= 0.85 * best)


@functools.lru_cache(maxsize=None)
def build(d_pad, SOFTCAP=False, ALIBI=False):
    """The split-KV kernel for head-dim bucket d_pad (d_pad threads); softcap and ALiBi as variants."""
    T = d_pad
    KS_ROW = d_pad + 1                        # padded row: threads n < BC read Ks[n, kk], no bank conflict

    @cuda.jit
    def split_kv_kernel(q, k_cache, v_cache, cache_rows, seqlens_k, O_part, L_part, q_scale, left, right,
                        cap2, slopes, keys_per_split):
        # --- sizes --- q (B, N_q, H_q, d); caches (B_cache, S, H_kv, d); O_part (splits, B, N_q, H_q, d);
        # L_part (splits, B, H_q, N_q); q_scale: softmax scale times log2(e); left, right: the window
        # (-1 unbounded); cap2: softcap log2(e) (SOFTCAP); slopes (B, H_q) (ALIBI)
        _, N_q, H_q, d = q.shape
        H_kv = k_cache.shape[2]
        s = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // H_q
        h = bh % H_q
        h_kv = h // (H_q // H_kv)
        n = cuda.threadIdx.x
        row_c = cache_rows[b]
        N_k = seqlens_k[b]
        key_start = s * keys_per_split
        key_stop = min(key_start + keys_per_split, N_k)
        if ALIBI:
            slope = slopes[b, h] * float32(LOG2_E)

        Qs = cuda.shared.array(T, float32)
        Ks = cuda.shared.array((BC, KS_ROW), float32)
        Ss = cuda.shared.array(BC, float32)

        for r in range(N_q):
            centre = r + N_k - N_q                  # the key aligned with query r (bottom-right)
            c_lo = key_start
            c_hi = key_stop
            if left >= 0:
                c_lo = max(c_lo, centre - left)
            if right >= 0:
                c_hi = min(c_hi, centre + right + 1)
            cuda.syncthreads()  # every thread done reading the last row's Qs
            Qs[n] = q[b, r, h, min(n, d - 1)] * q_scale if n < d else float32(0.0)
            m = float32(-math.inf)
            l = float32(0.0)
            o = float32(0.0)
            c0 = c_lo
            while c0 < c_hi:
                cuda.syncthreads()  # Ks, Ss of the last chunk consumed (and Qs written)
                for kk in range(BC):                # K_chunk -> Ks, dims past d and keys past c_hi: 0
                    c = c0 + kk
                    value = float32(0.0)
                    if c < c_hi and n < d:
                        value = k_cache[row_c, c, h_kv, n]
                    Ks[kk, n] = value
                cuda.syncthreads()  # Ks written before the scores read it
                if n < BC:                          # S_c = Q_r . K_c for key c = c0 + n
                    c = c0 + n
                    score = float32(-math.inf)
                    if c < c_hi:
                        acc = float32(0.0)
                        for kk in range(d_pad):
                            acc += Qs[kk] * Ks[n, kk]
                        score = acc
                        if SOFTCAP:                 # S = c2 tanh(S / c2)
                            score = cap2 * math.tanh(score / cap2)
                        if ALIBI:                   # S -= slope |r + Nk - Nq - c|
                            score -= slope * float32(abs(centre - c))
                    Ss[n] = score
                cuda.syncthreads()  # every score of the chunk written before any thread reads them
                m_tilde = Ss[0]
                for kk in range(1, BC):
                    m_tilde = max(m_tilde, Ss[kk])
                m_new = max(m, m_tilde)             # m_new = max(m, rowmax(S_chunk))
                m_safe = m_new
                if m_new == -math.inf:
                    m_safe = float32(0.0)
                alpha = math.exp2(m - m_safe)
                l *= alpha
                o *= alpha
                for kk in range(BC):
                    p = math.exp2(Ss[kk] - m_safe)  # P_c = exp2(S_c - m_new), 0 where masked
                    l += p
                    c = c0 + kk
                    if c < c_hi and n < d:
                        o += p * v_cache[row_c, c, h_kv, n]
                m = m_new
                c0 += BC
            if n < d:
                O_part[s, b, r, h, n] = o / l if l != 0.0 else float32(0.0)
            if n == 0:
                L_part[s, b, h, r] = (m + math.log2(l)) * LN_2 if l != 0.0 else -math.inf

    return split_kv_kernel


@cuda.jit
def combine(O_part, L_part, out, L):
    """out[b, r, h, n] = sum_s exp(L_s - L) O_s,  L = log sum_s exp(L_s): merge.merge on the device.
    A split that saw no key (L_s = -inf) weighs 0; a row no split saw: out 0, L -inf; NaN spreads."""
    splits, B, N_q, H_q, d = O_part.shape
    idx = cuda.grid(1)
    if idx >= B * N_q * H_q * d:
        return
    n = idx % d
    h = (idx // d) % H_q
    r = (idx // (d * H_q)) % N_q
    b = idx // (d * H_q * N_q)
    m = L_part[0, b, h, r]
    for s in range(1, splits):
        L_s = L_part[s, b, h, r]
        if L_s != L_s or L_s > m:                   # max that keeps a NaN
            m = L_s
    m_safe = m
    if m == -math.inf:
        m_safe = float32(0.0)                       # every split empty: avoid -inf - -inf
    total = float32(0.0)
    for s in range(splits):
        total += math.exp(L_part[s, b, h, r] - m_safe)
    acc = float32(0.0)
    for s in range(splits):
        w = math.exp(L_part[s, b, h, r] - m_safe)
        if w > 0.0:                                 # an empty split's O_s is never read
            acc += (w / total) * O_part[s, b, r, h, n]
    out[b, r, h, n] = acc + total * float32(0.0)    # a NaN L_s: the row is NaN
    if n == 0:
        L[b, h, r] = m_safe + math.log(total) if total > 0.0 else -math.inf


def partials(Q, K_cache, V_cache, cache_rows, seqlens_k, num_splits, keys_per_split, scale, window_size,
             softcap=0.0, slopes=None):
    """(O_part (splits, B, Nq, Hq, d), L_part (splits, B, Hq, Nq)) device arrays: each split's
    normalised output and log-sum-exp. Q, caches float32 device arrays; cache_rows, seqlens_k
    int32 device arrays (B,); window_size (left, right) with causal already folded in (right = 0)."""
    B, N_q, H_q, d = Q.shape
    d_pad = head_dim_bucket(d)
    kernel = build(d_pad, softcap > 0.0, slopes is not None)
    O_part = cuda.device_array((num_splits, B, N_q, H_q, d), dtype=np.float32)
    L_part = cuda.device_array((num_splits, B, H_q, N_q), dtype=np.float32)
    slopes_d = slopes if slopes is not None else cuda.device_array((1, 1), dtype=np.float32)
    kernel[(num_splits, B * H_q), d_pad](Q, K_cache, V_cache, cache_rows, seqlens_k, O_part, L_part,
                                     np.float32(scale * LOG2_E), np.int64(window_size[0]),
                                     np.int64(window_size[1]), np.float32(softcap * LOG2_E), slopes_d,
                                     np.int64(keys_per_split))
    return O_part, L_part


def merged(O_part, L_part):
    """(out (B, Nq, Hq, d), L (B, Hq, Nq)) device arrays: the partials combined."""
    _, B, N_q, H_q, d = O_part.shape
    out = cuda.device_array((B, N_q, H_q, d), dtype=np.float32)
    L = cuda.device_array((B, H_q, N_q), dtype=np.float32)
    combine[num_tiles(out.size, COMBINE_THREADS), COMBINE_THREADS](O_part, L_part, out, L)
    return out, L


def keys_per_split(max_seqlen_k, num_splits):
    """Keys per split: the cache cut into num_splits runs, each a whole number of chunks."""
    return num_tiles(num_tiles(max_seqlen_k, num_splits), BC) * BC


def targets():
    """(label, dispatcher, argtypes) for the resource check: every bucket's plain and
    softcap + ALiBi kernel, and the combine."""
    from numba import types
    a5 = types.Array(types.float32, 5, "C")
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    a2 = types.Array(types.float32, 2, "C")
    i1 = types.Array(types.int32, 1, "C")
    argtypes = (a4, a4, a4, i1, i1, a5, a4, types.float32, types.int64, types.int64, types.float32,
                a2, types.int64)
    kernels = [(f"{NAME}_d{d_pad}{'_softcap_alibi' if variant else ''}", build(d_pad, variant, variant),
                argtypes) for d_pad in SPLIT_HEAD_DIMS for variant in (False, True)]
    return kernels + [("combine", combine, (a5, a4, a4, a3))]
