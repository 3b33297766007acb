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

Inside a block (NW warps of 32 lanes). A key's d_pad head dims are spread over a group of
LG = d_pad / DPL lanes (DPL per bucket: LAYOUTS), each lane owning DPL dims n = t + LG i (t: its
place in the group, i < DPL), so a warp takes KPW = 32 / LG keys at once, one per group:

    for each group of R rows:
        Q_r -> registers (scaled into log2 units); per lane: m = -inf, l = 0, o = 0 per row
        warp w, key group g: key c = lo + w KPW + g, then c + NW KPW, ...
            K_c, V_c -> registers (each row load: LG consecutive floats, whole 32-byte sectors)
            S_rc = sum_i Q_r[n] K_c[n]: this lane's share, then summed over the group's LG lanes
                (log2 LG shuffles); softcap, ALiBi
            S_rc = -inf outside row r's band, past seqlens_k[b] or past the split
            if S_rc > m: l, o *= exp2(m - S_rc); m = S_rc      (a new running max: rare after the first keys)
            P_rc = exp2(S_rc - m);  l += P_rc;  o += P_rc V_c
        the warp's KPW groups' (m, l, o) merged by shuffles; the NW warps' through shared memory:
        O_s = sum_w exp2(m_w - m) o_w / sum_w exp2(m_w - m) l_w,  L_s = (m + log2 l) ln 2

The warps are independent in the key loop (no barrier in it); the only barriers
guard the shared merge of (m, l, o). The cache is read through ``cache_rows[b]``
(flash-attn's cache_batch_idx) and sequence b sees its first ``seqlens_k[b]``
keys; query r of Nq sees key c when r + Nk - Nq - left <= c <= r + Nk - Nq + right
(-1 unbounded; causal: right = 0). Head dims: compiled for d_pad in
SPLIT_HEAD_DIMS, up to 256; DPL is 4 or 8 dims a lane in every bucket, so the registers
a thread needs hardly grow with d.

What bounds it: reading K and V once from HBM, which needs many loads in flight: many
warps per SM (``num_splits_heuristic``; registers, hence MIN_BLOCKS); then the instructions
per key (the group's shuffles and the online softmax, per row).

The combine step is ``flashnumba.merge``'s formula on device arrays (merge.py
works on NumPy and PyTorch; this kernel is its device form, tested against it).
"""

import functools
import math

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, int32, uint64

from flashnumba.geometry import num_tiles
from flashnumba.kernels.fast_math import LN_2, LOG2_E
from flashnumba.kernels.hardware import FULL_MASK, WARP_SIZE

NAME = __name__.rpartition(".")[2]
SPLIT_HEAD_DIMS = (32, 64, 128, 256)
NW = 4                                    # warps per block
R = 4                                     # query rows per group (rows held in registers at once)
# DPL head dims per lane, per d_pad: a key's dims over LG = d_pad / DPL lanes (LG <= 32)
LAYOUTS = {32: 4, 64: 4, 128: 4, 256: 8}
# blocks per SM asked of the compiler, per (d_pad, softcap or ALiBi): the launch bounds cap registers
# at 65536 / (NW * 32 * blocks) per thread; the most that compile without spills for sm_80 and
# sm_90 (`flashnumba resources --source flashnumba.kernels.split_kv:targets`)
MIN_BLOCKS = {(32, False): 4, (32, True): 3, (64, False): 4, (64, True): 3,
              (128, False): 4, (128, True): 3, (256, False): 2, (256, True): 2}
SPLIT_KEYS = 16                           # keys per split: a multiple of this
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
    of NW warps fit on an SM at once (MIN_BLOCKS), so BLOCKS_PER_SM blocks per SM are several
    waves, and the last, partial one is a small part of the time. A split of fewer keys
    would spend a larger share on its start, its merge and the combine."""
    wanted = -(-BLOCKS_PER_SM * num_sms // max(1, blocks))
    cap = max(1, min(max_splits, num_key_blocks // MIN_KEY_BLOCKS_PER_SPLIT))
    return max(1, min(wanted, cap))


def _jit_options(d_pad, features):
    """Launch bounds for the real compiler (the simulator takes none)."""
    if numba_config.ENABLE_CUDASIM:
        return {}
    return {"launch_bounds": (NW * WARP_SIZE, MIN_BLOCKS[d_pad, features])}


@functools.cache
def build(d_pad, SOFTCAP=False, ALIBI=False, FULL=True):
    """The split-KV kernel for head-dim bucket d_pad (NW warps); softcap and ALiBi as variants;
    FULL: d == d_pad (no per-dim bounds test)."""
    DPL = LAYOUTS[d_pad]                      # head dims per lane
    LG = d_pad // DPL                         # lanes per key (a key group), a power of 2
    KPW = WARP_SIZE // LG                     # keys a warp takes at once, one per group
    STEP = NW * KPW                           # keys the block's warps take in one step
    T = NW * WARP_SIZE
    ALIGN = None if numba_config.ENABLE_CUDASIM else 16   # 16 bytes for ld.shared.v4 (the simulator takes none)

    @cuda.jit(device=True, inline="always")
    def group_sum(x):
        """sum over the LG lanes of a key group; xor offsets LG/2 .. 1 stay inside the group."""
        offset = LG // 2
        while offset > 0:
            x += cuda.shfl_xor_sync(FULL_MASK, x, offset)
            offset //= 2
        return x

    @cuda.jit(device=True, inline="always")
    def key_to_registers(X, cache, row_c, N_cache, H_kv, d, c, c_stop, h_kv, t):
        """Cache row (row_c, c, h_kv), this lane's dims n = t + LG i -> X (DPL,): the group's LG lanes
        read LG consecutive floats per i; a row at or past c_stop and dims past d read as 0. The
        flat index is unsigned (no wraparound test), so each i is a constant offset from one address."""
        base = uint64(((row_c * N_cache + c) * H_kv + h_kv) * d + t)
        for i in range(DPL):
            value = float32(0.0)
            if c < c_stop and (FULL or t + LG * i < d):
                value = cache[base + uint64(LG * i)]
            X[i] = value

    @cuda.jit(**_jit_options(d_pad, SOFTCAP or ALIBI))
    def split_kv_kernel(q, k_cache, v_cache, N_cache, H_kv, cache_rows, seqlens_k, O_part, L_part, q_scale, left,
                        right, cap2, slopes, keys_per_split):
        # --- sizes --- q (B, N_q, H_q, d); caches: flat views of (B_cache, N_cache, H_kv, d), C order;
        # O_part (splits, B, N_q, H_q, d);
        # L_part (splits, B, H_q, N_q); q_scale: softmax scale times log2(e); left, right: the window
        # (-1 unbounded); cap2: softcap log2(e) (SOFTCAP); slopes (B, H_q) (ALIBI)
        _, N_q, H_q, d = q.shape
        G = H_q // H_kv
        s = cuda.blockIdx.x
        b = cuda.blockIdx.y // H_kv
        h_kv = cuda.blockIdx.y % H_kv
        tid = cuda.threadIdx.x
        w = tid // WARP_SIZE
        lane = tid % WARP_SIZE
        g = lane // LG                              # this lane's key group
        t = lane % LG                               # its place in the group: dims t + LG i
        t_dims = uint64(t * DPL)                    # where its dims start in Qs (unsigned: no wraparound test)
        row_c = cache_rows[b]
        N_k = seqlens_k[b]
        key_start = s * keys_per_split
        key_stop = min(key_start + keys_per_split, N_k)
        rows = N_q * G                              # block rows (r, g) numbered r * G + g

        Ms = cuda.shared.array((NW, R), float32)    # each warp's m of each row of the group
        Ls = cuda.shared.array((NW, R), float32)    # each warp's l
        Os = cuda.shared.array((NW, R, d_pad), float32)   # each warp's o
        # Q_r of the group's rows, lane-major: dim n = t + LG i at [a, t DPL + i], so that a lane's
        # DPL dims are consecutive (ld.shared.v4, one per 4 dims) and the KPW groups read the same words
        Qs = cuda.shared.array((R, d_pad), float32, alignment=ALIGN)

        O = cuda.local.array((R, DPL), float32)     # o (unnormalised), this key group's keys only
        m = cuda.local.array(R, float32)            # m (log2 units)
        l = cuda.local.array(R, float32)
        c_lo = cuda.local.array(R, int32)           # row's visible keys of the split: [c_lo, c_hi)
        c_hi = cuda.local.array(R, int32)
        centre = cuda.local.array(R, int32)         # the key aligned with the row's query (bottom-right)
        slope = cuda.local.array(R, float32)        # ALiBi slope of the row's head, log2 units
        K = cuda.local.array(DPL, float32)          # K_c of this step's key, this lane's dims
        V = cuda.local.array(DPL, float32)
        S = cuda.local.array(R, float32)            # S_rc of this step's key

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
                for i in range(DPL):
                    if w == 0 and g == 0:
                        n = t + LG * i
                        value = float32(0.0)
                        if rr < rows and n < d:
                            value = q[b, r, h, n] * q_scale
                        Qs[a, t_dims + uint64(i)] = value
                    O[a, i] = float32(0.0)
                m[a] = -math.inf
                l[a] = float32(0.0)
            cuda.syncthreads()  # the group's Q_r in Qs before any warp reads it

            # warp w, group g: keys c = group_lo + w KPW + g, then every STEP keys
            c0 = group_lo + w * KPW                 # the warp's first key of the step (warp-uniform)
            while c0 < group_hi:
                c = c0 + g
                key_to_registers(K, k_cache, row_c, N_cache, H_kv, d, c, group_hi, h_kv, t)
                key_to_registers(V, v_cache, row_c, N_cache, H_kv, d, c, group_hi, h_kv, t)
                for a in range(R):                  # S_rc, this lane's share: sum_i Q_r[n] K_c[n]
                    acc = float32(0.0)
                    for i in range(DPL):
                        acc += Qs[a, t_dims + uint64(i)] * K[i]
                    S[a] = acc
                for a in range(R):                  # S_rc = Q_r . K_c: the group's sum of its lanes' shares
                    S[a] = group_sum(S[a])
                for a in range(R):                  # online softmax, row by row, one key
                    score = S[a]
                    if SOFTCAP:                     # S = c2 tanh(S / c2)
                        score = cap2 * math.tanh(score / cap2)
                    if ALIBI:                       # S -= slope |r + Nk - Nq - c|
                        score -= slope[a] * float32(abs(centre[a] - c))
                    if c < c_lo[a] or c >= c_hi[a]:
                        score = float32(-math.inf)  # outside the band, past N_k or past the split
                    if score > m[a]:                # m_new = max(m, S_rc) > m: rescale l and o
                        alpha = math.exp2(m[a] - score)
                        l[a] *= alpha
                        for i in range(DPL):
                            O[a, i] *= alpha
                        m[a] = score
                    m_safe = m[a]
                    if m_safe == -math.inf:
                        m_safe = float32(0.0)       # no visible key yet: P = 0, no inf - inf
                    p = math.exp2(score - m_safe)   # P_rc = exp2(S_rc - m)
                    l[a] += p
                    for i in range(DPL):            # o += P_rc V_c
                        O[a, i] += p * V[i]
                c0 += STEP

            # merge the warp's KPW key groups' (m, l, o) per row: xor offsets LG .. 16 cross groups
            for a in range(R):
                m_w = m[a]
                offset = LG
                while offset < WARP_SIZE:
                    m_w = max(m_w, cuda.shfl_xor_sync(FULL_MASK, m_w, offset))
                    offset *= 2
                m_safe = m_w
                if m_w == -math.inf:
                    m_safe = float32(0.0)           # no group saw a key: every weight 0
                alpha = math.exp2(m[a] - m_safe)
                l_w = l[a] * alpha
                offset = LG
                while offset < WARP_SIZE:
                    l_w += cuda.shfl_xor_sync(FULL_MASK, l_w, offset)
                    offset *= 2
                for i in range(DPL):
                    o_w = O[a, i] * alpha
                    offset = LG
                    while offset < WARP_SIZE:
                        o_w += cuda.shfl_xor_sync(FULL_MASK, o_w, offset)
                        offset *= 2
                    O[a, i] = o_w
                m[a] = m_w
                l[a] = l_w

            # merge the NW warps' (m, l, o) per row through shared memory
            cuda.syncthreads()  # every warp done with Qs and with the last group's Ms, Ls, Os
            for a in range(R):
                if lane == 0:
                    Ms[w, a] = m[a]
                    Ls[w, a] = l[a]
                if g == 0:
                    for i in range(DPL):
                        Os[w, a, t + LG * i] = O[a, i]
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
    N_cache, H_kv = K_cache.shape[1:3]
    d_pad = head_dim_bucket(d)
    kernel = build(d_pad, softcap > 0.0, slopes is not None, d == d_pad)
    O_part = cuda.device_array((num_splits, B, N_q, H_q, d), dtype=np.float32)
    L_part = cuda.device_array((num_splits, B, H_q, N_q), dtype=np.float32)
    slopes_d = slopes if slopes is not None else cuda.device_array((1, 1), dtype=np.float32)
    kernel[(num_splits, B * H_kv), NW * WARP_SIZE](Q, K_cache.reshape(K_cache.size), V_cache.reshape(V_cache.size),
                                     np.int64(N_cache), np.int64(H_kv), cache_rows, seqlens_k, O_part, L_part,
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
    softcap + ALiBi kernel, for d = d_pad and d < d_pad, and the combine."""
    from numba import types
    a5 = types.Array(types.float32, 5, "C")
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    a2 = types.Array(types.float32, 2, "C")
    i1 = types.Array(types.int32, 1, "C")
    a1 = types.Array(types.float32, 1, "C")
    argtypes = (a4, a1, a1, types.int64, types.int64, i1, i1, a5, a4, types.float32, types.int64, types.int64,
                types.float32, a2, types.int64)
    kernels = [(f"{NAME}_d{d_pad}{'_softcap_alibi' if variant else ''}{'' if full else '_d_lt_d_pad'}",
                build(d_pad, variant, variant, full), argtypes)
               for d_pad in SPLIT_HEAD_DIMS for variant in (False, True) for full in (True, False)]
    return kernels + [("combine", combine, (a5, a4, a4, a3))]
