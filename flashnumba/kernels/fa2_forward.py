"""FlashAttention-2 forward (Dao 2023, Algorithm 1): warps split the rows of Q_i.

One thread block per (Q tile i, batch b, head h); grid (Tr, B * Hq).

    for each Q tile i (one block):                    Q_i -> shared, once
        m_i = -inf, l_i = 0, O_i = 0                  registers
        for j < kv_tile_end(i) (all Tc without causal):
            K_j, V_j -> shared (all threads load, all warps read)
            S_ij  = scale Q_i K_j^T                   masked: -inf where c >= Nk or c > r + offset
            m_new = max(m_i, rowmax(S_ij))            warp shuffle butterfly over 32 lanes
            P~_ij = exp(S_ij - m_new)
            l_i   = exp(m_i - m_new) l_i + rowsum(P~_ij)   warp shuffle butterfly (undropped P~_ij)
            P~_ij = P~_ij o Z_ij                      dropout: Z_ij = keep / (1 - p), only with p > 0
            O_i   = exp(m_i - m_new) O_i + P~_ij V_j  O_i unnormalised, on chip
            m_i   = m_new
        O_i = O_i / l_i,  L_i = m_i + log(l_i)        deferred normalisation, once

Causal alignment: the wrapper passes offset = Nk - Nq (bottom-right, flash-attn's,
the default) or 0 (top-left, PyTorch's ``is_causal``), from ``common.resolve_offset``;
key c is visible to query r when c <= r + offset, and kv_tile_end(i) skips the
tiles past that diagonal for either alignment.

Dropout (FA1 paper, Algorithm 2): element (r, c) of query head h, batch b is kept
when ``philox.keep(seed, b, h, r, c, p)``, the Philox4x32-10 bit the reference's
mask (``flashnumba.philox.keep_mask``) is made of, regenerated here on chip, never
stored. The statistics m_i, l_i and L_i are those of the undropped softmax; only
the P~_ij that multiplies V_j is dropped. With p = 0 the kernel never calls Philox.

Split-Q (FA2 section 3.3): the Br rows of Q_i are dealt to the block's warps,
rows_per_warp = Br / num_warps each. A row never leaves its warp, so the
softmax statistics of a row are reduced with warp shuffles (no shared memory,
no block barrier), and the warps never exchange partial results. K_j and V_j
are loaded once per block and read by every warp.

Inside a warp, for each of its rows r, lane L owns

    score columns   c = L + 32 t,  t < Bc / 32         (S_ij, P~_ij in registers)
    output dims     x = L + 32 u,  u < ceil(d_pad / 32)    (O_i in registers)

S_ij[r, c] is a dot product over x of Q_i[r, :] (shared, the same address for
all lanes: a broadcast) and K_j[c, :] (shared, row stride d_pad + 1 so that the 32
lanes reading 32 different rows hit 32 different banks). O_i[r, x] needs
P~_ij[r, c] for every c, but each lane holds only its own columns, so the warp
writes its rows of P~_ij to its own region of shared memory, waits for its
lanes (``syncwarp``), and reads them back as broadcasts.

Where shuffles are used and where shared memory is: the row max and the row
sum (10 ``shfl_xor_sync`` per row per K/V tile) go through shuffles; the row
of P~_ij each lane needs for P~_ij V_j goes through shared memory.

Head dim: compiled for d_pad = head_dim_bucket(d); Q_i, K_j, V_j are zero-padded in
shared memory from d to d_pad (V_j to a multiple of 32, so every lane owns a whole
number of output dims), and only x < d is written out.

``limit``: every block stops after ``limit`` iterations of its j loop and then
finishes as usual (divides by l_i, writes O, L, m, l): the state after k steps.
m and l (B, Hq, Nq) are always written, so the running state is readable.

What bounds it: shared-memory loads, not arithmetic: a lane owns only Bc/32
columns of a row, so each broadcast Q_i[r, x] or P~_ij[r, c] serves one or two
FMAs (its measured speed, several times below the fast version's, is in
PERF-NOTES.md and figures/bench/readable). Dropout is not tuned: each lane calls one full Philox4x32-10 per
score it owns and keeps one of the four words it makes (its columns are 32
apart, so the other three belong to other lanes).
"""

import functools
import math

import numpy as np
from numba import cuda, float32, types

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.kernels import common
from flashnumba.kernels.common import HEAD_DIM_BUCKETS, TileConfig, require
from flashnumba.kernels.geometry import kv_tile_end
from flashnumba.kernels.hardware import FLOAT_BYTES, FULL_MASK, MAX_REGISTER_TILE, WARP_SIZE
from flashnumba.kernels.philox import keep

# Default tiles per head-dim bucket: (Br, Bc, num_warps). All fit in 48 KB of
# static shared memory (see smem_bytes) and keep their register arrays in
# registers on sm_80/sm_90 (no stack frame, no spill). Picked on a GPU among the
# configurations that fit: more warps per block beat more rows per warp
# (PERF-NOTES.md, "Figures moved from the code").
_DEFAULTS = {
    16: (64, 64, 8),
    32: (64, 64, 8),
    64: (64, 32, 8),
    96: (32, 32, 8),
    128: (16, 32, 4),
}


# ---------------------------------------------------------------------------
# Warp reductions: xor butterflies, every lane ends with the same value
# ---------------------------------------------------------------------------

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it

@cuda.jit(device=True)
def warp_max(x):
    """max over the 32 lanes of a warp; offsets 16, 8, 4, 2, 1."""
    offset = WARP_SIZE // 2
    while offset > 0:
        x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, offset))
        offset //= 2
    return x


@cuda.jit(device=True)
def warp_sum(x):
    """sum over the 32 lanes of a warp; offsets 16, 8, 4, 2, 1.

    After each step a lane and its partner hold a + b and b + a, which are equal
    in floating point: all 32 lanes end with bitwise the same sum.
    """
    offset = WARP_SIZE // 2
    while offset > 0:
        x += cuda.shfl_xor_sync(FULL_MASK, x, offset)
        offset //= 2
    return x


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def _sizes(config):
    """rows_per_warp, score columns per lane, output dims per lane, padded widths."""
    rows_per_warp = config.Br // config.num_warps
    cols_per_lane = config.Bc // WARP_SIZE
    dims_per_lane = (config.d_pad + WARP_SIZE - 1) // WARP_SIZE
    return rows_per_warp, cols_per_lane, dims_per_lane


def default_config(d):
    """The shipped tile configuration for head dim d (served by its bucket d_pad)."""
    d_pad = common.head_dim_bucket(d)
    Br, Bc, num_warps = _DEFAULTS[d_pad]
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps)


def shipped_configs():
    """The default configuration of every head-dim bucket."""
    return [default_config(d_pad) for d_pad in HEAD_DIM_BUCKETS]


def smem_bytes(config):
    """Static shared memory per block: Q_i (Br x d_pad), K_j (Bc x d_pad+1), V_j (Bc x 32*ceil(d_pad/32)), P~_ij (Br x Bc)."""
    _, _, dims_per_lane = _sizes(config)
    Br, Bc, d_pad = config.Br, config.Bc, config.d_pad
    floats = Br * d_pad + Bc * (d_pad + 1) + Bc * WARP_SIZE * dims_per_lane + Br * Bc
    return floats * FLOAT_BYTES


def check_config(config):
    """Raise ConfigError unless the configuration can compile and launch."""
    common.check_sizes(config, NAME)
    Br, Bc, d_pad, num_warps = config.Br, config.Bc, config.d_pad, config.num_warps
    require(Br % num_warps == 0,
            f"Br={Br} must be a multiple of num_warps={num_warps}: each warp owns Br/num_warps rows")
    require(Bc % WARP_SIZE == 0,
            f"Bc={Bc} must be a multiple of {WARP_SIZE}: each lane owns Bc/32 score columns")
    common.check_smem(config, smem_bytes(config), NAME)
    rows_per_warp, cols_per_lane, dims_per_lane = _sizes(config)
    registers = rows_per_warp * (cols_per_lane + dims_per_lane + 3)
    require(registers <= MAX_REGISTER_TILE,
            f"Br={Br}, Bc={Bc}, d_pad={d_pad}, num_warps={num_warps} holds {registers} floats per thread "
            f"in register arrays (> {MAX_REGISTER_TILE}, would spill); use more warps or smaller tiles")


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------

@functools.cache
def build(config, dropout=False):
    """Compile-time sizes baked in as plain Python ints; returns the @cuda.jit kernel."""
    check_config(config)
    DROPOUT = bool(dropout)          # compile time: the kernel without dropout has no Philox code
    Br, Bc, d_pad, num_warps = int(config.Br), int(config.Bc), int(config.d_pad), int(config.num_warps)
    THREADS = num_warps * WARP_SIZE
    ROWS_PER_WARP, COLS_PER_LANE, DIMS_PER_LANE = _sizes(config)
    K_STRIDE = d_pad + 1                          # odd row stride: lanes reading K_j[c, x] for 32 c hit 32 banks
    V_WIDTH = DIMS_PER_LANE * WARP_SIZE       # V_j padded so every lane owns DIMS_PER_LANE dims

    @cuda.jit
    def fa2_forward_kernel(q, k, v, out, L, m, l, scale, causal, offset, dropout_p, seed, limit):
        """q (B, Nq, Hq, d), k, v (B, Nk, Hkv, d) -> out (B, Nq, Hq, d); L, m, l (B, Hq, Nq).

        scale: float32; causal: bool; offset: int64, key c visible to query r iff
        c <= r + offset; dropout_p: float64; seed: uint64; limit: j steps to run (int64).
        """
        # --- sizes ---
        _, Nq, H_q, d = q.shape
        Nk = k.shape[1]
        H_kv = k.shape[2]
        Tc = (Nk + Bc - 1) // Bc
        Z_kept = float32(1.0 / (1.0 - dropout_p))   # Z_ij of a kept element (0 if dropped)

        # --- who am I ---
        i = cuda.blockIdx.x                   # Q tile
        b = cuda.blockIdx.y // H_q
        h = cuda.blockIdx.y % H_q
        h_kv = h // (H_q // H_kv)             # grouped-query attention: this head's K/V head
        tid = cuda.threadIdx.x
        warp = tid // WARP_SIZE
        lane = tid % WARP_SIZE
        r0 = warp * ROWS_PER_WARP             # this warp's first row within Q_i

        # --- shared memory (each array on its own line) ---
        Q_i = cuda.shared.array((Br, d_pad), float32)
        K_j = cuda.shared.array((Bc, K_STRIDE), float32)
        V_j = cuda.shared.array((Bc, V_WIDTH), float32)
        P_ij = cuda.shared.array((Br, Bc), float32)   # warp w uses rows [r0, r0 + ROWS_PER_WARP)

        # --- registers ---
        S_ij = cuda.local.array((ROWS_PER_WARP, COLS_PER_LANE), float32)
        O_i = cuda.local.array((ROWS_PER_WARP, DIMS_PER_LANE), float32)
        m_i = cuda.local.array(ROWS_PER_WARP, float32)
        l_i = cuda.local.array(ROWS_PER_WARP, float32)
        alpha = cuda.local.array(ROWS_PER_WARP, float32)   # exp(m_i - m_new)
        for rr in range(ROWS_PER_WARP):
            m_i[rr] = -math.inf
            l_i[rr] = 0.0
            for u in range(DIMS_PER_LANE):
                O_i[rr, u] = 0.0

        # Q_i -> shared, pre-multiplied by the softmax scale; zero rows past Nq, zero dims past d
        for idx in range(tid, Br * d_pad, THREADS):
            r = idx // d_pad
            x = idx % d_pad
            row = i * Br + r
            if row < Nq and x < d:
                Q_i[r, x] = q[b, row, h, x] * scale
            else:
                Q_i[r, x] = 0.0

        n_tiles = Tc
        if causal:
            n_tiles = kv_tile_end(i, Br, Bc, Nq, Nk, offset)   # tiles past the diagonal are skipped
        n_tiles = min(n_tiles, limit)

        for j in range(n_tiles):
            # K_j, V_j -> shared; zero rows past Nk, zero dims past d
            for idx in range(tid, Bc * V_WIDTH, THREADS):
                c = idx // V_WIDTH
                x = idx % V_WIDTH
                col = j * Bc + c
                if col < Nk and x < d:
                    V_j[c, x] = v[b, col, h_kv, x]
                else:
                    V_j[c, x] = 0.0
                if x < d_pad:
                    if col < Nk and x < d:
                        K_j[c, x] = k[b, col, h_kv, x]
                    else:
                        K_j[c, x] = 0.0
            cuda.syncthreads()  # K_j, V_j (and Q_i on the first pass) fully written before any warp reads them

            # S_ij = (scale Q_i) K_j^T for this warp's rows and this lane's columns
            for rr in range(ROWS_PER_WARP):
                for t in range(COLS_PER_LANE):
                    S_ij[rr, t] = 0.0
            for x in range(d_pad):
                for rr in range(ROWS_PER_WARP):
                    q_rk = Q_i[r0 + rr, x]
                    for t in range(COLS_PER_LANE):
                        S_ij[rr, t] += q_rk * K_j[lane + WARP_SIZE * t, x]

            # online softmax, one row at a time: the row's 32 lanes reduce with shuffles
            for rr in range(ROWS_PER_WARP):
                row = i * Br + r0 + rr
                # mask: keys past Nk, and under causal keys past the diagonal, score -inf
                m_tilde = float32(-math.inf)
                for t in range(COLS_PER_LANE):
                    col = j * Bc + lane + WARP_SIZE * t
                    if col >= Nk or (causal and col > row + offset):
                        S_ij[rr, t] = -math.inf
                    m_tilde = max(m_tilde, S_ij[rr, t])
                m_tilde = warp_max(m_tilde)                  # m~ = rowmax(S_ij)
                m_new = max(m_i[rr], m_tilde)                # m_new = max(m_i, m~)
                m_safe = m_new
                if m_new == -math.inf:
                    m_safe = float32(0.0)                    # row fully masked so far: P~ = 0, no NaN
                alpha[rr] = math.exp(m_i[rr] - m_safe)       # rescales the old l_i and O_i
                l_tilde = float32(0.0)
                for t in range(COLS_PER_LANE):
                    p = math.exp(S_ij[rr, t] - m_safe)       # P~_ij = exp(S_ij - m_new)
                    P_ij[r0 + rr, lane + WARP_SIZE * t] = p
                    l_tilde += p
                l_tilde = warp_sum(l_tilde)                  # l~ = rowsum(P~_ij), undropped
                l_i[rr] = alpha[rr] * l_i[rr] + l_tilde      # l_i = e^(m_i - m_new) l_i + l~
                m_i[rr] = m_new

            # dropout: P~_ij <- P~_ij o Z_ij, Z_ij = 1/(1-p) where kept, 0 where dropped; each lane
            # rescales its own entries (no barrier). A loop of its own, on shared memory only, so
            # the Philox code cannot stop the loops above from keeping S_ij, m_i, l_i in registers.
            if DROPOUT:
                for rr in range(ROWS_PER_WARP):
                    row = i * Br + r0 + rr
                    for t in range(COLS_PER_LANE):
                        c = lane + WARP_SIZE * t
                        if keep(seed, b, h, row, j * Bc + c, dropout_p):
                            P_ij[r0 + rr, c] *= Z_kept
                        else:
                            P_ij[r0 + rr, c] = 0.0
            cuda.syncwarp()  # this warp's rows of P~_ij written by all its lanes before any lane reads a whole row

            # O_i = e^(m_i - m_new) O_i + (P~_ij o Z_ij) V_j; lane owns dims x = lane + 32 u
            for rr in range(ROWS_PER_WARP):
                for u in range(DIMS_PER_LANE):
                    O_i[rr, u] *= alpha[rr]
            for c in range(Bc):
                for rr in range(ROWS_PER_WARP):
                    p = P_ij[r0 + rr, c]                     # broadcast: one address for the warp
                    for u in range(DIMS_PER_LANE):
                        O_i[rr, u] += p * V_j[c, lane + WARP_SIZE * u]
            cuda.syncthreads()  # every warp done reading K_j, V_j, P~_ij before the next tile overwrites them

        # O_i / l_i, L_i = m_i + log(l_i); a row that saw no key: O = 0, L = -inf
        for rr in range(ROWS_PER_WARP):
            row = i * Br + r0 + rr
            if row < Nq:
                inv_l = float32(0.0)
                if l_i[rr] != 0.0:                            # 0: no visible key (a NaN l stays NaN)
                    inv_l = float32(1.0) / l_i[rr]
                for u in range(DIMS_PER_LANE):
                    x = lane + WARP_SIZE * u
                    if x < d:
                        out[b, row, h, x] = O_i[rr, u] * inv_l
                if lane == 0:
                    if l_i[rr] != 0.0:
                        L[b, h, row] = m_i[rr] + math.log(l_i[rr])
                    else:
                        L[b, h, row] = -math.inf
                    m[b, h, row] = m_i[rr]
                    l[b, h, row] = l_i[rr]

    return fa2_forward_kernel


def compile_targets(config):
    """[(label, dispatcher, argtypes)] for cuda.compile_ptx, argument types as fa2_forward launches them."""
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    argtypes = (a4, a4, a4, a4, a3, a3, a3, types.float32, types.boolean,
                types.int64, types.float64, types.uint64, types.int64)
    return [(NAME, build(config), argtypes),
            (f"{NAME}_dropout", build(config, dropout=True), argtypes)]


# ---------------------------------------------------------------------------
# Wrapper: check, allocate, launch
# ---------------------------------------------------------------------------

def resolve_config(d, Br=None, Bc=None, num_warps=None):
    """The TileConfig for head dim d: the default, with any of Br, Bc, num_warps overridden."""
    return common.resolve_config(d, Br, Bc, num_warps, defaults=default_config, check=check_config)


def fa2_forward(q, k, v, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None, limit=None,
                return_state=False):
    """FlashAttention-2 forward. q (B, Nq, Hq, d), k, v (B, Nk, Hkv, d), float32.

    Returns (O (B, Nq, Hq, d), L (B, Hq, Nq)) with L = m + log l; with
    return_state=True, (O, L, m, l): the running max and sum after the last step.
    alignment: where the causal diagonal sits, BOTTOM_RIGHT (flash-attn) or TOP_LEFT
    (PyTorch). dropout_p, seed: O = (P o Z) V with Z = keep / (1 - p), keep from
    ``philox.keep_mask(seed, p, B, Hq, Nq, Nk)``; L, m, l are the undropped softmax's.
    """
    B, Nq, Nk, H_q, _, d = common.check_qkv(q, k, v)
    scale = common.resolve_scale(softmax_scale, d)
    offset = common.resolve_offset(causal, alignment, Nq, Nk)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    steps = common.resolve_limit(limit)
    config = resolve_config(d, Br, Bc, num_warps)
    kernel = build(config, dropout=dropout_p > 0.0)

    arrays = common.Arrays(q, k, v)
    q_d, k_d, v_d = arrays.to_device(q), arrays.to_device(k), arrays.to_device(v)
    out = arrays.empty((B, Nq, H_q, d))
    L = arrays.empty((B, H_q, Nq))
    m = arrays.empty((B, H_q, Nq))
    l = arrays.empty((B, H_q, Nq))

    Tr = (Nq + config.Br - 1) // config.Br
    kernel[(Tr, B * H_q), config.threads](q_d, k_d, v_d, out, L, m, l, np.float32(scale),
                                           bool(causal), offset, dropout_p, seed, steps)

    if return_state:
        return arrays.result(out), arrays.result(L), arrays.result(m), arrays.result(l)
    return arrays.result(out), arrays.result(L)


def fa2_forward_state(q, k, v, **kwargs):
    """fa2_forward with the running state: (O, L, m, l)."""
    return fa2_forward(q, k, v, return_state=True, **kwargs)


# ---------------------------------------------------------------------------
# The registry's entry points (flashnumba.registry)
# ---------------------------------------------------------------------------

def forward(q, k, v, **options):
    """(O, L)."""
    return fa2_forward(q, k, v, **options)


def state(q, k, v, **options):
    """What a step shows: O (= O_i / l_i so far), m, l after the steps done."""
    O, _, m, l = fa2_forward(q, k, v, return_state=True, **options)
    return {"O": O, "m": m, "l": l}
