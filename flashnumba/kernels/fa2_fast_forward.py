"""FlashAttention-2 forward, version 2: register tiles, for speed (the readable one is fa2_forward).

Same algorithm, same contract as ``fa2_forward`` (Dao 2023, Algorithm 1; one
thread block per Q tile i and head; grid (Tr, B * Hq)), but the work inside a
tile is laid out the way fast matrix-product kernels lay it out:

    version 1  fa2_forward.py       one warp per group of rows, one lane per score
               column; every multiply-add loads one operand from shared memory.
               Simple; shared-memory bound.
    version 2  this file            each thread owns a 4 x TN block of S_ij and a
               4 x TD block of O_i in registers, and reads its operands as
               16-byte vectors from k-major (transposed) tiles, so one shared
               load feeds 4-8 multiply-adds. fp32 FMA (no tensor cores).

Names here -> the paper's (Dao 2023, Algorithm 1; "l." = its line numbers):

    Qt, Kt, Vs     Q_i (l. 4), K_j, V_j (l. 7) in shared memory; Qt, Kt transposed,
                   and Kt reused as Pt = P~_ij^T once S_ij is in registers
    S              S_ij = Q_i K_j^T (l. 8), then P~_ij (l. 9), in log2 units
    m_tilde        rowmax(S_ij);   m -> m_i^(j-1),   m_new -> m_i^(j)   (l. 9)
    l_tilde        rowsum(P~_ij);  l -> l_i^(j) over this thread's columns (l. 9);
                   the CG partial sums are added once, at the end
    O              O_i^(j), unnormalised (l. 10); O_i / l_i is written at the end (l. 12, 14)
    L              L_i = m_i + log l_i (l. 13, 15)
    r, c, x        a row of Q_i, a key of K_j, a head dim;  d_pad: the compiled head dim (d <= d_pad)

The algorithm, with the papers' names (scores in log2 units, see below):

    Q_i -> shared (transposed, pre-multiplied by scale * log2(e)), once
    m_i = -inf, l_i = 0, O_i = 0                               registers
    for j < Tc (causal: j < kv_tile_end(i), tiles above the diagonal skipped):
        K_j -> shared (transposed), V_j -> shared
        Z_ij = keep / (1 - p)              dropout kernel only: the thread's keep bits, from Philox
        S_ij = Q_i K_j^T                   register tile, 4 rows x TN columns per thread
        S_ij = -inf where key c >= Nk or (causal) c > r + offset   (edge/diagonal tiles only)
        m_new = max(m_i, rowmax(S_ij))     over the thread's columns, then shfl_xor
                                           across the CG threads that share the row
        P_ij  = exp2(S_ij - m_new)
        l_i   = exp2(m_i - m_new) l_i + rowsum(P_ij)   undropped P_ij; per thread's columns,
                                           the CG partial sums are added once, at the end
        O_i   = exp2(m_i - m_new) O_i + (P_ij o Z_ij) V_j   P_ij o Z_ij goes through shared
                                           memory (P_ij itself without dropout)
        m_i   = m_new
    O_i = O_i / l_i,   L_i = (m_i + log2 l_i) ln 2   natural log, as fa2_forward

Causal alignment: key c is visible to query r when c <= r + offset, with offset =
Nk - Nq (bottom-right, flash-attn's, the default) or 0 (top-left, PyTorch's
``is_causal``), computed by ``common.resolve_offset`` in the wrapper and passed
as an int64; kv_tile_end(i) skips the tiles past that diagonal for either.

Sliding window, softcap, ALiBi (flash-attn's window_size, softcap, alibi_slopes):
the window is a run-time band, key c visible to query r when r + lo <= c <= r +
hi (``geometry.window_bounds``; causal is the band with hi = offset and lo = -Nq),
so Q tile i visits tiles kv_tile_start(i) <= j < kv_tile_end(i) and skips the
rest on both sides. Softcap and ALiBi are compile-time variants,
``build(config, softcap=True, alibi=True)``: the plain kernel has neither. In log2
units, S_ij = c2 tanh(S_ij / c2) with c2 = softcap log2(e), then S_ij -= slope
log2(e) |r + Nk - Nq - c|, both before masking.

Dropout is a compile-time variant, ``build(config, dropout=True)``, launched
when p > 0: the p = 0 kernel contains no Philox code at all. Element (r, c) of
query head h (also under GQA), batch b is kept when ``philox.keep(seed, b, h,
r, c, p)``, the bit the reference's mask (``philox.keep_mask``) is made of:
word c % 4 of Philox4x32-10 of counter (c // 4, r, h, b), key (seed lo, seed
hi), compared as x 2^-32 >= p in float64. A thread's columns come in 4-aligned
groups c = 4 (tx + CG g) + t, so one Philox call serves a (row, group): TM x NG
calls per thread and tile, made right after the tile barrier, before S_ij
exists (the registers are free then), into one integer of keep bits. m_i, l_i
and L_i are those of the undropped softmax; only the P_ij that multiplies V_j
is dropped. What it costs (read off the SASS, sm_90, d_pad=64 default; not measured
on a GPU): ~1000 more instructions per thread and K/V tile (4 rows x 2 Philox
calls of ~100 instructions, 32 float64 keep tests, the selects) on top of ~5500
(4096 of them FFMA), so I expect the dropout kernel 15-20% slower than the
plain one. Registers and spills of both: PERF-NOTES.md.

Thread layout (T threads; TM = 4 rows per thread; CG column groups)::

    tx = tid % CG, ty = tid // CG
    rows of S_ij and O_i:   r = 4 ty + a,            a < 4
    columns of S_ij:        c = 4 (tx + CG g) + t,   g < TN / 4, t < 4
    columns of O_i:         n = 4 (tx + CG g) + t,   g < TD / 4, t < 4

The CG threads of a row are CG consecutive lanes of one warp, so the row max
and row sum are xor shuffles with offsets 1, 2, ..., CG / 2.

Shared memory (static, each array declared on its own line, where the tiles fit in 48 KB;
for d_pad = 256, one dynamic array with the three tiles at ``smem_offsets``, indexed by
hand through ``tile_load`` / ``tile_store``, launched with smem_bytes(config) and a raised
limit: ``smem_limit``):

    Qt[x, r]   Q_i transposed (d_pad x Br): for each x a thread reads its 4 rows as one
               16-byte vector; the 32 / CG row groups of a warp read 64 bytes: one
               shared-memory wavefront, no bank conflict.
    Kt[x, c]   K_j transposed (d_pad x Bc): a thread reads 4 consecutive columns per
               vector; the CG threads of a row group read 4 CG consecutive floats.
               After S_ij, the same array holds P_ij transposed, Pt[c, r], so that
               P_ij V_j reads P like S_ij reads Q. (Br <= Bc: Pt, Bc x Br, fits in Kt.)
    Vs[c, x]   V_j row-major (Bc x d_pad): 4 consecutive output dims per vector.

    Transposing on the way in costs a 4-way bank conflict on the store (8 rows x
    4 dims per warp instruction, so the global loads stay 16-byte runs); it
    happens once per tile, against d_pad * Bc * Br multiply-adds.

Scores in log2 units: Q_i is multiplied by scale * log2(e) as it is loaded, so
S_ij is already in log2 units and P_ij = exp2(S_ij - m) (one ``ex2.approx``
instruction) instead of exp(scale * S_ij - m).

Compiler habits this file relies on (checked in the PTX, see PERF-NOTES.md):

- register arrays (``cuda.local.array``) are indexed only by loop variables
  of loops with compile-time bounds, which LLVM unrolls: they stay in registers;
- ``tid = threadIdx.x & (T - 1)`` is the thread index unchanged, but tells
  the compiler it is non-negative, so Numba's negative-index wraparound code
  folds away and consecutive shared loads merge into ``ld.shared.v4.f32``;
- the shared arrays are declared 16-byte aligned, for those vector loads.

Head dims: compiled for d_pad in FAST_HEAD_DIMS (32, 64, 128, 256); d <= d_pad is
zero-padded in shared memory (Q_i) and only n < d is written out. d = 96
therefore runs the d_pad = 128 kernel and wastes a quarter of its multiply-adds.
d_pad = 256 cannot fit 48 KB: O_i's 4 x TD register tile needs CG = 16 threads per row
(TD = 16), so Bc >= 4 CG = 64 and K_j alone is 64 KB. It runs Br = 32, Bc = 64 with 4
warps in 160 KB of dynamic shared memory (Br < Bc: P_ij^T, Bc x Br, still fits where
K_j^T was), one block per SM; an A100 gives a block 163 KB, an H100 227 KB.

Barriers per K/V tile: three ``syncthreads`` (tile consumed / tile loaded /
K_j consumed before P_ij overwrites it) and one ``syncwarp`` (a warp reads back
only the rows of P_ij its own lanes wrote).

Known limits: fp32 FMA only (no TF32 / tensor cores: numba exposes no mma);
48 KB of static shared memory caps the tiles up to d_pad = 128 (d_pad=128 runs
32 x 32 tiles with 2 warps); d_pad = 256, over 48 KB, runs one block per SM; no
software pipelining of the K_j, V_j loads (several blocks per SM hide that
latency instead, except at d_pad = 256).
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, int64, types

from flashnumba import geometry
from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.kernels import common, smem_limit
from flashnumba.kernels.common import FAST_HEAD_DIMS, ConfigError, TileConfig, fast_bucket, require
from flashnumba.kernels.fast_math import LN_2, LOG2_E
from flashnumba.kernels.geometry import kv_tile_end, kv_tile_start, num_tiles
from flashnumba.kernels.half_io import fast_slopes
from flashnumba.kernels.hardware import (
    FLOAT_BYTES,
    FULL_MASK,
    REGISTERS_PER_SM,
    SM_SHARED_BYTES,
    STATIC_SMEM_LIMIT,
    WARP_SIZE,
)
from flashnumba.kernels.launch import prepared
from flashnumba.kernels.philox import (  # kept: philox.keep's test on a drawn word
    kept,
    philox4x32,
    philox_key,
)

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it
FEATURES = ("window_size", "softcap", "alibi_slopes")   # flash-attn's options beyond plain attention

TM = 4                                   # rows of S_ij and O_i per thread (one 16-byte vector)
MIN_REGISTERS = 160                      # per thread: S_ij, O_i, operands, and one tile of loads in flight
MAX_REGISTER_FLOATS = 112                # S_ij + O_i + operands per thread; more would spill

# Default tiles per head-dim bucket: (Br, Bc, num_warps).
_DEFAULTS = {
    32: (64, 64, 4),
    64: (64, 64, 4),
    128: (32, 32, 2),
    256: (32, 64, 4),    # dynamic shared memory (160 KB: fits an A100's 163 KB); see smem_offsets
}
# Other configurations that compile cleanly, for tuning on a GPU (bench --tune).
_ALTERNATIVES = {
    64: [(32, 32, 2)],
    128: [],
    256: [],
}


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def layout(config):
    """Thread layout of a config: dict with CG, RG (row groups), TN, TD, NG, ND (16-byte groups)."""
    T = config.threads
    CG = T * TM // config.Br              # threads that share a row
    return {"T": T, "CG": CG, "RG": T // max(CG, 1), "TN": config.Bc // max(CG, 1),
            "TD": config.d_pad // max(CG, 1), "NG": config.Bc // max(4 * CG, 1),
            "ND": config.d_pad // max(4 * CG, 1)}


def default_config(d):
    """The shipped tile configuration for head dim d (served by its bucket d_pad)."""
    d_pad = fast_bucket(d)
    Br, Bc, num_warps = _DEFAULTS[d_pad]
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps)


def shipped_configs():
    """Every bucket's default plus the alternatives bench --tune times."""
    configs = [default_config(d_pad) for d_pad in FAST_HEAD_DIMS]
    for d_pad, alternatives in _ALTERNATIVES.items():
        configs += [TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=w) for Br, Bc, w in alternatives]
    return configs


def smem_offsets(config):
    """Where Qt (d_pad x Br), Kt, reused as Pt (max(d_pad, Bc) x Bc), and Vs (Bc x d_pad) start,
    in floats, and their total: in one dynamic shared array when they need more than 48 KB
    (``is_dynamic``), else three static arrays of these sizes. Every offset is a multiple of
    4 floats, so 16-byte vectors stay aligned."""
    Br, Bc, d_pad = config.Br, config.Bc, config.d_pad
    sizes = (("Qt", d_pad * Br), ("Kt", max(d_pad, Bc) * Bc), ("Vs", Bc * d_pad))
    return common.tile_offsets(sizes)


def smem_bytes(config):
    """Qt (d_pad x Br) + Kt, reused as Pt (max(d_pad, Bc) x Bc) + Vs (Bc x d_pad), float32."""
    return smem_offsets(config)["floats"] * FLOAT_BYTES


def is_dynamic(config):
    """True when the tiles need more than the 48 KB of static shared memory a block may have:
    then they live in one dynamic shared array and the launch raises the limit (smem_limit).
    Only d_pad = 256 needs it: its 4-wide column groups of CG = 16 threads make Bc >= 64, and
    K_j alone is then 64 KB."""
    return smem_bytes(config) > STATIC_SMEM_LIMIT


def static_smem_bytes(config):
    """Static shared memory per block, as ptxas counts it: smem_bytes, or 0 when dynamic."""
    return 0 if is_dynamic(config) else smem_bytes(config)


# Blocks per SM for the dropout kernel where the plain kernel's launch bound leaves too few
# registers for the Philox state: (Br, Bc, d_pad, num_warps) -> blocks per SM. At the plain
# kernel's 3 blocks (168 registers) the d_pad=64 dropout kernel spills on sm_90 (ptxas,
# `flashnumba resources`).
_DROPOUT_BLOCKS_PER_SM = {
    (64, 64, 64, 4): 2,
}


def min_blocks_per_sm(config, dropout=False):
    """Blocks per SM to ask the compiler for: as many as shared memory allows (1 KB per block is
    reserved by the hardware), but not so many that a thread gets fewer than 128 registers; the
    dropout kernel of a config in _DROPOUT_BLOCKS_PER_SM asks for fewer."""
    key = (config.Br, config.Bc, config.d_pad, config.num_warps)
    if dropout and key in _DROPOUT_BLOCKS_PER_SM:
        return _DROPOUT_BLOCKS_PER_SM[key]
    by_smem = SM_SHARED_BYTES // (smem_bytes(config) + 1024)
    by_registers = REGISTERS_PER_SM // (config.threads * MIN_REGISTERS)
    return max(1, min(by_smem, by_registers))


def check_config(config):
    """Raise ConfigError unless the configuration can compile and launch."""
    require(isinstance(config, TileConfig), f"expected a TileConfig, got {config!r}")
    Br, Bc, d_pad, num_warps = config.Br, config.Bc, config.d_pad, config.num_warps
    for name, value in (("Br", Br), ("Bc", Bc), ("num_warps", num_warps)):
        require(isinstance(value, (int, np.integer)) and value >= 1,
                f"{name} must be a positive integer, got {value!r}")
    require(d_pad in FAST_HEAD_DIMS, f"d_pad={d_pad} is not a fast head-dim bucket {FAST_HEAD_DIMS}")
    require(Br <= Bc, f"Br={Br} must be <= Bc={Bc}: P_ij^T (Bc x Br) is stored in K_j^T's shared array "
                      f"(max(d_pad, Bc) x Bc)")
    T = config.threads
    require(T <= 1024 and T & (T - 1) == 0, f"num_warps={num_warps}: threads must be a power of 2, <= 1024")
    require((T * TM) % Br == 0, f"Br={Br} must divide threads * {TM} = {T * TM}")
    lay = layout(config)
    CG = lay["CG"]
    require(1 <= CG <= WARP_SIZE and CG & (CG - 1) == 0,
            f"Br={Br}, num_warps={num_warps}: {CG} threads per row; must be a power of 2 <= 32 "
            f"(the threads of a row must sit in one warp)")
    require(lay["RG"] * TM == Br, f"Br={Br}: row groups x {TM} must cover Br")
    require(Bc % (4 * CG) == 0, f"Bc={Bc} must be a multiple of 4 * CG = {4 * CG}")
    require(d_pad % (4 * CG) == 0, f"d_pad={d_pad} must be a multiple of 4 * CG = {4 * CG}")
    require(Bc <= d_pad or Bc == Br, f"Bc={Bc}: Pt (Bc x Br) must fit where Kt was")
    smem = smem_bytes(config)
    require(smem <= smem_limit.MAX_BLOCK_BYTES,
            f"Br={Br}, Bc={Bc}, d_pad={d_pad} needs {smem} bytes of shared memory per block "
            f"> {smem_limit.MAX_BLOCK_BYTES} (227 KB, an H100's most); use smaller tiles")
    floats = TM * lay["TN"] + TM * lay["TD"] + TM + max(lay["TN"], lay["TD"])
    require(floats <= MAX_REGISTER_FLOATS,
            f"Br={Br}, Bc={Bc}, d_pad={d_pad}, num_warps={num_warps} holds {floats} floats per thread in "
            f"register arrays (> {MAX_REGISTER_FLOATS}, would spill); use more warps or smaller tiles")


def _smem_alignment():
    """16 bytes (for ld.shared.v4) on a GPU; the simulator accepts no alignment argument."""
    return None if numba_config.ENABLE_CUDASIM else 16


def _jit_options(config, dropout=False):
    """Launch bounds for the real compiler (the simulator takes none): caps registers so that
    as many blocks as shared memory allows can share an SM."""
    if numba_config.ENABLE_CUDASIM:
        return {}
    return {"launch_bounds": (config.threads, min_blocks_per_sm(config, dropout))}


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------

def build(config, dropout=False, softcap=False, alibi=False):
    """The kernel for `config`; ``dropout=True`` is the variant that drops P_ij (a separate
    compile: the default kernel has no Philox code at all), ``softcap``, ``alibi`` the variants
    that cap and bias S_ij. Cached per (config, variant)."""
    return _build(config, bool(dropout), bool(softcap), bool(alibi))


@functools.lru_cache(maxsize=None)
def _build(config, DROPOUT, SOFTCAP=False, ALIBI=False):
    """Compile-time sizes baked in as plain Python ints; returns the @cuda.jit kernel."""
    check_config(config)
    Br, Bc, d_pad = int(config.Br), int(config.Bc), int(config.d_pad)
    lay = layout(config)
    T, CG, TN, TD, NG, ND = lay["T"], lay["CG"], lay["TN"], lay["TD"], lay["NG"], lay["ND"]
    require(not DROPOUT or TM * TN <= 64,
            f"Br={Br}, Bc={Bc}, num_warps={config.num_warps}: the dropout kernel keeps the keep bits "
            f"of a thread's {TM} x {TN} tile of S_ij in one 64-bit integer")
    T_MASK = T - 1
    LOG2_CG = CG.bit_length() - 1
    T_ROWS = T // 4                         # rows of Q_i / K_j loaded per pass (4 threads per row)
    V_ROWS = T // WARP_SIZE                 # rows of V_j loaded per pass (a warp per row)
    INDEX_MASK = 0x7FFFFFFF                 # x & INDEX_MASK == x for the indices here; tells the
                                            # compiler x >= 0 (no negative-index wraparound code)
    Y_LEN = max(TN, TD)
    ALIGN = _smem_alignment()
    DYNAMIC = is_dynamic(config)             # the tiles need more than 48 KB: a dynamic array
    SM = smem_offsets(config)                # tile offsets in the shared array, floats
    QT, KT, VS = SM["Qt"], SM["Kt"], SM["Vs"]
    KP_ROWS = max(d_pad, Bc)                 # Kt uses d_pad rows, Pt uses Bc rows

    # Tile element [row, col] of a shared tile at offset OFF with rows LEN long: the 2-D static
    # array itself (OFF, LEN unused), or, for the dynamic array, sm[OFF + LEN row + col]
    # (indexed by hand: a reshaped view of it costs a stack frame). The static kernels keep
    # 2-D arrays: indexed by hand, the d_pad=128 one spilled on sm_80 (ptxas).
    if DYNAMIC:
        @cuda.jit(device=True, inline="always")
        def tile_load(A, OFF, LEN, row, col):
            return A[OFF + LEN * row + col]

        @cuda.jit(device=True, inline="always")
        def tile_store(A, OFF, LEN, row, col, value):
            A[OFF + LEN * row + col] = value
    else:
        @cuda.jit(device=True, inline="always")
        def tile_load(A, OFF, LEN, row, col):
            return A[row, col]

        @cuda.jit(device=True, inline="always")
        def tile_store(A, OFF, LEN, row, col, value):
            A[row, col] = value

    @cuda.jit(device=True, inline="always")
    def product_step(C, At, AT, A_LEN, Bs, BS, B_LEN, kk, r_t, tx, a_vec, b_vec):
        """C[a, n] += At[kk, r_t + a] * Bs[kk, 4 (tx + CG g) + t]: one rank-1 update of a register tile
        (At, Bs: tiles at offsets AT, BS with rows A_LEN, B_LEN long, read by tile_load).

        S_ij += Q_i[:, kk] K_j[:, kk]^T  (At = Qt, Bs = Kt), or
        O_i  += P_ij[:, kk] V_j[kk, :]   (At = Pt, Bs = Vs).
        One 16-byte load of At, NB = C.shape[1] / 4 of Bs, 4 * 4 NB multiply-adds.
        Inlined into the kernel (Numba IR level), so every index below is a constant.
        """
        NB = C.shape[1] // 4
        for a in range(TM):
            a_vec[a] = tile_load(At, AT, A_LEN, kk, r_t + a)
        for g in range(NB):
            for t in range(4):
                b_vec[4 * g + t] = tile_load(Bs, BS, B_LEN, kk, 4 * (tx + CG * g) + t)
        for a in range(TM):
            for n in range(4 * NB):
                C[a, n] += a_vec[a] * b_vec[n]

    @cuda.jit(**_jit_options(config, DROPOUT))
    def fa2_fast_forward_kernel(q, k, v, out, L, q_scale, windowed, lo, hi, dropout_p, seed, limit,
                                cap2, slopes):
        # --- sizes ---
        # q_scale: float32 softmax scale times log2(e); windowed: bool (causal or a window);
        # lo, hi: int32, key c is visible to query r iff r + lo <= c <= r + hi; dropout_p:
        # float64; seed: uint64 (both unused unless DROPOUT); limit: j steps to run (int64);
        # cap2: float32 softcap log2(e) (SOFTCAP only); slopes: float32 (B, Hq) ALiBi slopes
        # (ALIBI only).
        B, Nq, H_q, d = q.shape
        Nk = k.shape[1]
        H_kv = k.shape[2]
        Tr = num_tiles(Nq, Br)
        Tc = num_tiles(Nk, Bc)

        # --- who am I ---
        tid = cuda.threadIdx.x & T_MASK     # = threadIdx.x; the mask proves tid >= 0 to the compiler
        tx = tid % CG                       # column group
        ty = tid // CG                      # row group: rows 4 ty .. 4 ty + 3
        r_t = TM * ty
        i = Tr - 1 - cuda.blockIdx.x       # last Q tiles first: under causal they have the most work
        bh = cuda.blockIdx.y & 0x7FFFFFFF
        b = bh // H_q
        h = bh % H_q
        h_kv = h // (H_q // H_kv)           # grouped-query attention: this head's K/V head
        row0 = i * Br
        r_ld = tid // 4                     # loading Q_i, K_j: rows r_ld + T_ROWS rr, dims x_ld + 4 s
        x_ld = tid % 4
        v_row = tid // WARP_SIZE            # loading V_j: rows v_row + V_ROWS rr, dims v_dim + 32 u
        v_dim = tid % WARP_SIZE
        if DROPOUT:                         # Philox key and the counter words fixed for this block
            key0, key1 = philox_key(seed)
            h_word = np.uint64(h)           # the query head, also under GQA
            b_word = np.uint64(b)
            Z_kept = float32(1.0 / (1.0 - dropout_p))   # Z_ij of a kept element (0 if dropped)

        # --- shared memory (each array on its own line; above 48 KB all three are the one
        # dynamic array, smem_bytes(config) long, their tiles at smem_offsets) ---
        if DYNAMIC:
            Qt = cuda.shared.array(0, float32, alignment=ALIGN)
            Kt = Qt                                                     # K_j^T, then P_ij^T
            Vs = Qt
        else:
            Qt = cuda.shared.array((d_pad, Br), float32, alignment=ALIGN)
            Kt = cuda.shared.array((KP_ROWS, Bc), float32, alignment=ALIGN)   # K_j^T, then P_ij^T
            Vs = cuda.shared.array((Bc, d_pad), float32, alignment=ALIGN)

        # --- registers ---
        S = cuda.local.array((TM, TN), float32)     # S_ij, then P_ij: rows r_t + a, columns of tx
        O = cuda.local.array((TM, TD), float32)     # O_i, unnormalised
        m = cuda.local.array(TM, float32)           # m_i (log2 units)
        l = cuda.local.array(TM, float32)           # l_i, this thread's columns only
        a_vec = cuda.local.array(TM, float32)           # a column of Qt or of Pt
        b_vec = cuda.local.array(Y_LEN, float32)        # a row of Kt or of Vs
        for a in range(TM):
            m[a] = -math.inf
            l[a] = 0.0
            for n in range(TD):
                O[a, n] = 0.0

        # Q_i -> Qt, scaled into log2 units. Lanes: 4 consecutive dims x 8 rows, so a warp
        # reads 16-byte runs of 8 rows (the transposed store has a 4-way bank conflict). Rows
        # past Nq load a clamped valid row (never written out); dims past d must be zero, so
        # that K_j's padding dims add nothing to S_ij.
        for rr in range(Br // T_ROWS):
            r = r_ld + T_ROWS * rr
            row = min(row0 + r, Nq - 1) & INDEX_MASK
            for s4 in range(d_pad // 4):
                x = x_ld + 4 * s4
                value = q[b, row, h, min(x, d - 1)] * q_scale
                tile_store(Qt, QT, Br, x, r, value if x < d else float32(0.0))

        n_tiles = Tc
        j = 0
        if windowed:                        # tiles outside the band are skipped, on both sides
            n_tiles = int64(kv_tile_end(i, Br, Bc, Nq, Nk, hi))    # int64: lo, hi are int32 only
            j = int64(min(kv_tile_start(i, Br, Bc, Nk, lo), n_tiles))   # to save registers
        n_tiles = min(n_tiles, j + limit)
        if ALIBI:
            slope = slopes[b, h] * float32(LOG2_E)   # ALiBi slope in log2 units
            alibi_offset = Nk - Nq                 # bias -slope |r + Nk - Nq - c|

        while j < n_tiles:
            col0 = j * Bc
            cuda.syncthreads()  # every warp done reading the last tile's Pt (in Kt) and Vs

            # K_j -> Kt (transposed, lanes as for Q_i); V_j -> Vs (lanes along the 32 consecutive
            # dims of one row: coalesced, no bank conflict). Unconditional loads from clamped,
            # valid addresses, so the compiler issues them all before any store. Nothing needs
            # zeroing: keys past Nk are masked to -inf in S_ij (so P_ij = 0 times a finite V_j
            # row), K_j dims past d meet zeros in Qt, and V_j dims past d land in O_i columns
            # that are never written.
            for rr in range(Bc // T_ROWS):
                c = r_ld + T_ROWS * rr
                col = min(col0 + c, Nk - 1) & INDEX_MASK
                for s4 in range(d_pad // 4):
                    x = x_ld + 4 * s4
                    tile_store(Kt, KT, Bc, x, c, k[b, col, h_kv, min(x, d - 1)])
            for rr in range(Bc // V_ROWS):
                c = v_row + V_ROWS * rr
                col = min(col0 + c, Nk - 1) & INDEX_MASK
                for u in range(d_pad // WARP_SIZE):
                    x = v_dim + WARP_SIZE * u
                    tile_store(Vs, VS, d_pad, c, x, v[b, col, h_kv, min(x, d - 1)])
            cuda.syncthreads()  # K_j, V_j (and Q_i, the first time) written before any warp reads them

            if DROPOUT:
                # keep bits of this thread's TM x TN entries of Z_ij (bit TN a + n), made before
                # S_ij exists (fewer live registers) and applied when P_ij is stored. Columns
                # 4 (tx + CG g) + t, t < 4, are one 4-aligned group: one Philox4x32-10 call
                # makes their 4 words
                keep_bits = 0
                for a in range(TM):
                    row = row0 + r_t + a
                    for g in range(NG):
                        words = philox4x32(np.uint64(col0 // 4 + tx + CG * g), np.uint64(row),
                                           h_word, b_word, key0, key1)
                        for t in range(4):
                            if kept(words[t], dropout_p):
                                keep_bits |= 1 << (TN * a + 4 * g + t)

            # S_ij = Q_i K_j^T: per k, one vector of Q (4 rows) and NG vectors of K (TN columns)
            for a in range(TM):
                for n in range(TN):
                    S[a, n] = 0.0
            k0 = 0
            while k0 < d_pad:                        # four k steps per trip, unrolled by hand
                product_step(S, Qt, QT, Br, Kt, KT, Bc, k0, r_t, tx, a_vec, b_vec)
                product_step(S, Qt, QT, Br, Kt, KT, Bc, k0 + 1, r_t, tx, a_vec, b_vec)
                product_step(S, Qt, QT, Br, Kt, KT, Bc, k0 + 2, r_t, tx, a_vec, b_vec)
                product_step(S, Qt, QT, Br, Kt, KT, Bc, k0 + 3, r_t, tx, a_vec, b_vec)
                k0 += 4

            if SOFTCAP or ALIBI:
                for a in range(TM):
                    row = row0 + r_t + a
                    for g in range(NG):
                        for t in range(4):
                            score = S[a, 4 * g + t]
                            if SOFTCAP:          # S_ij = c2 tanh(S_ij / c2)
                                score = cap2 * math.tanh(score / cap2)
                            if ALIBI:            # S_ij -= slope |r + Nk - Nq - c|
                                col = col0 + 4 * (tx + CG * g) + t
                                score -= slope * float32(abs(row + alibi_offset - col))
                            S[a, 4 * g + t] = score

            # mask keys past Nk and, under a window, outside the band; only edge and band-edge tiles
            if col0 + Bc > Nk or (windowed and (col0 + Bc - 1 > row0 + hi or col0 < row0 + Br - 1 + lo)):
                for a in range(TM):
                    row = row0 + r_t + a
                    for g in range(NG):
                        for t in range(4):
                            col = col0 + 4 * (tx + CG * g) + t
                            if col >= Nk or (windowed and (col > row + hi or col < row + lo)):
                                S[a, 4 * g + t] = -math.inf

            # online softmax, row by row
            for a in range(TM):
                m_tilde = S[a, 0]
                for n in range(1, TN):
                    m_tilde = max(m_tilde, S[a, n])
                for s in range(LOG2_CG):         # max over the CG threads of the row
                    m_tilde = max(m_tilde, cuda.shfl_xor_sync(FULL_MASK, m_tilde, 1 << s))
                m_new = max(m[a], m_tilde)       # m_new = max(m_i, rowmax(S_ij))
                m_safe = m_new
                if m_new == -math.inf:
                    m_safe = float32(0.0)        # no visible key yet: P = 0, no inf - inf
                alpha = math.exp2(m[a] - m_safe)     # rescales the old l_i and O_i
                l_tilde = float32(0.0)
                for n in range(TN):
                    p = math.exp2(S[a, n] - m_safe)  # P_ij = exp2(S_ij - m_new)
                    S[a, n] = p
                    l_tilde += p
                l[a] = alpha * l[a] + l_tilde    # l_i of the undropped P_ij
                m[a] = m_new
                if DROPOUT:
                    for n in range(TN):          # P_ij o Z_ij, for the P V product only
                        kept_here = keep_bits & (1 << (TN * a + n))
                        S[a, n] = S[a, n] * Z_kept if kept_here else float32(0.0)
                for n in range(TD):
                    O[a, n] *= alpha
            cuda.syncthreads()  # every warp done reading K_j before P_ij overwrites it

            # P_ij -> Pt[c, r] (in Kt); a warp writes and later reads only its own rows r
            for g in range(NG):
                for t in range(4):
                    c = 4 * (tx + CG * g) + t
                    for a in range(TM):
                        tile_store(Kt, KT, Bc, c, r_t + a, S[a, 4 * g + t])    # Pt[c, r_t + a]
            cuda.syncwarp()  # this warp's rows of P_ij written by all its lanes before any lane reads them

            # O_i += P_ij V_j: per key c, one vector of P (4 rows) and ND vectors of V (TD dims)
            c0 = 0
            while c0 < Bc:                       # four keys per trip, unrolled by hand
                product_step(O, Kt, KT, Bc, Vs, VS, d_pad, c0, r_t, tx, a_vec, b_vec)
                product_step(O, Kt, KT, Bc, Vs, VS, d_pad, c0 + 1, r_t, tx, a_vec, b_vec)
                product_step(O, Kt, KT, Bc, Vs, VS, d_pad, c0 + 2, r_t, tx, a_vec, b_vec)
                product_step(O, Kt, KT, Bc, Vs, VS, d_pad, c0 + 3, r_t, tx, a_vec, b_vec)
                c0 += 4
            j += 1

        # O_i / l_i and L_i = (m_i + log2 l_i) ln 2; a row that saw no key: O = 0, L = -inf
        for a in range(TM):
            l_row = l[a]
            for s in range(LOG2_CG):             # l_i = sum of the CG threads' partial sums
                l_row += cuda.shfl_xor_sync(FULL_MASK, l_row, 1 << s)
            row = row0 + r_t + a
            if row < Nq:
                inv_l = float32(0.0)
                if l_row != 0.0:                 # 0: no visible key (a NaN l stays NaN)
                    inv_l = float32(1.0) / l_row
                for g in range(ND):
                    for t in range(4):
                        n = 4 * (tx + CG * g) + t
                        if n < d:
                            out[b, row, h, n] = O[a, 4 * g + t] * inv_l
                if tx == 0:
                    if l_row != 0.0:
                        L[b, h, row] = (m[a] + math.log2(l_row)) * LN_2
                    else:
                        L[b, h, row] = -math.inf

    return fa2_fast_forward_kernel


def argtypes():
    """The kernel's argument types as the wrappers launch it (``launcher`` and ``fast_forward``)."""
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    a2 = types.Array(types.float32, 2, "C")
    return (a4, a4, a4, a4, a3, types.float32, types.boolean, types.int32, types.int32,
            types.float64, types.uint64, types.int64, types.float32, a2)


def compile_targets(config):
    """[(label, dispatcher, argtypes)] for cuda.compile_ptx, argument types as the wrapper launches them."""
    return [(NAME, build(config), argtypes()),
            (f"{NAME}_dropout", build(config, dropout=True), argtypes()),
            (f"{NAME}_softcap_alibi", build(config, softcap=True, alibi=True), argtypes())]


# ---------------------------------------------------------------------------
# Wrapper: check, allocate, launch
# ---------------------------------------------------------------------------

def resolve_config(d, Br=None, Bc=None, num_warps=None, config=None):
    """The default config for d, or `config`, with any of Br, Bc, num_warps overridden; checked."""
    base = config if config is not None else default_config(d)
    if base.d_pad != fast_bucket(d) and base.d_pad < d:
        raise ConfigError(f"config d_pad={base.d_pad} cannot serve head dim d={d}")
    config = TileConfig(Br=base.Br if Br is None else Br, Bc=base.Bc if Bc is None else Bc,
                        d_pad=base.d_pad, num_warps=base.num_warps if num_warps is None else num_warps)
    check_config(config)
    return config


@dataclass(frozen=True)
class Setup:
    """What a shape and the options fix for one launch: the kernel, its grid, block and dynamic
    shared memory, and its scalar arguments (all but dropout's p and seed, which vary per call)."""
    kernel: object
    grid: tuple
    threads: int
    nbytes: int
    before: tuple             # q_scale, windowed, lo, hi: between L and p
    after: tuple              # steps, cap2: between seed and the slopes


def setup(B, Nq, Nk, H_q, d, *, causal, alignment, softmax_scale, window_size, softcap, alibi,
          dropout, limit, Br=None, Bc=None, num_warps=None, config=None):
    """The Setup for q (B, Nq, H_q, d), k, v (B, Nk, ., d) and these options, checked."""
    scale, windowed, lo, hi, steps = common.resolve_band(
        Nq, Nk, d, causal=causal, alignment=alignment, softmax_scale=softmax_scale,
        window_size=window_size, limit=limit)
    config = resolve_config(d, Br, Bc, num_warps, config)
    kernel = build(config, dropout=dropout, softcap=softcap > 0.0, alibi=alibi)
    Tr = geometry.num_tiles(Nq, config.Br)
    nbytes = smem_bytes(config) if is_dynamic(config) else 0
    q_scale = np.float32(scale * LOG2_E)
    cap2 = np.float32(softcap * LOG2_E)
    return Setup(kernel, (Tr, B * H_q), config.threads, nbytes, (q_scale, windowed, lo, hi),
                 (steps, cap2))


def launcher(q, k, v, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None, dropout_p=0.0,
             seed=0, Br=None, Bc=None, num_warps=None, limit=None, config=None, window_size=(-1, -1),
             softcap=0.0, alibi_slopes=None):
    """Check and allocate once; returns (launch, out, L) with device arrays out, L.

    ``launch()`` runs the kernel again into the same out and L: what the
    benchmark times (no allocation inside the timed region). q, k, v must stay alive.
    dropout_p > 0 launches the dropout variant of the kernel; p = 0 the plain one.
    softcap > 0 and alibi_slopes launch their variants (``common.resolve_features``).
    """
    B, Nq, Nk, H_q, H_kv, d = common.check_qkv(q, k, v, bucket=fast_bucket)
    cap, slopes = common.resolve_features(softcap, alibi_slopes, B, H_q, alignment)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    plan = setup(B, Nq, Nk, H_q, d, causal=causal, alignment=alignment, softmax_scale=softmax_scale,
                 window_size=window_size, softcap=cap, alibi=alibi_slopes is not None,
                 dropout=dropout_p > 0.0, limit=limit, Br=Br, Bc=Bc, num_warps=num_warps,
                 config=config)

    arrays = common.Arrays(q, k, v)
    q_d, k_d, v_d = arrays.to_device(q), arrays.to_device(k), arrays.to_device(v)
    out = cuda.device_array((B, Nq, H_q, d), dtype=np.float32)
    L = cuda.device_array((B, H_q, Nq), dtype=np.float32)
    launch_kernel = plan.kernel[plan.grid, plan.threads, 0, plan.nbytes]
    args = (q_d, k_d, v_d, out, L, *plan.before, dropout_p, seed, *plan.after, slopes)
    smem_limit.raise_dynamic_limit(plan.kernel, args, plan.nbytes)   # above 48 KB the driver must allow it

    def launch():
        launch_kernel(*args)

    return launch, out, L


_fast = {}    # (shapes, device, options) -> (Setup, its Launch, the slopes placeholder)


def fast_takes(dtype, d):
    """True where ``fast_forward`` serves a call: float32 inputs (16-bit ones are widened first)."""
    return dtype == "float32"


def fast_forward(q, k, v, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                 dropout_p=0.0, seed=0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """(O, L) as new torch CUDA tensors: ``fa2_fast_forward`` without numba's per-call work.

    q, k, v: torch CUDA tensors, float32, C-contiguous, on numba's current GPU, shapes checked
    (``attention.forward`` checks all that first). The Setup and the prepared launch
    (``launch.prepared``) are made once per shape and options; a call allocates O and L with
    torch and launches the same kernel with the same arguments as ``launcher`` (bitwise the same
    results). dropout_p and seed as ``common.resolve_dropout`` takes them, already checked (the
    public call's ``Call``).
    """
    B, Nq, H_q, d = q.shape
    Nk = k.shape[1]
    key = (q.shape, k.shape, q.get_device(), causal, alignment, softmax_scale, dropout_p > 0.0,
           tuple(window_size), softcap, alibi_slopes is None)
    cached = _fast.get(key)
    if cached is None:
        fast_bucket(d)
        plan = setup(B, Nq, Nk, H_q, d, causal=causal, alignment=alignment,
                     softmax_scale=softmax_scale, window_size=window_size,
                     softcap=common.resolve_features_host(softcap, None, B, H_q, alignment)[0],
                     alibi=alibi_slopes is not None, dropout=dropout_p > 0.0, limit=None)
        run = prepared(plan.kernel, argtypes(), plan.grid, plan.threads, plan.nbytes,
                       device=q.device.index)
        cached = _fast[key] = (plan, run, q.new_empty((1, 1)))   # slopes placeholder, never read
    plan, run, placeholder = cached
    slopes = fast_slopes(q, placeholder, softcap=softcap, alibi_slopes=alibi_slopes, alignment=alignment)
    out = q.new_empty((B, Nq, H_q, d))
    L = q.new_empty((B, H_q, Nq))
    run(q, k, v, out, L, *plan.before, dropout_p, seed, *plan.after, slopes)
    return out, L


def fa2_fast_forward(q, k, v, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                     dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None, limit=None,
                     config=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """FlashAttention-2 forward, register-tiled. q (B, Nq, Hq, d), k, v (B, Nk, Hkv, d), float32.

    Returns (O (B, Nq, Hq, d), L (B, Hq, Nq)), L = logsumexp of each row's
    scaled scores (natural log; -inf for a row with no visible key).
    alignment: the causal diagonal, "bottom-right" (flash-attn, the default) or "top-left"
    (PyTorch). dropout_p, seed: O = (P o Z) V with Z = keep / (1 - p), keep from
    ``philox.keep_mask(seed, p, B, Hq, Nq, Nk)``; L is the undropped softmax's.
    NumPy in, NumPy out; device arrays in, device arrays out (no copies).
    """
    launch, out, L = launcher(q, k, v, causal=causal, alignment=alignment,
                              softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed, Br=Br,
                              Bc=Bc, num_warps=num_warps, limit=limit, config=config,
                              window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    launch()
    arrays = common.Arrays(q, k, v)
    return arrays.result(out), arrays.result(L)


# ---------------------------------------------------------------------------
# The registry's entry points (flashnumba.registry)
# ---------------------------------------------------------------------------

def forward(q, k, v, **options):
    """(O, L)."""
    return fa2_fast_forward(q, k, v, **options)


def state(q, k, v, **options):
    """What a step shows: O (= O_i / l_i so far) and L (= m_i + log l_i): m and l stay in registers."""
    return dict(zip(("O", "L"), fa2_fast_forward(q, k, v, **options)))
