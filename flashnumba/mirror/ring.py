"""Ring attention (Liu, Zaharia, Abbeel 2023) over P simulated ranks, step by step.

The sequence is split over P ranks (``flashnumba.ring_geometry``: contiguous or zigzag).
Each rank keeps its Q_r; the K/V blocks travel around the ring, one hop per step, and
each rank runs FlashAttention-2 on (Q_r, the visiting K_j, V_j). Partial outputs merge
by their log-sum-exps (``flashnumba.merge``), FA1's online softmax one level up:

    forward, on every rank r at once:
        O_r = 0, L_r = -inf
        for s in 0 .. P-1:                        (step s: the block of rank j = r - s mod P is here)
            O_rj, L_rj = attention(Q_r, K_j, V_j)  on the piece the geometry says (or skipped)
            O_r, L_r = merge_pair(O_r, L_r, O_rj, L_rj)
            send K_j, V_j to rank r + 1; receive the next block from rank r - 1

    backward, with the final O_r, L_r (so P_rj = exp(S_rj - L_r) is the true softmax):
        dQ_r = 0;  the travelling sums dK_j, dV_j start at 0 with their block
        for s in 0 .. P-1:
            dQ_rj, dK_rj, dV_rj = attention_backward(dO_r, Q_r, K_j, V_j, O_r, L_r)
            dQ_r += dQ_rj;  dK_j += dK_rj;  dV_j += dV_rj
            send K_j, V_j, dK_j, dV_j to rank r + 1; receive from rank r - 1
        after P steps rank r holds block r + 1's finished sums: one more hop sends them home

Inputs are the full sequences in flash layout: Q (B, N, Hq, d), K, V (B, N, Hkv, d),
Hq % Hkv == 0 (GQA: query head h reads K/V head h // (Hq / Hkv)). The mirror shards
them, runs the ring, and returns full tensors (unsharded), so a test compares them
with ``flashnumba.reference`` directly. Each visit runs the FA2 mirrors
(``mirror.fa2_forward``, ``mirror.fa2_backward``) per batch and head.

Each ``*_steps`` generator yields one ``Step`` per rank per ring step (P x P in all,
ranks in order within a step), with the trace's fields read for the ring:

    i           the rank r (its Q block)
    j           the rank whose K/V block visits (j = r - s mod P)
    kind        FULL, PARTIAL (the diagonal block) or SKIPPED: unlike the tile mirrors, a
                skipped visit has a record, because its block still arrives and moves on
    rows, cols  (start, stop) of the local query rows and the visiting block's key columns
                computed ((0, 0) when skipped)
    reads       what arrived from rank r - 1 before this step: () at step 0, else
                ("K_j", "V_j") (forward) or ("K_j", "V_j", "dK_j", "dV_j") (backward)
    writes      what leaves for rank r + 1 after it: ("K_j", "V_j") (not after the last
                forward step), ("K_j", "V_j", "dK_j", "dV_j") (backward; after the last
                step only "dK_j", "dV_j", going home)
    state       forward: "O_r" (B, n, Hq, d), "L_r" (B, Hq, n): rank r's merged output so far
                backward: "dQ_r" (rank r's sum so far), "dK_j", "dV_j" (block j's travelling sums)
    S_ij, P_ij  None; hbm_reads, hbm_writes  {} (the per-head mirrors count HBM, not the ring)

Dropout: `keep` is the boolean keep-mask (B, Hq, N, N) of the whole sequence; each visit
uses its rows and columns at their global positions, so the ring drops exactly what a
single call on the full sequence drops.
"""

import numpy as np

from flashnumba.geometry import SKIPPED
from flashnumba.merge import merge_pair
from flashnumba.mirror.fa2_backward import fa2_backward
from flashnumba.mirror.fa2_forward import fa2_forward
from flashnumba.mirror.trace import Step, finish
from flashnumba.ring_geometry import CONTIGUOUS, check_split, piece, positions, shard, unshard

FORWARD = "ring_forward"
BACKWARD = "ring_backward"


def _check(Q, K, V, world, layout, keep, dropout_p):
    """Shapes and options of a ring call; returns (Q, K, V) in the compute dtype and n = N / P."""
    Q, K, V = (np.asarray(X) for X in (Q, K, V))
    for name, X in (("Q", Q), ("K", K), ("V", V)):
        if X.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, nheads, headdim), got shape {X.shape}")
    if K.shape != V.shape:
        raise ValueError(f"K and V must have the same shape, got {K.shape} and {V.shape}")
    B, N, H_q, d = Q.shape
    if K.shape[0] != B or K.shape[1] != N or K.shape[3] != d:
        raise ValueError(f"K {K.shape} must match Q {Q.shape} in batch, seqlen and headdim "
                         f"(the ring attends a sequence to itself)")
    if H_q % K.shape[2] != 0:
        raise ValueError(f"nheads_q={H_q} must be a multiple of nheads_kv={K.shape[2]}")
    if int(world) != world or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    n = check_split(N, int(world), layout)
    if keep is not None and np.shape(keep) != (B, H_q, N, N):
        raise ValueError(f"keep must have shape {(B, H_q, N, N)}, got {np.shape(keep)}")
    if dropout_p > 0.0 and keep is None:
        raise ValueError("dropout_p > 0 needs keep, the boolean (B, Hq, N, N) keep-mask")
    dtype = np.result_type(Q, K, V)
    dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)
    return Q.astype(dtype), K.astype(dtype), V.astype(dtype), n


def _visit_keep(keep, world, n, layout, p):
    """The keep-mask of piece p: its query rows and key columns at their global positions."""
    if keep is None:
        return None
    rows = positions(p.rank, world, n, layout)[slice(*p.rows)]
    cols = positions(p.src, world, n, layout)[slice(*p.cols)]
    return keep[:, :, rows][:, :, :, cols]                 # (B, Hq, rows, cols)


def _heads(Q):
    """(b, h) for every batch and query head (each visit runs the per-head mirrors on each)."""
    B, _, H_q, _ = Q.shape
    return [(b, h) for b in range(B) for h in range(H_q)]


def _visit_forward(Q_r, K_j, V_j, p, keep_p, options):
    """(O_rj (B, n, Hq, d), L_rj (B, Hq, n)) of one visit: -inf / 0 outside the piece's rows."""
    B, n, H_q, _ = Q_r.shape
    group = H_q // K_j.shape[2]
    O_rj = np.zeros_like(Q_r)
    L_rj = np.full((B, H_q, n), -np.inf, dtype=Q_r.dtype)   # rows the piece leaves out saw no key
    if p.kind == SKIPPED:
        return O_rj, L_rj
    rows, cols = slice(*p.rows), slice(*p.cols)
    for b, h in _heads(Q_r):
        O_bh, L_bh = fa2_forward(Q_r[b, rows, h], K_j[b, cols, h // group], V_j[b, cols, h // group],
                                 causal=p.causal, keep=None if keep_p is None else keep_p[b, h],
                                 **options)
        O_rj[b, rows, h] = O_bh
        L_rj[b, h, rows] = L_bh
    return O_rj, L_rj


def _visit_backward(dO_r, Q_r, K_j, V_j, O_r, L_r, p, keep_p, options):
    """(dQ_rj, dK_rj, dV_rj) of one visit, zero outside the piece."""
    H_q = Q_r.shape[2]
    group = H_q // K_j.shape[2]
    dQ_rj, dK_rj, dV_rj = np.zeros_like(Q_r), np.zeros_like(K_j), np.zeros_like(V_j)
    if p.kind == SKIPPED:
        return dQ_rj, dK_rj, dV_rj
    rows, cols = slice(*p.rows), slice(*p.cols)
    for b, h in _heads(Q_r):
        h_kv = h // group
        dQ_bh, dK_bh, dV_bh = fa2_backward(
            dO_r[b, rows, h], Q_r[b, rows, h], K_j[b, cols, h_kv], V_j[b, cols, h_kv],
            O_r[b, rows, h], L_r[b, h, rows], causal=p.causal,
            keep=None if keep_p is None else keep_p[b, h], **options)
        dQ_rj[b, rows, h] += dQ_bh
        dK_rj[b, cols, h_kv] += dK_bh                         # GQA: a K/V head sums its query heads
        dV_rj[b, cols, h_kv] += dV_bh
    return dQ_rj, dK_rj, dV_rj


def _options(softmax_scale, dropout_p, Br, Bc):
    return {"softmax_scale": softmax_scale, "dropout_p": dropout_p, "Br": Br, "Bc": Bc}


def ring_forward_steps(Q, K, V, *, world, layout=CONTIGUOUS, causal=False, softmax_scale=None,
                       keep=None, dropout_p=0.0, Br=None, Bc=None):
    """Yield a Step per rank per ring step; return (O (B, N, Hq, d), L (B, Hq, N)), unsharded."""
    Q, K, V, n = _check(Q, K, V, world, layout, keep, dropout_p)
    P = int(world)
    options = _options(softmax_scale, dropout_p, Br, Bc)
    Q_r = [shard(Q, r, P, layout) for r in range(P)]            # stays on rank r
    held = [(r, shard(K, r, P, layout), shard(V, r, P, layout)) for r in range(P)]   # (j, K_j, V_j)
    B, _, H_q, _ = Q.shape
    O = [np.zeros_like(Q_r[r]) for r in range(P)]               # O_r = 0
    L = [np.full((B, H_q, n), -np.inf, dtype=Q.dtype) for r in range(P)]   # L_r = -inf

    count = 0
    for s in range(P):
        for r in range(P):
            j, K_j, V_j = held[r]
            p = piece(r, s, P, n, layout, causal)
            O_rj, L_rj = _visit_forward(Q_r[r], K_j, V_j, p, _visit_keep(keep, P, n, layout, p), options)
            O[r], L[r] = _merge(O[r], L[r], O_rj, L_rj)            # O_r, L_r = merge_pair(...)
            yield Step(FORWARD, count, r, j, p.kind, p.rows, p.cols,
                       reads=("K_j", "V_j") if s > 0 else (),
                       writes=("K_j", "V_j") if s < P - 1 else (),
                       state={"O_r": O[r].copy(), "L_r": L[r].copy()})
            count += 1
        if s < P - 1:
            held = [held[(r - 1) % P] for r in range(P)]        # every block moves one hop: r -> r + 1

    return unshard(O, layout), unshard(L, layout, dim=2)


def _merge(O_r, L_r, O_rj, L_rj):
    """merge_pair in flash layout: O (B, n, H, d) is merged as (B, H, n, d) beside L (B, H, n)."""
    O, L = merge_pair(O_r.swapaxes(1, 2), L_r, O_rj.swapaxes(1, 2), L_rj)
    return np.ascontiguousarray(O.swapaxes(1, 2)), L


def ring_backward_steps(dO, Q, K, V, O, L, *, world, layout=CONTIGUOUS, causal=False,
                        softmax_scale=None, keep=None, dropout_p=0.0, Br=None, Bc=None):
    """Yield a Step per rank per ring step; return (dQ, dK, dV), unsharded.

    O (B, N, Hq, d) and L (B, Hq, N) are ring_forward's (or the reference's) outputs.
    """
    Q, K, V, n = _check(Q, K, V, world, layout, keep, dropout_p)
    P = int(world)
    options = _options(softmax_scale, dropout_p, Br, Bc)
    dO_r, Q_r, O_r = ([shard(np.asarray(X, dtype=Q.dtype), r, P, layout) for r in range(P)]
                      for X in (dO, Q, O))
    L_r = [shard(np.asarray(L, dtype=Q.dtype), r, P, layout, dim=2) for r in range(P)]
    held = [(r, shard(K, r, P, layout), shard(V, r, P, layout)) for r in range(P)]   # (j, K_j, V_j)
    dKV = [(np.zeros_like(K_j), np.zeros_like(V_j)) for _, K_j, V_j in held]       # travel with them
    dQ = [np.zeros_like(Q_r[r]) for r in range(P)]

    count = 0
    for s in range(P):
        for r in range(P):
            j, K_j, V_j = held[r]
            p = piece(r, s, P, n, layout, causal)
            dQ_rj, dK_rj, dV_rj = _visit_backward(dO_r[r], Q_r[r], K_j, V_j, O_r[r], L_r[r], p,
                                                  _visit_keep(keep, P, n, layout, p), options)
            dQ[r] = dQ[r] + dQ_rj                                # dQ_r += dQ_rj
            dKV[r] = (dKV[r][0] + dK_rj, dKV[r][1] + dV_rj)     # dK_j += dK_rj, dV_j += dV_rj
            sums = ("dK_j", "dV_j")
            yield Step(BACKWARD, count, r, j, p.kind, p.rows, p.cols,
                       reads=("K_j", "V_j") + sums if s > 0 else (),
                       writes=("K_j", "V_j") + sums if s < P - 1 else sums,
                       state={"dQ_r": dQ[r].copy(), "dK_j": dKV[r][0].copy(), "dV_j": dKV[r][1].copy()})
            count += 1
        held = [held[(r - 1) % P] for r in range(P)]            # blocks and their sums move r -> r + 1
        dKV = [dKV[(r - 1) % P] for r in range(P)]              # (after the last step: only the sums)

    # after P hops every sum is home: rank r holds block r's finished dK_r, dV_r
    assert all(held[r][0] == r for r in range(P))
    dK = unshard([dK_r for dK_r, _ in dKV], layout)
    dV = unshard([dV_r for _, dV_r in dKV], layout)
    return unshard(dQ, layout), dK, dV


def ring_forward(Q, K, V, **keywords):
    """Ring attention forward on P simulated ranks: (O, L) of the full sequence. Keywords as
    ring_forward_steps."""
    return finish(ring_forward_steps(Q, K, V, **keywords))


def ring_backward(dO, Q, K, V, O, L, **keywords):
    """Ring attention backward on P simulated ranks: (dQ, dK, dV). Keywords as ring_backward_steps."""
    return finish(ring_backward_steps(dO, Q, K, V, O, L, **keywords))
