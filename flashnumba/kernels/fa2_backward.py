"""FlashAttention-2 backward (Dao 2023, Algorithm 2): K/V tiles outside, warps split the rows of Q_i.

Three kernels, launched in this order by ``fa2_backward`` (after ``zero_fill``
clears dQ for the atomics):

1. ``preprocess``, grid (ceil(Nq / 16), B * Hq):  D_i = rowsum(dO_i * O_i).
   A warp reduces 4 rows at once, 8 lanes per row (a 32-byte sector of each
   row per step); each lane sums every 8th element of its row, then a 3-step
   ``shfl_xor_sync`` butterfly (offsets 4, 2, 1) adds the 8 lanes' partial sums.

2. ``dkdv``, grid (Tc, B * Hq): one block per K/V tile j.

       K_j, V_j -> shared; dK_j = dV_j = 0 in registers
       for i from q_tile_start(j) (0 without causal) to Tr - 1:
           Q_i, dO_i -> shared; L_i, D_i read per row
           phase A (warp w owns rows [w Br/num_warps, (w+1) Br/num_warps), lane owns columns c = lane + 32 t):
               Z_ij  = keep / (1 - p)                dropout only (p > 0): Philox keep bits, else Z_ij = 1
               S_ij  = scale Q_i K_j^T
               P_ij  = exp(S_ij - L_i)               0 where masked (c > r + offset) or where the row saw no key (L_i = -inf)
               dP_ij = dO_i V_j^T
               dS_ij = P_ij * (dP_ij o Z_ij - D_i)   -> P_ij o Z_ij, dS_ij to shared
           phase B (warp w owns key rows [w Bc/num_warps, ...), lane owns dims x = lane + 32 u):
               dV_j += (P_ij o Z_ij)^T dO_i
               dK_j += dS_ij^T Q_i                   (times scale once, at the end)
               dQ_i += scale dS_ij K_j               cuda.atomic.add into global dQ (float32)
       write dK_j, dV_j

   D_i = rowsum(dO_i * O_i) is unchanged by dropout: O is the dropped output,
   so rowsum(dO_i o O_i) = rowsum(P_ij o (dP_ij o Z_ij)) over j, as dS needs.

3. ``dq`` (only with ``deterministic=True``), grid (Tr, B * Hq): one block per
   Q tile i loops over j, recomputes phase A, and accumulates
   dQ_i += scale dS_ij K_j on chip in a fixed order, then writes it once. The
   ``dkdv`` kernel then skips its atomics. Repeated runs give bitwise-identical
   dQ (atomics add in whatever order the blocks arrive; this does not).

Where shuffles are used and where shared memory is, honestly: shuffles only in
``preprocess`` (the row sums of dO * O, a reduction across the lanes of one
row). The main kernels need none: in phase A each lane computes whole dot
products over d for its own (row, column) entries, and the reductions of
phase B (over the rows of Q_i for dK_j and dV_j, over the columns of K_j for
dQ_i) are over data that *other warps* produced, so they go through shared
memory (P_ij, dS_ij) after a block barrier, each thread summing in registers.

Lane mappings and banks: K_j and V_j are stored with an odd row stride
(32 ceil(d_pad/32) + 1) so the 32 lanes of phase A, each reading a different row
c, hit 32 different banks; Q_i and dO_i are read in phase A as broadcasts
(one row per warp) and in phase B as 32 consecutive words.

Causal alignment: offset = Nk - Nq (bottom-right, the default) or 0 (top-left,
PyTorch's), computed by the wrapper (``common.resolve_offset``) and passed in;
q_tile_start and kv_tile_end skip the tiles past either diagonal.

Dropout: the keep bit of element (r, c) of query head h, batch b is
``philox.keep(seed, b, h, r, c, p)``, the same bit the forward used, regenerated
(never stored); ``dkdv`` and ``dq`` each regenerate it for the tiles they visit.
The bits are drawn in a loop of their own and parked in dS_ij (phase A then
overwrites each entry): drawn inside phase A's main loop, the Philox code kept
the compiler from holding S_ij, dP_ij in registers (they went to local memory).
With p = 0 no Philox code runs.

Head dim: compiled for d_pad = head_dim_bucket(d); tiles are zero-padded in shared
memory from d to d_pad (to a multiple of 32 where lanes own dims), and only x < d
is written. GQA: dK, dV are written per *query* head into (B, Nk, Hq, d)
scratch and summed over each group by ``gqa.reduce_groups``.

``limit``: each ``dkdv`` block stops after ``limit`` iterations of its i loop
and writes its dK_j, dV_j; dQ holds what was added so far (the ``dq`` kernel,
when deterministic, adds exactly the same (i, j) pairs).

What bounds it: like the forward, shared-memory loads (about one per FMA in
phase A). ``deterministic=True`` is slower still, because the ``dq`` kernel
recomputes S_ij, P_ij, dP_ij and dS_ij. Dropout costs each element one full
Philox4x32-10, in ``dkdv`` and again in ``dq``. Measured speeds: PERF-NOTES.md.
"""

import collections
import functools
import math

import numpy as np
from numba import cuda, float32, types

from flashnumba.geometry import BOTTOM_RIGHT, num_tiles
from flashnumba.kernels import common, gqa
from flashnumba.kernels.common import (
    HEAD_DIM_BUCKETS,
    TileConfig,
    require,
)
from flashnumba.kernels.geometry import kv_tile_end, q_tile_start
from flashnumba.kernels.hardware import FLOAT_BYTES, MAX_REGISTER_TILE, WARP_SIZE
from flashnumba.kernels.philox import keep
from flashnumba.kernels.preprocess import PRE_ROWS_PER_BLOCK, PRE_THREADS, preprocess, zero_fill

# Default tiles per head-dim bucket: (Br, Bc, num_warps). All fit in 48 KB of
# static shared memory (see smem_bytes) and keep their register arrays in
# registers on sm_80/sm_90. Picked on a GPU among the configurations that fit
# (PERF-NOTES.md, "Figures moved from the code").
_DEFAULTS = {
    16: (32, 64, 4),
    32: (32, 64, 4),
    64: (32, 32, 4),
    96: (16, 32, 4),
    128: (8, 32, 4),
}

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it

def _sizes(config):
    """rows of Q_i per warp, key rows per warp, score columns per lane, dims per lane."""
    rows_per_warp = config.Br // config.num_warps
    keys_per_warp = config.Bc // config.num_warps
    cols_per_lane = config.Bc // WARP_SIZE
    dims_per_lane = (config.d_pad + WARP_SIZE - 1) // WARP_SIZE
    return rows_per_warp, keys_per_warp, cols_per_lane, dims_per_lane


def default_config(d):
    """The shipped tile configuration for head dim d (served by its bucket d_pad)."""
    d_pad = common.head_dim_bucket(d)
    Br, Bc, num_warps = _DEFAULTS[d_pad]
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps)


def shipped_configs():
    """The default configuration of every head-dim bucket."""
    return [default_config(d_pad) for d_pad in HEAD_DIM_BUCKETS]


def smem_bytes(config):
    """Static shared memory per block of ``dkdv``, the largest of this module's kernels:
    K_j, V_j (Bc x ROW_WIDTH+1 each), Q_i, dO_i (Br x ROW_WIDTH each), P_ij, dS_ij (Br x Bc each), ROW_WIDTH = 32 ceil(d_pad/32).

    ``dq`` declares the same arrays, but only writes P_ij, so the compiler drops it
    (Br x Bc floats less); ``preprocess`` and ``zero_fill`` use none."""
    _, _, _, dims_per_lane = _sizes(config)
    ROW_WIDTH = dims_per_lane * WARP_SIZE
    Br, Bc = config.Br, config.Bc
    floats = 2 * Bc * (ROW_WIDTH + 1) + 2 * Br * ROW_WIDTH + 2 * Br * Bc
    return floats * FLOAT_BYTES


def check_config(config):
    """Raise ConfigError unless the configuration can compile and launch."""
    common.check_sizes(config, NAME)
    Br, Bc, d_pad, num_warps = config.Br, config.Bc, config.d_pad, config.num_warps
    require(Br % num_warps == 0,
            f"Br={Br} must be a multiple of num_warps={num_warps}: each warp owns Br/num_warps rows of Q_i")
    require(Bc % WARP_SIZE == 0,
            f"Bc={Bc} must be a multiple of {WARP_SIZE}: each lane owns Bc/32 score columns")
    require(Bc % num_warps == 0,
            f"Bc={Bc} must be a multiple of num_warps={num_warps}: each warp owns Bc/num_warps rows of dK_j, dV_j")
    common.check_smem(config, smem_bytes(config), NAME)
    rows_per_warp, keys_per_warp, cols_per_lane, dims_per_lane = _sizes(config)
    registers = max(2 * rows_per_warp * cols_per_lane,                  # S_ij, dP_ij
                    2 * keys_per_warp * dims_per_lane + rows_per_warp * dims_per_lane)  # dK_j, dV_j, dQ_i
    require(registers <= MAX_REGISTER_TILE,
            f"Br={Br}, Bc={Bc}, d_pad={d_pad}, num_warps={num_warps} holds {registers} floats per thread "
            f"in register arrays (> {MAX_REGISTER_TILE}, would spill); use more warps or smaller tiles")


# ---------------------------------------------------------------------------
# Kernels 2 and 3: dK_j, dV_j (+ dQ by atomics), and the deterministic dQ_i
# ---------------------------------------------------------------------------

Fa2BackwardKernels = collections.namedtuple("Fa2BackwardKernels", "preprocess dkdv dq")


@functools.cache
def build(config, dropout=False):
    """Compile-time sizes baked in as plain Python ints; returns Fa2BackwardKernels(preprocess, dkdv, dq)."""
    check_config(config)
    DROPOUT = bool(dropout)          # compile time: the kernel without dropout has no Philox code
    Br, Bc, d_pad, num_warps = int(config.Br), int(config.Bc), int(config.d_pad), int(config.num_warps)
    THREADS = num_warps * WARP_SIZE
    ROWS_PER_WARP, KEYS_PER_WARP, COLS_PER_LANE, DIMS_PER_LANE = _sizes(config)
    ROW_WIDTH = DIMS_PER_LANE * WARP_SIZE          # tile width in shared memory: d_pad, padded to whole lanes
    KV_STRIDE = ROW_WIDTH + 1                      # odd row stride: 32 lanes reading 32 rows hit 32 banks

    @cuda.jit(device=True)
    def load_rows(dst, src, b, h, start, n_rows, N, d):
        """dst[r, x] = src[b, start + r, h, x], zero past N and past d (all threads take part)."""
        for idx in range(cuda.threadIdx.x, n_rows * ROW_WIDTH, THREADS):
            r = idx // ROW_WIDTH
            x = idx % ROW_WIDTH
            if start + r < N and x < d:
                dst[r, x] = src[b, start + r, h, x]
            else:
                dst[r, x] = 0.0

    @cuda.jit(device=True)
    def probabilities_and_dS(Q_i, dO_i, K_j, V_j, P_ij, dS_ij, L, D_rows,
                             b, h, i, j, r0, lane, Nq, Nk, offset, causal, scale,
                             dropout_p, seed):
        """Phase A for this warp's rows [r0, r0 + ROWS_PER_WARP) and this lane's columns:
        P_ij = exp(scale Q_i K_j^T - L_i), dS_ij = P_ij * (dO_i V_j^T o Z_ij - D_i), and
        P_ij o Z_ij (what dV_j needs) written to shared; Z_ij = 1 without dropout."""
        # dropout: Z_ij = 1/(1-p) where kept, 0 where dropped, parked in this lane's entries of
        # dS_ij until the last loop below reads each back and overwrites it (same lane: no
        # barrier). A loop of its own, on shared memory only: inside the loops below the Philox
        # code would keep the compiler from holding S and dP in registers.
        if DROPOUT:
            Z_kept = float32(1.0 / (1.0 - dropout_p))
            for rr in range(ROWS_PER_WARP):
                row = i * Br + r0 + rr
                for t in range(COLS_PER_LANE):
                    c = lane + WARP_SIZE * t
                    if keep(seed, b, h, row, j * Bc + c, dropout_p):
                        dS_ij[r0 + rr, c] = Z_kept
                    else:
                        dS_ij[r0 + rr, c] = 0.0
        S = cuda.local.array((ROWS_PER_WARP, COLS_PER_LANE), float32)
        dP = cuda.local.array((ROWS_PER_WARP, COLS_PER_LANE), float32)
        for rr in range(ROWS_PER_WARP):
            for t in range(COLS_PER_LANE):
                S[rr, t] = 0.0
                dP[rr, t] = 0.0
        # S = Q_i K_j^T, dP = dO_i V_j^T: Q_i, dO_i broadcast; K_j, V_j one row per lane
        for x in range(d_pad):
            for rr in range(ROWS_PER_WARP):
                q_rk = Q_i[r0 + rr, x]
                do_rk = dO_i[r0 + rr, x]
                for t in range(COLS_PER_LANE):
                    c = lane + WARP_SIZE * t
                    S[rr, t] += q_rk * K_j[c, x]
                    dP[rr, t] += do_rk * V_j[c, x]
        for rr in range(ROWS_PER_WARP):
            row = i * Br + r0 + rr
            L_r = float32(-math.inf)
            D_r = float32(0.0)
            if row < Nq:
                L_r = L[b, h, row]
                D_r = D_rows[b, h, row]
            for t in range(COLS_PER_LANE):
                c = lane + WARP_SIZE * t
                col = j * Bc + c
                p = float32(0.0)
                visible = row < Nq and col < Nk and not (causal and col > row + offset)
                if visible and L_r != -math.inf:      # L_r = -inf: the row saw no key, P = 0
                    p = math.exp(scale * S[rr, t] - L_r)        # P_ij = exp(S_ij - L_i)
                z = float32(1.0)                                # Z_ij: 1 without dropout
                if DROPOUT:
                    z = dS_ij[r0 + rr, c]                       # Z_ij, parked above
                P_ij[r0 + rr, c] = p * z                         # P_ij o Z_ij: all dV_j needs
                ds = float32(0.0)                                # a hidden key: exactly 0, even if D_i is NaN
                if visible:
                    ds = p * (dP[rr, t] * z - D_r)               # dS_ij = P_ij (dP_ij o Z_ij - D_i)
                dS_ij[r0 + rr, c] = ds

    @cuda.jit
    def dkdv(q, k, v, dout, L, D_rows, dq, dk, dv, scale, causal, offset, dropout_p, seed,
             accumulate_dq, limit):
        # --- sizes ---
        _, Nq, H_q, d = q.shape
        Nk = k.shape[1]
        H_kv = k.shape[2]
        Tr = (Nq + Br - 1) // Br

        # --- who am I ---
        j = cuda.blockIdx.x                   # K/V tile
        b = cuda.blockIdx.y // H_q
        h = cuda.blockIdx.y % H_q
        h_kv = h // (H_q // H_kv)             # grouped-query attention: this head's K/V head
        tid = cuda.threadIdx.x
        warp = tid // WARP_SIZE
        lane = tid % WARP_SIZE
        r0 = warp * ROWS_PER_WARP             # phase A: this warp's rows of Q_i
        c0 = warp * KEYS_PER_WARP             # phase B: this warp's rows of dK_j, dV_j

        # --- shared memory (each array on its own line) ---
        K_j = cuda.shared.array((Bc, KV_STRIDE), float32)
        V_j = cuda.shared.array((Bc, KV_STRIDE), float32)
        Q_i = cuda.shared.array((Br, ROW_WIDTH), float32)
        dO_i = cuda.shared.array((Br, ROW_WIDTH), float32)
        P_ij = cuda.shared.array((Br, Bc), float32)
        dS_ij = cuda.shared.array((Br, Bc), float32)

        # --- registers: dK_j, dV_j rows [c0, c0 + KEYS_PER_WARP), dims lane + 32 u ---
        dK_j = cuda.local.array((KEYS_PER_WARP, DIMS_PER_LANE), float32)
        dV_j = cuda.local.array((KEYS_PER_WARP, DIMS_PER_LANE), float32)
        dQ_i = cuda.local.array((ROWS_PER_WARP, DIMS_PER_LANE), float32)
        for cc in range(KEYS_PER_WARP):
            for u in range(DIMS_PER_LANE):
                dK_j[cc, u] = 0.0
                dV_j[cc, u] = 0.0

        load_rows(K_j, k, b, h_kv, j * Bc, Bc, Nk, d)
        load_rows(V_j, v, b, h_kv, j * Bc, Bc, Nk, d)

        i_start = 0
        if causal:
            i_start = q_tile_start(j, Br, Bc, Nq, offset)   # Q tiles above the diagonal are skipped
        i_end = min(Tr, i_start + limit)

        for i in range(i_start, i_end):
            load_rows(Q_i, q, b, h, i * Br, Br, Nq, d)
            load_rows(dO_i, dout, b, h, i * Br, Br, Nq, d)
            cuda.syncthreads()  # Q_i, dO_i (and K_j, V_j on the first pass) written before any warp reads them

            # phase A: P_ij, dS_ij for this warp's rows
            probabilities_and_dS(Q_i, dO_i, K_j, V_j, P_ij, dS_ij, L, D_rows,
                                 b, h, i, j, r0, lane, Nq, Nk, offset, causal, scale,
                                 dropout_p, seed)
            cuda.syncthreads()  # every warp's rows of P_ij, dS_ij written before phase B reads whole columns

            # phase B: dV_j += P_ij^T dO_i, dK_j += dS_ij^T Q_i over the valid rows of Q_i
            n_rows = min(Br, Nq - i * Br)
            for r in range(n_rows):
                for cc in range(KEYS_PER_WARP):
                    p = P_ij[r, c0 + cc]              # broadcast: one address for the warp
                    ds = dS_ij[r, c0 + cc]
                    for u in range(DIMS_PER_LANE):
                        x = lane + WARP_SIZE * u
                        dV_j[cc, u] += p * dO_i[r, x]
                        dK_j[cc, u] += ds * Q_i[r, x]

            # dQ_i += scale dS_ij K_j for this warp's rows, added into global dQ
            if accumulate_dq:
                for rr in range(ROWS_PER_WARP):
                    for u in range(DIMS_PER_LANE):
                        dQ_i[rr, u] = 0.0
                for c in range(Bc):
                    for rr in range(ROWS_PER_WARP):
                        ds = dS_ij[r0 + rr, c]
                        for u in range(DIMS_PER_LANE):
                            dQ_i[rr, u] += ds * K_j[c, lane + WARP_SIZE * u]
                for rr in range(ROWS_PER_WARP):
                    row = i * Br + r0 + rr
                    for u in range(DIMS_PER_LANE):
                        x = lane + WARP_SIZE * u
                        if row < Nq and x < d:
                            cuda.atomic.add(dq, (b, row, h, x), scale * dQ_i[rr, u])
            cuda.syncthreads()  # every warp done reading Q_i, dO_i, P_ij, dS_ij before the next Q tile overwrites them

        # dK_j = scale dS^T Q summed over i, dV_j = P^T dO summed over i; per query head
        for cc in range(KEYS_PER_WARP):
            col = j * Bc + c0 + cc
            for u in range(DIMS_PER_LANE):
                x = lane + WARP_SIZE * u
                if col < Nk and x < d:
                    dk[b, col, h, x] = scale * dK_j[cc, u]
                    dv[b, col, h, x] = dV_j[cc, u]

    @cuda.jit
    def dq_kernel(q, k, v, dout, L, D_rows, dq, scale, causal, offset, dropout_p, seed, limit):
        # --- sizes ---
        _, Nq, H_q, d = q.shape
        Nk = k.shape[1]
        H_kv = k.shape[2]
        Tc = (Nk + Bc - 1) // Bc

        # --- who am I ---
        i = cuda.blockIdx.x                   # Q tile
        b = cuda.blockIdx.y // H_q
        h = cuda.blockIdx.y % H_q
        h_kv = h // (H_q // H_kv)
        tid = cuda.threadIdx.x
        warp = tid // WARP_SIZE
        lane = tid % WARP_SIZE
        r0 = warp * ROWS_PER_WARP

        # --- shared memory (each array on its own line; the same arrays as dkdv) ---
        K_j = cuda.shared.array((Bc, KV_STRIDE), float32)
        V_j = cuda.shared.array((Bc, KV_STRIDE), float32)
        Q_i = cuda.shared.array((Br, ROW_WIDTH), float32)
        dO_i = cuda.shared.array((Br, ROW_WIDTH), float32)
        P_ij = cuda.shared.array((Br, Bc), float32)
        dS_ij = cuda.shared.array((Br, Bc), float32)

        # --- registers: dQ_i rows [r0, r0 + ROWS_PER_WARP), dims lane + 32 u ---
        dQ_i = cuda.local.array((ROWS_PER_WARP, DIMS_PER_LANE), float32)
        for rr in range(ROWS_PER_WARP):
            for u in range(DIMS_PER_LANE):
                dQ_i[rr, u] = 0.0

        load_rows(Q_i, q, b, h, i * Br, Br, Nq, d)
        load_rows(dO_i, dout, b, h, i * Br, Br, Nq, d)

        n_tiles = Tc
        if causal:
            n_tiles = kv_tile_end(i, Br, Bc, Nq, Nk, offset)   # tiles past the diagonal are skipped
        for j in range(n_tiles):
            # with a step limit, add exactly the (i, j) pairs the dkdv block of tile j visited
            i_start = 0
            if causal:
                i_start = q_tile_start(j, Br, Bc, Nq, offset)
            if i - i_start < limit:           # the same for the whole block: barriers stay uniform
                load_rows(K_j, k, b, h_kv, j * Bc, Bc, Nk, d)
                load_rows(V_j, v, b, h_kv, j * Bc, Bc, Nk, d)
                cuda.syncthreads()  # K_j, V_j (and Q_i, dO_i on the first pass) written before any warp reads them

                probabilities_and_dS(Q_i, dO_i, K_j, V_j, P_ij, dS_ij, L, D_rows,
                                     b, h, i, j, r0, lane, Nq, Nk, offset, causal, scale,
                                 dropout_p, seed)
                cuda.syncwarp()  # this warp's rows of dS_ij written by all its lanes before any lane reads a whole row

                # dQ_i += dS_ij K_j, in the order j = 0, 1, ...: deterministic
                for c in range(Bc):
                    for rr in range(ROWS_PER_WARP):
                        ds = dS_ij[r0 + rr, c]
                        for u in range(DIMS_PER_LANE):
                            dQ_i[rr, u] += ds * K_j[c, lane + WARP_SIZE * u]
                cuda.syncthreads()  # every warp done reading K_j, V_j before the next tile overwrites them

        for rr in range(ROWS_PER_WARP):
            row = i * Br + r0 + rr
            for u in range(DIMS_PER_LANE):
                x = lane + WARP_SIZE * u
                if row < Nq and x < d:
                    dq[b, row, h, x] = scale * dQ_i[rr, u]

    return Fa2BackwardKernels(preprocess=preprocess, dkdv=dkdv, dq=dq_kernel)


def compile_targets(config):
    """[(label, dispatcher, argtypes)] for cuda.compile_ptx, argument types as fa2_backward launches them."""
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    dkdv_types = (a4, a4, a4, a4, a3, a3, a4, a4, a4, types.float32, types.boolean,
                  types.int64, types.float64, types.uint64, types.boolean, types.int64)
    dq_types = (a4, a4, a4, a4, a3, a3, a4, types.float32, types.boolean,
                types.int64, types.float64, types.uint64, types.int64)
    plain, dropout = build(config), build(config, dropout=True)
    return [
        ("fa2_backward_zero_fill", zero_fill, (a4,)),
        ("fa2_backward_preprocess", plain.preprocess, (a4, a4, a3)),
        ("fa2_backward_dkdv", plain.dkdv, dkdv_types),
        ("fa2_backward_dq", plain.dq, dq_types),
        ("fa2_backward_dkdv_dropout", dropout.dkdv, dkdv_types),
        ("fa2_backward_dq_dropout", dropout.dq, dq_types),
    ]


# ---------------------------------------------------------------------------
# Wrappers: check, allocate, launch
# ---------------------------------------------------------------------------

def _check_like(name, x, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if np.dtype(x.dtype) != np.float32:
        raise TypeError(f"{name} must be float32, got {np.dtype(x.dtype)}")


def fa2_backward_preprocess(dout, out):
    """D (B, Hq, Nq) with D_i = rowsum(dO_i * O_i); dout, out (B, Nq, Hq, d) float32."""
    _check_like("dout", dout, out.shape)
    _check_like("out", out, dout.shape)
    B, Nq, H_q, _ = out.shape
    arrays = common.Arrays(dout, out)
    D_rows = arrays.empty((B, H_q, Nq))
    grid = (num_tiles(Nq, PRE_ROWS_PER_BLOCK), B * H_q)
    preprocess[grid, PRE_THREADS](arrays.to_device(dout), arrays.to_device(out), D_rows)
    return arrays.result(D_rows)


def fa2_backward(dout, q, k, v, out, L, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                 dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None, deterministic=False,
                 limit=None):
    """FlashAttention-2 backward. Returns (dq, dk, dv) shaped like q, k, v.

    dout, out (B, Nq, Hq, d) and L (B, Hq, Nq) come from the forward pass, run with
    the same causal, alignment, softmax_scale, dropout_p and seed: the backward
    regenerates the forward's dropout mask from (seed, p).
    deterministic=True computes dQ in a separate kernel without atomics.
    """
    B, Nq, Nk, H_q, H_kv, d = common.check_qkv(q, k, v)
    _check_like("dout", dout, q.shape)
    _check_like("out", out, q.shape)
    _check_like("L", L, (B, H_q, Nq))
    scale = common.resolve_scale(softmax_scale, d)
    offset = common.resolve_offset(causal, alignment, Nq, Nk)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    steps = common.resolve_limit(limit)
    config = common.resolve_config(d, Br, Bc, num_warps, defaults=default_config, check=check_config)
    kernels = build(config, dropout=dropout_p > 0.0)

    arrays = common.Arrays(dout, q, k, v, out, L)
    dout_d, q_d, k_d, v_d = (arrays.to_device(x) for x in (dout, q, k, v))
    out_d, L_d = arrays.to_device(out), arrays.to_device(L)
    D_rows = cuda.device_array((B, H_q, Nq), dtype=np.float32)
    dq = arrays.empty(q.shape)
    dk_per_head = cuda.device_array((B, Nk, H_q, d), dtype=np.float32)
    dv_per_head = cuda.device_array((B, Nk, H_q, d), dtype=np.float32)

    if not deterministic:
        zero_fill[(dq.size + PRE_THREADS - 1) // PRE_THREADS, PRE_THREADS](dq)
    pre_grid = (num_tiles(Nq, PRE_ROWS_PER_BLOCK), B * H_q)
    kernels.preprocess[pre_grid, PRE_THREADS](dout_d, out_d, D_rows)
    Tr = (Nq + config.Br - 1) // config.Br
    Tc = (Nk + config.Bc - 1) // config.Bc
    scale32, causal = np.float32(scale), bool(causal)
    kernels.dkdv[(Tc, B * H_q), config.threads](q_d, k_d, v_d, dout_d, L_d, D_rows, dq,
                                                  dk_per_head, dv_per_head, scale32, causal,
                                                  offset, dropout_p, seed, not deterministic, steps)
    if deterministic:
        kernels.dq[(Tr, B * H_q), config.threads](q_d, k_d, v_d, dout_d, L_d, D_rows, dq,
                                                    scale32, causal, offset, dropout_p, seed, steps)

    dk = gqa.reduce_groups(dk_per_head, H_kv)
    dv = gqa.reduce_groups(dv_per_head, H_kv)
    return arrays.result(dq), arrays.result(dk), arrays.result(dv)


# ---------------------------------------------------------------------------
# The registry's entry point (flashnumba.registry)
# ---------------------------------------------------------------------------

def backward(dout, q, k, v, out, L, deterministic=False, **options):
    """(dq, dk, dv); deterministic=True: dQ in a separate pass, bitwise reproducible."""
    return fa2_backward(dout, q, k, v, out, L, deterministic=deterministic, **options)
