"""FlashAttention-2 backward, version 3: on the tensor cores (mma.sync), for fp16 and bf16.

Dao 2023, Algorithm 2, with every product on ``mma.sync.m16n8k16`` (``kernels.mma``):
one thread block per K/V tile j and K/V head (grid (Tc, B * Hkv)); Bc keys of K_j,
16 for each warp, or, for d_pad >= 96, 16 for each pair of warps (``key_warps``: one
warp's dK_j and dV_j would be 128 fp32 registers per lane at d_pad = 128), or twice
that: two 16-key m-tiles (``key_tiles``; the d_pad = 128 default, Bc = 128 with 8
warps). Q tiles have Br rows, a multiple of 16 (of 32 with pairs): a warp's registers
grow with Br and its m-tiles, the block's K/V tile with Bc, and every Q tile's loads
and dQ_i atomics are shared by Bc keys. dQ_i's 16 x 16 pieces are dealt out to all
warps. Three launches:

    preprocess   D_i = rowsum(dO_i o O_i), fp32, 8 lanes a row (Alg. 2 line 4);
                 dQ = 0 (fp32, accumulated by atomics; line 3)
    dkdv         for each query head h of the group (GQA: dK_j, dV_j summed over it in registers)
                   for each Q tile i visible to K_j (q_tile_start <= i < q_tile_end under
                 causal or a window):
                     Q_i, dO_i -> shared (cp.async), L_i, D_i -> shared: two stages, tile
                     i + 1's copies asked for as soon as every warp is done with tile i - 1
                     S_ij^T  = K_j Q_i^T                 mma, A = K_j (ldmatrix), B = Q_i
                     dP_ij^T = V_j dO_i^T                mma, A = V_j, B = dO_i (side by side)
                     P_ij^T  = exp(scale S_ij^T - L_i)    (0 where masked); the SOFTCAP, ALIBI
                               variants: exp(softcap tanh(scale S_ij^T / softcap)
                                             - slope |r + Nk - Nq - c| - L_i)
                     dS_ij^T = P_ij^T o (dP_ij^T o Z^T - D_i)   (o (1 - tanh^2) with softcap)
                     dS_ij^T -> shared (16-bit)
                     dV_j   += (P_ij o Z_ij)^T dO_i      mma, B = dO_i by ldmatrix.trans
                     dK_j   += dS_ij^T Q_i               mma, B = Q_i by ldmatrix.trans
                     dQ_i   += dS_ij K_j                 mma, A = dS by ldmatrix.trans, B = K_j
                                                         (.trans); fp32 atomics into dQ, 16 x 16
                                                         pieces of dQ_i dealt to the warps
                 dK_j = scale dK_j, dV_j written in the input dtype
    finish_dq    dQ = scale dQ (fp32) -> the input dtype

Working on S^T (keys as rows) puts P^T and dS^T in the accumulators laid out as the A
operands of dV_j and dK_j. With one warp for each 16 keys (d_pad <= 64) both go from
accumulators to A fragments in registers, as P_ij does in the forward; only dQ needs
dS_ij itself, which ldmatrix.trans reads back from shared memory. With a pair (FA2's
own split), each warp computes S_ij^T and dP_ij^T for its 16 keys and half of Q_i's
queries, writes (P_ij o Z_ij)^T and dS_ij^T to shared memory, and after a barrier
accumulates dV_j and dK_j for its 16 keys and half of the head dims, reading all Br
queries of P^T and dS^T back as A fragments (ldmatrix): no product is computed twice.

Names here -> the paper's (Dao 2023, Algorithm 2; "l." = its line numbers):

    D_rows         D = rowsum(dO o O) (l. 4), the preprocess launch
    sm             the dynamic shared array, 16-bit; the tiles at offsets (``smem_offsets``):
      KS, VS         K_j, V_j (l. 6)
      QS, DOS        Q_i, dO_i (l. 9), STAGES of each, tile i in rows q0 .. q0 + Br
      DSS, PS        dS_ij^T (l. 14), (P_ij o Z_ij)^T (l. 11; pairs only), keys x queries
    Ls, Ds         log2(e) L_i, D_i (l. 9), static fp32, STAGES of each
    S              S_ij^T (l. 10), then (P_ij o Z_ij)^T (l. 11)
    dP             dP_ij^T (l. 13), then dS_ij^T (l. 14)
    dV, dK         dV_j (l. 12), dK_j (l. 16, unscaled until it is written, l. 18)
    dQ             dq_group() 16 x 16 pieces of dS_ij K_j side by side, added to HBM by
                   atomics (l. 15)
    KM             a warp's 16-key m-tiles (``key_tiles``): S, dP, dK, dV hold KM of them
    d_pad          the compiled head dim (d <= d_pad)

Names follow the paper; the lane layout is kernels/mma.py's: accumulator e of
m-tile m, n-tile n holds S_ij^T[16 (KM w + m) + g + 8 (e // 2), qw0 + 8 n + 2 t + e % 2]
(key, query; qw0 = 0, or the half of Q_i a warp of a pair takes).
Masking: P_ij = 0 for key c >= Nk, query row r >= Nq and, under causal or a
sliding window, keys outside the band r + lo <= c <= r + hi
(``geometry.window_bounds``), tested on edge and band-edge tiles only.
Softcap and ALiBi are compile-time variants (``build(config, kind, softcap=True,
alibi=True)``), as in ``fa2_fast_backward``: S_ij is capped and biased before
exp, and with softcap dS_ij carries tanh's derivative, 1 - tanh^2.
Dropout (compile-time variant): Z_ij from ``philox.keep`` per element, the same
mask as every other kernel. m_i, l_i are not needed: L_i = m_i + log l_i from
the forward gives P_ij directly.

Global memory: q, k, v, dout and dQ's fp32 accumulator are passed as flat (1-D) views
(``flat_views``; the sizes come from L and dk), a head's first row computed once as an
unsigned 64-bit element offset, then one multiply-add per 16-byte copy (``load_rows``) and
per row of dQ added (no per-axis index arithmetic, no wraparound tests).

What bounds it: dQ's atomics and instruction issue with few warps. The atomics are
B * Hq * Nq * d fp32 adds per column of K/V blocks, so Nk / Bc of them per element of dQ
(two floats an atomic where the GPU has ``red.global.add.v2.f32``: ``vector_red``; not
deterministic in their summation order), hence Bc = 128 at d_pad = 128. A lane's registers
(S_ij^T, dP_ij^T, dK_j, dV_j and the fragments) leave room for two blocks of 4 warps an SM
at d_pad = 64 and one block of 8 at d_pad = 128, too few to hide the latency of each mma's
operands (ldmatrix from shared memory) and of the mmas themselves, and each mma comes with
many other instructions: the copies' and atomics' address arithmetic, the masks and
exponentials of P_ij and dS_ij.
Also: Q_i and dO_i re-read from L2 by every K/V block, K_j and V_j re-read from shared
memory by ldmatrix for every Q tile (and, with pairs, P^T and dS^T written and read back),
three barriers per Q tile, and the dropout variant's Philox call per element (3 of its 4
words unused). Shared memory is dynamic (up to what the GPU gives a block,
``smem_limit``): the d_pad = 128 default needs more than the 48 KB of static memory.
deterministic=True is served by FA2's readable backward (``registry``: its
separate dQ pass, on the inputs widened to float32), not by this kernel.
"""

import collections
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
    WARP_SIZE,
    ConfigError,
    TileConfig,
    require,
)
from flashnumba.kernels.fast_math import LOG2_E, exp2_ftz
from flashnumba.kernels.geometry import num_tiles, q_tile_end, q_tile_start
from flashnumba.kernels.half_io import (
    as_dtype,
    bits_of,
    check_qkv16,
    f32_like,
    fast_band,
    fast_shape_class,
    fast_slopes,
    padded_bits,
    resolve_kind,
)
from flashnumba.kernels.hardware import MAX_THREADS_PER_SM, SM_SHARED_BYTES
from flashnumba.kernels.launch import prepared
from flashnumba.kernels.philox import kept, philox4x32, philox_key
from flashnumba.kernels.preprocess import (
    LANES_PER_ROW,
    PRE_ROWS_PER_BLOCK,
    PRE_THREADS,
    row_of_lane,
    sum_over_row_lanes,
    zero_flat,
)

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it
FEATURES = ("window_size", "softcap", "alibi_slopes")   # flash-attn's options beyond plain attention
HALF_BYTES = 2
FLOAT_BYTES = 4
ROW_PAD = 8
MMA = {"bf16": mma.mma_bf16, "f16": mma.mma_f16}
PACK = {"bf16": mma.pack_bf16x2, "f16": mma.pack_f16x2}
UNPACK = {"bf16": mma.unpack_bf16x2, "f16": mma.unpack_f16x2}

# (Br, Bc, num_warps) per head-dim bucket. A warp's registers grow with Br (S^T, dP^T: Br / 2
# fp32 each per lane at d_pad <= 64): Br = Bc = 64 at d = 64 needed more than 255 registers and
# spilled; Bc grows with the warps instead. d_pad >= 96: two warps for each 16 keys, each with
# half of Q_i's queries in S^T, dP^T and half of the head dims of dK_j, dV_j (``key_warps``;
# one warp's dK_j + dV_j would be 128 fp32 registers per lane at d_pad = 128, and spill). At
# d_pad = 128 each pair holds two 16-key m-tiles (``key_tiles``): Bc = 128 with 8 warps, as FA2's
# own d = 128 tile, at Br = 32 (Br = 64 spilled); the dQ_i atomics per Q tile serve twice the keys
# (PERF-NOTES.md, "fa2_tc_backward v5").
_DEFAULTS = {16: (32, 64, 4), 32: (32, 64, 4), 64: (32, 64, 4), 96: (64, 64, 8), 128: (32, 128, 8)}
# Where the dropout, softcap and ALiBi kernels take other tiles: they hold more registers a lane,
# and with two key m-tiles at d_pad = 128 they spilled (ptxas, sm_90: dropout 44 B, softcap with
# ALiBi 8 B, at 255 registers), so they keep one (``serves_variants``).
_VARIANT_DEFAULTS = {128: (64, 64, 8)}
_ALTERNATIVES = {64: [(32, 32, 2), (16, 128, 8), (16, 16, 1)], 128: [(32, 64, 8), (32, 32, 4)]}
STAGES = 2    # Q tiles in shared memory: tile i + 1 is copied while tile i is used


def key_warps(d_pad):
    """Warps for each 16 keys of K_j: 1 (the warp computes S_ij^T, dP_ij^T for all Br queries
    and all of dK_j, dV_j for its keys, P^T and dS^T from its own accumulators), or 2 for
    d_pad >= 96, a pair that splits the work FA2's way: each warp S_ij^T, dP_ij^T for half of
    the queries, both written to shared memory as P^T, dS^T, and dK_j, dV_j for half of the head
    dims, their A operands read back (so each holds 64 fp32 accumulators a lane at d_pad = 128)."""
    return 2 if d_pad >= 96 else 1


def key_tiles(config):
    """16-key m-tiles a warp (with key_warps = 2, a pair) holds: Bc key_warps / (16 num_warps),
    1 or 2. Two double the keys of a block (K_j, V_j's loads and dQ_i's atomics per Q tile serve
    twice the keys) and each B fragment of S^T, dP^T, dK_j and dV_j feeds two mmas, for twice
    the registers of S^T, dP^T, dK_j and dV_j (FA2's own d = 128 tile: Bc = 128 with 8 warps)."""
    return config.Bc * key_warps(config.d_pad) // (16 * config.num_warps)


def dq_group(Br, d_pad, num_warps):
    """dQ_i's 16 x 16 pieces a warp computes side by side: the largest divisor of d_pad / 16 no
    larger than the pieces per warp (rounded down, at least 1), so a group shares its rows (one
    dS_ij fragment a k-step) and its mmas are independent. Rounded down: where the pieces do not
    split evenly the last groups wait for the slowest warp either way, and each piece of a group
    holds 8 fp32 registers a lane for the whole of dQ's loop."""
    per_warp = max(1, (Br // 16) * (d_pad // 16) // num_warps)
    return max(p for p in range(1, d_pad // 16 + 1) if (d_pad // 16) % p == 0 and p <= per_warp)


def default_config(d, variant=False):
    """The tiles for head dim d; variant: those of the dropout, softcap and ALiBi kernels."""
    d_pad = common.head_dim_bucket(d)
    Br, Bc, num_warps = (_VARIANT_DEFAULTS if variant else _DEFAULTS).get(d_pad, _DEFAULTS[d_pad])
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps)


def serves_variants(config):
    """Whether the dropout, softcap and ALiBi kernels ship at this config (all but two key
    m-tiles a warp at d_pad = 128, where they spill: ``_VARIANT_DEFAULTS``)."""
    return not (key_tiles(config) == 2 and config.d_pad >= 128)


def shipped_configs():
    configs = [default_config(d_pad) for d_pad in HEAD_DIM_BUCKETS]
    configs += [default_config(d_pad, variant=True) for d_pad in _VARIANT_DEFAULTS]
    for d_pad, alternatives in _ALTERNATIVES.items():
        configs += [TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=w) for Br, Bc, w in alternatives]
    return configs


def smem_offsets(config):
    """Where each 16-bit tile starts in the dynamic shared array, in elements, and its length:
    K_j, V_j (Bc x (d_pad + 8) each), STAGES of Q_i, dO_i (Br x (d_pad + 8) each), dS_ij^T and,
    with key_warps = 2, P_ij^T (Bc x (Br + 8) each). End to end, each on a 16-byte boundary (rows
    are multiples of 8 elements)."""
    Br, Bc, d_pad = config.Br, config.Bc, config.d_pad
    kv = Bc * (d_pad + ROW_PAD)
    qd = STAGES * Br * (d_pad + ROW_PAD)
    st = Bc * (Br + ROW_PAD)
    offsets = {"Ks": 0, "Vs": kv, "Qs": 2 * kv, "dOs": 2 * kv + qd, "dSs": 2 * kv + 2 * qd,
               "Ps": 2 * kv + 2 * qd + st}
    offsets["elements"] = offsets["Ps"] + (st if key_warps(d_pad) == 2 else 0)
    return offsets


def smem_bytes(config):
    """Shared memory per block: the dynamic array (``smem_offsets``, 16-bit) and STAGES of L_i,
    D_i (fp32, static)."""
    return smem_offsets(config)["elements"] * HALF_BYTES + 2 * STAGES * config.Br * FLOAT_BYTES


def dynamic_smem_bytes(config):
    """The launch's dynamic shared memory (its 4th configuration value)."""
    return smem_offsets(config)["elements"] * HALF_BYTES


def check_config(config, cc=None):
    """Raise ConfigError unless the configuration can compile and launch: its shared memory up to
    what a GPU of compute capability `cc` gives a block (None: the most any does)."""
    who = NAME
    common.check_sizes(config, who)
    Br, Bc, d_pad, num_warps = config.Br, config.Bc, config.d_pad, config.num_warps
    KW = key_warps(d_pad)
    require(Bc * KW in (16 * num_warps, 32 * num_warps),
            f"{who}: Bc={Bc} must be 16 x num_warps / {KW} = {16 * num_warps // KW} or twice that "
            f"({KW} warp(s) for each 16 or 32 keys of K_j)")
    require(Br % (16 * KW) == 0, f"{who}: Br={Br} must be a multiple of {16 * KW} (the mma's k-steps "
                                 f"over queries{', a half for each warp of a pair' if KW == 2 else ''})")
    require(d_pad % (16 * KW) == 0, f"{who}: d_pad={d_pad} must be a multiple of {16 * KW}")
    KM = key_tiles(config)
    require(KM * Br // (2 * KW) <= 63, f"{who}: Br={Br}, Bc={Bc}: the dropout kernel keeps a lane's "
                                       f"{KM} Br / {2 * KW} keep bits in one 64-bit integer")
    limit = smem_limit.MAX_BLOCK_BYTES if cc is None else smem_limit.opt_in_limit(cc)
    smem = smem_bytes(config)
    require(smem <= limit, f"{who}: Br={Br}, Bc={Bc}, d_pad={d_pad}, num_warps={num_warps} needs "
                           f"{smem} bytes of shared memory, over the {limit} a block may have; use "
                           f"smaller tiles")
    blocks = config.blocks_per_sm
    require(isinstance(blocks, (int, np.integer)) and blocks >= 0,
            f"{who}: blocks_per_sm must be a non-negative integer, got {blocks!r}")
    require(blocks * config.threads <= MAX_THREADS_PER_SM and blocks * (smem + 1024) <= SM_SHARED_BYTES,
            f"{who}: blocks_per_sm={blocks}: that many blocks of {config.threads} threads and {smem} "
            f"bytes of shared memory do not fit on one SM")


def _smem_alignment():
    return None if numba_config.ENABLE_CUDASIM else 16


def _jit_options(config):
    """Launch bounds (threads, config.blocks_per_sm) where the config asks for them: ptxas then
    holds a thread to 65536 / (threads x blocks) registers (a 12-warp block: 168). None on the
    simulator, which takes none."""
    if numba_config.ENABLE_CUDASIM or not config.blocks_per_sm:
        return {}
    return {"launch_bounds": (config.threads, int(config.blocks_per_sm))}


Fa2TcBackwardKernels = collections.namedtuple("Fa2TcBackwardKernels", "preprocess dkdv finish_dq")


def build(config, kind="bf16", dropout=False, softcap=False, alibi=False, red_v2=False):
    """(preprocess, dkdv, finish_dq) for `config` and `kind` ('bf16' | 'f16'); dropout, softcap,
    alibi: the dkdv variants that drop P_ij, cap S_ij (and carry tanh's derivative into dS_ij),
    bias S_ij; red_v2: dQ's atomics two floats at a time (``mma.red_add_v2``, sm_90 and newer,
    even head dims). dkdv takes q, k, v, dout and dQ's accumulator as flat (1-D) views
    (``flat_views``), indexed by unsigned 64-bit offsets. Cached."""
    if kind not in MMA:
        raise ValueError(f"kind={kind!r}: expected 'bf16' or 'f16'")
    return _build(config, kind, bool(dropout), bool(softcap), bool(alibi), bool(red_v2))


@functools.cache
def _build(config, KIND, DROPOUT, SOFTCAP=False, ALIBI=False, RED_V2=False):
    check_config(config)
    Br, Bc, d_pad, NW = int(config.Br), int(config.Bc), int(config.d_pad), int(config.num_warps)
    T = NW * WARP_SIZE
    ROW_LEN = d_pad + ROW_PAD
    BP = Br + ROW_PAD
    KW = key_warps(d_pad)         # warps for each 16 keys (2: each takes half the queries, dims)
    KM = key_tiles(config)        # 16-key m-tiles of a warp (of a pair, with KW = 2)
    KD = d_pad // 16              # k-steps over the head dim
    NS = Br // (8 * KW)           # n-tiles of a warp's S^T, dP^T (8 queries each)
    QW = Br // KW                 # queries of a warp's S^T, dP^T
    KC = Br // 16                 # k-steps over queries (dV_j, dK_j)
    KK = Bc // 16                 # k-steps over keys (dQ_i)
    NQ16 = d_pad // 16            # 16-dim columns of dQ_i
    PIECES = (Br // 16) * NQ16    # 16 x 16 pieces of dQ_i, dealt to the warps in groups
    PW = dq_group(Br, d_pad, NW)  # of PW side by side (one dS_ij fragment a k-step)
    NQ = 2 * PW                   # their n-tiles (8 dims each)
    DH = d_pad // KW              # head dims of a warp's dK_j, dV_j
    NDH = DH // 8                 # their n-tiles
    CHUNKS = d_pad // 8           # 16-byte chunks per row
    QROWS = STAGES * Br           # rows of Qs, dOs, Ls, Ds
    NLD = -(-Br // T)             # rows of L_i, D_i a thread copies
    SM = smem_offsets(config)     # where each tile starts in the dynamic array
    KS, VS, QS, DOS, DSS, PS = SM["Ks"], SM["Vs"], SM["Qs"], SM["dOs"], SM["dSs"], SM["Ps"]
    MMA_K, PACK_K, UNPACK_K = MMA[KIND], PACK[KIND], UNPACK[KIND]
    ALIGN = _smem_alignment()

    # Element [row, col] of a d_pad-wide tile (Ks, Vs, Qs, dOs: rows of ROW_LEN) or of a
    # Br-wide one (dSs, Ps: rows of BP) at offset OFF of the dynamic array
    @cuda.jit(device=True, inline="always")
    def wide_at(OFF, row, col):
        return OFF + row * ROW_LEN + col

    @cuda.jit(device=True, inline="always")
    def narrow_at(OFF, row, col):
        return OFF + row * BP + col

    @cuda.jit(device=True, inline="always")
    def mma_into(C, m, n, a, b0, b1):
        """C[m, n] = a (b0, b1) + C[m, n]: m-tile m (16 rows), n-tile n (8 columns)."""
        d = MMA_K(a, (b0, b1), (C[m, n, 0], C[m, n, 1], C[m, n, 2], C[m, n, 3]))
        for e in range(4):
            C[m, n, e] = d[e]

    @cuda.jit(device=True, inline="always")
    def load_rows(sm, OFF, src, base, row_stride, start, N, tid, ROWS):
        """rows start .. start + ROWS (clamped to N - 1) of one head of src -> the tile at OFF
        of sm, by cp.async: src is the flat view of a (B, N, H, d_pad) array, the head's row r
        at the unsigned element offset base + r row_stride."""
        for m in range((ROWS * CHUNKS + T - 1) // T):
            chunk = uint64(tid) + uint64(m * T)
            if chunk < uint64(ROWS * CHUNKS):
                r = chunk // uint64(CHUNKS)
                x = uint64(8) * (chunk % uint64(CHUNKS))
                row = uint64(min(start + int64(r), N - 1))
                mma.cp_async_16(sm, uint64(OFF) + r * uint64(ROW_LEN) + x, src, base + row * row_stride + x)

    @cuda.jit(device=True, inline="always")
    def stats_of(L, D_rows, b, hq, row, ok):
        """log2(e) L_i and D_i of query `row` (0, 0 unless ok)."""
        if ok:
            return L[b, hq, row] * LOG2_E, D_rows[b, hq, row]
        return float32(0.0), float32(0.0)

    @cuda.jit(device=True, inline="always")
    def products_T(C, A_OFF, B_OFF, C2, A2_OFF, B2_OFF, sm, w, lane):
        """C = A_w B^T and C2 = A2_w B2^T, KM 16 x QW m-tiles each, side by side (their mmas
        independent, so each k-step issues 2 KM NS of them): A_w = rows 16 KM w.. of the tile at
        A_OFF (ldmatrix, the KM fragments held for the k-step), B = the QW rows of the tile at
        B_OFF (ldmatrix, each fragment used by the KM m-tiles); likewise A2_w, B2."""
        for m in range(KM):
            for n in range(NS):
                for e in range(4):
                    C[m, n, e] = 0.0
                    C2[m, n, e] = 0.0
        for kk in range(KD):
            row, col = 16 * KM * w + lane % 16, 16 * kk + 8 * (lane // 16)
            a0 = mma.ldmatrix_x4(sm, wide_at(A_OFF, row, col))
            a0_2 = mma.ldmatrix_x4(sm, wide_at(A2_OFF, row, col))
            a1 = mma.ldmatrix_x4(sm, wide_at(A_OFF, row + 16, col)) if KM == 2 else a0
            a1_2 = mma.ldmatrix_x4(sm, wide_at(A2_OFF, row + 16, col)) if KM == 2 else a0_2
            for nn in range(NS // 2):
                at = (16 * nn + lane % 8 + 8 * (lane // 16), 16 * kk + 8 * ((lane // 8) % 2))
                bf = mma.ldmatrix_x4(sm, wide_at(B_OFF, at[0], at[1]))
                bf2 = mma.ldmatrix_x4(sm, wide_at(B2_OFF, at[0], at[1]))
                for m in range(KM):
                    a = a0 if m == 0 else a1
                    a2 = a0_2 if m == 0 else a1_2
                    mma_into(C, m, 2 * nn, a, bf[0], bf[1])
                    mma_into(C2, m, 2 * nn, a2, bf2[0], bf2[1])
                    mma_into(C, m, 2 * nn + 1, a, bf[2], bf[3])
                    mma_into(C2, m, 2 * nn + 1, a2, bf2[2], bf2[3])

    @cuda.jit(device=True, inline="always")
    def accumulate_from_registers(Acc, C, sm, B_OFF, lane):
        """Acc += C B (key_warps = 1): C (KM m-tiles of 16 x Br accumulators) packed into A
        fragments, B = the Br x d_pad tile at B_OFF by ldmatrix.trans."""
        for kc in range(KC):
            for nd in range(NDH // 2):
                bf = mma.ldmatrix_x4_trans(sm, wide_at(B_OFF, 16 * kc + lane % 16, 16 * nd + 8 * (lane // 16)))
                for m in range(KM):
                    a = (PACK_K(C[m, 2 * kc, 0], C[m, 2 * kc, 1]), PACK_K(C[m, 2 * kc, 2], C[m, 2 * kc, 3]),
                         PACK_K(C[m, 2 * kc + 1, 0], C[m, 2 * kc + 1, 1]),
                         PACK_K(C[m, 2 * kc + 1, 2], C[m, 2 * kc + 1, 3]))
                    mma_into(Acc, m, 2 * nd, a, bf[0], bf[1])
                    mma_into(Acc, m, 2 * nd + 1, a, bf[2], bf[3])

    @cuda.jit(device=True, inline="always")
    def accumulate_from_shared(Acc, sm, A_OFF, B_OFF, w, x0, lane):
        """Acc += A_w B (key_warps = 2): A_w = rows 16 KM w.. of the 16-bit Bc x Br tile at A_OFF
        (ldmatrix, KM fragments held for the k-step), B = columns x0 .. x0 + DH of the Br x d_pad
        tile at B_OFF (ldmatrix.trans, each fragment used by the KM m-tiles)."""
        for kc in range(KC):
            row, col = 16 * KM * w + lane % 16, 16 * kc + 8 * (lane // 16)
            a0 = mma.ldmatrix_x4(sm, narrow_at(A_OFF, row, col))
            a1 = mma.ldmatrix_x4(sm, narrow_at(A_OFF, row + 16, col)) if KM == 2 else a0
            for nd in range(NDH // 2):
                bf = mma.ldmatrix_x4_trans(sm, wide_at(B_OFF, 16 * kc + lane % 16, x0 + 16 * nd + 8 * (lane // 16)))
                for m in range(KM):
                    a = a0 if m == 0 else a1
                    mma_into(Acc, m, 2 * nd, a, bf[0], bf[1])
                    mma_into(Acc, m, 2 * nd + 1, a, bf[2], bf[3])

    @cuda.jit(device=True, inline="always")
    def probability(s, key, row, masked, L_row, Nq, Nk, windowed, lo, hi, q_scale, scale, cap, slope):
        """P_ij^T's element for key and query row from S_ij^T's s: exp(scale s - L_i) (L_row =
        log2(e) L_i), 0 where hidden (tested only when the tile is `masked`); and what dS_ij takes
        of the cap, 1 - tanh^2 (1 without SOFTCAP). SOFTCAP, ALIBI: exp(cap tanh(scale s / cap)
        - slope |row + Nk - Nq - key| - L_i)."""
        visible = True
        if masked:
            visible = key < Nk and row < Nq and (not windowed or row + lo <= key <= row + hi)
        p = float32(0.0)
        dcap = float32(1.0)
        if visible:
            if SOFTCAP or ALIBI:
                score = s * scale
                if SOFTCAP:              # S_ij = cap tanh(S_ij / cap)
                    tanh_s = math.tanh(score / cap)
                    score = cap * tanh_s
                    dcap = float32(1.0) - tanh_s * tanh_s
                if ALIBI:                # S_ij -= slope |r + Nk - Nq - c|
                    score -= slope * float32(abs(row + Nk - Nq - key))
                p = exp2_ftz(score * float32(LOG2_E) - L_row)
            else:
                p = exp2_ftz(s * q_scale - L_row)
        return p, dcap

    @cuda.jit(device=True, inline="always")
    def put_pair(sm, at, lo, hi):
        """sm[at], sm[at + 1] = lo, hi rounded to 16 bits, as the mma operand would be."""
        pair = PACK_K(lo, hi)
        sm[at] = uint16(pair & uint32(0xFFFF))
        sm[at + 1] = uint16(pair >> uint32(16))

    @cuda.jit(device=True, inline="always")
    def put_gradient(dst, b, key, h, x, d, lo, hi):
        """dst[b, key, h, x], and dst[.., x + 1] if x + 1 < d, = lo, hi in the input dtype."""
        pair = PACK_K(lo, hi)
        dst[b, key, h, x] = uint16(pair & uint32(0xFFFF))
        if x + 1 < d:
            dst[b, key, h, x + 1] = uint16(pair >> uint32(16))

    @cuda.jit(device=True, inline="always")
    def keep_word(words, s):
        """words[s] for a run-time s < 4, by selects (indexing a tuple at run time would put it
        in local memory)."""
        x = words[3]
        if s == 0:
            x = words[0]
        elif s == 1:
            x = words[1]
        elif s == 2:
            x = words[2]
        return x

    @cuda.jit
    def preprocess(dout, out, D_rows, dq_acc):
        """D_rows[b, h, r] = sum_x dO[b, r, h, x] O[b, r, h, x] in fp32 (16-bit inputs; Alg. 2
        line 4) and dQ = 0 (line 3), in one launch. Grid (row blocks of PRE_ROWS_PER_BLOCK, B H_q):
        LANES_PER_ROW lanes a row, their partial sums added by a shuffle butterfly; dq_acc (flat)
        zeroed by a grid-stride loop over the whole grid (``kernels.preprocess``'s parts)."""
        _, Nq, H_q, d = out.shape
        b, h, row, sub = row_of_lane(H_q)
        partial = float32(0.0)
        if row < Nq:
            for x in range(sub, d, LANES_PER_ROW):
                o, _ = UNPACK_K(uint32(out[b, row, h, x]))
                g, _ = UNPACK_K(uint32(dout[b, row, h, x]))
                partial += o * g
        partial = sum_over_row_lanes(partial)      # every lane, also those past Nq
        if sub == 0 and row < Nq:
            D_rows[b, h, row] = partial
        zero_flat(dq_acc)

    @cuda.jit
    def finish_dq(dq_acc, scale, dq):
        """dq = scale dq_acc, rounded to the input dtype (bits); both flat views of (B, Nq, H_q, d)
        arrays, so one index serves both."""
        e = cuda.grid(1)
        if e < dq.size:
            pair = PACK_K(dq_acc[e] * scale, float32(0.0))
            dq[e] = uint16(pair & uint32(0xFFFF))

    @cuda.jit(**_jit_options(config))
    def dkdv(q, k, v, dout, L, D_rows, dq_acc, dk, dv, q_scale, scale, windowed, lo, hi,
             dropout_p, seed, limit, cap, slopes):
        # --- sizes --- q, dout (B, Nq, H_q, d_pad), k, v (B, Nk, H_kv, d_pad): uint16 bits padded
        # to d_pad; dq_acc (B, Nq, H_q, d) fp32: these five as flat views (C order), so the sizes
        # come from L, D_rows (B, H_q, Nq) fp32 and dk, dv (B, Nk, H_kv, d) bits.
        # q_scale: scale log2(e), scale: float32; windowed: bool (causal or a window); lo, hi:
        # int32, key c is visible to query r iff r + lo <= c <= r + hi; dropout_p, seed (DROPOUT
        # only); limit: i steps to run (int64); cap: float32 softcap (SOFTCAP only); slopes:
        # float32 (B, H_q) ALiBi slopes (ALIBI only).
        H_q, Nq = L.shape[1], L.shape[2]
        Nk, H_kv = dk.shape[1], dk.shape[2]
        d = dk.shape[3]
        Tr = num_tiles(Nq, Br)
        G = H_q // H_kv                      # query heads per K/V head

        # --- who am I ---
        tid = cuda.threadIdx.x
        warp = tid // WARP_SIZE
        w = warp // KW                       # keys 16 KM w .. 16 KM (w + 1) - 1 of K_j
        qw0 = QW * (warp % KW)               # queries qw0 .. qw0 + QW of Q_i in S^T, dP^T
        x0 = DH * (warp % KW)                # head dims x0 .. x0 + DH of dK_j, dV_j
        lane = tid % WARP_SIZE
        g = lane // 4
        t = lane % 4
        j = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // H_kv
        h_kv = bh % H_kv
        col0 = j * Bc
        if DROPOUT:
            key0, key1 = philox_key(seed)
            b_word = np.uint64(b)
            Z_kept = float32(1.0 / (1.0 - dropout_p))

        # --- shared memory: the 16-bit tiles in one dynamic array (smem_offsets), L_i, D_i ---
        sm = cuda.shared.array(0, uint16, alignment=ALIGN)
        Ls = cuda.shared.array(QROWS, float32)      # L_i log2(e), stage s: rows s Br..
        Ds = cuda.shared.array(QROWS, float32)      # D_i

        # --- registers ---
        S = cuda.local.array((KM, NS, 4), float32)      # S_ij^T, then (P_ij o Z_ij)^T
        dP = cuda.local.array((KM, NS, 4), float32)     # dP_ij^T, then dS_ij^T
        dK = cuda.local.array((KM, NDH, 4), float32)    # dK_j (unscaled), rows 16 (KM w + m) + g, + 8
        dV = cuda.local.array((KM, NDH, 4), float32)    # dV_j
        dQ = cuda.local.array((1, NQ, 4), float32)      # PW 16 x 16 pieces of dS_ij K_j, side by side
        L_next = cuda.local.array(NLD, float32)     # L_i+1 log2(e), D_i+1, on their way to
        D_next = cuda.local.array(NLD, float32)     # shared memory while tile i runs

        # Alg. 2 lines 6-7: load K_j, V_j; dK_j = 0, dV_j = 0
        # unsigned element offsets: k[b, 0, h_kv, 0], and from one key's row to the next
        kv_at = (uint64(b) * uint64(Nk) * uint64(H_kv) + uint64(h_kv)) * uint64(d_pad)
        kv_row = uint64(H_kv * d_pad)
        load_rows(sm, KS, k, kv_at, kv_row, col0, Nk, tid, Bc)
        load_rows(sm, VS, v, kv_at, kv_row, col0, Nk, tid, Bc)
        mma.cp_async_commit()
        for m in range(KM):
            for n in range(NDH):
                for e in range(4):
                    dK[m, n, e] = 0.0
                    dV[m, n, e] = 0.0

        i_start = 0
        i_stop = Tr
        if windowed:                                         # Q tiles outside the band are skipped
            i_start = int64(q_tile_start(j, Br, Bc, Nq, hi))            # above the band's right edge
            i_stop = int64(max(i_start, q_tile_end(j, Br, Bc, Nq, Nk, lo)))   # below its left edge
        i_end = min(i_stop, i_start + limit)
        q_row = uint64(H_q * d_pad)                          # from one query's row to the next

        for hq in range(h_kv * G, h_kv * G + G):             # GQA: the group's query heads
            slope = float32(0.0)
            if ALIBI:
                slope = slopes[b, hq]                        # bias -slope |r + Nk - Nq - c|
            # row (b, 0, hq) among the B Nq H_q rows of q (d_pad elements each) and of dQ (d each)
            head_at = uint64(b) * uint64(Nq) * uint64(H_q) + uint64(hq)
            q_at = head_at * uint64(d_pad)                               # q[b, 0, hq, 0]
            if i_start < i_end:                      # Alg. 2 line 9 for the first tile: stage 0
                load_rows(sm, QS, q, q_at, q_row, i_start * Br, Nq, tid, Br)
                load_rows(sm, DOS, dout, q_at, q_row, i_start * Br, Nq, tid, Br)
                mma.cp_async_commit()
                for qr in range(tid, Br, T):
                    row = i_start * Br + qr
                    Ls[qr], Ds[qr] = stats_of(L, D_rows, b, hq, row, row < Nq)
            for i in range(i_start, i_end):                  # Alg. 2 line 8
                row0 = i * Br
                q0 = Br * ((i - i_start) % STAGES)           # Q_i's stage: rows q0.. of Qs, dOs, Ls, Ds
                mma.cp_async_wait(0)
                # Q_i, dO_i, L_i, D_i (and K_j, V_j) landed before any warp reads them, and every
                # warp is done with tile i - 1: its stage, P^T and dS^T may be written again
                cuda.syncthreads()
                # Alg. 2 line 9 for tile i + 1, into the other stage while tile i is used; its
                # L_i, D_i read into registers now and stored at the end of tile i, so that their
                # loads' latency hides behind tile i's work
                if i + 1 < i_end:
                    load_rows(sm, QS + (Br - q0) * ROW_LEN, q, q_at, q_row, row0 + Br, Nq, tid, Br)
                    load_rows(sm, DOS + (Br - q0) * ROW_LEN, dout, q_at, q_row, row0 + Br, Nq, tid, Br)
                    mma.cp_async_commit()
                    for u in range(NLD):
                        qr = tid + u * T
                        row = row0 + Br + qr
                        L_next[u], D_next[u] = stats_of(L, D_rows, b, hq, row, qr < Br and row < Nq)
                Q_i = QS + q0 * ROW_LEN                      # where Q_i, dO_i start in sm
                dO_i = DOS + q0 * ROW_LEN

                if DROPOUT:
                    # keep bits of this lane's 4 KM NS entries of Z_ij^T (bit 4 (m NS + n) + e),
                    # made before S^T exists: in a loop of its own, which may stay rolled (it
                    # touches no register array). philox.keep(seed, b, hq, row, key, p): word key % 4.
                    keep_bits = 0
                    for m in range(KM):
                        for n in range(NS):
                            for e in range(4):
                                key = col0 + 16 * (KM * w + m) + g + 8 * (e // 2)
                                row = row0 + qw0 + 8 * n + 2 * t + e % 2
                                words = philox4x32(np.uint64(key // 4), np.uint64(row), np.uint64(hq),
                                                   b_word, key0, key1)
                                if kept(keep_word(words, key % 4), dropout_p):
                                    keep_bits |= 1 << (4 * (m * NS + n) + e)

                # Alg. 2 lines 10-11: S_ij^T = K_j Q_i^T, P_ij^T = exp(scale S_ij^T - L_i); line
                # 13: dP_ij^T = V_j dO_i^T (with KW = 2: queries qw0 .. qw0 + QW)
                products_T(S, KS, Q_i + qw0 * ROW_LEN, dP, VS, dO_i + qw0 * ROW_LEN, sm, w, lane)
                masked = (col0 + Bc > Nk or row0 + Br > Nq
                          or (windowed and (col0 + Bc - 1 > row0 + hi or col0 < row0 + Br - 1 + lo)))
                for m in range(KM):
                    for n in range(NS):
                        for e in range(4):
                            key = col0 + 16 * (KM * w + m) + g + 8 * (e // 2)
                            qr = qw0 + 8 * n + 2 * t + e % 2         # query, within Q_i
                            p, dcap = probability(S[m, n, e], key, row0 + qr, masked, Ls[q0 + qr], Nq, Nk,
                                                  windowed, lo, hi, q_scale, scale, cap, slope)
                            z = float32(1.0)
                            if DROPOUT:
                                z = Z_kept if keep_bits & (1 << (4 * (m * NS + n) + e)) else float32(0.0)
                            # Alg. 2 line 14: dS_ij = P_ij o (dP_ij o Z_ij - D_i) (o (1 - tanh^2)
                            # with softcap); exactly 0 where hidden (p = 0 there; dP_ij, D_i finite)
                            dP[m, n, e] = p * dcap * (dP[m, n, e] * z - Ds[q0 + qr])
                            S[m, n, e] = p * z

                # dS_ij^T (and, with KW = 2, (P_ij o Z_ij)^T) -> shared, 16-bit
                for m in range(KM):
                    for n in range(NS):
                        for hh in range(2):
                            key_l = 16 * (KM * w + m) + g + 8 * hh
                            at = narrow_at(DSS, key_l, qw0 + 8 * n + 2 * t)
                            put_pair(sm, at, dP[m, n, 2 * hh], dP[m, n, 2 * hh + 1])
                            if KW == 2:
                                put_pair(sm, at + (PS - DSS), S[m, n, 2 * hh], S[m, n, 2 * hh + 1])
                if KW == 1:
                    # Alg. 2 line 12: dV_j += (P_ij o Z_ij)^T dO_i, A from S's accumulators
                    accumulate_from_registers(dV, S, sm, dO_i, lane)
                    # Alg. 2 line 16: dK_j += dS_ij^T Q_i  (times scale at the end)
                    accumulate_from_registers(dK, dP, sm, Q_i, lane)
                    cuda.syncthreads()  # dS_ij^T complete (all warps' keys) before any warp reads dS_ij
                else:
                    cuda.syncthreads()  # P^T, dS^T complete (all warps' keys and queries) before reads
                    # Alg. 2 line 12: dV_j += (P_ij o Z_ij)^T dO_i, head dims x0 .. x0 + DH
                    accumulate_from_shared(dV, sm, PS, dO_i, w, x0, lane)
                    # Alg. 2 line 16: dK_j += dS_ij^T Q_i  (times scale at the end)
                    accumulate_from_shared(dK, sm, DSS, Q_i, w, x0, lane)

                # Alg. 2 line 15: dQ_i += dS_ij K_j, in groups of PW 16 x 16 pieces side by side:
                # rows 16 rq.., dims 16 nq0.. of dQ_i; A = dS_ij by ldmatrix.trans of dS_ij^T (one
                # fragment a k-step for the group), B = K_j by ldmatrix.trans; fp32 atomics into dQ
                for grp in range(warp, PIECES // PW, NW):
                    rq = grp // (NQ16 // PW)                 # rows 16 rq .. of dQ_i
                    nq0 = PW * (grp % (NQ16 // PW))          # dims 16 nq0 .. 16 (nq0 + PW) - 1
                    for n in range(NQ):
                        for e in range(4):
                            dQ[0, n, e] = 0.0
                    for kk in range(KK):
                        a = mma.ldmatrix_x4_trans(sm, narrow_at(DSS, 16 * kk + lane % 8 + 8 * (lane // 16),
                                                                16 * rq + 8 * ((lane // 8) % 2)))
                        for u in range(PW):
                            bf = mma.ldmatrix_x4_trans(sm, wide_at(KS, 16 * kk + lane % 16,
                                                                   16 * (nq0 + u) + 8 * (lane // 16)))
                            mma_into(dQ, 0, 2 * u, a, bf[0], bf[1])
                            mma_into(dQ, 0, 2 * u + 1, a, bf[2], bf[3])
                    for hh in range(2):
                        row = row0 + 16 * rq + g + 8 * hh
                        if row < Nq:
                            # dQ[b, row, hq, 0]: dq_acc's rows are d long (not padded)
                            row_at = (head_at + uint64(row) * uint64(H_q)) * uint64(d)
                            for n in range(NQ):
                                if RED_V2:              # dims x, x + 1 in one 8-byte add (d even)
                                    x = 16 * nq0 + 8 * n + 2 * t
                                    if x < d:
                                        mma.red_add_v2(dq_acc, row_at + uint64(x), dQ[0, n, 2 * hh],
                                                       dQ[0, n, 2 * hh + 1])
                                else:
                                    for e2 in range(2):
                                        x = 16 * nq0 + 8 * n + 2 * t + e2
                                        if x < d:
                                            cuda.atomic.add(dq_acc, row_at + uint64(x),
                                                            dQ[0, n, 2 * hh + e2])
                if i + 1 < i_end:                    # L_i+1, D_i+1 into the other stage
                    for u in range(NLD):
                        qr = tid + u * T
                        if qr < Br:
                            Ls[Br - q0 + qr] = L_next[u]
                            Ds[Br - q0 + qr] = D_next[u]
                # every warp done with tile i before any starts tile i + 1: the next head's first
                # tile loads into stage 0 (within a head the next tile's first barrier would
                # come in time, but the kernel was measured faster with this one: PERF-NOTES.md,
                # "fa2_tc_backward v4")
                cuda.syncthreads()

        mma.cp_async_wait(0)    # K_j, V_j's copies done even when no Q tile was visited

        # Alg. 2 line 18: write dK_j = scale dK_j, dV_j in the input dtype
        for m in range(KM):
            for hh in range(2):
                key = col0 + 16 * (KM * w + m) + g + 8 * hh
                if key < Nk:
                    for n in range(NDH):
                        x = x0 + 8 * n + 2 * t
                        if x < d:
                            put_gradient(dk, b, key, h_kv, x, d, dK[m, n, 2 * hh] * scale,
                                         dK[m, n, 2 * hh + 1] * scale)
                            put_gradient(dv, b, key, h_kv, x, d, dV[m, n, 2 * hh], dV[m, n, 2 * hh + 1])

    return Fa2TcBackwardKernels(preprocess=preprocess, dkdv=dkdv, finish_dq=finish_dq)


def dkdv_argtypes():
    """dkdv's argument types as the launcher passes them (q, k, v, dout, dq_acc: flat views)."""
    bits = types.Array(types.uint16, 1, "C")
    f3 = types.Array(types.float32, 3, "C")
    acc = types.Array(types.float32, 1, "C")
    u4 = types.Array(types.uint16, 4, "C")
    f2 = types.Array(types.float32, 2, "C")
    return (bits, bits, bits, bits, f3, f3, acc, u4, u4, types.float32, types.float32, types.boolean,
            types.int32, types.int32, types.float64, types.uint64, types.int64, types.float32, f2)


def preprocess_argtypes():
    """preprocess's: dout, out (uint16 bits), D_rows, dQ's accumulator (a flat view)."""
    return (types.Array(types.uint16, 4, "C"), types.Array(types.uint16, 4, "C"),
            types.Array(types.float32, 3, "C"), types.Array(types.float32, 1, "C"))


def finish_dq_argtypes():
    """finish_dq's: dQ's accumulator, scale, dq's bits (both flat views)."""
    return (types.Array(types.float32, 1, "C"), types.float32, types.Array(types.uint16, 1, "C"))


def compile_targets(config):
    """The kernels that ship at `config`, for ``flashnumba resources``: the plain dkdv, the
    dropout and softcap-with-ALiBi ones where it serves them (``serves_variants``), preprocess and
    finish_dq, for bf16 and f16."""
    argtypes = dkdv_argtypes()
    targets = []
    for kind in ("bf16", "f16"):
        plain = build(config, kind)
        targets.append((f"fa2_tc_backward_{kind}", plain.dkdv, argtypes))
        if serves_variants(config):
            targets += [(f"fa2_tc_backward_{kind}_dropout", build(config, kind, True).dkdv, argtypes),
                        (f"fa2_tc_backward_{kind}_softcap_alibi",
                         build(config, kind, softcap=True, alibi=True).dkdv, argtypes)]
        targets += [(f"fa2_tc_backward_preprocess_{kind}", plain.preprocess, preprocess_argtypes()),
                    (f"fa2_tc_backward_finish_dq_{kind}", plain.finish_dq, finish_dq_argtypes())]
    return targets


def static_smem_bytes(config):
    """Static shared memory per block, as ptxas counts it: L_i and D_i (the tiles are dynamic)."""
    return smem_bytes(config) - dynamic_smem_bytes(config)


# ---------------------------------------------------------------------------
# Wrapper: check, allocate, launch
# ---------------------------------------------------------------------------

def resolve_config(d, Br=None, Bc=None, num_warps=None, config=None, variant=False):
    """The config for head dim d: `config`, else the default one (of the dropout, softcap and
    ALiBi kernels if `variant`) with any of Br, Bc, num_warps replaced. Bc and num_warps go
    together (Bc = 16 num_warps / key_warps, one key m-tile a warp): either gives the other. Br
    not given: the default's, but no more than Bc. blocks_per_sm: the base config's while
    num_warps is its own, else 0 (no launch bounds)."""
    base = config if config is not None else default_config(d, variant)
    if base.d_pad < d:
        raise ConfigError(f"config d_pad={base.d_pad} cannot serve head dim d={d}")
    KW = key_warps(base.d_pad)
    if num_warps is None and Bc is not None:
        num_warps = max(1, Bc // 16) * KW
    if Bc is None and num_warps is not None:
        Bc = 16 * num_warps // KW
    Bc = base.Bc if Bc is None else Bc
    num_warps = base.num_warps if num_warps is None else num_warps
    config = TileConfig(Br=min(base.Br, Bc) if Br is None else Br, Bc=Bc, d_pad=base.d_pad,
                        num_warps=num_warps,
                        blocks_per_sm=base.blocks_per_sm if num_warps == base.num_warps else 0)
    check_config(config)
    return config


def check_for_this_gpu(config):
    """check_config against what this GPU gives a block (on the simulator: against the most any
    GPU does, as the simulator enforces no limit)."""
    if not numba_config.ENABLE_CUDASIM:
        check_config(config, cc=cuda.get_current_device().compute_capability)


def flat_views(*arrays):
    """Each C-contiguous device array as its flat (1-D) view, no copy."""
    return tuple(x.reshape(x.size) for x in arrays)


def vector_red():
    """True on a GPU of compute capability 9.0 or newer, whose ``red.global.add.v2.f32`` adds two
    floats in one atomic (``mma.red_add_v2``); False on the simulator (its stand-in is for
    tests that ask for red_v2=True)."""
    if numba_config.ENABLE_CUDASIM:
        return False
    return tuple(cuda.get_current_device().compute_capability) >= (9, 0)


def launcher(dout, q, k, v, out, L, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
             dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None, limit=None, config=None,
             dtype=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, red_v2=None):
    """Check and allocate once; returns (launch, dq, dk, dv, kind), results as device uint16 bits.
    softcap > 0 and alibi_slopes launch their variants (``common.resolve_features``); red_v2:
    dQ's atomics two floats at a time, on a GPU of compute capability 9.0 or newer (a
    ValueError below it), for even head dims (odd ones keep one float an atomic); None (the
    default): where the GPU has them (``vector_red``), one float an atomic on the simulator."""
    B, Nq, Nk, H_q, H_kv, d = check_qkv16(q, k, v)
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    if tuple(L.shape) != (B, H_q, Nq):
        raise ValueError(f"L must have shape {(B, H_q, Nq)}, got {tuple(L.shape)}")
    kind = resolve_kind(q, dtype)
    for name, x in (("dout", dout), ("out", out)):
        if resolve_kind(x, dtype) != kind:
            raise TypeError(f"{name} must have q's dtype")
    scale, windowed, lo, hi, steps = common.resolve_band(
        Nq, Nk, d, causal=causal, alignment=alignment, softmax_scale=softmax_scale,
        window_size=window_size, limit=limit)
    cap, slopes = common.resolve_features(softcap, alibi_slopes, B, H_q, alignment)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    config = resolve_config(d, Br, Bc, num_warps, config,
                            variant=dropout_p > 0.0 or cap > 0.0 or alibi_slopes is not None)
    check_for_this_gpu(config)
    if red_v2 is None:
        red_v2 = vector_red()
    elif red_v2 and not numba_config.ENABLE_CUDASIM and not vector_red():
        cc = tuple(cuda.get_current_device().compute_capability)
        raise ValueError(f"red_v2=True needs a GPU of compute capability >= 9.0 (vector red), "
                         f"this one is {cc[0]}.{cc[1]}")
    kernels = build(config, kind, dropout=dropout_p > 0.0, softcap=cap > 0.0,
                    alibi=alibi_slopes is not None, red_v2=bool(red_v2) and d % 2 == 0)

    arrays = common.Arrays(q, k, v, dout, out)
    q_d, k_d, v_d, dout_d = (padded_bits(x, config.d_pad, arrays) for x in (q, k, v, dout))
    out_d = arrays.to_device(bits_of(out))
    L_d = arrays.to_device(np.ascontiguousarray(L, np.float32) if isinstance(L, np.ndarray) else L)
    D_rows = cuda.device_array((B, H_q, Nq), dtype=np.float32)
    dq_acc = cuda.device_array((B, Nq, H_q, d), dtype=np.float32)
    # what dkdv reads and adds into: flat views, no copies
    dq = cuda.device_array((B, Nq, H_q, d), dtype=np.uint16)
    q_flat, k_flat, v_flat, dout_flat, dq_acc_flat, dq_flat = flat_views(q_d, k_d, v_d, dout_d, dq_acc, dq)
    dk = cuda.device_array((B, Nk, H_kv, d), dtype=np.uint16)
    dv = cuda.device_array((B, Nk, H_kv, d), dtype=np.uint16)
    Tc = geometry.num_tiles(Nk, config.Bc)
    pre_grid = (geometry.num_tiles(Nq, PRE_ROWS_PER_BLOCK), B * H_q)
    n_dq = dq.size
    nbytes = dynamic_smem_bytes(config)
    launch_dkdv = kernels.dkdv[(Tc, B * H_kv), config.threads, 0, nbytes]
    args = (q_flat, k_flat, v_flat, dout_flat, L_d, D_rows, dq_acc_flat, dk, dv,
            np.float32(scale * LOG2_E), np.float32(scale), windowed, lo, hi, dropout_p, seed, steps,
            np.float32(cap), slopes)
    smem_limit.raise_dynamic_limit(kernels.dkdv, args, nbytes)   # above 48 KB the driver must allow it

    def launch():
        # D_i, and dQ = 0 (accumulated by atomics)
        kernels.preprocess[pre_grid, PRE_THREADS](dout_d, out_d, D_rows, dq_acc_flat)
        launch_dkdv(*args)
        kernels.finish_dq[geometry.num_tiles(n_dq, 256), 256](dq_acc_flat, np.float32(scale), dq_flat)

    return launch, dq, dk, dv, kind


fast_takes = half_io.fast_takes   # what fast_backward serves: attention.fast_kernels asks the module
_fast = {}    # (shapes, dtype, device, options) -> (the three Launches, the constants, slopes placeholder)


def fast_backward(dout, q, k, v, out, L, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                  dropout_p=0.0, seed=0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """(dq, dk, dv) as new torch CUDA tensors in q's dtype: ``fa2_tc_backward`` without numba's
    per-call work.

    dout, q, k, v, out: torch CUDA tensors, float16 or bfloat16, L float32, C-contiguous, on
    numba's current GPU, shapes checked, head dim as ``fast_takes`` asks (``attention.backward``
    checks all that first). The config and the three prepared launches (``launch.prepared``) are
    made once per shape, dtype and options; a call allocates D_i, dQ's accumulator and the
    gradients with torch and launches the kernels with the arguments ``launcher`` gives them.
    """
    B, Nq, H_q, d = q.shape
    Nk, H_kv = k.shape[1], k.shape[2]
    kind, key = fast_shape_class(q, k, causal=causal, alignment=alignment, softmax_scale=softmax_scale,
                                 dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                                 alibi_slopes=alibi_slopes)
    cached = _fast.get(key)
    if cached is None:
        scale, windowed, lo, hi, steps, cap = fast_band(q, k, causal=causal, alignment=alignment,
                                                        softmax_scale=softmax_scale,
                                                        window_size=window_size, softcap=softcap)
        config = resolve_config(d, variant=dropout_p > 0.0 or cap > 0.0 or alibi_slopes is not None)
        check_for_this_gpu(config)
        kernels = build(config, kind, dropout=dropout_p > 0.0, softcap=cap > 0.0,
                        alibi=alibi_slopes is not None, red_v2=vector_red() and d % 2 == 0)
        device = q.device.index
        runs = (prepared(kernels.preprocess, preprocess_argtypes(),
                         (geometry.num_tiles(Nq, PRE_ROWS_PER_BLOCK), B * H_q), PRE_THREADS, device=device),
                prepared(kernels.dkdv, dkdv_argtypes(), (geometry.num_tiles(Nk, config.Bc), B * H_kv),
                         config.threads, dynamic_smem_bytes(config), device=device),
                prepared(kernels.finish_dq, finish_dq_argtypes(), geometry.num_tiles(q.numel(), 256), 256,
                         device=device))
        constants = ((np.float32(scale * LOG2_E), np.float32(scale), windowed, lo, hi),
                     (steps, np.float32(cap)), np.float32(scale))
        cached = _fast[key] = (runs, constants, f32_like(q, (1, 1)))     # slopes placeholder, never read
    (rowsum, dkdv, finish), (before, after, dq_scale), placeholder = cached
    slopes = fast_slopes(q, placeholder, softcap=softcap, alibi_slopes=alibi_slopes, alignment=alignment)
    D_rows = f32_like(q, (B, H_q, Nq))
    dq_acc = f32_like(q, (B, Nq, H_q, d))
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    rowsum(dout, out, D_rows, dq_acc)                  # D_i, and dQ = 0
    dkdv(q, k, v, dout, L, D_rows, dq_acc, dk, dv, *before, dropout_p, seed, *after, slopes)
    finish(dq_acc, dq_scale, dq)
    return dq, dk, dv


def fa2_tc_backward(dout, q, k, v, out, L, softmax_scale=None, causal=False, alignment=BOTTOM_RIGHT,
                    dropout_p=0.0, seed=0, limit=None, *, Br=None, Bc=None, num_warps=None,
                    config=None, dtype=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    red_v2=None):
    """FlashAttention-2 backward on tensor cores. Returns (dq, dk, dv) shaped like q, k, v, in
    the input dtype (float16 or bfloat16). dout, out (B, Nq, Hq, d) in that dtype and L (B, Hq, Nq)
    float32 come from the forward, run with the same causal, alignment, softmax_scale, dropout_p,
    seed, window_size, softcap and alibi_slopes. NumPy in, NumPy out; device arrays (uint16 bits, with dtype=) in, device arrays out.
    """
    launch, dq, dk, dv, kind = launcher(dout, q, k, v, out, L, causal=causal, alignment=alignment,
                                        softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed,
                                        Br=Br, Bc=Bc, num_warps=num_warps, limit=limit,
                                        config=config, dtype=dtype, window_size=window_size,
                                        softcap=softcap, alibi_slopes=alibi_slopes, red_v2=red_v2)
    launch()
    return as_dtype(dq, kind, q), as_dtype(dk, kind, q), as_dtype(dv, kind, q)


# ---------------------------------------------------------------------------
# The registry's entry point (flashnumba.registry)
# ---------------------------------------------------------------------------

def backward(dout, q, k, v, out, L, deterministic=False, **options):
    """(dq, dk, dv) in the inputs' 16-bit dtype. Not deterministic (dQ by atomics): the registry
    sends deterministic=True to the version named by its ``deterministic_backward``."""
    if deterministic:
        raise ValueError("fa2_tc_backward adds dQ with atomics; deterministic=True runs "
                         "fa2_backward (registry: deterministic_backward)")
    return fa2_tc_backward(dout, q, k, v, out, L, **options)
