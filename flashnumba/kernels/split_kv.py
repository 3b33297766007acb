"""Split-KV decoding ("flash-decoding"): a few queries against a long KV cache.

With Nq = 1 a FlashAttention-2 grid (Tr, B * Hq) has B * Hq blocks, too few to
keep the GPU's memory system busy, and each walks the whole cache alone. Here
the keys are split too, and one block serves every query head of a KV head:

    grid (num_splits, B * Hkv); block (split s, batch b, KV head h_kv) attends the
    queries of all G = Hq / Hkv query heads h = h_kv G + g of b, over keys
    [s * keys_per_split, (s + 1) * keys_per_split) of its sequence, and writes
    each row's partial O_s (normalised) and L_s (its log-sum-exp) to HBM;
    combine: O = sum_s exp(L_s - L) O_s, L = log sum_s exp(L_s)   (flashnumba.merge)

So K and V are read once per split, not once per query head. The rows of a
block are (r, g) for r < Nq, g < G, numbered r * G + g; they go R at a time
(a compile-time group size, keeping the per-row registers bounded), each
group re-reading the split's keys.

Inside a block (NW warps of 32 lanes; lane owns head dims n = lane + 32 i, i < DL = d_pad / 32):

    for each group of R rows:
        Q_r -> registers (scaled into log2 units); m = -inf, l = 0, o = 0 per row
        warp w: for each batch of KB keys c = c0 .. c0 + KB - 1, c0 = lo + w KB, lo + (NW + w) KB, ...
            (KB per head-dim bucket and variant: LAYOUTS)
            K_c -> registers (each row load: 32 consecutive floats, coalesced)
            S_rc = sum_i Q_r[n] K_c[n]: this lane's share
            V_c -> registers (in flight during the shuffles that follow)
            S_rc = sum over the lanes of their shares         shuffles (warp_sum); softcap, ALiBi
            S_rc = -inf outside row r's band, past seqlens_k[b] or past the split
            m_new = max(m, max_c S_rc);  P_rc = exp2(S_rc - m_new)
            l = exp2(m - m_new) l + sum_c P_rc
            o = exp2(m - m_new) o + sum_c P_rc V_c
        the NW warps' (m, l, o) of each row -> shared; merged per row:
        O_s = sum_w exp2(m_w - m) o_w / sum_w exp2(m_w - m) l_w,  L_s = (m + log2 l) ln 2

The warps are independent in the key loop (no barrier in it); the only barriers
guard the shared merge of (m, l, o). The cache is read through ``cache_rows[b]``
(flash-attn's cache_batch_idx) and sequence b sees its first ``seqlens_k[b]``
keys; query r of Nq sees key c when r + Nk - Nq - left <= c <= r + Nk - Nq + right
(-1 unbounded; causal: right = 0). Head dims: compiled for d_pad in
SPLIT_HEAD_DIMS, up to 256.

What bounds it: reading K and V once from HBM, which needs many warps in flight
(``num_splits_heuristic``); then the per-key shuffles (5 per key and row for the
dot products' warp sums).

The combine step is ``flashnumba.merge``'s formula on device arrays (merge.py
works on NumPy and PyTorch; this kernel is its device form, tested against it).
"""

import functools
import math

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, int32

from flashnumba.geometry import num_tiles
from flashnumba.kernels.fast_math import LN_2, LOG2_E
from flashnumba.kernels.hardware import FULL_MASK, WARP_SIZE

NAME = __name__.rpartition(".")[2]
SPLIT_HEAD_DIMS = (32, 64, 128, 256)
NW = 4                                    # warps per block
R = 4                                     # query rows per group (rows held in registers at once)
# (KB keys per warp per batch, blocks per SM asked of the compiler) per (d_pad, softcap or ALiBi):
# the most keys in flight per SM that compile without spills for sm_80 and sm_90 (`flashnumba
# resources`); the launch bounds cap registers at 65536 / (NW * 32 * blocks) per thread
LAYOUTS = {(32, False): (4, 4), (32, True): (4, 3),
           (64, False): (4, 3), (64, True): (2, 3),
           (128, False): (4, 3), (128, True): (4, 2),
           (256, False): (1, 2), (256, True): (1, 2)}
SPLIT_KEYS = 16                           # splits are multiples of every layout's NW * KB keys
MAX_SPLITS = 128                          # flash-attn's cap on num_splits
BLOCKS_PER_SM = 16                        # the heuristic's target (a guess to tune on a GPU): several waves
MIN_KEY_BLOCKS_PER_SPLIT = 4              # and each split at least 4 of the caller's key blocks
COMBINE_THREADS = 128


def head_dim_bucket(d):
    if not 1 <= d <= SPLIT_HEAD_DIMS[-1]:
        raise ValueError(f"head dim d={d} is not supported by split-KV decoding: expected "
                         f"1 <= d <= {SPLIT_HEAD_DIMS[-1]}")
    return next(d_pad for d_pad in SPLIT_HEAD_DIMS if d <= d_pad)


def num_splits_heuristic(blocks, num_sms, num_key_blocks, max_splits=MAX_SPLITS):
    """Ours, for this kernel (flash-attn's formula assumed its own): the smallest split count
    giving at least BLOCKS_PER_SM blocks per SM, at most max_splits and at most one split per
    MIN_KEY_BLOCKS_PER_SPLIT key blocks. blocks: the grid's blocks per split (B * Hkv).

    A memory-bound kernel wants every SM full of warps with loads in flight: 2 to 4 blocks
    of NW warps fit on an SM at once (LAYOUTS), so BLOCKS_PER_SM blocks per SM are several
    waves, and the last, partial one is a small part of the time. A split of fewer keys
    would spend a larger share on its start, its merge and the combine."""
    wanted = -(-BLOCKS_PER_SM * num_sms // max(1, blocks))
    cap = max(1, min(max_splits, num_key_blocks // MIN_KEY_BLOCKS_PER_SPLIT))
    return max(1, min(wanted, cap))


def _jit_options(d_pad, features):
    """Launch bounds for the real compiler (the simulator takes none)."""
    if numba_config.ENABLE_CUDASIM:
        return {}
    return {"launch_bounds": (NW * WARP_SIZE, LAYOUTS[d_pad, features][1])}


@cuda.jit(device=True)
def warp_sum(x):
    """sum over the 32 lanes of a warp; xor offsets 16, 8, 4, 2, 1: every lane ends with the sum."""
    offset = WARP_SIZE // 2
    while offset > 0:
        x += cuda.shfl_xor_sync(FULL_MASK, x, offset)
        offset //= 2
    return x


@functools.cache
def build(d_pad, SOFTCAP=False, ALIBI=False):
    """The split-KV kernel for head-dim bucket d_pad (NW warps); softcap and ALiBi as variants."""
    DL = d_pad // WARP_SIZE                   # head dims per lane
    T = NW * WARP_SIZE
    KB = LAYOUTS[d_pad, SOFTCAP or ALIBI][0]
    STEP = NW * KB                            # keys the block's warps take in one round of batches

    @cuda.jit(device=True, inline="always")
    def batch_to_registers(X, cache, row_c, c0, c_stop, h_kv, d, lane):
        """Cache rows c0 .. c0 + KB, this lane's dims (lane + 32 i), -> X (KB, DL): one coalesced
        128-byte read per row and i; rows at or past c_stop and dims past d read as 0."""
        for j in range(KB):
            c = c0 + j
            for i in range(DL):
                n = lane + WARP_SIZE * i
                value = float32(0.0)
                if c < c_stop and n < d:
                    value = cache[row_c, c, h_kv, n]
                X[j, i] = value

    @cuda.jit(**_jit_options(d_pad, SOFTCAP or ALIBI))
    def split_kv_kernel(q, k_cache, v_cache, cache_rows, seqlens_k, O_part, L_part, q_scale, left, right,
                        cap2, slopes, keys_per_split):
        # --- sizes --- q (B, N_q, H_q, d); caches (B_cache, S, H_kv, d); O_part (splits, B, N_q, H_q, d);
        # L_part (splits, B, H_q, N_q); q_scale: softmax scale times log2(e); left, right: the window
        # (-1 unbounded); cap2: softcap log2(e) (SOFTCAP); slopes (B, H_q) (ALIBI)
        _, N_q, H_q, d = q.shape
        H_kv = k_cache.shape[2]
        G = H_q // H_kv
        s = cuda.blockIdx.x
        b = cuda.blockIdx.y // H_kv
        h_kv = cuda.blockIdx.y % H_kv
        tid = cuda.threadIdx.x
        w = tid // WARP_SIZE
        lane = tid % WARP_SIZE
        row_c = cache_rows[b]
        N_k = seqlens_k[b]
        key_start = s * keys_per_split
        key_stop = min(key_start + keys_per_split, N_k)
        rows = N_q * G                              # block rows (r, g) numbered r * G + g

        Ms = cuda.shared.array((NW, R), float32)    # each warp's m of each row of the group
        Ls = cuda.shared.array((NW, R), float32)    # each warp's l
        Os = cuda.shared.array((NW, R, d_pad), float32)   # each warp's o

        Q = cuda.local.array((R, DL), float32)      # Q_r of the group's rows, this lane's dims
        O = cuda.local.array((R, DL), float32)      # o (unnormalised), this warp's keys only
        m = cuda.local.array(R, float32)            # m (log2 units)
        l = cuda.local.array(R, float32)
        c_lo = cuda.local.array(R, int32)           # row's visible keys of the split: [c_lo, c_hi)
        c_hi = cuda.local.array(R, int32)
        centre = cuda.local.array(R, int32)         # the key aligned with the row's query (bottom-right)
        slope = cuda.local.array(R, float32)        # ALiBi slope of the row's head, log2 units
        K = cuda.local.array((KB, DL), float32)     # the batch's K_c, this lane's dims
        V = cuda.local.array((KB, DL), float32)
        S = cuda.local.array((R, KB), float32)      # S_rc, then P_rc

        rr0 = 0
        while rr0 < rows:
            # the group's rows: Q_r, their bands, m = -inf, l = 0, o = 0
            group_lo = N_k                          # union of the rows' bands: [group_lo, group_hi)
            group_hi = 0
            for a in range(R):
                rr = rr0 + a
                lo = 0
                hi = 0
                r = rr // G
                h = h_kv * G + rr % G
                ctr = r + N_k - N_q
                slope[a] = float32(0.0)
                if rr < rows:
                    lo = key_start
                    hi = key_stop
                    if left >= 0:
                        lo = max(lo, ctr - left)
                    if right >= 0:
                        hi = min(hi, ctr + right + 1)
                    if ALIBI:
                        slope[a] = slopes[b, h] * float32(LOG2_E)
                if lo < hi:
                    group_lo = min(group_lo, lo)
                    group_hi = max(group_hi, hi)
                c_lo[a] = lo
                c_hi[a] = hi
                centre[a] = ctr
                for i in range(DL):
                    n = lane + WARP_SIZE * i
                    value = float32(0.0)
                    if rr < rows and n < d:
                        value = q[b, r, h, n] * q_scale
                    Q[a, i] = value
                    O[a, i] = float32(0.0)
                m[a] = -math.inf
                l[a] = float32(0.0)

            # warp w: batches of KB keys, interleaved with the other warps'
            c0 = group_lo + w * KB
            while c0 < group_hi:
                batch_to_registers(K, k_cache, row_c, c0, group_hi, h_kv, d, lane)     # K_c
                for a in range(R):                  # S_rc, this lane's share: sum_i Q_r[n] K_c[n]
                    for j in range(KB):
                        acc = float32(0.0)
                        for i in range(DL):
                            acc += Q[a, i] * K[j, i]
                        S[a, j] = acc
                # V_c (K_c is dead), in flight during the shuffles
                batch_to_registers(V, v_cache, row_c, c0, group_hi, h_kv, d, lane)
                for a in range(R):                  # S_rc = Q_r . K_c: the warp's sum of the lanes' shares
                    for j in range(KB):
                        S[a, j] = warp_sum(S[a, j])
                for a in range(R):                  # online softmax, row by row
                    m_tilde = float32(-math.inf)
                    for j in range(KB):
                        c = c0 + j
                        score = S[a, j]
                        if SOFTCAP:                 # S = c2 tanh(S / c2)
                            score = cap2 * math.tanh(score / cap2)
                        if ALIBI:                   # S -= slope |r + Nk - Nq - c|
                            score -= slope[a] * float32(abs(centre[a] - c))
                        if c < c_lo[a] or c >= c_hi[a]:
                            score = float32(-math.inf)  # outside the band, past N_k or past the split
                        S[a, j] = score
                        m_tilde = max(m_tilde, score)
                    m_new = max(m[a], m_tilde)      # m_new = max(m, rowmax(S_r))
                    m_safe = m_new
                    if m_new == -math.inf:
                        m_safe = float32(0.0)       # no visible key yet: P = 0, no inf - inf
                    alpha = math.exp2(m[a] - m_safe)
                    l_tilde = float32(0.0)
                    for j in range(KB):
                        p = math.exp2(S[a, j] - m_safe)     # P_rc = exp2(S_rc - m_new)
                        S[a, j] = p
                        l_tilde += p
                    l[a] = alpha * l[a] + l_tilde
                    m[a] = m_new
                    for i in range(DL):             # o = alpha o + sum_c P_rc V_c
                        acc = O[a, i] * alpha
                        for j in range(KB):
                            acc += S[a, j] * V[j, i]
                        O[a, i] = acc
                c0 += STEP

            # merge the NW warps' (m, l, o) per row through shared memory
            if rr0 > 0:
                cuda.syncthreads()  # every thread done reading the last group's Ms, Ls, Os
            for a in range(R):
                if lane == 0:
                    Ms[w, a] = m[a]
                    Ls[w, a] = l[a]
                for i in range(DL):
                    Os[w, a, lane + WARP_SIZE * i] = O[a, i]
            cuda.syncthreads()  # every warp's (m, l, o) written before any thread merges them
            e = tid                                 # element (row a, dim n) of the group's O_s
            while e < R * d_pad:
                a = e // d_pad
                n = e % d_pad
                rr = rr0 + a
                if rr < rows and n < d:
                    m_row = Ms[0, a]                # m = max_w m_w
                    for u in range(1, NW):
                        m_row = max(m_row, Ms[u, a])
                    m_safe = m_row
                    if m_row == -math.inf:
                        m_safe = float32(0.0)       # no warp saw a key: every weight 0
                    l_row = float32(0.0)
                    o_row = float32(0.0)
                    for u in range(NW):             # l = sum_w exp2(m_w - m) l_w, o likewise
                        alpha = math.exp2(Ms[u, a] - m_safe)
                        l_row += alpha * Ls[u, a]
                        o_row += alpha * Os[u, a, n]
                    r = rr // G
                    h = h_kv * G + rr % G
                    O_part[s, b, r, h, n] = o_row / l_row if l_row != 0.0 else float32(0.0)
                    if n == 0:
                        L_part[s, b, h, r] = (m_row + math.log2(l_row)) * LN_2 if l_row != 0.0 else -math.inf
                e += T
            rr0 += R

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
        if L_s != L_s or L_s > m:  # noqa: PLR0124 (max that keeps a NaN)
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
    H_kv = K_cache.shape[2]
    d_pad = head_dim_bucket(d)
    kernel = build(d_pad, softcap > 0.0, slopes is not None)
    O_part = cuda.device_array((num_splits, B, N_q, H_q, d), dtype=np.float32)
    L_part = cuda.device_array((num_splits, B, H_q, N_q), dtype=np.float32)
    slopes_d = slopes if slopes is not None else cuda.device_array((1, 1), dtype=np.float32)
    kernel[(num_splits, B * H_kv), NW * WARP_SIZE](Q, K_cache, V_cache, cache_rows, seqlens_k, O_part, L_part,
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
    """Keys per split: the cache cut into num_splits runs, each a multiple of SPLIT_KEYS."""
    return num_tiles(num_tiles(max_seqlen_k, num_splits), SPLIT_KEYS) * SPLIT_KEYS


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
