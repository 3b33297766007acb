"""S_dmask: the attention probabilities with the dropped entries negated, as flash-attn returns them.

flash-attn's ``return_attn_probs=True`` gives, with dropout, a (batch, nheads,
seqlen_q, seqlen_k) matrix whose sign says which entries dropout kept
(negative = dropped), so that a test can rebuild the mask without knowing the
generator. flashnumba never stores the mask (each kernel regenerates it from
Philox), so this kernel rebuilds P from the forward's log-sum-exp L and draws
the same keep bits the attention kernels drew:

    P[r, c]       = exp(scale q_r . k_c - L_r)    0 where causal hides key c, or L_r = -inf
    S_dmask[r, c] = P[r, c]    if keep(seed, b, h, r, c, p)
                  = -P[r, c]   otherwise          (-0.0 for a hidden key that was dropped)

One thread per entry, each its own dot product from global memory: O(Nq Nk d)
reads, for inspection and tests, not for speed (the official library's is
for testing too). So ``np.signbit(S_dmask)`` is exactly the dropped set.
"""

import math

from numba import cuda, float32, types

from flashnumba.geometry import num_tiles
from flashnumba.kernels import philox

THREADS = 256


def blocks(n):
    return num_tiles(n, THREADS)


@cuda.jit
def dropout_mask(q, k, L, S_dmask, scale, causal, offset, p, seed):
    """S_dmask (B, Hq, Nq, Nk) float32 from q (B, Nq, Hq, d), k (B, Nk, Hkv, d), L (B, Hq, Nq)."""
    B, H_q, Nq, Nk = S_dmask.shape
    d = q.shape[3]
    H_kv = k.shape[2]
    idx = cuda.grid(1)
    if idx < B * H_q * Nq * Nk:
        c = idx % Nk
        r = (idx // Nk) % Nq
        h = (idx // (Nk * Nq)) % H_q
        b = idx // (Nk * Nq * H_q)
        h_kv = h // (H_q // H_kv)                      # grouped-query attention: this head's K/V head
        L_r = L[b, h, r]
        P_rc = float32(0.0)
        if not (causal and c > r + offset) and L_r != -math.inf:
            s = float32(0.0)
            for x in range(d):
                s += q[b, r, h, x] * k[b, c, h_kv, x]
            P_rc = math.exp(scale * s - L_r)          # P = exp(S - L): the normalised softmax
        if philox.keep(seed, b, h, r, c, p):
            S_dmask[b, h, r, c] = P_rc
        else:
            S_dmask[b, h, r, c] = -P_rc                # dropped: negative (-0.0 where P = 0)


def targets():
    """(label, dispatcher, argtypes) for the resource check."""
    a4 = types.Array(types.float32, 4, "C")
    a3 = types.Array(types.float32, 3, "C")
    return [("dropout_mask", dropout_mask,
             (a4, a4, a3, a4, types.float32, types.boolean, types.int64, types.float64, types.uint64))]
