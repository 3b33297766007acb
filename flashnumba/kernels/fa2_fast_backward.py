"""FlashAttention-2 backward, version 2: register tiles, for speed (the readable one is fa2_backward).

Same algorithm, same outputs as ``fa2_backward`` (Dao 2023, Algorithm 2; one
thread block per K/V tile j and head; grid (Tc, B * Hq); dQ accumulated with
float32 atomics), but the work inside a tile is laid out the way fast
matrix-product kernels lay it out:

    version 1  fa2_backward.py       one lane per score column or output dim; every
               multiply-add loads an operand from shared memory. Simple;
               shared-memory bound.
    version 2  this file             the block's two warp groups split the five
               products between them; each thread owns a register tile of every
               product and reads its operands as 16-byte vectors, so one shared
               load feeds 4-16 multiply-adds. fp32 FMA (no tensor cores): bound
               by the FMA rate and the shared-memory loads that feed it; its
               speed beside PyTorch's is in PERF-NOTES.md (v5) and the README.

Names here -> the paper's (Dao 2023, Algorithm 2; "l." = its line numbers):

    D_rows         D = rowsum(dO o O) (l. 4), written by the preprocess launch (which zeroes dQ)
    Kt, Vt         K_j^T, V_j^T in shared memory (l. 6)
    Qs, dOs        Q_i, dO_i in shared memory (l. 9)
    stat           group 0: log2(e) L_i;  group 1: scale D_i   (l. 9)
    S              group 0: S_ij (l. 10), then P_ij (l. 11);
                   group 1: dP_ij (l. 13), then dS_ij (l. 14)
    Ps, dSs        P_ij (o Z_ij) and dS_ij in shared memory, for the other group's products
    acc            group 0: dK_j (l. 16, scaled at the end);  group 1: dV_j (l. 12)
    dQ             this K/V tile's share of dQ_i += dS_ij K_j (l. 15), added to HBM by atomics
    r, c, x        a row of Q_i, a key of K_j, a head dim;  d_pad: the compiled head dim (d <= d_pad)

The algorithm, with the papers' names. Group 0 and group 1 are the two halves
of the block (num_warps / 2 warps each); the two columns run side by side:

    K_j, V_j -> shared, once;  dK_j = 0 (group 0), dV_j = 0 (group 1)     registers
    for i from q_tile_start(j) (0 without causal) to q_tile_end(j) - 1 (Tr - 1 without a window):
        Q_i, dO_i -> shared
        group 0                                  group 1
        .                                        Z_ij = keep / (1 - p)     dropout kernel only:
        .                                                                  keep bits, from Philox
        S_ij  = Q_i K_j^T                        dP_ij = dO_i V_j^T        register tiles
        P_ij  = exp2(scale log2(e) S_ij          .
                     - log2(e) L_i)              .
                0 where masked           -> Ps   .
        .                                        dS_ij = scale P_ij (dP_ij o Z_ij - D_i)  -> dSs
        .                                        P_ij o Z_ij  -> Ps (dropout kernel only)
        dK_j += dS_ij^T Q_i                      dV_j += (P_ij o Z_ij)^T dO_i   register tiles
        dQ_i  = dS_ij K_j   (both groups: the whole block)  -> cuda.atomic.add into dQ
    write dK_j (group 0), dV_j (group 1)

Without dropout Z_ij = 1 and those lines vanish: dropout is a compile-time
variant, ``build(config, dropout=True)``, launched when p > 0, so the p = 0
kernel contains no Philox code at all.

D_i = rowsum(dO_i * O_i) comes from ``preprocess.preprocess_zero_dq`` (run first, zeroing dQ);
L_i is the forward's natural-log logsumexp (``fa2_fast_forward`` and
``fa2_forward`` both write L = m + log l in natural log), so
exp(scale S - L) = exp2(scale log2(e) S - log2(e) L): one multiply-add and one
``ex2.approx.ftz`` per entry (``fast_math.exp2_ftz``). The softmax scale is folded
into dS_ij as it is made, dS_ij = P_ij (scale dP_ij - scale D_i) (one multiply-add
and one multiply per entry), so dK_j and dQ_i come out scaled with no extra
multiply.

How the operands are read: 16-byte vectors, used two ways
--------------------------------------------------------

Each product reads two tiles from shared memory. A thread reads 4 consecutive
floats of a row as one ``ld.shared.v4`` and uses them in one of two ways:

- as 4 *outputs* of a rank-1 update, when the sum runs over the tile's rows
  (dV_j += P_ij^T dO_i sums over r: a vector of P_ij[r, :] times a vector of
  dO_i[r, :]), the way the fast forward reads its k-major tiles;
- as 4 consecutive *steps of the sum*, when the sum runs along the row
  (S_ij = Q_i K_j^T sums over k: Q_i[r, k0:k0+4] is "a chunk of 4 k steps"
  of row r). A thread holds one chunk per row of its tile.

So no tile needs a second, transposed copy; the six tiles (70 KB for the d_pad=64
default) live in one dynamic shared array at the offsets of ``smem_offsets``
(more than 48 KB per block needs a dynamic array and a raised limit:
``smem_limit``):

    Kt[x, c]   K_j^T   (d_pad x Bc+4)   S_ij (vectors along c), dQ_i (chunks along c)
    Vt[x, c]   V_j^T   (d_pad x Bc+4)   dP_ij (vectors along c)
    Qs[r, x]   Q_i     (Br x d_pad+4)   S_ij (chunks along x), dK_j (vectors along x)
    dOs[r, x]  dO_i    (Br x d_pad+4)   dP_ij (chunks along x), dV_j (vectors along x)
    Ps[r, c]   P_ij    (Br x Bc+4)  dS_ij (group 1), dV_j (vectors along c)
    dSs[r, c]  dS_ij   (Br x Bc+4)  dK_j (vectors along c), dQ_i (chunks along c)

K_j and V_j are stored transposed (once per block) so that dQ_i = dS_ij K_j can
own *single* consecutive dims n per thread: then a warp's atomics into dQ cover
whole 32-byte sectors (8 consecutive floats per row), not 2 floats of every
sector. Every row is padded by 4 floats, to 4 x (an odd number): the chunks of
8 consecutive rows at the same column fall in 8 different groups of 4 banks,
so a warp's chunk loads are conflict-free.

Register tiles per thread (sizes from ``layout(config)``; the d_pad=64 default,
Br=32, Bc=64, 4 warps, shown)::

    S_ij / dP_ij  TM x TN     (4 x 8)   rows r = ty + RG a (chunks of Qs, dOs),
                                        keys c = 4 (tx + CG g) + t (vectors of Kt, Vt)
    dK_j / dV_j   TKC x TKN   (8 x 8)   keys c = 4 (ty + RG g) + t, dims n = 4 (tx + CG g) + t
    dQ_i          TQM x TQN   (4 x 4)   rows r = ty + RG a, dims n = tx + CG t (chunks of both)

A group's thread holds dK_j or dV_j (64 floats) for the whole i loop, so the
block's two groups each keep one of them: 64 accumulators per thread instead of
128, and 8 x 8 tiles (4 vectors per 64 multiply-adds) for both.

Global memory: q, dout and dq are passed as flat 1-D views, so a row's address
is one 64-bit add from the last one (Numba's 4-D indexing redoes the whole
index product per element). A *whole* Q tile (all Br rows exist and d == d_pad, every
tile of the benchmark but the causal diagonal's tails) is loaded and added into
dQ with no bounds tests at all; an edge tile clamps its rows and zero-fills or
zero-adds the dims past d.

Barriers per Q tile: four ``syncthreads`` (Q_i, dO_i free to overwrite /
Q_i, dO_i loaded / P_ij written / dS_ij written), each explained where it is.

Masking: P_ij = 0 for key c >= Nk, query row r >= Nq and, under causal or a
sliding window, keys outside the band r + lo <= c <= r + hi
(``geometry.window_bounds``: causal is hi = offset, offset = Nk - Nq bottom-right,
flash-attn's, or 0 top-left, PyTorch's), tested on edge and band-edge tiles
only; Q tiles q_tile_start(j) <= i < q_tile_end(j) are visited, the rest skipped.
Softcap and ALiBi are compile-time variants (``build(config, softcap=True,
alibi=True)``): group 0 caps and biases S_ij before exp2 and, with softcap,
writes P_ij (1 - tanh^2) into dSs for group 1, which forms dS_ij from it. A row that sees no key at all (L_i = -inf) is
masked wherever it meets a key, so it contributes nothing and no NaN appears. Rows past Nq and dims past d load clamped, valid
addresses: Q_i and dO_i dims past d are zeros (so K_j's and V_j's padding adds
nothing to S_ij, dP_ij), rows past Nq have P_ij = 0 and are never written.

Dropout: element (r, c) of query head h (also under GQA), batch b is kept when
``philox.keep(seed, b, h, r, c, p)``, the bit the forward and the reference's
mask (``philox.keep_mask``) use: word c % 4 of Philox4x32-10 of counter
(c // 4, r, h, b), key (seed lo, seed hi), compared as x 2^-32 >= p in float64.
The mask is regenerated, never stored. Group 1 makes the keep bits of its own
S_ij-shaped tile (keys c = 4 (tx + CG g) + t: one Philox call per row and group
of 4 keys) right after the tile barrier, before dP_ij, while group 0 computes
S_ij and P_ij; it keeps them in one integer, uses them for dP_ij o Z_ij, and
overwrites its own entries of Ps with P_ij o Z_ij for dV_j (D_i = rowsum(dO_i
o O_i) with the dropped O, unchanged). Group 0 is untouched. What it costs
(read off the SASS, sm_90, d_pad=64 default; not measured on a GPU): ~600 more
instructions per group-1 thread and Q tile (4 Philox calls of ~100
instructions, the float64 keep tests, the selects in dS_ij and Ps) against
~3400 per Q tile (2560 FFMA), a sixth of them hidden behind group 0's exp2
pass: I expect the dropout kernel 10-20% slower than the plain one. Where the
plain kernel's register cap leaves no room, the dropout kernel runs fewer blocks
per SM or one dQ chunk per loop trip (_DROPOUT_BLOCKS_PER_SM, DQ_TWO_CHUNKS).
Registers and spills of both: PERF-NOTES.md.

GQA: dK_j, dV_j are written per *query* head into (B, Nk, Hq, d) buffers and
summed over each group by ``gqa.sum_head_groups`` (into buffers the launcher
allocated once). ``limit``: each block stops after ``limit`` iterations of its
i loop and writes its dK_j, dV_j; dQ holds what was added so far.

Head dims: compiled for d_pad in FAST_HEAD_DIMS (32, 64, 128, 256), as the fast forward;
d <= d_pad is zero-padded in shared memory and only n < d is written out. d_pad = 256
runs Br = Bc = 16 with 4 warps (75 KB): a thread of a group holds 8 x 8 of dK_j (or dV_j).
deterministic=True runs fa2_backward (registry: deterministic_backward), which stops at
d = 128: above it there is no deterministic backward.

Known limits: fp32 FMA only; dQ gets Nk / Bc float32 atomics per entry (Bc = 64
for the d_pad=64 default); no prefetch of Q_{i+1}, dO_{i+1} (no registers left under
the 168-register cap of 3 blocks per SM: other blocks hide that latency); q, dout
must be C-contiguous (flat views); one float32 atomic per dQ entry per (i, j),
so dQ is not bitwise reproducible (fa2_backward has a deterministic mode, this
kernel does not).
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import config as numba_config
from numba import cuda, float32, int64, types

from flashnumba import geometry
from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.kernels import common, gqa, smem_limit
from flashnumba.kernels.common import FAST_HEAD_DIMS, ConfigError, TileConfig, fast_bucket, require
from flashnumba.kernels.fast_math import LOG2_E, exp2_ftz, is_negative_zero
from flashnumba.kernels.geometry import num_tiles, q_tile_end, q_tile_start
from flashnumba.kernels.half_io import fast_slopes
from flashnumba.kernels.hardware import (
    FLOAT_BYTES,
    MAX_THREADS_PER_SM,
    REGISTERS_PER_SM,
    SM_SHARED_BYTES,
    WARP_SIZE,
)
from flashnumba.kernels.launch import prepared
from flashnumba.kernels.philox import kept, philox4x32, philox_key
from flashnumba.kernels.preprocess import PRE_ROWS_PER_BLOCK, PRE_THREADS, preprocess_zero_dq

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it
FEATURES = ("window_size", "softcap", "alibi_slopes")   # flash-attn's options beyond plain attention

PAD = 4                                  # floats added to every shared row (see the docstring)
CHUNK = 4                                # steps of a sum per 16-byte vector
MIN_REGISTERS = 160                      # per thread: dK_j or dV_j, S_ij or dQ_i, operands
MAX_REGISTER_FLOATS = 136                # floats per thread in register arrays; more would spill

# Default tiles per head-dim bucket: (Br, Bc, num_warps, blocks_per_sm), blocks_per_sm 0 meaning
# min_blocks_per_sm's choice. Chosen by `flashnumba bench --tune` (PERF-NOTES.md, runs 7 and 8):
# d_pad=64: Br=32 Bc=64 4 warps (70 KB of shared memory, 3 blocks per SM) was fastest; Br=Bc=64
# 8 warps is not shipped (it spills 4 B on sm_80). d_pad=128: Br=16 Bc=32 4 warps.
_DEFAULTS = {
    32: (32, 32, 2, 0),
    64: (32, 64, 4, 0),
    128: (16, 32, 4, 0),
    256: (16, 16, 4, 0),     # 75 KB, 2 blocks per SM: dK_j (or dV_j) 16 x 256 over 64 threads
}
# Other configurations that compile cleanly, for tuning on a GPU (bench --tune).
_ALTERNATIVES = {
    64: [(32, 32, 4, 4)],    # 44 KB (fits without raising the limit), 4 blocks per SM, 128 registers
    128: [(16, 16, 2, 0),    # 39 KB, 5 blocks per SM
          (32, 32, 8, 2)],   # 78 KB, 2 blocks (16 warps) per SM, 128 registers
}
# Blocks per SM for the dropout kernel where the plain kernel's launch bound leaves it no
# registers for the Philox state: (Br, Bc, d_pad, num_warps, blocks_per_sm) -> blocks per SM. The
# Br=Bc=16 d_pad=128 dropout kernel spilled 8 B on sm_80 at 5 blocks per SM once dQ's padding dims
# were masked (a NaN must not leak into other entries of dQ), so it is compiled for 4.
# (Every other dropout kernel keeps its plain kernel's blocks per SM; those with
# blocks_per_sm = 0 run one 4-key chunk per dQ loop trip instead of two: DQ_TWO_CHUNKS.)
_DROPOUT_BLOCKS_PER_SM = {
    (16, 16, 128, 2, 0): 4,
}
# The same for the softcap / ALiBi variant: at the blocks per SM of the plain kernel these two
# spilled on sm_90 (4 B and 16 B); with these they do not (ptxas, flashnumba resources).
_FEATURE_BLOCKS_PER_SM = {
    (16, 16, 128, 2, 0): 4,
    (32, 64, 64, 4, 0): 2,
}


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def _split(M, N, threads, row_run, col_run):
    """How `threads` threads share an M x N register tile: (TM, TN, RG, CG), each thread
    TM x TN entries, RG x CG threads; TM a multiple of row_run, TN of col_run.
    Picks the most square tile (fewest loads per multiply-add), None if there is none."""
    if threads <= 0 or (M * N) % threads:
        return None
    per_thread = M * N // threads
    best = None
    for TM in range(row_run, per_thread + 1, row_run):
        if per_thread % TM or M % TM:
            continue
        TN = per_thread // TM
        if TN % col_run or N % TN:
            continue
        RG, CG = M // TM, N // TN
        if RG * CG != threads:
            continue
        key = (TM + TN, TM)                 # fewest loads, then the smaller left operand chunk
        if best is None or key < best[0]:
            best = (key, (TM, TN, RG, CG))
    return None if best is None else best[1]


def layout(config):
    """Register-tile shapes of a config, a dict (None for a tile that does not split evenly):

    S:  (TM, TN, RG, CG)       S_ij / dP_ij over one group (T / 2 threads)
    KV: (TKC, TKN, RG, CG)     dK_j / dV_j over one group
    Q:  (TQM, TQN, RG, CG)     dQ_i over the whole block (T threads)
    """
    T = config.threads
    G = T // 2
    return {"T": T, "G": G,
            "S": _split(config.Br, config.Bc, G, 1, 4),
            "KV": _split(config.Bc, config.d_pad, G, 4, 4),
            "Q": _split(config.Br, config.d_pad, T, 1, 1)}


def default_config(d):
    """The shipped tile configuration for head dim d (served by its bucket d_pad)."""
    d_pad = fast_bucket(d)
    Br, Bc, num_warps, blocks_per_sm = _DEFAULTS[d_pad]
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps, blocks_per_sm=blocks_per_sm)


def shipped_configs():
    """Every bucket's default plus the alternatives bench --tune times."""
    configs = [default_config(d_pad) for d_pad in FAST_HEAD_DIMS]
    for d_pad, alternatives in _ALTERNATIVES.items():
        configs += [TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=w, blocks_per_sm=blocks)
                    for Br, Bc, w, blocks in alternatives]
    return configs


def smem_offsets(config):
    """Where each tile starts in the block's dynamic shared array, in floats, and the array's
    length: Kt, Vt (d_pad x Bc+4), Qs, dOs (Br x d_pad+4), Ps, dSs (Br x Bc+4), in that order. Every
    offset and row length is a multiple of 4 floats, so 16-byte vectors stay aligned."""
    Br, Bc, d_pad = config.Br, config.Bc, config.d_pad
    sizes = (("Kt", d_pad * (Bc + PAD)), ("Vt", d_pad * (Bc + PAD)), ("Qs", Br * (d_pad + PAD)),
             ("dOs", Br * (d_pad + PAD)), ("Ps", Br * (Bc + PAD)), ("dSs", Br * (Bc + PAD)))
    return common.tile_offsets(sizes)


def smem_bytes(config):
    """Shared memory per block (all of it dynamic): the six tiles of smem_offsets, float32."""
    return smem_offsets(config)["floats"] * FLOAT_BYTES


def static_smem_bytes(config):
    """Static shared memory per block, as ptxas counts it: none (see smem_limit)."""
    return 0


def min_blocks_per_sm(config, dropout=False, features=False):
    """Blocks per SM to ask the compiler for: config.blocks_per_sm if set, else as many as shared
    memory allows (1 KB per block is reserved by the hardware), but not so many that a thread
    gets fewer than MIN_REGISTERS. The dropout kernel of a config in _DROPOUT_BLOCKS_PER_SM,
    the softcap / ALiBi kernel of one in _FEATURE_BLOCKS_PER_SM, asks for fewer."""
    key = (config.Br, config.Bc, config.d_pad, config.num_warps, config.blocks_per_sm)
    if dropout and key in _DROPOUT_BLOCKS_PER_SM:
        return _DROPOUT_BLOCKS_PER_SM[key]
    if features and key in _FEATURE_BLOCKS_PER_SM:
        return _FEATURE_BLOCKS_PER_SM[key]
    if config.blocks_per_sm:
        return config.blocks_per_sm
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
    T = config.threads
    require(num_warps % 2 == 0 and T <= 1024 and T & (T - 1) == 0,
            f"num_warps={num_warps}: must be even (two warp groups) and a power of 2, <= 32")
    require(Br % CHUNK == 0 and Bc % (2 * CHUNK) == 0,
            f"Br={Br} must be a multiple of {CHUNK}, Bc={Bc} of {2 * CHUNK} (sums run in chunks of "
            f"{CHUNK}, two chunks per loop trip)")
    require(Br % num_warps == 0, f"Br={Br} must be a multiple of num_warps={num_warps} (loading Q_i)")
    require(Bc % num_warps == 0, f"Bc={Bc} must be a multiple of num_warps={num_warps} (loading K_j)")
    blocks = config.blocks_per_sm
    require(isinstance(blocks, (int, np.integer)) and blocks >= 0,
            f"blocks_per_sm must be a non-negative integer, got {blocks!r}")
    require(blocks == 0 or (blocks * (smem_bytes(config) + 1024) <= SM_SHARED_BYTES
                            and blocks * config.threads <= MAX_THREADS_PER_SM),
            f"blocks_per_sm={blocks}: that many blocks of {config.threads} threads and "
            f"{smem_bytes(config)} bytes of shared memory do not fit on one SM")
    lay = layout(config)
    for name, what in (("S", "S_ij (Br x Bc) over T/2 threads"), ("KV", "dK_j (Bc x d_pad) over T/2 threads"),
                       ("Q", "dQ_i (Br x d_pad) over T threads")):
        require(lay[name] is not None,
                f"Br={Br}, Bc={Bc}, d_pad={d_pad}, num_warps={num_warps}: {what} does not split into "
                f"equal register tiles (runs of 4 where vectors are read)")
    smem = smem_bytes(config)
    require(smem <= smem_limit.MAX_BLOCK_BYTES,
            f"Br={Br}, Bc={Bc}, d_pad={d_pad} needs {smem} bytes of shared memory per block "
            f"> {smem_limit.MAX_BLOCK_BYTES} (227 KB, an H100's most); use smaller tiles")
    TM, TN = lay["S"][:2]
    TKC, TKN = lay["KV"][:2]
    TQM, TQN = lay["Q"][:2]
    floats = TKC * TKN + max(TM * TN + CHUNK * TM + CHUNK, TQM * TQN + CHUNK * TQM + TQN)
    require(floats <= MAX_REGISTER_FLOATS,
            f"Br={Br}, Bc={Bc}, d_pad={d_pad}, num_warps={num_warps} holds {floats} floats per thread in "
            f"register arrays (> {MAX_REGISTER_FLOATS}, would spill); use more warps or smaller tiles")


def _smem_alignment():
    """16 bytes (for ld.shared.v4) on a GPU; the simulator accepts no alignment argument."""
    return None if numba_config.ENABLE_CUDASIM else 16


def _jit_options(config, dropout, features=False):
    """Launch bounds for the real compiler (the simulator takes none)."""
    if numba_config.ENABLE_CUDASIM:
        return {}
    return {"launch_bounds": (config.threads, min_blocks_per_sm(config, dropout, features))}


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------

def build(config, dropout=False, softcap=False, alibi=False):
    """The kernel for `config`; ``dropout=True`` is the variant that drops P_ij (a separate
    compile: the default kernel has no Philox code at all); ``softcap``, ``alibi`` the variants
    that cap and bias S_ij (softcap also carries tanh's derivative into dS_ij). Cached per
    (config, variant)."""
    return _build(config, bool(dropout), bool(softcap), bool(alibi))


@functools.lru_cache(maxsize=None)
def _build(config, DROPOUT, SOFTCAP=False, ALIBI=False):
    """Compile-time sizes baked in as plain Python ints; returns the @cuda.jit kernel."""
    check_config(config)
    Br, Bc, d_pad = int(config.Br), int(config.Bc), int(config.d_pad)
    lay = layout(config)
    T, G = lay["T"], lay["G"]
    TM, TN, RG_S, CG_S = lay["S"]
    require(not DROPOUT or TM * TN <= 64,
            f"Br={Br}, Bc={Bc}, num_warps={config.num_warps}: the dropout kernel keeps the keep bits "
            f"of a thread's {TM} x {TN} tile of S_ij in one 64-bit integer")
    TKC, TKN, RG_K, CG_K = lay["KV"]
    TQM, TQN, RG_Q, CG_Q = lay["Q"]
    NW = config.num_warps
    T_MASK = T - 1
    ROW_LEN = d_pad + PAD                             # row length of Qs, dOs
    BcP = Bc + PAD                           # row length of Kt, Vt, Ps, dSs
    DIMS_PER_LANE = d_pad // WARP_SIZE                 # dims per lane when a warp loads a row
    ROWS_PER_WARP = Br // NW                 # rows of Q_i per warp when loading
    INDEX_MASK = 0x7FFFFFFF                  # x & INDEX_MASK == x for the indices here; tells the
                                             # compiler x >= 0 (no negative-index wraparound code)
    FLAT_MASK = 0x7FFFFFFFFFFFFFFF           # the same for 64-bit flat indices
    DQ_MASK = 0x3FFFFFFFFFFFFFFF             # idx & DQ_MASK plus a small constant is still >= 0
    # two 4-key chunks per dQ loop trip; one where registers are tighter: under a set
    # blocks_per_sm (two spilled 8 B on sm_90 at 128 registers) and in the dropout kernel
    # (the Br=32 Bc=64 one spilled 4 B with two)
    DQ_TWO_CHUNKS = config.blocks_per_sm == 0 and not DROPOUT
    SM = smem_offsets(config)                # tile offsets in the dynamic shared array, floats
    KT, VT, QS, DOS, PS, DSS = (SM[name] for name in ("Kt", "Vt", "Qs", "dOs", "Ps", "dSs"))
    X_ROWS = max(TM, TQM, TKC // 4)
    Y_LEN = max(TN, TKC, TKN, CHUNK)
    ALIGN = _smem_alignment()

    # The tiles live in one dynamic shared array `sm` (more than 48 KB needs it: smem_limit):
    # element [r, c] of the tile at offset A with rows of length W is sm[A + r W + c]. The
    # device functions take the tile's offset (a compile-time constant once inlined).

    @cuda.jit(device=True, inline="always")
    def chunk_ab(C, sm, As, Bt, k0, ty, tx, a_vec, b_vec):
        """C[a, 4 g + t] += sum over k0 <= k < k0 + 4 of As[ty + RG_S a, k] Bt[k, 4 (tx + CG_S g) + t].

        S_ij += Q_i K_j^T (As = Qs, Bt = Kt) or dP_ij += dO_i V_j^T (As = dOs, Bt = Vt), four
        k steps: one 16-byte chunk per row of As (4 k steps of one row), TN / 4 vectors of Bt
        per k; 4 TM TN multiply-adds.
        """
        for a in range(TM):
            for s in range(CHUNK):
                a_vec[a, s] = sm[As + (ty + RG_S * a) * ROW_LEN + k0 + s]
        for s in range(CHUNK):
            for g in range(TN // 4):
                for t in range(4):
                    b_vec[4 * g + t] = sm[Bt + (k0 + s) * BcP + 4 * (tx + CG_S * g) + t]
            for a in range(TM):
                for n in range(TN):
                    C[a, n] += a_vec[a, s] * b_vec[n]

    @cuda.jit(device=True, inline="always")
    def step_atb(C, sm, As, Bs, r, ty, tx, a_vec, b_vec):
        """C[4 g + t, 4 g2 + t2] += As[r, 4 (ty + RG_K g) + t] Bs[r, 4 (tx + CG_K g2) + t2].

        dK_j += dS_ij^T Q_i (As = dSs, Bs = Qs) or dV_j += P_ij^T dO_i (As = Ps, Bs = dOs),
        one row r of both: TKC / 4 + TKN / 4 vectors, TKC TKN multiply-adds.
        """
        for g in range(TKC // 4):
            for t in range(4):
                a_vec[g, t] = sm[As + r * BcP + 4 * (ty + RG_K * g) + t]
        for g in range(TKN // 4):
            for t in range(4):
                b_vec[4 * g + t] = sm[Bs + r * ROW_LEN + 4 * (tx + CG_K * g) + t]
        for c in range(TKC):
            for n in range(TKN):
                C[c, n] += a_vec[c // 4, c % 4] * b_vec[n]

    @cuda.jit(device=True, inline="always")
    def chunk_abt(C, sm, As, Bs, c0, ty, tx, a_vec, b_vec):
        """C[a, t] += sum over c0 <= c < c0 + 4 of As[ty + RG_Q a, c] Bs[tx + CG_Q t, c].

        dQ_i += dS_ij K_j (As = dSs, Bs = Kt: K_j transposed, so its column n is a row),
        four c steps: one 16-byte chunk per row of each, 4 TQM TQN multiply-adds.
        """
        for a in range(TQM):
            for s in range(CHUNK):
                a_vec[a, s] = sm[As + (ty + RG_Q * a) * BcP + c0 + s]
        for t in range(TQN):
            for s in range(CHUNK):
                b_vec[s] = sm[Bs + (tx + CG_Q * t) * BcP + c0 + s]
            for s in range(CHUNK):
                for a in range(TQM):
                    C[a, t] += a_vec[a, s] * b_vec[s]

    @cuda.jit(device=True, inline="always")
    def load_kv_transposed(sm, dst, src, b, h, start, N, d, warp, lane):
        """dst[x, c] = src[b, start + c, h, x] for this warp's keys c = warp + NW cc, x < d_pad; zeros
        past N and past d. Once per block, so plainly written (the transposed store has bank
        conflicts; it happens once, against Tr Q tiles of work)."""
        for cc in range(Bc // NW):
            c = warp + NW * cc
            for u in range(DIMS_PER_LANE):
                x = lane + WARP_SIZE * u
                value = float32(0.0)
                if start + c < N and x < d:
                    value = src[b, start + c, h, x]
                sm[dst + x * BcP + c] = value

    @cuda.jit(device=True, inline="always")
    def load_q_rows(sm, dst, src_flat, first, last, row_stride, d, warp, lane, whole):
        """dst[r, x] = Q_i[r, x] (or dO_i) for this warp's rows r = warp + NW rr, x = lane + 32 u < d_pad,
        from the flat array: row r of the tile starts at first + r row_stride. Lanes along
        consecutive dims: coalesced loads, conflict-free stores.

        whole (every row of the tile exists and d == d_pad): one 64-bit add per row, and the row's
        elements at constant offsets from it (about 3 instructions per element). Otherwise a
        row past Nq reads the last row (flat index `last`: a valid address, masked later) and
        dims past d are zeros: per row an add and a min, per element a clamped index, a load,
        a select and a store (about 15 instructions per element: 64-bit index arithmetic)."""
        idx = first + warp * row_stride
        step = NW * row_stride
        if whole:
            for rr in range(ROWS_PER_WARP):
                row_idx = (idx + lane) & FLAT_MASK
                for u in range(DIMS_PER_LANE):
                    sm[dst + (warp + NW * rr) * ROW_LEN + lane + WARP_SIZE * u] = src_flat[row_idx + WARP_SIZE * u]
                idx += step
            return
        rr = 0
        while rr < ROWS_PER_WARP:
            r = warp + NW * rr
            row_idx = min(idx, last)
            for u in range(DIMS_PER_LANE):
                x = lane + WARP_SIZE * u
                value = src_flat[(row_idx + min(x, d - 1)) & FLAT_MASK]
                sm[dst + r * ROW_LEN + x] = value if x < d else float32(0.0)
            idx += step
            rr += 1

    @cuda.jit(**_jit_options(config, DROPOUT, SOFTCAP or ALIBI))
    def fa2_fast_backward_kernel(q_flat, k, v, dout_flat, L, D_rows, dq_flat, dk, dv, scale, windowed,
                                 lo, hi, dropout_p, seed, limit, cap, slopes):
        # --- sizes (q_flat, dout_flat, dq_flat: flat views of (B, Nq, H_q, d) arrays) ---
        # scale: float32; windowed: bool (causal or a window); lo, hi: int32, key c is visible
        # to query r iff r + lo <= c <= r + hi; dropout_p: float64; seed: uint64 (both unused
        # unless DROPOUT); limit: i steps to run (int64); cap: float32 softcap (SOFTCAP only);
        # slopes: float32 (B, H_q) ALiBi slopes (ALIBI only).
        _, Nk, H_kv, d = k.shape
        H_q = L.shape[1]
        Nq = L.shape[2]
        Tr = num_tiles(Nq, Br)
        scale_log2 = scale * float32(LOG2_E)

        # --- who am I ---
        tid = cuda.threadIdx.x & T_MASK      # = threadIdx.x; the mask proves tid >= 0 to the compiler
        group = tid // G                     # 0: S_ij, P_ij, dK_j;  1: dP_ij, dS_ij, dV_j
        gid = tid % G                        # place within the group
        ty_s = gid // CG_S                   # S_ij, dP_ij: rows ty_s + RG_S a, keys 4 (tx_s + CG_S g) + t
        tx_s = gid % CG_S
        ty_k = gid // CG_K                   # dK_j, dV_j: keys 4 (ty_k + RG_K g) + t, dims 4 (tx_k + CG_K g) + t
        tx_k = gid % CG_K
        ty_q = tid // CG_Q                   # dQ_i: rows ty_q + RG_Q a, dims tx_q + CG_Q t
        tx_q = tid % CG_Q
        t_valid = (d - tx_q + CG_Q - 1) // CG_Q  # dims n = tx_q + CG_Q t of dQ_i below d: t < t_valid
        warp = tid // WARP_SIZE
        lane = tid % WARP_SIZE
        j = cuda.blockIdx.x & INDEX_MASK     # K/V tile (ascending: under causal, the most Q tiles first)
        bh = cuda.blockIdx.y & INDEX_MASK
        b = bh // H_q
        h = bh % H_q
        h_kv = h // (H_q // H_kv)            # grouped-query attention: this head's K/V head
        col0 = j * Bc
        row_stride = H_q * d                 # flat index of q[b, r + 1, h, 0] - q[b, r, h, 0]
        q_head = (b * Nq * H_q + h) * d     # flat index of q[b, 0, h, 0]
        q_last = q_head + (Nq - 1) * row_stride
        if DROPOUT:                          # Philox key and the counter words fixed for this block
            key0, key1 = philox_key(seed)
            h_word = np.uint64(h)            # the query head, also under GQA
            b_word = np.uint64(b)
            Z_kept = float32(1.0 / (1.0 - dropout_p))   # Z_ij of a kept element (0 if dropped)

        # --- shared memory: one dynamic array, smem_bytes(config) long (the launch gives it);
        # at offsets KT: K_j transposed, VT: V_j transposed, QS: Q_i, DOS: dO_i, PS: P_ij,
        # DSS: dS_ij times scale (smem_offsets) ---
        sm = cuda.shared.array(0, float32, alignment=ALIGN)

        # --- registers ---
        acc = cuda.local.array((TKC, TKN), float32)    # dK_j (group 0) or dV_j (group 1)
        S = cuda.local.array((TM, TN), float32)        # S_ij -> P_ij (group 0) or dP_ij -> dS_ij (group 1)
        dQ = cuda.local.array((TQM, TQN), float32)     # dQ_i, this K/V tile's share
        stat = cuda.local.array(TM, float32)           # log2(e) L_i (group 0) or scale D_i (group 1), per row
        a_vec = cuda.local.array((X_ROWS, CHUNK), float32)  # chunks of the left operand
        b_vec = cuda.local.array(Y_LEN, float32)           # a chunk or vectors of the right operand
        for c in range(TKC):
            for n in range(TKN):
                acc[c, n] = 0.0

        # K_j, V_j -> shared, transposed, once; keys past Nk and dims past d are zeros
        load_kv_transposed(sm, KT, k, b, h_kv, col0, Nk, d, warp, lane)
        load_kv_transposed(sm, VT, v, b, h_kv, col0, Nk, d, warp, lane)

        i = 0
        i_stop = Tr
        if windowed:                                   # Q tiles outside the band are skipped
            # (int64 as without a window: lo, hi are int32 only to save registers)
            i = int64(q_tile_start(j, Br, Bc, Nq, hi))          # above the diagonal (right of the band)
            i_stop = int64(max(i, q_tile_end(j, Br, Bc, Nq, Nk, lo)))   # below the band's left edge
        if ALIBI:
            slope = slopes[b, h]                       # bias -slope |r + Nk - Nq - c|
        i_end = min(i_stop, i + limit) & INDEX_MASK   # i_end < 2^31: its high word needs no register
                                                   # (with offset an argument, the 2-warp d_pad=64 kernel
                                                   # spilled it on sm_90)

        while i < i_end:
            row0 = i * Br
            cuda.syncthreads()  # every warp done reading Qs, dOs (and Ps, dSs) of the last Q tile

            # Q_i, dO_i -> shared (rows past Nq: clamped, masked below; dims past d: zeros)
            first = q_head + row0 * row_stride
            whole = row0 + Br <= Nq and d == d_pad
            load_q_rows(sm, QS, q_flat, first, q_last, row_stride, d, warp, lane, whole)
            load_q_rows(sm, DOS, dout_flat, first, q_last, row_stride, d, warp, lane, whole)
            cuda.syncthreads()  # Q_i, dO_i (and K_j, V_j the first time) written before any warp reads them

            # this thread's rows of log2(e) L_i (group 0) or of scale D_i (group 1), loaded now so that
            # their latency hides behind the products, not in front of exp2
            for a in range(TM):
                row = min(row0 + ty_s + RG_S * a, Nq - 1) & INDEX_MASK
                if group == 0:
                    stat[a] = L[b, h, row] * float32(LOG2_E)
                else:
                    stat[a] = D_rows[b, h, row] * scale

            if DROPOUT and group == 1:
                # keep bits of this thread's TM x TN entries of Z_ij (bit TN a + n), made while
                # group 0 computes S_ij and P_ij, before dP_ij exists (fewer live registers).
                # Keys 4 (tx_s + CG_S g) + t, t < 4, are one 4-aligned group: one
                # Philox4x32-10 call makes their 4 words
                keep_bits = 0
                for a in range(TM):
                    row = row0 + ty_s + RG_S * a
                    for g in range(TN // 4):
                        words = philox4x32(np.uint64(col0 // 4 + tx_s + CG_S * g), np.uint64(row),
                                           h_word, b_word, key0, key1)
                        for t in range(4):
                            if kept(words[t], dropout_p):
                                keep_bits |= 1 << (TN * a + 4 * g + t)

            # S_ij = Q_i K_j^T (group 0), dP_ij = dO_i V_j^T (group 1): eight k steps per trip
            for a in range(TM):
                for n in range(TN):
                    S[a, n] = 0.0
            k0 = 0
            if group == 0:
                while k0 < d_pad:
                    chunk_ab(S, sm, QS, KT, k0, ty_s, tx_s, a_vec, b_vec)
                    chunk_ab(S, sm, QS, KT, k0 + CHUNK, ty_s, tx_s, a_vec, b_vec)
                    k0 += 2 * CHUNK
            else:
                while k0 < d_pad:
                    chunk_ab(S, sm, DOS, VT, k0, ty_s, tx_s, a_vec, b_vec)
                    chunk_ab(S, sm, DOS, VT, k0 + CHUNK, ty_s, tx_s, a_vec, b_vec)
                    k0 += 2 * CHUNK

            # edge and diagonal tiles: some (row, key) pairs are masked
            masked_tile = (row0 + Br > Nq or col0 + Bc > Nk
                           or (windowed and (col0 + Bc - 1 > row0 + hi or col0 < row0 + Br - 1 + lo)))
            if group == 0:
                # P_ij = exp(scale S_ij - L_i) = exp2(scale log2(e) S_ij - log2(e) L_i), 0 where masked
                for a in range(TM):
                    r = ty_s + RG_S * a
                    row = row0 + r
                    for g in range(TN // 4):
                        for t in range(4):
                            c = 4 * (tx_s + CG_S * g) + t
                            if SOFTCAP or ALIBI:
                                score = S[a, 4 * g + t] * scale
                                if SOFTCAP:      # S_ij = cap tanh(S_ij / cap); dS_ij will carry 1 - tanh^2
                                    tanh_s = math.tanh(score / cap)
                                    score = cap * tanh_s
                                if ALIBI:        # S_ij -= slope |r + Nk - Nq - c|
                                    score -= slope * float32(abs(row + Nk - Nq - col0 - c))
                                p = exp2_ftz(score * float32(LOG2_E) - stat[a])
                            else:
                                p = exp2_ftz(S[a, 4 * g + t] * scale_log2 - stat[a])
                            if masked_tile:
                                col = col0 + c
                                if row >= Nq or col >= Nk or (windowed and (col > row + hi or col < row + lo)):
                                    p = float32(-0.0)    # hidden: -0, so group 1 can tell it from an underflow
                            sm[PS + r * BcP + c] = p
                            if SOFTCAP:          # P_ij (1 - tanh^2) for group 1's dS_ij (dSs is free
                                                 # until group 1 writes it, after the next barrier)
                                sm[DSS + r * BcP + c] = p * (float32(1.0) - tanh_s * tanh_s)
            cuda.syncthreads()  # P_ij written (group 0) before group 1 reads it

            if group == 1:
                # dS_ij = P_ij (scale dP_ij - scale D_i): this thread's entries of P_ij, written by the
                # group-0 thread with the same place in its group. With dropout,
                # dS_ij = scale P_ij (dP_ij o Z_ij - D_i), and P_ij o Z_ij replaces P_ij in Ps for
                # dV_j (only this thread reads or writes these entries until the barrier)
                for a in range(TM):
                    r = ty_s + RG_S * a
                    for g in range(TN // 4):
                        for t in range(4):
                            c = 4 * (tx_s + CG_S * g) + t
                            P_rc = sm[PS + r * BcP + c]
                            dP_rc = S[a, 4 * g + t]
                            if DROPOUT:
                                if keep_bits & (1 << (TN * a + 4 * g + t)):
                                    dP_rc *= Z_kept
                                    sm[PS + r * BcP + c] = P_rc * Z_kept
                                else:
                                    dP_rc = float32(0.0)
                                    sm[PS + r * BcP + c] = float32(0.0)
                            if SOFTCAP:          # dS_ij = P_ij (1 - tanh^2) (dP_ij - D_i)
                                ds = sm[DSS + r * BcP + c] * (dP_rc * scale - stat[a])
                            else:
                                ds = P_rc * (dP_rc * scale - stat[a])
                            if is_negative_zero(P_rc):
                                ds = float32(0.0)   # a hidden key (P = -0): exactly 0, even where D_i is NaN
                            sm[DSS + r * BcP + c] = ds
            cuda.syncthreads()  # dS_ij (and, with dropout, P_ij o Z_ij) written by group 1 before every warp reads it

            # dK_j += dS_ij^T Q_i (group 0), dV_j += P_ij^T dO_i (group 1): four rows r per trip
            r = 0
            if group == 0:
                while r < Br:
                    step_atb(acc, sm, DSS, QS, r, ty_k, tx_k, a_vec, b_vec)
                    step_atb(acc, sm, DSS, QS, r + 1, ty_k, tx_k, a_vec, b_vec)
                    step_atb(acc, sm, DSS, QS, r + 2, ty_k, tx_k, a_vec, b_vec)
                    step_atb(acc, sm, DSS, QS, r + 3, ty_k, tx_k, a_vec, b_vec)
                    r += CHUNK
            else:
                while r < Br:
                    step_atb(acc, sm, PS, DOS, r, ty_k, tx_k, a_vec, b_vec)
                    step_atb(acc, sm, PS, DOS, r + 1, ty_k, tx_k, a_vec, b_vec)
                    step_atb(acc, sm, PS, DOS, r + 2, ty_k, tx_k, a_vec, b_vec)
                    step_atb(acc, sm, PS, DOS, r + 3, ty_k, tx_k, a_vec, b_vec)
                    r += CHUNK

            # dQ_i = dS_ij K_j (the whole block), added into global dQ: eight keys per trip (four
            # without DQ_TWO_CHUNKS)
            for a in range(TQM):
                for n in range(TQN):
                    dQ[a, n] = 0.0
            c0 = 0
            while c0 < Bc:
                chunk_abt(dQ, sm, DSS, KT, c0, ty_q, tx_q, a_vec, b_vec)
                if DQ_TWO_CHUNKS:
                    chunk_abt(dQ, sm, DSS, KT, c0 + CHUNK, ty_q, tx_q, a_vec, b_vec)
                    c0 += CHUNK
                c0 += CHUNK
            # One atomic per entry; a warp's atomics for one (a, t) cover CG_Q consecutive dims of
            # each of its rows (whole 32-byte sectors), one instruction each at an immediate
            # offset. Dims n >= d (t >= t_valid) add an exact 0, selected rather than branched on,
            # to the entries that follow in the flat array (other dims, or the d_pad spare floats at
            # its end): K_j's padding dims are zeros, but a NaN in dS_ij times 0 is NaN. Rows past
            # Nq are skipped. A whole tile (every row exists, d == d_pad) needs neither test.
            if whole:
                idx = (q_head + (row0 + ty_q) * row_stride + tx_q) & DQ_MASK
                for a in range(TQM):
                    for t in range(TQN):
                        cuda.atomic.add(dq_flat, idx + CG_Q * t, dQ[a, t])
                    idx += RG_Q * row_stride
            else:
                for a in range(TQM):
                    row = row0 + ty_q + RG_Q * a
                    if row < Nq:
                        idx = (q_head + row * row_stride + tx_q) & DQ_MASK
                        for t in range(TQN):
                            value = dQ[a, t]
                            if t >= t_valid:
                                value = float32(0.0)
                            cuda.atomic.add(dq_flat, idx + CG_Q * t, value)
            i += 1

        # dK_j (group 0) or dV_j (group 1), per query head; dS_ij already carried the scale
        for g in range(TKC // 4):
            for t in range(4):
                col = col0 + 4 * (ty_k + RG_K * g) + t
                if col < Nk:
                    for g2 in range(TKN // 4):
                        for t2 in range(4):
                            n = 4 * (tx_k + CG_K * g2) + t2
                            if n < d:
                                if group == 0:
                                    dk[b, col, h, n] = acc[4 * g + t, 4 * g2 + t2]
                                else:
                                    dv[b, col, h, n] = acc[4 * g + t, 4 * g2 + t2]

    return fa2_fast_backward_kernel


def argtypes():
    """The kernel's argument types as the wrappers launch it (``launcher`` and ``fast_backward``)."""
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    a1 = types.Array(types.float32, 1, "C")
    a2 = types.Array(types.float32, 2, "C")
    return (a1, a4, a4, a1, a3, a3, a1, a4, a4, types.float32, types.boolean, types.int32,
            types.int32, types.float64, types.uint64, types.int64, types.float32, a2)


def compile_targets(config):
    """[(label, dispatcher, argtypes)] for cuda.compile_ptx, argument types as the launcher uses them.
    (The GQA kernel is gqa's, checked with fa2_backward's.)"""
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    a1 = types.Array(types.float32, 1, "C")
    return [(NAME, build(config), argtypes()),
            (f"{NAME}_dropout", build(config, dropout=True), argtypes()),
            (f"{NAME}_softcap_alibi", build(config, softcap=True, alibi=True), argtypes()),
            (f"{NAME}_preprocess_zero_dq", preprocess_zero_dq, (a4, a4, a3, a1))]


# ---------------------------------------------------------------------------
# Wrapper: check, allocate, launch
# ---------------------------------------------------------------------------

def resolve_config(d, Br=None, Bc=None, num_warps=None, config=None):
    """The default config for d, or `config`, with any of Br, Bc, num_warps overridden; checked."""
    base = config if config is not None else default_config(d)
    if base.d_pad < d:
        raise ConfigError(f"config d_pad={base.d_pad} cannot serve head dim d={d}")
    config = TileConfig(Br=base.Br if Br is None else Br, Bc=base.Bc if Bc is None else Bc,
                        d_pad=base.d_pad, num_warps=base.num_warps if num_warps is None else num_warps,
                        blocks_per_sm=base.blocks_per_sm)
    check_config(config)
    return config


def _flat(x, name):
    """A 1-D view of a C-contiguous device array (no copy)."""
    try:
        return x.reshape(x.size)
    except NotImplementedError as exc:     # numba: a reshape that would need a copy
        raise ValueError(f"{name} must be C-contiguous (the kernel reads it as a flat array)") from exc


def _check_like(name, x, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if np.dtype(x.dtype) != np.float32:
        raise TypeError(f"{name} must be float32, got {np.dtype(x.dtype)}")


@dataclass(frozen=True)
class Setup:
    """What a shape and the options fix for one backward: the main kernel, its grid, block and
    dynamic shared memory, its scalar arguments (all but dropout's p and seed, which vary per
    call), and the grids of the preprocess and the GQA head-group sums."""
    kernel: object
    grid: tuple
    threads: int
    nbytes: int
    before: tuple             # scale, windowed, lo, hi: between dV and p
    after: tuple              # steps, cap: between seed and the slopes
    rowsum_grid: tuple        # preprocess_zero_dq: D = rowsum(dO o O), dQ = 0
    group_sum_grid: int       # gqa.sum_head_groups over (B, Nk, Hkv, d)
    dq_floats: int            # dQ's floats and the d_pad spare floats after them (see the kernel)


def setup(B, Nq, Nk, H_q, H_kv, d, *, causal, alignment, softmax_scale, window_size, softcap,
          alibi, dropout, limit, Br=None, Bc=None, num_warps=None, config=None):
    """The Setup for q (B, Nq, H_q, d), k, v (B, Nk, H_kv, d) and these options, checked."""
    scale, windowed, lo, hi, steps = common.resolve_band(
        Nq, Nk, d, causal=causal, alignment=alignment, softmax_scale=softmax_scale,
        window_size=window_size, limit=limit)
    config = resolve_config(d, Br, Bc, num_warps, config)
    kernel = build(config, dropout=dropout, softcap=softcap > 0.0, alibi=alibi)
    Tc = geometry.num_tiles(Nk, config.Bc)
    n_kv = B * Nk * H_kv * d
    return Setup(kernel, (Tc, B * H_q), config.threads, smem_bytes(config),
                 (np.float32(scale), windowed, lo, hi), (steps, np.float32(softcap)),
                 (geometry.num_tiles(Nq, PRE_ROWS_PER_BLOCK), B * H_q),
                 geometry.num_tiles(n_kv, gqa.THREADS), B * Nq * H_q * d + config.d_pad)


def launcher(dout, q, k, v, out, L, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
             dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None, limit=None, config=None,
             window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Check and allocate once; returns (launch, dq, dk, dv) with device arrays dq, dk, dv.

    ``launch()`` runs everything again into the same arrays, allocating nothing:
    D = rowsum(dO * O) and dQ = 0 (one launch), the main kernel, and (GQA) the head-group sums of dK, dV. What the
    benchmark times. The inputs must stay alive. dropout_p > 0 launches the dropout variant
    of the main kernel (out must then be the dropped forward's output); p = 0 the plain one.
    """
    B, Nq, Nk, H_q, H_kv, d = common.check_qkv(q, k, v, bucket=fast_bucket)
    _check_like("dout", dout, q.shape)
    _check_like("out", out, q.shape)
    _check_like("L", L, (B, H_q, Nq))
    cap, slopes = common.resolve_features(softcap, alibi_slopes, B, H_q, alignment)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    plan = setup(B, Nq, Nk, H_q, H_kv, d, causal=causal, alignment=alignment,
                 softmax_scale=softmax_scale, window_size=window_size, softcap=cap,
                 alibi=alibi_slopes is not None, dropout=dropout_p > 0.0, limit=limit, Br=Br,
                 Bc=Bc, num_warps=num_warps, config=config)

    arrays = common.Arrays(dout, q, k, v, out, L)
    dout_d, q_d, k_d, v_d, out_d, L_d = (arrays.to_device(x) for x in (dout, q, k, v, out, L))
    D_rows = cuda.device_array((B, H_q, Nq), dtype=np.float32)
    n_q = B * Nq * H_q * d
    dq_spare = cuda.device_array(plan.dq_floats, dtype=np.float32)   # d_pad spare floats: see the kernel
    dq_flat = dq_spare[:n_q]
    dq = dq_flat.reshape(B, Nq, H_q, d)
    dk = cuda.device_array((B, Nk, H_kv, d), dtype=np.float32)
    dv = cuda.device_array((B, Nk, H_kv, d), dtype=np.float32)
    grouped = H_q != H_kv
    dk_heads = cuda.device_array((B, Nk, H_q, d), dtype=np.float32) if grouped else dk
    dv_heads = cuda.device_array((B, Nk, H_q, d), dtype=np.float32) if grouped else dv

    # D = rowsum(dO o O) and dQ = 0, the spare floats too: their atomics (adding 0) read them
    rowsum = preprocess_zero_dq[plan.rowsum_grid, PRE_THREADS]
    main = plan.kernel[plan.grid, plan.threads, 0, plan.nbytes]
    group_sum = gqa.sum_head_groups[plan.group_sum_grid, gqa.THREADS]
    q_flat, dout_flat = _flat(q_d, "q"), _flat(dout_d, "dout")
    args = (q_flat, k_d, v_d, dout_flat, L_d, D_rows, dq_spare, dk_heads, dv_heads, *plan.before,
            dropout_p, seed, *plan.after, slopes)
    smem_limit.raise_dynamic_limit(plan.kernel, args, plan.nbytes)   # above 48 KB the driver must allow it

    def launch():
        rowsum(dout_d, out_d, D_rows, dq_spare)
        main(*args)
        if grouped:
            group_sum(dk_heads, dk)
            group_sum(dv_heads, dv)

    return launch, dq, dk, dv


_fast = {}    # (shapes, device, options) -> (Setup, its three prepared launches, slopes placeholder)


def fast_takes(dtype, d):
    """True where ``fast_backward`` serves a call: float32 inputs (16-bit ones are widened first)."""
    return dtype == "float32"


def fast_backward(dout, q, k, v, out, L, *, causal=False, alignment=BOTTOM_RIGHT,
                  softmax_scale=None, dropout_p=0.0, seed=0, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None):
    """(dq, dk, dv) as new torch CUDA tensors: ``fa2_fast_backward`` without numba's per-call work.

    All six: torch CUDA tensors, float32, C-contiguous, on numba's current GPU, shapes checked
    (``attention.backward`` checks all that first). The Setup and the prepared launches
    (``launch.prepared``) are made once per shape and options. A call allocates with torch and
    launches what ``launcher``'s ``launch()`` does, with the same arguments: bitwise the same
    results. dropout_p and seed as ``common.resolve_dropout`` takes them, already checked (the
    public call's ``Call``).
    """
    B, Nq, H_q, d = q.shape
    Nk, H_kv = k.shape[1], k.shape[2]
    key = (q.shape, k.shape, q.get_device(), causal, alignment, softmax_scale, dropout_p > 0.0,
           tuple(window_size), softcap, alibi_slopes is None)
    cached = _fast.get(key)
    if cached is None:
        fast_bucket(d)
        plan = setup(B, Nq, Nk, H_q, H_kv, d, causal=causal, alignment=alignment,
                     softmax_scale=softmax_scale, window_size=window_size,
                     softcap=common.resolve_features_host(softcap, None, B, H_q, alignment)[0],
                     alibi=alibi_slopes is not None, dropout=dropout_p > 0.0, limit=None)
        device = q.device.index
        a4 = types.Array(types.float32, 4, "C")
        a3 = types.Array(types.float32, 3, "C")
        a1 = types.Array(types.float32, 1, "C")
        rowsum = prepared(preprocess_zero_dq, (a4, a4, a3, a1), plan.rowsum_grid, PRE_THREADS,
                          device=device)
        main = prepared(plan.kernel, argtypes(), plan.grid, plan.threads, plan.nbytes, device=device)
        group_sum = (prepared(gqa.sum_head_groups, (a4, a4), plan.group_sum_grid, gqa.THREADS,
                              device=device) if H_q != H_kv else None)
        cached = _fast[key] = (plan, rowsum, main, group_sum, q.new_empty((1, 1)))   # placeholder slopes
    plan, rowsum, main, group_sum, placeholder = cached
    slopes = fast_slopes(q, placeholder, softcap=softcap, alibi_slopes=alibi_slopes, alignment=alignment)
    D_rows = q.new_empty((B, H_q, Nq))
    # dQ and its spare floats: zeroed by preprocess_zero_dq (their atomics, adding 0, read them)
    dq_spare = q.new_empty(plan.dq_floats)
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    grouped = group_sum is not None
    dk_heads = q.new_empty((B, Nk, H_q, d)) if grouped else dk
    dv_heads = q.new_empty((B, Nk, H_q, d)) if grouped else dv
    rowsum(dout, out, D_rows, dq_spare)
    # q and dout to the kernel's 1-D parameters as they are: a launch reads them as flat views
    main(q, k, v, dout, L, D_rows, dq_spare, dk_heads, dv_heads, *plan.before, dropout_p, seed,
         *plan.after, slopes)
    if grouped:
        group_sum(dk_heads, dk)
        group_sum(dv_heads, dv)
    return dq_spare.as_strided((B, Nq, H_q, d), (Nq * H_q * d, H_q * d, d, 1)), dk, dv


def fa2_fast_backward(dout, q, k, v, out, L, *, causal=False, alignment=BOTTOM_RIGHT,
                      softmax_scale=None, dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None,
                      limit=None, config=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """FlashAttention-2 backward, register-tiled. Returns (dq, dk, dv) shaped like q, k, v.

    dout, out (B, Nq, Hq, d) and L (B, Hq, Nq, natural-log logsumexp) come from the forward,
    run with the same causal, alignment, softmax_scale, dropout_p and seed (out is the dropped
    output; L the undropped softmax's, as the forward writes it).
    NumPy in, NumPy out; device arrays in, device arrays out (no copies).
    """
    launch, dq, dk, dv = launcher(dout, q, k, v, out, L, causal=causal, alignment=alignment,
                                  softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed,
                                  Br=Br, Bc=Bc, num_warps=num_warps, limit=limit, config=config,
                                  window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    launch()
    arrays = common.Arrays(dout, q, k, v, out, L)
    return arrays.result(dq), arrays.result(dk), arrays.result(dv)


# ---------------------------------------------------------------------------
# The registry's entry point (flashnumba.registry)
# ---------------------------------------------------------------------------

def backward(dout, q, k, v, out, L, deterministic=False, **options):
    """(dq, dk, dv). Not deterministic (dQ by atomics): the registry sends deterministic=True
    to the version named by its ``deterministic_backward``."""
    if deterministic:
        raise ValueError("fa2_fast_backward adds dQ with atomics; deterministic=True runs "
                         "fa2_backward (registry: deterministic_backward)")
    return fa2_fast_backward(dout, q, k, v, out, L, **options)
