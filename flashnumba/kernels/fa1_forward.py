"""FlashAttention-1 forward: Algorithm 1 of Dao et al. 2022, with FA1's split-K warp layout.

Algorithm 1 with Algorithm 2's masking and dropout, for one (batch, head);
S = softmax_scale * Q K^T, Z = keep / (1 - p) the dropout matrix (Z = 1 without dropout):

    initialise O = 0 (N x d), l = 0 (N), m = -inf (N) in HBM
    for j in 0 .. Tc-1:                                   # outer loop: K/V tiles
        load K_j, V_j into shared memory
        for i in 0 .. Tr-1:                               # inner loop: Q tiles
            load Q_i, O_i, l_i, m_i from HBM
            S_ij  = softmax_scale * Q_i K_j^T             (Br x Bc)
            S_ij  = -inf where masked                     (causal: key c > query r + offset)
            m~_ij = rowmax(S_ij)
            P~_ij = exp(S_ij - m~_ij)
            l~_ij = rowsum(P~_ij)                         (undropped: l, m are the softmax's)
            m_i_new = max(m_i, m~_ij)
            l_i_new = e^(m_i - m_i_new) l_i + e^(m~_ij - m_i_new) l~_ij
            O_i <- diag(l_i_new)^-1 (diag(l_i) e^(m_i - m_i_new) O_i
                                     + e^(m~_ij - m_i_new) (P~_ij o Z_ij) V_j)
            write O_i, l_i <- l_i_new, m_i <- m_i_new to HBM

The loop order is the paper's: K/V outside, Q inside, so O, l and m make a
round trip through global memory at every inner step. FlashAttention-2 swaps
the loops and keeps O_i on chip; compare ``fa2_forward``.

Inside a thread block (one per (batch, head)) the warps split the Bc columns
(keys) of S_ij: warp w owns keys [w*Bcw, (w+1)*Bcw) with Bcw = Bc / num_warps.
This is the original FlashAttention's split-K layout. Each warp computes its
slice of S_ij, its partial row max, then (once the partial maxima are combined
into m~_ij) its slice of P~_ij, its partial row sum and its partial product
P~_ij V_j over its own keys only. The partials meet in shared memory:

    m~_ij = max over warps of the warps' row maxima        (m_warp, num_warps x Br)
    l~_ij = sum over warps of the warps' row sums          (l_warp, num_warps x Br)
    P~_ij V_j = sum over warps of the warps' products      (PV_warp, num_warps x Br x d_pad)

That exchange costs a barrier per combine and num_warps x Br x d_pad floats of
shared memory; FlashAttention-2 gives each warp whole rows (split-Q) and needs
none of it.

Causal alignment: the wrapper passes offset = Nk - Nq (bottom-right, flash-attn's,
the default) or 0 (top-left, PyTorch's ``is_causal``), from ``common.resolve_offset``;
q_tile_start(j) skips the Q tiles above either diagonal.

Dropout is Algorithm 2 of the paper (Algorithm 1 plus masking and dropout):
element (r, c) of query head h, batch b is kept when ``philox.keep(seed, b, h, r,
c, p)``, the Philox4x32-10 bit the reference's mask (``philox.keep_mask``) is made
of, regenerated on chip and never stored. l sums the undropped P~_ij, so l and m
are the undropped softmax's statistics; only the P~_ij that multiplies V_j is
dropped. With p = 0 no Philox code runs. Each element costs one full Philox
call (4 words made, 1 used); unmeasured on a GPU.

Head dims are compiled for the bucket d_pad >= d (``common.head_dim_bucket``);
tiles are zero-padded from d to d_pad in shared memory, so the dot products run
over the compile-time d_pad. Tiles wholly above the causal diagonal are skipped:
for K_j, Q tiles i < q_tile_start(j) are never loaded, and a K_j no Q tile
sees is not loaded at all.
"""

import functools
import math

import numpy as np
from numba import cuda, float32, types

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.kernels import common
from flashnumba.kernels.common import (
    HEAD_DIM_BUCKETS,
    Arrays,
    TileConfig,
    check_qkv,
    head_dim_bucket,
    max_nan,
    require,
    resolve_limit,
    resolve_scale,
)
from flashnumba.kernels.geometry import q_tile_start
from flashnumba.kernels.hardware import FLOAT_BYTES, WARP_SIZE
from flashnumba.kernels.philox import keep

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it

NEG_INF = np.float32(-np.inf)

# Default (Br, Bc, num_warps) per head-dim bucket: 4 warps and tiles that fit
# 48 KB of static shared memory (see smem_bytes; PV_warp is the big one).
# ptxas, sm_80/sm_90: 125-164 registers (dropout variant 122-165), no spills
# (flashnumba resources).
_DEFAULT_TILES = {
    16: (32, 64, 4),     # 28.8 KB
    32: (32, 32, 4),     # 34.8 KB
    64: (16, 32, 4),     # 40.0 KB
    96: (8, 32, 4),      # 41.6 KB
    128: (8, 16, 4),     # 37.9 KB
}


def default_config(d):
    """The shipped TileConfig for head dim d (compiled for its bucket d_pad)."""
    d_pad = head_dim_bucket(d)
    Br, Bc, num_warps = _DEFAULT_TILES[d_pad]
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps)


def shipped_configs():
    """The default config of every head-dim bucket."""
    return [default_config(d_pad) for d_pad in HEAD_DIM_BUCKETS]


def smem_bytes(config):
    """Static shared memory of one thread block of ``build(config)``, in bytes."""
    Br, Bc, d_pad, NW = config.Br, config.Bc, config.d_pad, config.num_warps
    floats = (Br * (d_pad + 1)          # Q_i, rows padded to d_pad + 1
              + Bc * (d_pad + 1)        # K_j, rows padded to d_pad + 1
              + Bc * d_pad              # V_j
              + Br * (Bc + 1)       # S_ij, then P~_ij
              + NW * Br              # m_warp: each warp's row max
              + NW * Br              # l_warp: each warp's row sum
              + NW * Br * d_pad          # PV_warp: each warp's P~_ij V_j
              + 5 * Br)             # m_i, l_i, m~_ij, m_i_new, l_i_new
    return floats * FLOAT_BYTES


def check_config(config):
    """Raise ConfigError unless ``build(config)`` can run on a GPU."""
    common.check_sizes(config, NAME)
    require(config.Bc % config.num_warps == 0,
            f"fa1_forward: the warps split the Bc keys of S_ij evenly, but Bc={config.Bc} "
            f"is not a multiple of num_warps={config.num_warps}")
    common.check_smem(config, smem_bytes(config), NAME)


@functools.cache
def build(config, dropout=False):
    """The forward kernel for one TileConfig, its sizes baked in as compile-time constants."""
    check_config(config)
    DROPOUT = bool(dropout)          # compile time: the kernel without dropout has no Philox code
    Br, Bc, d_pad, num_warps = int(config.Br), int(config.Bc), int(config.d_pad), int(config.num_warps)
    THREADS = num_warps * WARP_SIZE
    Bcw = Bc // num_warps           # keys (columns of S_ij) per warp
    ROW_STRIDE = d_pad + 1                   # padded row stride: lanes reading different rows of
    Bc_pad = Bc + 1                 # K_j, Q_i or S_ij fall in different banks

    @cuda.jit
    def fa1_forward_kernel(Q, K, V, O, l, m, softmax_scale, causal, offset, dropout_p, seed, limit):
        """One thread block per (batch, query head); Algorithm 1's loops run inside it.

        Q (B, Nq, Hq, d), K, V (B, Nk, Hkv, d); O (B, Nq, Hq, d), l, m (B, Hq, Nq).
        softmax_scale: float32; causal: bool; offset: int64, key c visible to query r
        iff c <= r + offset; dropout_p: float64; seed: uint64; limit: outer steps (int32).
        """
        _, Nq, Hq, d = Q.shape
        Nk = K.shape[1]
        Hkv = K.shape[2]
        b = cuda.blockIdx.x
        h = cuda.blockIdx.y
        h_kv = h // (Hq // Hkv)             # grouped-query attention: the K/V head of h
        tid = cuda.threadIdx.x
        warp = tid // WARP_SIZE
        lane = tid % WARP_SIZE
        Tr = (Nq + Br - 1) // Br
        Tc = (Nk + Bc - 1) // Bc
        Z_kept = float32(1.0 / (1.0 - dropout_p))   # Z_ij of a kept element (0 if dropped)

        Q_i = cuda.shared.array((Br, ROW_STRIDE), float32)
        K_j = cuda.shared.array((Bc, ROW_STRIDE), float32)
        V_j = cuda.shared.array((Bc, d_pad), float32)
        S_ij = cuda.shared.array((Br, Bc_pad), float32)
        m_warp = cuda.shared.array((num_warps, Br), float32)
        l_warp = cuda.shared.array((num_warps, Br), float32)
        PV_warp = cuda.shared.array((num_warps, Br, d_pad), float32)
        m_i = cuda.shared.array(Br, float32)
        l_i = cuda.shared.array(Br, float32)
        m_ij = cuda.shared.array(Br, float32)
        m_new = cuda.shared.array(Br, float32)
        l_new = cuda.shared.array(Br, float32)

        # Alg. 1 l. 2: O = 0, l = 0, m = -inf in HBM (this block owns head (b, h) of all three).
        for e in range(tid, Nq * d, THREADS):
            O[b, e // d, h, e % d] = float32(0.0)
        for r in range(tid, Nq, THREADS):
            l[b, h, r] = float32(0.0)
            m[b, h, r] = NEG_INF
        cuda.syncthreads()  # O, l, m initialised before threads read back rows others wrote

        for j in range(min(Tc, limit)):                                   # Alg. 1 l. 5
            i_first = 0
            if causal:
                i_first = q_tile_start(j, Br, Bc, Nq, offset)
            if i_first >= Tr:
                continue                    # K_j is above the diagonal for every query: skipped

            # Alg. 1 l. 6: load K_j, V_j (keys j*Bc ..), zero-padded past Nk and past d.
            for e in range(tid, Bc * d_pad, THREADS):
                c = e // d_pad
                x = e % d_pad
                col = j * Bc + c
                if col < Nk and x < d:
                    K_j[c, x] = K[b, col, h_kv, x]
                    V_j[c, x] = V[b, col, h_kv, x]
                else:
                    K_j[c, x] = float32(0.0)
                    V_j[c, x] = float32(0.0)

            for i in range(i_first, Tr):                                  # Alg. 1 l. 7
                # Alg. 1 l. 8: load Q_i (zero-padded) and the row statistics l_i, m_i from HBM.
                for e in range(tid, Br * d_pad, THREADS):
                    r = e // d_pad
                    x = e % d_pad
                    row = i * Br + r
                    if row < Nq and x < d:
                        Q_i[r, x] = Q[b, row, h, x]
                    else:
                        Q_i[r, x] = float32(0.0)
                for r in range(tid, Br, THREADS):
                    row = i * Br + r
                    if row < Nq:
                        m_i[r] = m[b, h, row]
                        l_i[r] = l[b, h, row]
                    else:
                        m_i[r] = NEG_INF
                        l_i[r] = float32(0.0)
                cuda.syncthreads()  # K_j, V_j, Q_i, m_i, l_i loaded before any warp reads them

                # Alg. 1 l. 9: S_ij = softmax_scale * Q_i K_j^T, warp w computing its keys c in
                # [w*Bcw, (w+1)*Bcw) for all Br rows; -inf where the key is masked.
                for e in range(lane, Br * Bcw, WARP_SIZE):
                    r = e // Bcw
                    c = warp * Bcw + e % Bcw
                    s = float32(0.0)
                    for x in range(d_pad):
                        s += Q_i[r, x] * K_j[c, x]
                    s *= softmax_scale
                    row = i * Br + r
                    col = j * Bc + c
                    if col >= Nk or (causal and col > row + offset):
                        s = NEG_INF
                    S_ij[r, c] = s
                cuda.syncthreads()  # warp w's slice of S_ij complete before its row max reads it

                # Alg. 1 l. 10, split-K: m_warp[w] = rowmax of S_ij over warp w's keys (one lane per row).
                for r in range(lane, Br, WARP_SIZE):
                    mx = NEG_INF
                    for cc in range(Bcw):
                        mx = max_nan(mx, S_ij[r, warp * Bcw + cc])
                    m_warp[warp, r] = mx
                cuda.syncthreads()  # every warp's row max written before warps combine them

                # Alg. 1 l. 10: m~_ij = max over warps of m_warp;  P~_ij = exp(S_ij - m~_ij) on warp w's
                # keys (0 in a row with no visible key);  l_warp[w] = its row sum of P~_ij
                # (undropped);  then P~_ij o Z_ij, Z_ij = 1/(1-p) where kept, 0 where dropped.
                for r in range(lane, Br, WARP_SIZE):
                    m_tilde = NEG_INF
                    for w in range(num_warps):
                        m_tilde = max_nan(m_tilde, m_warp[w, r])
                    row_sum = float32(0.0)
                    for cc in range(Bcw):
                        c = warp * Bcw + cc
                        p = float32(0.0)
                        if m_tilde != NEG_INF:
                            p = math.exp(S_ij[r, c] - m_tilde)
                        row_sum += p
                        if DROPOUT:
                            if keep(seed, b, h, i * Br + r, j * Bc + c, dropout_p):
                                p *= Z_kept
                            else:
                                p = float32(0.0)
                        S_ij[r, c] = p
                    l_warp[warp, r] = row_sum
                cuda.syncthreads()  # P~_ij and every warp's row sum written before they are read

                # PV_warp[w] = (P~_ij o Z_ij) V_j summed over warp w's keys only (the split-K partial).
                for e in range(lane, Br * d_pad, WARP_SIZE):
                    r = e // d_pad
                    x = e % d_pad
                    acc = float32(0.0)
                    for cc in range(Bcw):
                        c = warp * Bcw + cc
                        acc += S_ij[r, c] * V_j[c, x]
                    PV_warp[warp, r, x] = acc

                # Alg. 1 l. 11: m~_ij = max_w m_warp, l~_ij = sum_w l_warp;  m_i_new = max(m_i, m~_ij);
                # l_i_new = e^(m_i - m_i_new) l_i + e^(m~_ij - m_i_new) l~_ij.
                for r in range(tid, Br, THREADS):
                    m_tilde = NEG_INF
                    l_tilde = float32(0.0)
                    for w in range(num_warps):
                        m_tilde = max_nan(m_tilde, m_warp[w, r])
                        l_tilde += l_warp[w, r]
                    mn = max_nan(m_i[r], m_tilde)
                    ln = float32(0.0)
                    if mn != NEG_INF:       # a row with no visible key yet keeps l = 0
                        ln = math.exp(m_i[r] - mn) * l_i[r] + math.exp(m_tilde - mn) * l_tilde
                    m_ij[r] = m_tilde
                    m_new[r] = mn
                    l_new[r] = ln
                cuda.syncthreads()  # all PV_warp partials and the new statistics written before the combine

                # Alg. 1 l. 12: O_i <- diag(l_i_new)^-1 (diag(l_i) e^(m_i - m_i_new) O_i
                #   + e^(m~_ij - m_i_new) (P~_ij o Z_ij) V_j),  (P~_ij o Z_ij) V_j = sum_w PV_warp.
                for e in range(tid, Br * d_pad, THREADS):
                    r = e // d_pad
                    x = e % d_pad
                    row = i * Br + r
                    if row < Nq and x < d:
                        o = float32(0.0)
                        if l_new[r] != float32(0.0):     # 0: no visible key yet (NaN inputs: NaN)
                            PV = float32(0.0)
                            for w in range(num_warps):
                                PV += PV_warp[w, r, x]
                            o = (l_i[r] * math.exp(m_i[r] - m_new[r]) * O[b, row, h, x]
                                 + math.exp(m_ij[r] - m_new[r]) * PV) / l_new[r]
                        O[b, row, h, x] = o
                # Alg. 1 l. 13: l_i <- l_i_new, m_i <- m_i_new in HBM.
                for r in range(tid, Br, THREADS):
                    row = i * Br + r
                    if row < Nq:
                        l[b, h, row] = l_new[r]
                        m[b, h, row] = m_new[r]
                cuda.syncthreads()  # Q_i, S_ij, partials, statistics (and K_j, V_j) all read before they are overwritten

    return fa1_forward_kernel


def compile_targets(config):
    """[(label, dispatcher, argtypes)]: what ``fa1_forward`` launches, typed for cuda.compile_ptx."""
    tensor = types.Array(types.float32, 4, "C")
    rows = types.Array(types.float32, 3, "C")
    argtypes = (tensor, tensor, tensor, tensor, rows, rows, types.float32, types.boolean,
                types.int64, types.float64, types.uint64, types.int32)
    label = (f"fa1_forward Br={config.Br} Bc={config.Bc} d_pad={config.d_pad} "
             f"num_warps={config.num_warps}")
    return [(label, build(config), argtypes),
            (label.replace(NAME, f"{NAME}_dropout"), build(config, dropout=True), argtypes)]


def resolve_config(d, Br=None, Bc=None, num_warps=None):
    """The TileConfig for head dim d: the default, with any of Br, Bc, num_warps overridden."""
    return common.resolve_config(d, Br, Bc, num_warps, defaults=default_config, check=check_config)


def fa1_forward(q, k, v, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None, limit=None):
    """FlashAttention-1 forward. Returns (O, l, m) as Algorithm 1 leaves them.

    q (B, Nq, Hq, d), k and v (B, Nk, Hkv, d), float32, Hq a multiple of Hkv.
    O (B, Nq, Hq, d) is normalised; l, m (B, Hq, Nq) are the softmax row sums
    and row maxima of S = softmax_scale Q K^T, so lse = m + log(l). A query with
    no visible key (causal, Nq > Nk bottom-right) gets O = 0, m = -inf, l = 0.
    alignment: the causal diagonal, BOTTOM_RIGHT (flash-attn) or TOP_LEFT (PyTorch).
    dropout_p, seed: O = (P o Z) V with Z = keep / (1 - p), keep from
    ``philox.keep_mask(seed, p, B, Hq, Nq, Nk)``; l and m stay the undropped softmax's.
    ``limit``: stop after that many outer (K/V tile) steps.
    NumPy in, NumPy out; device arrays in, device arrays out.
    """
    # Check.
    B, Nq, Nk, Hq, _, d = check_qkv(q, k, v)
    scale = resolve_scale(softmax_scale, d)
    offset = common.resolve_offset(causal, alignment, Nq, Nk)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    steps = resolve_limit(limit)
    config = resolve_config(d, Br, Bc, num_warps)
    # Allocate.
    arrays = Arrays(q, k, v)
    Q, K, V = arrays.to_device(q), arrays.to_device(k), arrays.to_device(v)
    O = arrays.empty((B, Nq, Hq, d))
    l = arrays.empty((B, Hq, Nq))
    m = arrays.empty((B, Hq, Nq))
    # Launch: one block per (batch, query head); the kernel initialises O, l, m.
    Tc = (Nk + config.Bc - 1) // config.Bc
    kernel = build(config, dropout=dropout_p > 0.0)
    kernel[(B, Hq), config.threads](Q, K, V, O, l, m, np.float32(scale), bool(causal),
                                    offset, dropout_p, seed, np.int32(min(steps, Tc)))
    return arrays.result(O), arrays.result(l), arrays.result(m)




# ---------------------------------------------------------------------------
# The registry's entry points (flashnumba.registry)
# ---------------------------------------------------------------------------

def forward(q, k, v, **options):
    """(O, L): fa1_forward with its (m, l) combined into FA2's L = m + log l."""
    from flashnumba.kernels.lse import lse_of
    O, l, m = fa1_forward(q, k, v, **options)
    return O, lse_of(m, l)


def state(q, k, v, **options):
    """What a step shows: O, l, m in HBM after the steps done."""
    return dict(zip(("O", "l", "m"), fa1_forward(q, k, v, **options)))
