"""FlashAttention-2 forward, version 3: on the tensor cores (mma.sync), for fp16 and bf16.

Same algorithm and contract as ``fa2_forward`` (Dao 2023, Algorithm 1; one
thread block per Q tile i and head; grid (Tr, B * Hq)), with every product
on ``mma.sync.m16n8k16`` (``kernels.mma``): 16-bit inputs, fp32 accumulators.

    version 1  fa2_forward.py        one warp per group of rows, one lane per score column
    version 2  fa2_fast_forward.py   register tiles of fp32 FMA
    version 3  this file             mma.sync: each warp owns 16 rows of Q_i (split-Q)

Names, against the paper's Algorithm 1 (line numbers in the comments below):

    Q_i     Br x d, Br = 16 num_warps: warp w holds rows 16w .. 16w+15 as A fragments
            (registers ``Qf``), read once from global memory (line 4)
    K_j, V_j  Bc x d_pad tiles in shared memory (``Ks``, ``Vs``), filled by cp.async from
            unsigned element offsets (``mma.cp_async_16_at``: the K/V head's row 0 once a
            block, then one multiply-add a 16-byte copy), double-buffered (STAGES = 2)
            where 48 KB allows (line 7); above 48 KB (e.g. ``stages=2`` at Bc = 64,
            d_pad = 128) both live in one dynamic array (``is_dynamic``)
    S_ij    Q_i K_j^T on mma: per warp 16 x Bc fp32 accumulators (``S``), in log2 units
    m_i, l_i  two rows per lane (rows g and g + 8 of the warp's 16); the row max and
            row sum run over the 4 lanes of a quad (shfl_xor 1, 2); l_i is kept per
            lane and summed over the quad once, at the end
    P_ij    exp2(S_ij - m_i), rounded to bf16/f16 and packed from the S accumulators
            straight into the A fragments of P_ij V_j (no shared memory)
    O_i     16 x d_pad fp32 accumulators per warp (``O``); V_j's B fragments by ldmatrix.trans
    O, L    O_i / l_i in the input dtype; L_i = (m_i + log2 l_i) ln 2 in fp32 (lines 12-15)

Kernel locals: ``S`` -> S_ij (l. 8), then P~_ij (l. 9); ``m_tilde`` -> rowmax(S_ij),
``m`` -> m_i^(j-1), ``m_new`` -> m_i^(j), ``l`` -> l_i^(j), ``l_tilde`` -> rowsum(P~_ij)
(all l. 9); ``O`` -> O_i^(j), unnormalised (l. 10); r, c, x: a row, a key, a head dim;
d_pad: the compiled head dim (d <= d_pad).

Lane layout (TENSOR-CORES.md; lane = 4 g + t): accumulator e of n-tile nt holds
S_ij[16 w + g + 8 (e // 2), 8 nt + 2 t + e % 2].

Inputs are the raw 16-bit data (uint16 bits of fp16 or bf16), head dim padded
with zeros to the bucket d_pad (the wrapper copies when d < d_pad, so every row of a
tile is whole 16-byte chunks for cp.async). Rows past Nk and Nq read a
clamped valid row: keys past Nk are masked to -inf in S_ij (so P_ij = 0
times a finite V_j row), queries past Nq are never written.

Causal and sliding window (flash-attn's window_size): a run-time band, key c
visible to query r when r + lo <= c <= r + hi (``geometry.window_bounds``;
causal is the band with hi = offset, offset = Nk - Nq bottom-right or 0 top-left,
and lo = -Nq), so Q tile i visits tiles kv_tile_start(i) <= j < kv_tile_end(i)
and skips the rest on both sides; only the edge and band-edge tiles are masked.
Softcap and ALiBi are compile-time variants, ``build(config, kind, softcap=True,
alibi=True)``, as in ``fa2_fast_forward``: in log2 units S_ij = c2 tanh(S_ij / c2)
with c2 = softcap log2(e), then S_ij -= slope log2(e) |r + Nk - Nq - c|, both
before masking.
Dropout is a compile-time variant (``build(config, dtype, dropout=True)``):
element (r, c) of query head h, batch b is kept when ``philox.keep(seed, b, h,
r, c, p)``, as in every other kernel; a lane's columns 2t, 2t+1 of an n-tile are
two words of one Philox4x32-10 call. m_i, l_i and L are the undropped softmax's.

What bounds it: per K/V tile a warp issues d_pad/16 x Bc/8 mma for S_ij and Bc/16 x
d_pad/8 for P_ij V_j, between which the softmax runs on the CUDA cores (exp2 as one
ex2.approx.ftz, max, shuffles, and O_i's rescaling, which a warp skips when none of
its rows has a new maximum) with no overlap across warps beyond what the scheduler finds; K_j and
V_j are read from shared memory once per warp (ldmatrix); where two stages of K_j
and V_j do not fit in 48 KB of static shared memory (Bc = 64 at d_pad = 128) only
one is used by default, and the loads of tile j + 1 are not overlapped with tile j there.
mma.sync is the Ampere instruction: on Hopper, wgmma is the faster path and this
kernel does not use it.

Shared memory: Ks and Vs are two static arrays (STAGES, Bc, d_pad + ROW_PAD) where they fit
in 48 KB; a config over that (``stages=2`` at Bc = 64, d_pad = 128: 69632 B) holds them in one
dynamic uint16 array, Ks at element 0 and Vs at STAGES Bc (d_pad + ROW_PAD), indexed by hand
(``tile_at``; a reshaped view of the dynamic array costs a stack frame, PERF-NOTES.md "v5"),
launched with smem_bytes bytes and the kernel's limit raised (``smem_limit``).
"""

import functools
import math

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, int64, types, uint16, uint32, uint64

from flashnumba import geometry
from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.kernels import common, half_io, mma, smem_limit
from flashnumba.kernels.common import (
    HEAD_DIM_BUCKETS,
    STATIC_SMEM_LIMIT,
    WARP_SIZE,
    ConfigError,
    TileConfig,
    require,
)
from flashnumba.kernels.fast_math import LN_2, LOG2_E, exp2_ftz
from flashnumba.kernels.geometry import kv_tile_end, kv_tile_start, num_tiles
from flashnumba.kernels.half_io import (
    as_dtype,
    check_qkv16,
    f32_like,
    fast_band,
    fast_shape_class,
    fast_slopes,
    padded_bits,
    resolve_kind,
)
from flashnumba.kernels.hardware import FULL_MASK
from flashnumba.kernels.launch import prepared
from flashnumba.kernels.philox import kept, philox4x32, philox_key

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it
FEATURES = ("window_size", "softcap", "alibi_slopes")   # flash-attn's options beyond plain attention
HALF_BYTES = 2
ROW_PAD = 8                    # elements added to each shared row: ldmatrix rows of one tile fall
                               # in different banks (8 x 16 B apart instead of a multiple of 128 B)
MMA = {"bf16": mma.mma_bf16, "f16": mma.mma_f16}
PACK = {"bf16": mma.pack_bf16x2, "f16": mma.pack_f16x2}

# Default tiles per head-dim bucket: (Br, Bc, num_warps), Br = 16 num_warps.
# d_pad >= 96 takes Bc = 32, where two K/V stages fit in 48 KB; Bc = 64 at d_pad = 128 has one stage
# and nearly all 255 registers. d_pad = 64 takes Bc = 32 too: half of S_ij's accumulators, and
# tiles half as long (PERF-NOTES.md; `python -m flashnumba.bench.tc_configs --forward` times them).
_DEFAULTS = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 32, 4), 96: (64, 32, 4), 128: (64, 32, 4)}
_ALTERNATIVES = {64: [(128, 64, 8), (64, 64, 4)], 128: [(128, 32, 8)]}


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def stages(config, requested=None):
    """K/V buffers: `requested` (1 or 2) when given, else 2 (tile j + 1 loads while tile j is
    used) when both fit in 48 KB, else 1."""
    if requested is not None:
        return requested
    one = 2 * config.Bc * (config.d_pad + ROW_PAD) * HALF_BYTES
    return 2 if 2 * one <= STATIC_SMEM_LIMIT else 1


def smem_bytes(config, requested_stages=None):
    """Ks and Vs: STAGES x Bc x (d_pad + ROW_PAD) 16-bit elements each, static or dynamic
    (``is_dynamic``)."""
    return stages(config, requested_stages) * 2 * config.Bc * (config.d_pad + ROW_PAD) * HALF_BYTES


def smem_offsets(config, requested_stages=None):
    """Where Ks and Vs (STAGES x Bc x (d_pad + ROW_PAD) elements each) start in the dynamic array,
    in 16-bit elements, and its length: end to end, so each starts on a 16-byte boundary (rows
    are multiples of 8 elements) and no stage of one overlaps the other."""
    one = stages(config, requested_stages) * config.Bc * (config.d_pad + ROW_PAD)
    return {"Ks": 0, "Vs": one, "elements": 2 * one}


def is_dynamic(config, requested_stages=None, dynamic=None):
    """Ks and Vs in one dynamic shared array: when they need more than the 48 KB of static shared
    memory a block may have (no shipped config at its default stages: those fit), or when
    `dynamic` says so (True: small tiles on the dynamic path, for tests; False: refuse above 48 KB)."""
    if dynamic is not None:
        return bool(dynamic)
    return smem_bytes(config, requested_stages) > STATIC_SMEM_LIMIT


def static_smem_bytes(config, requested_stages=None, dynamic=None):
    """Static shared memory per block, as ptxas counts it: smem_bytes, or 0 when dynamic."""
    return 0 if is_dynamic(config, requested_stages, dynamic) else smem_bytes(config, requested_stages)


def dynamic_smem_bytes(config, requested_stages=None, dynamic=None):
    """The launch's dynamic shared memory (its 4th configuration value): smem_bytes, or 0 when static."""
    return smem_bytes(config, requested_stages) if is_dynamic(config, requested_stages, dynamic) else 0


def default_config(d):
    d_pad = common.head_dim_bucket(d)
    Br, Bc, num_warps = _DEFAULTS[d_pad]
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps)


def shipped_configs():
    configs = [default_config(d_pad) for d_pad in HEAD_DIM_BUCKETS]
    for d_pad, alternatives in _ALTERNATIVES.items():
        configs += [TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=w) for Br, Bc, w in alternatives]
    return configs


def check_config(config, requested_stages=None, dynamic=None, cc=None):
    """Raise ConfigError unless the configuration (and the stages asked for, static or dynamic
    shared memory: ``is_dynamic``) can compile and launch: static up to 48 KB, dynamic up to what
    a GPU of compute capability `cc` lets a block opt in to (without cc: the most of any GPU here,
    ``smem_limit.MAX_BLOCK_BYTES``)."""
    who = NAME
    require(requested_stages in (None, 1, 2), f"{who}: stages={requested_stages!r} must be 1 or 2")
    common.check_sizes(config, who)
    Br, Bc, d_pad, num_warps = config.Br, config.Bc, config.d_pad, config.num_warps
    require(Br == 16 * num_warps, f"{who}: Br={Br} must be 16 x num_warps = {16 * num_warps} "
                                  f"(each warp owns 16 rows of Q_i)")
    require(d_pad % 16 == 0, f"{who}: d_pad={d_pad} must be a multiple of 16 (the k of m16n8k16)")
    require(Bc % 16 == 0, f"{who}: Bc={Bc} must be a multiple of 16 (P_ij's A fragments)")
    chunks = Bc * d_pad // 8
    require(chunks % config.threads == 0,
            f"{who}: Bc={Bc}, d_pad={d_pad}: {chunks} 16-byte chunks per tile must divide evenly among "
            f"{config.threads} threads")
    smem = smem_bytes(config, requested_stages)
    if not is_dynamic(config, requested_stages, dynamic):
        common.check_smem(config, smem, who)
        return
    limit = smem_limit.MAX_BLOCK_BYTES if cc is None else smem_limit.opt_in_limit(cc)
    gpu = "any GPU here" if cc is None else f"a GPU of compute capability {tuple(cc)}"
    require(smem <= limit, f"{who}: Br={Br}, Bc={Bc}, d_pad={d_pad}, num_warps={num_warps}, "
                           f"stages={stages(config, requested_stages)} needs {smem} bytes of dynamic "
                           f"shared memory, over the {limit} bytes {gpu} gives a block; use smaller tiles")


def _smem_alignment():
    """16 bytes (ldmatrix, cp.async) on a GPU; the simulator takes no alignment argument."""
    return None if numba_config.ENABLE_CUDASIM else 16


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------

def build(config, kind="bf16", dropout=False, softcap=False, alibi=False, stages=None,
          dynamic=None):
    """The kernel for `config` and 16-bit type `kind` ("bf16" or "f16"); dropout=True is the
    variant that drops P_ij, softcap, alibi the variants that cap and bias S_ij (each a
    separate compile); stages (1 or 2) overrides ``stages(config)``, for benchmarks; dynamic
    overrides ``is_dynamic`` (True: the dynamic-shared-memory kernel at any size, for tests).
    A dynamic kernel is launched with dynamic_smem_bytes(config, stages, dynamic). Cached."""
    if kind not in MMA:
        raise ValueError(f"kind={kind!r}: expected 'bf16' or 'f16'")
    if dynamic is None:           # the default: one cache entry with what the old calls built
        return _build(config, kind, bool(dropout), bool(softcap), bool(alibi), stages)
    return _build(config, kind, bool(dropout), bool(softcap), bool(alibi), stages, bool(dynamic))


@functools.cache
def _build(config, KIND, DROPOUT, SOFTCAP=False, ALIBI=False, REQUESTED_STAGES=None,
           REQUESTED_DYNAMIC=None):
    check_config(config, REQUESTED_STAGES, REQUESTED_DYNAMIC)
    Br, Bc, d_pad, NW = int(config.Br), int(config.Bc), int(config.d_pad), int(config.num_warps)
    T = NW * WARP_SIZE
    STAGES = stages(config, REQUESTED_STAGES)
    ROW_LEN = d_pad + ROW_PAD              # shared row length, elements
    KD = d_pad // 16                  # k-steps of S_ij = Q_i K_j^T (A fragments of Q_i)
    NC = Bc // 8                  # n-tiles of S_ij (8 keys each)
    KC = Bc // 16                 # k-steps of O_i += P_ij V_j
    ND = d_pad // 8                   # n-tiles of O_i (8 dims each)
    CHUNKS = d_pad // 8               # 16-byte chunks per row of K_j, V_j
    LOADS = Bc * CHUNKS // T      # chunks per thread per tile (each of K_j and V_j)
    MMA_K, PACK_K = MMA[KIND], PACK[KIND]
    ALIGN = _smem_alignment()
    DYNAMIC = is_dynamic(config, REQUESTED_STAGES, REQUESTED_DYNAMIC)   # Ks, Vs in one dynamic array
    SM = smem_offsets(config, REQUESTED_STAGES)
    KS, VS = SM["Ks"], SM["Vs"]   # first elements of Ks and Vs in the dynamic array

    # Element [s, row, col] of the tile at offset OFF (Ks or Vs): the static 3-D array's index
    # (OFF unused), or, for the dynamic array, OFF + (s Bc + row) ROW_LEN + col, indexed by hand
    if DYNAMIC:
        @cuda.jit(device=True, inline="always")
        def tile_at(OFF, s, row, col):
            return OFF + (s * Bc + row) * ROW_LEN + col
    else:
        @cuda.jit(device=True, inline="always")
        def tile_at(OFF, s, row, col):
            return (s, row, col)

    @cuda.jit(device=True, inline="always")
    def load_tile(Ks, Vs, s, k, v, col0, Nk, tid, kv_at, kv_row):
        """K_j, V_j (rows col0 .. col0 + Bc, clamped to Nk - 1) -> stage s, by cp.async, 16 bytes
        per copy: key c of the head at the unsigned element offset kv_at + c kv_row."""
        for u in range(LOADS):
            chunk = uint64(tid) + uint64(T * u)
            c = int64(chunk // uint64(CHUNKS))
            x = int64(uint64(8) * (chunk % uint64(CHUNKS)))
            # past Nk: a valid row, masked in S_ij
            at = kv_at + uint64(min(col0 + c, Nk - 1)) * kv_row + uint64(x)
            mma.cp_async_16_at(Ks, tile_at(KS, s, c, x), k, at)
            mma.cp_async_16_at(Vs, tile_at(VS, s, c, x), v, at)

    @cuda.jit(device=True, inline="always")
    def mma_into(C, n, a, b0, b1):
        """C[n, :] += A B for one m16n8k16 (C a local array of fragments)."""
        d = MMA_K(a, (b0, b1), (C[n, 0], C[n, 1], C[n, 2], C[n, 3]))
        for e in range(4):
            C[n, e] = d[e]

    @cuda.jit
    def fa2_tc_forward_kernel(q, k, v, out, L, q_scale, windowed, lo, hi, dropout_p, seed, limit,
                              cap2, slopes):
        # --- sizes --- q (B, Nq, H_q, d_pad), k, v (B, Nk, H_kv, d_pad): uint16 bits, padded to d_pad;
        # out (B, Nq, H_q, d) uint16 bits; L (B, H_q, Nq) float32. q_scale: scale log2(e);
        # windowed: bool (causal or a window); lo, hi: int32, key c is visible to query r iff
        # r + lo <= c <= r + hi; dropout_p: float64, seed: uint64 (DROPOUT only); limit: j steps
        # to run (int64); cap2: float32 softcap log2(e) (SOFTCAP only); slopes: float32 (B, H_q)
        # ALiBi slopes (ALIBI only).
        Nq, H_q = q.shape[1], q.shape[2]
        Nk = k.shape[1]
        H_kv = k.shape[2]
        d = out.shape[3]
        Tr = num_tiles(Nq, Br)
        Tc = num_tiles(Nk, Bc)

        # --- who am I ---
        tid = cuda.threadIdx.x
        w = tid // WARP_SIZE                # this warp's 16 rows of Q_i: 16 w .. 16 w + 15
        lane = tid % WARP_SIZE
        g = lane // 4                       # accumulator rows g and g + 8
        t = lane % 4                        # accumulator columns 2t, 2t + 1 of each n-tile
        i = Tr - 1 - cuda.blockIdx.x       # last Q tiles first: under causal they have the most work
        bh = cuda.blockIdx.y
        b = bh // H_q
        h = bh % H_q
        h_kv = h // (H_q // H_kv)           # grouped-query attention: this head's K/V head
        # unsigned element offsets: k[b, 0, h_kv, 0], and from one key's row to the next
        kv_at = (uint64(b) * uint64(Nk) * uint64(H_kv) + uint64(h_kv)) * uint64(d_pad)
        kv_row = uint64(H_kv * d_pad)
        row0 = i * Br
        wrow = row0 + 16 * w                # first row of this warp
        if DROPOUT:
            key0, key1 = philox_key(seed)
            h_word = np.uint64(h)
            b_word = np.uint64(b)
            Z_kept = float32(1.0 / (1.0 - dropout_p))

        # --- shared memory: K_j and V_j, STAGES buffers each (each array on its own line; above
        # 48 KB both are the one dynamic array, smem_bytes long, Ks at KS and Vs at VS) ---
        if DYNAMIC:
            Ks = cuda.shared.array(0, uint16, alignment=ALIGN)
            Vs = Ks
        else:
            Ks = cuda.shared.array((STAGES, Bc, ROW_LEN), uint16, alignment=ALIGN)
            Vs = cuda.shared.array((STAGES, Bc, ROW_LEN), uint16, alignment=ALIGN)

        # --- registers ---
        Qf = cuda.local.array((KD, 4), uint32)      # Q_i's A fragments, two 16-bit values each
        S = cuda.local.array((NC, 4), float32)      # S_ij, then P_ij
        O = cuda.local.array((ND, 4), float32)      # O_i, unnormalised
        m = cuda.local.array(2, float32)            # m_i of rows g, g + 8 (log2 units)
        l = cuda.local.array(2, float32)            # l_i of rows g, g + 8, this lane's columns

        # Alg. 1 line 4: load Q_i, straight into A fragments: a_e = Q[g + 8 (e % 2), 2t + 8 (e // 2)]
        # and the next column, as one 32-bit register (lower column in the low half)
        for kk in range(KD):
            for e in range(4):
                row = min(wrow + g + 8 * (e % 2), Nq - 1)
                x = 16 * kk + 2 * t + 8 * (e // 2)
                Qf[kk, e] = uint32(q[b, row, h, x]) | (uint32(q[b, row, h, x + 1]) << uint32(16))
        # Alg. 1 line 5: O_i = 0, l_i = 0, m_i = -inf
        for hh in range(2):
            m[hh] = -math.inf
            l[hh] = 0.0
        for n in range(ND):
            for e in range(4):
                O[n, e] = 0.0

        n_tiles = Tc
        j = 0
        if windowed:                        # tiles outside the band are skipped, on both sides
            n_tiles = int64(kv_tile_end(i, Br, Bc, Nq, Nk, hi))
            j = int64(min(kv_tile_start(i, Br, Bc, Nk, lo), n_tiles))
        n_tiles = min(n_tiles, j + limit)
        if ALIBI:
            slope = slopes[b, h] * float32(LOG2_E)     # ALiBi slope in log2 units
            alibi_offset = Nk - Nq                     # bias -slope |r + Nk - Nq - c|

        if j < n_tiles:                     # Alg. 1 line 7 for the first visited tile
            load_tile(Ks, Vs, j % STAGES, k, v, j * Bc, Nk, tid, kv_at, kv_row)
            mma.cp_async_commit()

        while j < n_tiles:                  # Alg. 1 line 6: for 1 <= j <= Tc (inside the band)
            s = j % STAGES
            col0 = j * Bc
            # Alg. 1 line 7: load K_j, V_j. With two stages, tile j + 1 is requested now and
            # arrives while tile j is used; wait(1): all but the newest group (tile j) landed.
            if STAGES == 2:
                if j + 1 < n_tiles:
                    load_tile(Ks, Vs, 1 - s, k, v, col0 + Bc, Nk, tid, kv_at, kv_row)
                mma.cp_async_commit()       # possibly empty, so that wait(1) always means tile j
                mma.cp_async_wait(1)
            else:
                mma.cp_async_wait(0)
            cuda.syncthreads()  # every thread's copies of K_j, V_j landed before any warp reads them

            # Alg. 1 line 8: S_ij = Q_i K_j^T. One ldmatrix.x4 gives the B fragments of two
            # n-tiles: matrices K_j[16 nn + 0:8 | 8:16, 16 kk + 0:8 | 8:16]
            for n in range(NC):
                for e in range(4):
                    S[n, e] = 0.0
            for kk in range(KD):
                for nn in range(NC // 2):
                    kf = mma.ldmatrix_x4(Ks, tile_at(KS, s, 16 * nn + lane % 8 + 8 * (lane // 16),
                                                     16 * kk + 8 * ((lane // 8) % 2)))
                    a = (Qf[kk, 0], Qf[kk, 1], Qf[kk, 2], Qf[kk, 3])
                    mma_into(S, 2 * nn, a, kf[0], kf[1])
                    mma_into(S, 2 * nn + 1, a, kf[2], kf[3])

            # scores in log2 units, capped and biased (variants); -inf past Nk and outside the
            # band: edge and band-edge tiles only
            masked = col0 + Bc > Nk or (windowed and (col0 + Bc - 1 > row0 + hi or col0 < row0 + Br - 1 + lo))
            for n in range(NC):
                for e in range(4):
                    row = wrow + g + 8 * (e // 2)
                    col = col0 + 8 * n + 2 * t + e % 2
                    score = S[n, e] * q_scale
                    if SOFTCAP:                  # S_ij = c2 tanh(S_ij / c2)
                        score = cap2 * math.tanh(score / cap2)
                    if ALIBI:                    # S_ij -= slope |r + Nk - Nq - c|
                        score -= slope * float32(abs(row + alibi_offset - col))
                    if masked and (col >= Nk or (windowed and (col > row + hi or col < row + lo))):
                        score = -math.inf
                    S[n, e] = score

            if DROPOUT:
                # keep bits of this lane's 4 NC entries of Z_ij (bit 4 n + e). Columns 2t, 2t + 1
                # of n-tile n are words 2 (t % 2), +1 of Philox of group (col0 + 8 n + 2 t) // 4
                keep_bits = 0
                for hh in range(2):
                    row = wrow + g + 8 * hh
                    for n in range(NC):
                        words = philox4x32(np.uint64((col0 + 8 * n + 2 * t) // 4), np.uint64(row),
                                           h_word, b_word, key0, key1)
                        for e2 in range(2):
                            if kept(words[2 * (t % 2) + e2], dropout_p):
                                keep_bits |= 1 << (4 * n + 2 * hh + e2)

            # Alg. 1 lines 9-10, per row (hh = 0: row g, 1: row g + 8)
            for hh in range(2):
                m_tilde = S[0, 2 * hh]
                for n in range(NC):
                    for e2 in range(2):
                        m_tilde = max(m_tilde, S[n, 2 * hh + e2])
                # rowmax(S_ij): the 4 lanes of a quad hold the row's columns
                m_tilde = max(m_tilde, cuda.shfl_xor_sync(FULL_MASK, m_tilde, 1))
                m_tilde = max(m_tilde, cuda.shfl_xor_sync(FULL_MASK, m_tilde, 2))
                m_new = max(m[hh], m_tilde)            # m_i^(j) = max(m_i^(j-1), rowmax(S_ij))
                m_safe = m_new
                if m_new == -math.inf:
                    m_safe = float32(0.0)              # no visible key yet: P = 0, no inf - inf
                alpha = exp2_ftz(m[hh] - m_safe)       # e^(m_i^(j-1) - m_i^(j)), log2 units
                l_tilde = float32(0.0)
                for n in range(NC):
                    for e2 in range(2):
                        p = exp2_ftz(S[n, 2 * hh + e2] - m_safe)    # P~_ij = exp(S_ij - m_i^(j))
                        S[n, 2 * hh + e2] = p
                        l_tilde += p
                l[hh] = alpha * l[hh] + l_tilde        # l_i^(j), of the undropped P~_ij
                m[hh] = m_new
                # diag(e^(m_i^(j-1) - m_i^(j)))^-1 O_i^(j-1), skipped by the whole warp when none
                # of its rows has a new maximum (alpha = 1 exactly: the product would change nothing)
                if cuda.any_sync(FULL_MASK, alpha != float32(1.0)):
                    for n in range(ND):
                        O[n, 2 * hh] *= alpha
                        O[n, 2 * hh + 1] *= alpha
            if DROPOUT:
                for n in range(NC):                    # P~_ij o Z_ij, for the P V product only
                    for e in range(4):
                        if keep_bits & (1 << (4 * n + e)):
                            S[n, e] *= Z_kept
                        else:
                            S[n, e] = float32(0.0)

            # Alg. 1 line 10: O_i += P~_ij V_j. The S accumulators of n-tiles 2 kc, 2 kc + 1 are
            # P_ij's A fragment for keys 16 kc .. 16 kc + 15; V_j's B fragments by ldmatrix.trans
            for kc in range(KC):
                a = (PACK_K(S[2 * kc, 0], S[2 * kc, 1]), PACK_K(S[2 * kc, 2], S[2 * kc, 3]),
                     PACK_K(S[2 * kc + 1, 0], S[2 * kc + 1, 1]),
                     PACK_K(S[2 * kc + 1, 2], S[2 * kc + 1, 3]))
                for nd in range(ND // 2):
                    vf = mma.ldmatrix_x4_trans(Vs, tile_at(VS, s, 16 * kc + lane % 16,
                                                           16 * nd + 8 * (lane // 16)))
                    mma_into(O, 2 * nd, a, vf[0], vf[1])
                    mma_into(O, 2 * nd + 1, a, vf[2], vf[3])
            cuda.syncthreads()  # every warp done reading stage s before it is refilled

            if STAGES == 1 and j + 1 < n_tiles:
                load_tile(Ks, Vs, 0, k, v, col0 + Bc, Nk, tid, kv_at, kv_row)
                mma.cp_async_commit()
            j += 1

        # Alg. 1 lines 12-15: O_i = diag(l_i)^-1 O_i, L_i = m_i + log(l_i); write both
        for hh in range(2):
            l_row = l[hh]                                 # l_i: the quad's partial sums
            l_row += cuda.shfl_xor_sync(FULL_MASK, l_row, 1)
            l_row += cuda.shfl_xor_sync(FULL_MASK, l_row, 2)
            row = wrow + g + 8 * hh
            if row < Nq:
                inv_l = float32(0.0)
                if l_row != 0.0:                          # 0: no visible key, O = 0, L = -inf
                    inv_l = float32(1.0) / l_row
                for n in range(ND):
                    x = 8 * n + 2 * t
                    if x < d:
                        pair = PACK_K(O[n, 2 * hh] * inv_l, O[n, 2 * hh + 1] * inv_l)
                        out[b, row, h, x] = uint16(pair & uint32(0xFFFF))
                        if x + 1 < d:
                            out[b, row, h, x + 1] = uint16(pair >> uint32(16))
                if t == 0:
                    if l_row != 0.0:
                        L[b, h, row] = (m[hh] + math.log2(l_row)) * LN_2
                    else:
                        L[b, h, row] = -math.inf

    return fa2_tc_forward_kernel


def argtypes():
    """The kernel's argument types as the launchers pass them: q, k, v, out (uint16 bits), L,
    q_scale, windowed, lo, hi, dropout_p, seed, limit, cap2, slopes."""
    u4 = types.Array(types.uint16, 4, "C")
    f3 = types.Array(types.float32, 3, "C")
    f2 = types.Array(types.float32, 2, "C")
    return (u4, u4, u4, u4, f3, types.float32, types.boolean, types.int32, types.int32,
            types.float64, types.uint64, types.int64, types.float32, f2)


def compile_targets(config):
    """[(label, dispatcher, argtypes)] for the resource check, as the wrapper launches them."""
    kernel_types = argtypes()
    targets = []
    for kind in ("bf16", "f16"):
        targets += [(f"{NAME}_{kind}", build(config, kind), kernel_types),
                    (f"{NAME}_{kind}_dropout", build(config, kind, dropout=True), kernel_types),
                    (f"{NAME}_{kind}_softcap_alibi", build(config, kind, softcap=True, alibi=True),
                     kernel_types)]
    return targets


# ---------------------------------------------------------------------------
# Wrapper: check, allocate, launch
# ---------------------------------------------------------------------------

def resolve_config(d, Br=None, Bc=None, num_warps=None, config=None):
    base = config if config is not None else default_config(d)
    if base.d_pad < d:
        raise ConfigError(f"config d_pad={base.d_pad} cannot serve head dim d={d}")
    if num_warps is not None and Br is None:
        Br = 16 * num_warps
    if Br is not None and num_warps is None:
        num_warps = max(1, Br // 16)
    config = TileConfig(Br=base.Br if Br is None else Br, Bc=base.Bc if Bc is None else Bc, d_pad=base.d_pad,
                        num_warps=base.num_warps if num_warps is None else num_warps)
    check_config(config)
    return config


def launcher(q, k, v, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None, dropout_p=0.0,
             seed=0, Br=None, Bc=None, num_warps=None, limit=None, config=None, dtype=None,
             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, stages=None, dynamic=None):
    """Check and allocate once; returns (launch, out, L, kind): out holds uint16 bits on the device.
    ``launch()`` runs the kernel again into the same out and L (what a benchmark times).
    softcap > 0 and alibi_slopes launch their variants (``common.resolve_features``); stages
    (1 or 2) overrides ``stages(config)`` (``bench.tc_configs --forward``); dynamic overrides
    ``is_dynamic`` (tests).
    Above 48 KB the kernel gets dynamic shared memory, within the GPU's opt-in limit
    (``smem_limit``)."""
    B, Nq, Nk, H_q, _, d = check_qkv16(q, k, v)
    kind = resolve_kind(q, dtype)
    scale, windowed, lo, hi, steps = common.resolve_band(
        Nq, Nk, d, causal=causal, alignment=alignment, softmax_scale=softmax_scale,
        window_size=window_size, limit=limit)
    cap, slopes = common.resolve_features(softcap, alibi_slopes, B, H_q, alignment)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    config = resolve_config(d, Br, Bc, num_warps, config)
    kernel = build(config, kind, dropout=dropout_p > 0.0, softcap=cap > 0.0, alibi=alibi_slopes is not None,
                   stages=stages, dynamic=dynamic)
    nbytes = dynamic_smem_bytes(config, stages, dynamic)     # 0: Ks and Vs are static
    if nbytes and not numba_config.ENABLE_CUDASIM:             # this GPU's opt-in limit
        check_config(config, stages, dynamic, cc=cuda.get_current_device().compute_capability)

    arrays = common.Arrays(q, k, v)
    q_d, k_d, v_d = (padded_bits(x, config.d_pad, arrays) for x in (q, k, v))
    out = cuda.device_array((B, Nq, H_q, d), dtype=np.uint16)
    L = cuda.device_array((B, H_q, Nq), dtype=np.float32)
    Tr = geometry.num_tiles(Nq, config.Br)
    launch_kernel = kernel[(Tr, B * H_q), config.threads, 0, nbytes]
    q_scale = np.float32(scale * LOG2_E)
    cap2 = np.float32(cap * LOG2_E)
    args = (q_d, k_d, v_d, out, L, q_scale, windowed, lo, hi, dropout_p, seed, steps, cap2, slopes)
    smem_limit.raise_dynamic_limit(kernel, args, nbytes)      # above 48 KB the driver must allow it

    def launch():
        launch_kernel(*args)

    return launch, out, L, kind


fast_takes = half_io.fast_takes   # what fast_forward serves: attention.fast_kernels asks the module
_fast = {}    # (shapes, dtype, device, options) -> (its Launch, the constants, the slopes placeholder)


def fast_forward(q, k, v, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                 dropout_p=0.0, seed=0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """(O, L) as new torch CUDA tensors (O in q's dtype, L float32): ``fa2_tc_forward`` without
    numba's per-call work.

    q, k, v: torch CUDA tensors, float16 or bfloat16, C-contiguous, on numba's current GPU,
    shapes checked, head dim as ``fast_takes`` asks (``attention.forward`` checks all that
    first). The config and the prepared launch (``launch.prepared``) are made once per shape,
    dtype and options; a call allocates O and L with torch and launches the kernel with the
    arguments ``launcher`` gives it (bitwise the same results). dropout_p and seed as
    ``common.resolve_dropout`` takes them, already checked (the public call's ``Call``).
    """
    B, Nq, H_q, d = q.shape
    kind, key = fast_shape_class(q, k, causal=causal, alignment=alignment, softmax_scale=softmax_scale,
                                 dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                                 alibi_slopes=alibi_slopes)
    cached = _fast.get(key)
    if cached is None:
        scale, windowed, lo, hi, steps, cap = fast_band(q, k, causal=causal, alignment=alignment,
                                                        softmax_scale=softmax_scale,
                                                        window_size=window_size, softcap=softcap)
        config = resolve_config(d)
        kernel = build(config, kind, dropout=dropout_p > 0.0, softcap=cap > 0.0,
                       alibi=alibi_slopes is not None)
        nbytes = dynamic_smem_bytes(config)
        if nbytes:
            check_config(config, cc=cuda.get_current_device().compute_capability)
        run = prepared(kernel, argtypes(), (geometry.num_tiles(Nq, config.Br), B * H_q),
                       config.threads, nbytes, device=q.device.index)
        constants = ((np.float32(scale * LOG2_E), windowed, lo, hi), (steps, np.float32(cap * LOG2_E)))
        cached = _fast[key] = (run, constants, f32_like(q, (1, 1)))     # slopes placeholder, never read
    run, (before, after), placeholder = cached
    slopes = fast_slopes(q, placeholder, softcap=softcap, alibi_slopes=alibi_slopes, alignment=alignment)
    out = q.new_empty((B, Nq, H_q, d))
    L = f32_like(q, (B, H_q, Nq))
    run(q, k, v, out, L, *before, dropout_p, seed, *after, slopes)
    return out, L


def fa2_tc_forward(q, k, v, softmax_scale=None, causal=False, alignment=BOTTOM_RIGHT, dropout_p=0.0,
                   seed=0, limit=None, *, Br=None, Bc=None, num_warps=None, config=None, dtype=None,
                   window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """FlashAttention-2 forward on tensor cores. q (B, Nq, Hq, d), k, v (B, Nk, Hkv, d), all
    float16 or all bfloat16 (NumPy, ml_dtypes.bfloat16 included), or Numba device arrays of
    their uint16 bits with dtype='bfloat16' | 'float16'.

    Returns (O (B, Nq, Hq, d) in the input dtype, L (B, Hq, Nq) float32), L the logsumexp of each
    row's scaled scores (natural log; -inf for a row with no visible key). alignment, dropout_p,
    seed, limit, window_size, softcap, alibi_slopes as in ``fa2_fast_forward``. NumPy in, NumPy
    out; device in, device out.
    """
    launch, out, L, kind = launcher(q, k, v, causal=causal, alignment=alignment,
                                    softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed,
                                    Br=Br, Bc=Bc, num_warps=num_warps, limit=limit, config=config,
                                    dtype=dtype, window_size=window_size, softcap=softcap,
                                    alibi_slopes=alibi_slopes)
    launch()
    L_out = L.copy_to_host() if isinstance(q, np.ndarray) else L
    return as_dtype(out, kind, q), L_out


# ---------------------------------------------------------------------------
# The registry's entry points (flashnumba.registry)
# ---------------------------------------------------------------------------

def forward(q, k, v, **options):
    """(O, L): O in the inputs' 16-bit dtype, L float32."""
    return fa2_tc_forward(q, k, v, **options)


def state(q, k, v, **options):
    """What a step shows: O (= O_i / l_i so far) and L (= m_i + log l_i): m and l stay in registers."""
    return dict(zip(("O", "L"), fa2_tc_forward(q, k, v, **options)))
