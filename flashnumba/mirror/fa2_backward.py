"""FlashAttention-2 backward (Dao 2023, Algorithm 2).

D = rowsum(dO * O) is computed first, in its own pass. Then K/V tiles are the
outer loop (one thread block each); dK_j, dV_j accumulate on chip, P_ij is
recomputed from L alone, and dQ_i is read, updated and written back in HBM at
every inner step (atomic adds on a GPU):

    for i in 0 .. Tr-1:  load dO_i, O_i;  D_i = rowsum(dO_i * O_i);  write D_i   l. 4
    dQ = 0 (Nq x d), in HBM                                              l. 3
    for j in 0 .. Tc-1:                  (one thread block each)         l. 5
        load K_j, V_j                                                    l. 6
        dK_j = 0, dV_j = 0               on chip                         l. 7
        for i in 0 .. Tr-1:              (the thread block's loop)       l. 8
            load Q_i, dO_i, dQ_i, L_i, D_i                               l. 9
            S_ij = scale Q_i K_j^T       (-inf where masked)             l. 10
            P_ij = exp(S_ij - L_i)                                       l. 11
            dV_j <- dV_j + (P_ij * Z_ij)^T dO_i                          l. 12
            dP_ij = (dO_i V_j^T) * Z_ij                                  l. 13
            dS_ij = P_ij * (dP_ij - D_i)                                 l. 14
            dQ_i <- dQ_i + scale dS_ij K_j   (written to HBM)            l. 15
            dK_j <- dK_j + scale dS_ij^T Q_i                             l. 16
        write dK_j, dV_j                                                 l. 18
    return dQ, dK, dV                                                    l. 20

(l. n: the line of Algorithm 2 in the paper; the code below carries the same numbers.
The paper writes dQ = 0 (l. 3) before D (l. 4); the order does not matter.)

The paper also lists O_i among the inner loads; once D is precomputed nothing
uses it, so (like flash-attn) it is not loaded here.
Z_ij = keep / (1 - p) is the forward's dropout matrix (1 without dropout).
Causal or a sliding window (window_size): K/V tile j visits Tiling.q_range(j); a K/V tile no Q tile sees loads
nothing and writes dK_j = dV_j = 0. A row with no visible key (L_i = -inf) has P = 0.
Softcap multiplies dS_ij by 1 - tanh^2(scale Q_i K_j^T / softcap); ALiBi's bias
(alibi_slope) changes P_ij only.
`limit` stops each K/V tile's i loop after `limit` Q tiles; dK_j, dV_j are then
written as usual.
"""

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.hbm import HBM
from flashnumba.mirror.common import (
    as_matrix,
    dropped,
    load,
    prepare,
    safe,
    scores,
    softcap_derivative,
    store,
)
from flashnumba.mirror.trace import finish, record

ALGORITHM = __name__.rpartition(".")[2]     # "fa2_backward": the name its steps carry


def fa2_backward_steps(dO, Q, K, V, O, L, *, Br=None, Bc=None, M=None, causal=False,
                       alignment=BOTTOM_RIGHT, softmax_scale=None, keep=None, dropout_p=0.0,
                       limit=None, hbm=None, window_size=(-1, -1), softcap=0.0, alibi_slope=0.0):
    """Yield a Step after every inner step; return (dQ (Nq, d), dK (Nk, d), dV (Nk, d)).

    O, L are fa2_forward's outputs for the same Q, K, V and keywords.
    """
    Q, K, V, problem = prepare(Q, K, V, Br=Br, Bc=Bc, M=M, causal=causal, alignment=alignment,
                               softmax_scale=softmax_scale, keep=keep, dropout_p=dropout_p,
                               limit=limit, window_size=window_size, softcap=softcap,
                               alibi_slope=alibi_slope)
    t = problem.tiling
    hbm = HBM() if hbm is None else hbm
    dO = as_matrix("dO", dO, problem.dtype)
    O = as_matrix("O", O, problem.dtype)
    L = np.asarray(L, dtype=problem.dtype)
    if dO.shape != Q.shape or O.shape != Q.shape or L.shape != (t.Nq,):
        raise ValueError(f"dO and O must have Q's shape {Q.shape}, L shape {(t.Nq,)}; got "
                         f"{dO.shape}, {O.shape}, {L.shape}")

    # D = rowsum(dO * O), one Q tile at a time, written to HBM      Alg. 2 l. 4
    D = np.empty(t.Nq, dtype=problem.dtype)
    for i in range(t.Tr):
        rows = t.rows(i)
        dO_i = load(hbm, "dO", dO, rows)
        O_i = load(hbm, "O", O, rows)
        store(hbm, "D", D, rows, (dO_i * O_i).sum(axis=1))

    dQ = np.zeros_like(Q)                               # dQ = 0 in HBM   Alg. 2 l. 3
    dK = np.empty_like(K)                               # every tile written once
    dV = np.empty_like(V)

    step = 0
    for j in range(t.Tc):                               # Alg. 2 l. 5
        cols = t.cols(j)
        dK_j = np.zeros((cols.stop - cols.start, problem.d), dtype=problem.dtype)   # on chip   Alg. 2 l. 7
        dV_j = np.zeros_like(dK_j)
        if len(t.q_range(j)) == 0:                      # no Q tile sees K_j
            store(hbm, "dK", dK, cols, dK_j)
            store(hbm, "dV", dV, cols, dV_j)
            continue
        K_j = load(hbm, "K", K, cols)                   # Alg. 2 l. 6
        V_j = load(hbm, "V", V, cols)

        i_range = t.q_range(j)[:problem.limit]
        for i in i_range:                               # Alg. 2 l. 8
            rows = t.rows(i)
            Q_i = load(hbm, "Q", Q, rows)               # Alg. 2 l. 9
            dO_i = load(hbm, "dO", dO, rows)
            dQ_i = load(hbm, "dQ", dQ, rows)
            L_i = load(hbm, "L", L, rows)
            D_i = load(hbm, "D", D, rows)

            S_ij = scores(problem, Q_i, K_j, i, j)             # scale Q_i K_j^T   Alg. 2 l. 10
            P_ij = np.exp(S_ij - safe(L_i)[:, None])            # P_ij = exp(S_ij - L_i)   Alg. 2 l. 11
            dV_j += dropped(P_ij, problem, i, j).T @ dO_i       # dV_j += (P_ij Z_ij)^T dO_i   Alg. 2 l. 12
            dP_ij = dropped(dO_i @ V_j.T, problem, i, j)        # dP_ij = (dO_i V_j^T) Z_ij   Alg. 2 l. 13
            dS_ij = P_ij * (dP_ij - D_i[:, None])               # dS_ij = P_ij (dP_ij - D_i)   Alg. 2 l. 14
            dS_ij = dS_ij * softcap_derivative(problem, Q_i, K_j)   # softcap: times 1 - tanh^2
            dQ_i += problem.scale * (dS_ij @ K_j)               # dQ_i += scale dS_ij K_j   Alg. 2 l. 15
            dK_j += problem.scale * (dS_ij.T @ Q_i)             # dK_j += scale dS_ij^T Q_i   Alg. 2 l. 16
            store(hbm, "dQ", dQ, rows, dQ_i)

            writes = ("dQ_i",)
            if i == i_range[-1]:                                # the i loop ends: Alg. 2 l. 18
                store(hbm, "dK", dK, cols, dK_j)
                store(hbm, "dV", dV, cols, dV_j)
                writes += ("dK_j", "dV_j")
            reads = (("K_j", "V_j") if i == i_range[0] else ()) + (
                "Q_i", "dO_i", "dQ_i", "L_i", "D_i")
            state = {"dK_j": dK_j.copy(), "dV_j": dV_j.copy(), "dQ": dQ.copy()}
            yield record(ALGORITHM, step, problem, i, j, reads, writes, state, S_ij, P_ij, hbm)
            step += 1

        if len(i_range) == 0:                           # limit = 0: nothing accumulated
            store(hbm, "dK", dK, cols, dK_j)
            store(hbm, "dV", dV, cols, dV_j)

    return dQ, dK, dV


def fa2_backward(dO, Q, K, V, O, L, **keywords):
    """FlashAttention-2 backward of one head: (dQ, dK, dV). Keywords as fa2_backward_steps."""
    return finish(fa2_backward_steps(dO, Q, K, V, O, L, **keywords))


def fa2_backward_state(dO, Q, K, V, O, L, **keywords):
    """What a step shows (``flashnumba.stepping``): dQ, dK, dV after the steps done."""
    return dict(zip(("dQ", "dK", "dV"), fa2_backward(dO, Q, K, V, O, L, **keywords)))
