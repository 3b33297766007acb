"""FlashAttention forward, as FlashAttention-1 does it (Dao et al. 2022, Algorithm 1;
Algorithm 2 of the appendix adds the masking and dropout written here).

K/V tiles are the outer loop; O, l and m live in HBM and every inner step reads
them and writes them back, already normalised:

    Bc = ceil(M / 4d), Br = min(Bc, d)                                          l. 1
    O = 0 (Nq x d), l = 0 (Nq), m = -inf (Nq)                     in HBM        l. 2
    for j in 0 .. Tc-1:                                           (block loop)  l. 5
        load K_j, V_j                                                           l. 6
        for i in 0 .. Tr-1:                                                     l. 7
            load Q_i, O_i, l_i, m_i                                             l. 8
            S_ij = scale Q_i K_j^T                                 (-inf where masked)   l. 9
            m~_ij = rowmax(S_ij),  P~_ij = exp(S_ij - m~_ij),  l~_ij = rowsum(P~_ij)    l. 10
            m_new = max(m_i, m~_ij)                                                     l. 11
            l_new = e^(m_i - m_new) l_i + e^(m~_ij - m_new) l~_ij                       l. 11
            O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i
                                   + e^(m~_ij - m_new) (P~_ij * Z_ij) V_j)             l. 12
            l_i <- l_new,  m_i <- m_new                            (to HBM)              l. 13
    return O, l, m                                                                      l. 16

(l. n: the line of Algorithm 1 in the paper; the code below carries the same numbers.)

Dropout multiplies P~_ij by Z_ij = keep / (1 - p) before P V; l sums the undropped P~_ij.
Causal: for K_j the i loop runs over the Q tiles that see it (Tiling.q_range);
tiles above the diagonal are skipped, and a K/V tile no Q tile sees is not loaded.
A row with no visible key yet keeps O = 0, l = 0, m = -inf (see common.safe).
`limit` stops the j loop after `limit` K/V tiles.
"""

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.hbm import HBM
from flashnumba.mirror.common import divide_rows, dropped, load, prepare, safe, scores, store
from flashnumba.mirror.trace import finish, record

ALGORITHM = __name__.rpartition(".")[2]     # "fa2_forward": the name its steps carry


def fa1_forward_steps(Q, K, V, *, Br=None, Bc=None, M=None, causal=False, alignment=BOTTOM_RIGHT,
                      softmax_scale=None, keep=None, dropout_p=0.0, limit=None, hbm=None):
    """Yield a Step after every inner step; return (O (Nq, d), l (Nq,), m (Nq,))."""
    Q, K, V, problem = prepare(Q, K, V, Br=Br, Bc=Bc, M=M, causal=causal, alignment=alignment,
                               softmax_scale=softmax_scale, keep=keep, dropout_p=dropout_p,
                               limit=limit)
    t = problem.tiling
    hbm = HBM() if hbm is None else hbm
    Nq, d = Q.shape

    # O = 0, l = 0, m = -inf in HBM                            Alg. 1 l. 2
    O = np.zeros((Nq, d), dtype=problem.dtype)
    l = np.zeros(Nq, dtype=problem.dtype)
    m = np.full(Nq, -np.inf, dtype=problem.dtype)

    step = 0
    for j in range(t.Tc)[:problem.limit]:                        # Alg. 1 l. 5
        i_range = t.q_range(j)
        if len(i_range) == 0:
            continue                                   # no Q tile sees K_j
        cols = t.cols(j)
        K_j = load(hbm, "K", K, cols)                        # Alg. 1 l. 6
        V_j = load(hbm, "V", V, cols)

        for i in i_range:                                    # Alg. 1 l. 7
            rows = t.rows(i)
            Q_i = load(hbm, "Q", Q, rows)                    # Alg. 1 l. 8
            O_i = load(hbm, "O", O, rows)
            l_i = load(hbm, "l", l, rows)
            m_i = load(hbm, "m", m, rows)

            S_ij = scores(problem, Q_i, K_j, i, j)             # scale Q_i K_j^T         Alg. 1 l. 9
            m_ij = S_ij.max(axis=1)                              # m~_ij = rowmax(S_ij)    Alg. 1 l. 10
            P_ij = np.exp(S_ij - safe(m_ij)[:, None])            # P~_ij = exp(S_ij - m~_ij)
            l_ij = P_ij.sum(axis=1)                              # l~_ij = rowsum(P~_ij)

            m_new = np.maximum(m_i, m_ij)                        # m_new = max(m_i, m~_ij) Alg. 1 l. 11
            alpha = np.exp(m_i - safe(m_new))                    # e^(m_i - m_new)
            beta = np.exp(m_ij - safe(m_new))                    # e^(m~_ij - m_new)
            l_new = alpha * l_i + beta * l_ij                    # l_new

            # O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j)   Alg. 1 l. 12
            PV = dropped(P_ij, problem, i, j) @ V_j
            O_i = divide_rows((l_i * alpha)[:, None] * O_i + beta[:, None] * PV, l_new)

            store(hbm, "O", O, rows, O_i)
            store(hbm, "l", l, rows, l_new)                  # Alg. 1 l. 13
            store(hbm, "m", m, rows, m_new)

            reads = (("K_j", "V_j") if i == i_range[0] else ()) + ("Q_i", "O_i", "l_i", "m_i")
            state = {"O": O.copy(), "l": l.copy(), "m": m.copy()}
            yield record(ALGORITHM, step, problem, i, j, reads, ("O_i", "l_i", "m_i"), state,
                         S_ij, P_ij, hbm)
            step += 1

    return O, l, m


def fa1_forward(Q, K, V, **keywords):
    """FlashAttention-1 forward of one head: (O, l, m). Keywords as fa1_forward_steps.

    The log-sum-exp of each row is L = m + log(l).
    """
    return finish(fa1_forward_steps(Q, K, V, **keywords))


def fa1_forward_state(Q, K, V, **keywords):
    """What a step shows (``flashnumba.stepping``): O, l, m in HBM after the steps done."""
    return dict(zip(("O", "l", "m"), fa1_forward(Q, K, V, **keywords)))
