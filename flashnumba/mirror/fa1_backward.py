"""FlashAttention backward, as FlashAttention-1 does it (Dao et al. 2022, Algorithm 4).

P is never stored: each tile P_ij is recomputed from Q_i, K_j and the forward's
l, m. dK_j, dV_j accumulate on chip; dQ_i is read, updated and written back in HBM
at every inner step:

    dQ = 0 (Nq x d), dK = 0, dV = 0 (Nk x d)                      in HBM        l. 5
    for j in 0 .. Tc-1:                                           (block loop)  l. 6
        load K_j, V_j                                                           l. 7
        dK_j = 0, dV_j = 0                                        on chip       l. 8
        for i in 0 .. Tr-1:                                                     l. 9
            load Q_i, O_i, dO_i, dQ_i, l_i, m_i                                 l. 10
            S_ij = scale Q_i K_j^T                                 (-inf where masked)   l. 11-12
            P_ij = diag(l_i)^-1 exp(S_ij - m_i)                                         l. 13
            dV_j <- dV_j + (P_ij * Z_ij)^T dO_i                                         l. 14-16
            dP_ij = (dO_i V_j^T) * Z_ij                                                 l. 17-18
            D_i = rowsum(dO_i * O_i)                                                    l. 19
            dS_ij = P_ij * (dP_ij - D_i)                                                l. 20
            dQ_i <- dQ_i + scale dS_ij K_j                         (to HBM)             l. 21
            dK_j <- dK_j + scale dS_ij^T Q_i                                            l. 22
        write dK_j, dV_j                                                                l. 24
    return dQ, dK, dV                                                                   l. 26

(l. n: the line of Algorithm 4 in the paper; the code below carries the same numbers.)

Z_ij = keep / (1 - p) is the forward's dropout matrix (1 without dropout).
Causal: the i loop runs over Tiling.q_range(j); a K/V tile no Q tile sees is not
loaded and keeps dK_j = dV_j = 0. A row with no visible key (l_i = 0) has P = 0.
`limit` stops the j loop after `limit` K/V tiles.
"""

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.hbm import HBM
from flashnumba.mirror.common import (
    as_matrix,
    divide_rows,
    dropped,
    load,
    prepare,
    safe,
    scores,
    store,
)
from flashnumba.mirror.trace import finish, record

ALGORITHM = __name__.rpartition(".")[2]     # "fa2_forward": the name its steps carry


def fa1_backward_steps(dO, Q, K, V, O, l, m, *, Br=None, Bc=None, M=None, causal=False,
                       alignment=BOTTOM_RIGHT, softmax_scale=None, keep=None, dropout_p=0.0,
                       limit=None, hbm=None):
    """Yield a Step after every inner step; return (dQ (Nq, d), dK (Nk, d), dV (Nk, d)).

    O, l, m are fa1_forward's outputs for the same Q, K, V and keywords.
    """
    Q, K, V, problem = prepare(Q, K, V, Br=Br, Bc=Bc, M=M, causal=causal, alignment=alignment,
                               softmax_scale=softmax_scale, keep=keep, dropout_p=dropout_p,
                               limit=limit)
    t = problem.tiling
    hbm = HBM() if hbm is None else hbm
    dO = as_matrix("dO", dO, problem.dtype)
    O = as_matrix("O", O, problem.dtype)
    l = np.asarray(l, dtype=problem.dtype)
    m = np.asarray(m, dtype=problem.dtype)
    if dO.shape != Q.shape or O.shape != Q.shape or l.shape != (t.Nq,) or m.shape != (t.Nq,):
        raise ValueError(f"dO and O must have Q's shape {Q.shape}, l and m shape {(t.Nq,)}; got "
                         f"{dO.shape}, {O.shape}, {l.shape}, {m.shape}")

    # dQ = 0, dK = 0, dV = 0 in HBM                            Alg. 4 l. 5
    dQ = np.zeros_like(Q)
    dK = np.zeros_like(K)
    dV = np.zeros_like(V)

    step = 0
    for j in range(t.Tc)[:problem.limit]:                        # Alg. 4 l. 6
        i_range = t.q_range(j)
        if len(i_range) == 0:
            continue                                   # no Q tile sees K_j: dK_j = dV_j = 0
        cols = t.cols(j)
        K_j = load(hbm, "K", K, cols)                        # Alg. 4 l. 7
        V_j = load(hbm, "V", V, cols)
        dK_j = np.zeros_like(K_j)                      # on chip    Alg. 4 l. 8
        dV_j = np.zeros_like(V_j)

        for i in i_range:                                    # Alg. 4 l. 9
            rows = t.rows(i)
            Q_i = load(hbm, "Q", Q, rows)                    # Alg. 4 l. 10
            O_i = load(hbm, "O", O, rows)
            dO_i = load(hbm, "dO", dO, rows)
            dQ_i = load(hbm, "dQ", dQ, rows)
            l_i = load(hbm, "l", l, rows)
            m_i = load(hbm, "m", m, rows)

            S_ij = scores(problem, Q_i, K_j, i, j)                     # scale Q_i K_j^T       Alg. 4 l. 11-12
            P_ij = divide_rows(np.exp(S_ij - safe(m_i)[:, None]), l_i)  # diag(l_i)^-1 exp(S_ij - m_i)          l. 13
            dV_j += dropped(P_ij, problem, i, j).T @ dO_i               # dV_j += (P_ij Z_ij)^T dO_i           l. 14-16
            dP_ij = dropped(dO_i @ V_j.T, problem, i, j)                # dP_ij = (dO_i V_j^T) Z_ij            l. 17-18
            D_i = (dO_i * O_i).sum(axis=1)                              # D_i = rowsum(dO_i * O_i)             l. 19
            dS_ij = P_ij * (dP_ij - D_i[:, None])                       # dS_ij = P_ij (dP_ij - D_i)           l. 20
            dQ_i += problem.scale * (dS_ij @ K_j)                       # dQ_i += scale dS_ij K_j              l. 21
            dK_j += problem.scale * (dS_ij.T @ Q_i)                     # dK_j += scale dS_ij^T Q_i            l. 22
            store(hbm, "dQ", dQ, rows, dQ_i)

            writes = ("dQ_i",)
            if i == i_range[-1]:                                        # end of the i loop: l. 24
                store(hbm, "dK", dK, cols, dK_j)
                store(hbm, "dV", dV, cols, dV_j)
                writes += ("dK_j", "dV_j")
            reads = (("K_j", "V_j") if i == i_range[0] else ()) + (
                "Q_i", "O_i", "dO_i", "dQ_i", "l_i", "m_i")
            state = {"dK_j": dK_j.copy(), "dV_j": dV_j.copy(), "dQ": dQ.copy()}
            yield record(ALGORITHM, step, problem, i, j, reads, writes, state, S_ij, P_ij, hbm)
            step += 1

    return dQ, dK, dV


def fa1_backward(dO, Q, K, V, O, l, m, **keywords):
    """FlashAttention-1 backward of one head: (dQ, dK, dV). Keywords as fa1_backward_steps."""
    return finish(fa1_backward_steps(dO, Q, K, V, O, l, m, **keywords))


def fa1_backward_state(dO, Q, K, V, O, L, **keywords):
    """What a step shows (``flashnumba.stepping``): dQ, dK, dV after the steps done, from FA2's
    L: m = L and l = 1 give the same P_ij = exp(S_ij - m_i) / l_i (l = 0 where L = -inf)."""
    l = np.where(np.isneginf(L), 0.0, 1.0)
    return dict(zip(("dQ", "dK", "dV"), fa1_backward(dO, Q, K, V, O, l, L, **keywords)))
