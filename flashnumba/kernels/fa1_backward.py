"""FlashAttention-1 backward: the backward pass of Dao et al. 2022 (Algorithm 4 of the appendix).

For one (batch, head); S = softmax_scale * Q K^T, O, l, m are what the forward
pass (``fa1_forward``) stored, and Z = keep / (1 - p) is the forward's dropout
matrix (Z = 1 without dropout), regenerated from (seed, p), never stored:

    initialise dQ = 0 in HBM
    for j in 0 .. Tc-1:                                   # outer loop: K/V tiles
        load K_j, V_j into shared memory;  dK_j = 0, dV_j = 0 on chip
        for i in 0 .. Tr-1:                               # inner loop: Q tiles
            load Q_i, O_i, dO_i, dQ_i, l_i, m_i from HBM
            S_ij  = softmax_scale * Q_i K_j^T             (Br x Bc)
            P_ij  = diag(l_i)^-1 exp(S_ij - m_i)          (the forward's softmax, recomputed;
                                                           0 where masked: key c > query r + offset)
            dV_j += (P_ij o Z_ij)^T dO_i
            dP_ij = dO_i V_j^T
            D_i   = rowsum(dO_i o O_i)                    (O is the dropped output)
            dS_ij = P_ij o (dP_ij o Z_ij - D_i)
            dQ_i += softmax_scale * dS_ij K_j             (read-modify-write in HBM)
            dK_j += softmax_scale * dS_ij^T Q_i
        write dK_j, dV_j to HBM

One thread block per (batch, query head) owns the whole head: it is the only
writer of its dQ rows, so the read-modify-write of dQ_i needs no atomics, and
its dK_j, dV_j are complete when its outer step ends. With grouped-query
attention several query heads share a K/V head: each block writes dK, dV of
its own query head into (B, Nk, Hq, d) buffers and ``gqa.reduce_groups`` sums
each group afterwards (no atomics, a fixed summation order).

Inside the block every phase gives each thread whole output entries (an entry
of P_ij and dS_ij, of dK_j and dV_j, of dQ_i), so the only exchange between
threads is through the shared tiles, three barriers per inner step. D_i is
recomputed at every step, as in the paper; FlashAttention-2 computes it once
before the loops.

Causal alignment: offset = Nk - Nq (bottom-right, the default) or 0 (top-left,
PyTorch's), computed by the wrapper (``common.resolve_offset``) and passed in.
Dropout: the keep bit of element (r, c) of query head h, batch b is
``philox.keep(seed, b, h, r, c, p)``, the bit ``fa1_forward`` used; with p = 0
no Philox code runs. Each element costs one full Philox call (unmeasured on a GPU).

Head dims are compiled for the bucket d_pad >= d and tiles are zero-padded from d
to d_pad in shared memory. For K_j, the Q tiles i < q_tile_start(j) lie wholly above
the causal diagonal and are skipped; a K_j no query sees is skipped whole and
keeps dK_j = dV_j = 0.
"""

import functools
import math

import numpy as np
from numba import cuda, float32, types

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.kernels import common, gqa
from flashnumba.kernels.common import (
    HEAD_DIM_BUCKETS,
    Arrays,
    TileConfig,
    check_qkv,
    head_dim_bucket,
    resolve_limit,
    resolve_scale,
)
from flashnumba.kernels.geometry import q_tile_start
from flashnumba.kernels.hardware import FLOAT_BYTES, WARP_SIZE
from flashnumba.kernels.philox import keep

NAME = __name__.rpartition(".")[2]       # this kernel's name, as flashnumba.registry gives it

NEG_INF = np.float32(-np.inf)

# Default (Br, Bc, num_warps) per head-dim bucket: Bc >= Br (dK_j, dV_j stay on
# chip for a whole outer step, dQ_i makes a round trip per inner step) within
# 48 KB of static shared memory; see smem_bytes.
# ptxas, sm_80/sm_90: 128-165 registers (dropout variant 154-171), no spills
# (flashnumba resources).
_DEFAULT_TILES = {
    16: (32, 64, 4),     # 38.0 KB
    32: (32, 32, 4),     # 33.7 KB
    64: (16, 32, 4),     # 45.6 KB
    96: (16, 16, 4),     # 39.4 KB
    128: (8, 16, 4),     # 42.3 KB
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
    Br, Bc, d_pad = config.Br, config.Bc, config.d_pad
    floats = (2 * Br * (d_pad + 1)      # Q_i, dO_i, rows padded to d_pad + 1
              + 2 * Bc * (d_pad + 1)    # K_j, V_j, rows padded to d_pad + 1
              + 2 * Bc * d_pad          # dK_j, dV_j accumulators
              + 2 * Br * Bc         # P_ij, dS_ij
              + 3 * Br)             # m_i, l_i, D_i
    return floats * FLOAT_BYTES


def check_config(config):
    """Raise ConfigError unless ``build(config)`` can run on a GPU."""
    common.check_sizes(config, NAME)
    common.check_smem(config, smem_bytes(config), NAME)


@functools.cache
def build(config, dropout=False):
    """The backward kernel for one TileConfig, its sizes baked in as compile-time constants."""
    check_config(config)
    DROPOUT = bool(dropout)          # compile time: the kernel without dropout has no Philox code
    Br, Bc, d_pad, num_warps = int(config.Br), int(config.Bc), int(config.d_pad), int(config.num_warps)
    THREADS = num_warps * WARP_SIZE
    ROW_STRIDE = d_pad + 1                   # padded row stride: threads reading different rows of
                                    # Q_i, dO_i, K_j or V_j fall in different banks

    @cuda.jit
    def fa1_backward_kernel(dO, Q, K, V, O, l, m, dQ, dK, dV, softmax_scale, causal, offset,
                            dropout_p, seed, limit):
        """One thread block per (batch, query head); the backward's loops run inside it.

        dO, Q, O, dQ (B, Nq, Hq, d); K, V (B, Nk, Hkv, d); l, m (B, Hq, Nq);
        dK, dV (B, Nk, Hq, d): per query head, summed over groups afterwards.
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
        Tr = (Nq + Br - 1) // Br
        Tc = (Nk + Bc - 1) // Bc
        Z_kept = float32(1.0 / (1.0 - dropout_p))   # Z_ij of a kept element (0 if dropped)

        Q_i = cuda.shared.array((Br, ROW_STRIDE), float32)
        dO_i = cuda.shared.array((Br, ROW_STRIDE), float32)
        K_j = cuda.shared.array((Bc, ROW_STRIDE), float32)
        V_j = cuda.shared.array((Bc, ROW_STRIDE), float32)
        dK_j = cuda.shared.array((Bc, d_pad), float32)
        dV_j = cuda.shared.array((Bc, d_pad), float32)
        P_ij = cuda.shared.array((Br, Bc), float32)
        dS_ij = cuda.shared.array((Br, Bc), float32)
        m_i = cuda.shared.array(Br, float32)
        l_i = cuda.shared.array(Br, float32)
        D_i = cuda.shared.array(Br, float32)

        # Alg. 4 l. 5: dQ = 0 in HBM; dK = dV = 0 too, so a K_j that is skipped or past `limit` reads 0.
        for e in range(tid, Nq * d, THREADS):
            dQ[b, e // d, h, e % d] = float32(0.0)
        for e in range(tid, Nk * d, THREADS):
            dK[b, e // d, h, e % d] = float32(0.0)
            dV[b, e // d, h, e % d] = float32(0.0)
        cuda.syncthreads()  # dQ zeroed before threads read back rows others zeroed

        for j in range(min(Tc, limit)):                                   # Alg. 4 l. 6
            i_first = 0
            if causal:
                i_first = q_tile_start(j, Br, Bc, Nq, offset)
            if i_first >= Tr:
                continue                    # K_j is above the diagonal for every query: skipped

            # Alg. 4 l. 7-8: load K_j, V_j (zero-padded past Nk and past d); dK_j = dV_j = 0.
            # Thread t owns entries e = t, t + THREADS, ... of dK_j and dV_j for the whole step.
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
                dK_j[c, x] = float32(0.0)
                dV_j[c, x] = float32(0.0)

            for i in range(i_first, Tr):                                  # Alg. 4 l. 9
                # Alg. 4 l. 10, 19: load Q_i, dO_i (zero-padded) and l_i, m_i;  D_i = rowsum(dO_i o O_i),
                # read straight from HBM (O_i is needed for nothing else).
                for e in range(tid, Br * d_pad, THREADS):
                    r = e // d_pad
                    x = e % d_pad
                    row = i * Br + r
                    if row < Nq and x < d:
                        Q_i[r, x] = Q[b, row, h, x]
                        dO_i[r, x] = dO[b, row, h, x]
                    else:
                        Q_i[r, x] = float32(0.0)
                        dO_i[r, x] = float32(0.0)
                for r in range(tid, Br, THREADS):
                    row = i * Br + r
                    if row < Nq:
                        m_i[r] = m[b, h, row]
                        l_i[r] = l[b, h, row]
                        acc = float32(0.0)
                        for x in range(d):
                            acc += dO[b, row, h, x] * O[b, row, h, x]
                        D_i[r] = acc
                    else:
                        m_i[r] = NEG_INF
                        l_i[r] = float32(0.0)
                        D_i[r] = float32(0.0)
                cuda.syncthreads()  # K_j, V_j, Q_i, dO_i, m_i, l_i, D_i loaded before any thread reads them

                # Alg. 4 l. 11-20, for each entry (r, c) of the tile:
                #   S_ij = softmax_scale * Q_i K_j^T,   P_ij = exp(S_ij - m_i) / l_i  (0 where masked),
                #   dP_ij = dO_i V_j^T,                  dS_ij = P_ij o (dP_ij o Z_ij - D_i);
                #   the P_ij array keeps P_ij o Z_ij, all that dV_j needs.
                for e in range(tid, Br * Bc, THREADS):
                    r = e // Bc
                    c = e % Bc
                    row = i * Br + r
                    col = j * Bc + c
                    s = float32(0.0)
                    dp = float32(0.0)
                    for x in range(d_pad):
                        s += Q_i[r, x] * K_j[c, x]
                        dp += dO_i[r, x] * V_j[c, x]
                    p = float32(0.0)
                    visible = col < Nk and not (causal and col > row + offset)
                    if visible and l_i[r] != float32(0.0):      # l = 0: the row saw no key (NaN: NaN)
                        p = math.exp(s * softmax_scale - m_i[r]) / l_i[r]
                    z = float32(1.0)                 # Z_ij: 1 without dropout
                    if DROPOUT:
                        z = float32(0.0)
                        if keep(seed, b, h, row, col, dropout_p):
                            z = Z_kept
                    P_ij[r, c] = p * z
                    dS_ij[r, c] = float32(0.0)       # a hidden key: exactly 0, even where D_i is NaN
                    if visible:
                        dS_ij[r, c] = p * (dp * z - D_i[r])
                cuda.syncthreads()  # all of P_ij and dS_ij written before any thread sums over them

                # Alg. 4 l. 16, 22: dV_j += (P_ij o Z_ij)^T dO_i,   dK_j += softmax_scale * dS_ij^T Q_i   (entries (c, x)).
                for e in range(tid, Bc * d_pad, THREADS):
                    c = e // d_pad
                    x = e % d_pad
                    acc_v = float32(0.0)
                    acc_k = float32(0.0)
                    for r in range(Br):
                        acc_v += P_ij[r, c] * dO_i[r, x]
                        acc_k += dS_ij[r, c] * Q_i[r, x]
                    dV_j[c, x] += acc_v
                    dK_j[c, x] += softmax_scale * acc_k

                # Alg. 4 l. 21: dQ_i += softmax_scale * dS_ij K_j   (entries (r, x), read-modify-write in HBM).
                for e in range(tid, Br * d_pad, THREADS):
                    r = e // d_pad
                    x = e % d_pad
                    row = i * Br + r
                    if row < Nq and x < d:
                        acc = float32(0.0)
                        for c in range(Bc):
                            acc += dS_ij[r, c] * K_j[c, x]
                        dQ[b, row, h, x] += softmax_scale * acc
                cuda.syncthreads()  # Q_i, dO_i, P_ij, dS_ij (and K_j, V_j) all read before they are overwritten

            # Alg. 4 l. 24: write dK_j, dV_j (each thread the entries it accumulated: no barrier needed).
            for e in range(tid, Bc * d_pad, THREADS):
                c = e // d_pad
                x = e % d_pad
                col = j * Bc + c
                if col < Nk and x < d:
                    dK[b, col, h, x] = dK_j[c, x]
                    dV[b, col, h, x] = dV_j[c, x]

    return fa1_backward_kernel


def compile_targets(config):
    """[(label, dispatcher, argtypes)]: the kernel ``fa1_backward`` launches, typed for cuda.compile_ptx.

    (It also launches ``gqa.sum_head_groups``, which has no tile config; the
    resource checker lists that one itself.)
    """
    tensor = types.Array(types.float32, 4, "C")
    rows = types.Array(types.float32, 3, "C")
    argtypes = (tensor, tensor, tensor, tensor, tensor, rows, rows, tensor, tensor, tensor,
                types.float32, types.boolean, types.int64, types.float64, types.uint64, types.int32)
    label = (f"fa1_backward Br={config.Br} Bc={config.Bc} d_pad={config.d_pad} "
             f"num_warps={config.num_warps}")
    return [(label, build(config), argtypes),
            (label.replace(NAME, f"{NAME}_dropout"), build(config, dropout=True), argtypes)]


def resolve_config(d, Br=None, Bc=None, num_warps=None):
    """The TileConfig for head dim d: the default, with any of Br, Bc, num_warps overridden."""
    return common.resolve_config(d, Br, Bc, num_warps, defaults=default_config, check=check_config)


def _check_saved(dout, q, out, l, m):
    """dout and out shaped like q; l and m (B, Hq, Nq); all float32."""
    B, Nq, Hq, _ = q.shape
    for name, x, shape in (("dout", dout, tuple(q.shape)), ("out", out, tuple(q.shape)),
                           ("l", l, (B, Hq, Nq)), ("m", m, (B, Hq, Nq))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if np.dtype(x.dtype) != np.float32:
            raise TypeError(f"{name} must be float32, got {np.dtype(x.dtype)}")


def fa1_backward(dout, q, k, v, out, l, m, *, causal=False, alignment=BOTTOM_RIGHT,
                 softmax_scale=None, dropout_p=0.0, seed=0, Br=None, Bc=None, num_warps=None,
                 limit=None):
    """FlashAttention-1 backward. Returns (dq, dk, dv), shaped like q, k, v.

    out, l, m are ``fa1_forward``'s outputs for the same q, k, v, causal, alignment,
    softmax_scale, dropout_p and seed (the backward regenerates the forward's dropout
    mask from seed and p). ``limit``: stop after that many outer (K/V tile) steps; dq is
    then the sum over the tiles done, and dk, dv hold those tiles' rows (0 elsewhere).
    NumPy in, NumPy out; device arrays in, device arrays out.
    """
    # Check.
    B, Nq, Nk, Hq, Hkv, d = check_qkv(q, k, v)
    _check_saved(dout, q, out, l, m)
    scale = resolve_scale(softmax_scale, d)
    offset = common.resolve_offset(causal, alignment, Nq, Nk)
    dropout_p, seed = common.resolve_dropout(dropout_p, seed)
    steps = resolve_limit(limit)
    config = resolve_config(d, Br, Bc, num_warps)
    # Allocate.
    arrays = Arrays(dout, q, k, v, out, l, m)
    dO, Q, K, V, O, l_dev, m_dev = (arrays.to_device(x) for x in (dout, q, k, v, out, l, m))
    dQ = arrays.empty((B, Nq, Hq, d))
    dK_per_q_head = arrays.empty((B, Nk, Hq, d))
    dV_per_q_head = arrays.empty((B, Nk, Hq, d))
    # Launch: one block per (batch, query head), which zeroes its dQ, dK, dV; then sum GQA groups.
    Tc = (Nk + config.Bc - 1) // config.Bc
    kernel = build(config, dropout=dropout_p > 0.0)
    kernel[(B, Hq), config.threads](dO, Q, K, V, O, l_dev, m_dev, dQ, dK_per_q_head, dV_per_q_head,
                                    np.float32(scale), bool(causal), offset, dropout_p, seed,
                                    np.int32(min(steps, Tc)))
    dK = gqa.reduce_groups(dK_per_q_head, Hkv)
    dV = gqa.reduce_groups(dV_per_q_head, Hkv)
    return arrays.result(dQ), arrays.result(dK), arrays.result(dV)




# ---------------------------------------------------------------------------
# The registry's entry point (flashnumba.registry)
# ---------------------------------------------------------------------------

def backward(dout, q, k, v, out, L, deterministic=False, **options):
    """(dq, dk, dv) from FA2's L: m = L and l = 1 give the same P_ij = exp(S_ij - m_i) / l_i.
    Deterministic whatever `deterministic` says: one block per head adds every dQ_i in order."""
    from flashnumba.kernels.lse import ml_of
    m, l = ml_of(L)
    return fa1_backward(dout, q, k, v, out, l, m, **options)
