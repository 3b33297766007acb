"""FlashAttention-2 forward (Dao 2023, Algorithm 1).

Q tiles are the outer loop (one thread block each). O_i, l_i, m_i stay on chip,
O_i unnormalised; it is divided by l_i once, at the end, and only O and
L = m + log(l) are written:

    for i in 0 .. Tr-1:                                           (one thread block each)
        load Q_i
        O_i = 0, l_i = 0, m_i = -inf                              on chip
        for j in 0 .. Tc-1:                                       (the thread block's loop)
            load K_j, V_j
            S_ij = scale Q_i K_j^T                                 (-inf where masked)
            m_new = max(m_i, rowmax(S_ij))
            P~_ij = exp(S_ij - m_new)
            l_i <- e^(m_i - m_new) l_i + rowsum(P~_ij)
            O_i <- diag(e^(m_i - m_new)) O_i + (P~_ij * Z_ij) V_j
            m_i <- m_new
        O_i <- diag(l_i)^-1 O_i,   L_i = m_i + log(l_i)
        write O_i, L_i
    return O, L

Dropout multiplies P~_ij by Z_ij = keep / (1 - p) before P V; l sums the undropped P~_ij.
Causal: Q tile i visits Tiling.kv_range(i); tiles above the diagonal are skipped.
A sliding window (window_size=(left, right)) skips the tiles on both sides of its
band, so Q tile i loads about (left + right + Br) / Bc K/V tiles, not Tc: the HBM
reads of K and V fall from O(Nq Nk) to O(Nq w). softcap and alibi_slope change
S_ij only (``mirror.common.scores``).
A Q tile that sees no key at all (causal, Nq > Nk) loads nothing and writes
O_i = 0, L_i = -inf, as the kernel's early exit does.
`limit` stops each Q tile's j loop after `limit` K/V tiles; O_i, L_i are then
finished and written as usual.
"""

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.hbm import HBM
from flashnumba.mirror.common import (
    divide_rows,
    dropped,
    load,
    logsumexp,
    prepare,
    safe,
    scores,
    store,
)
from flashnumba.mirror.trace import finish, record, run

ALGORITHM = __name__.rpartition(".")[2]     # "fa2_forward": the name its steps carry


def _write_out(hbm, O, L, rows, O_i, l_i, m_i):
    """O_i = diag(l_i)^-1 O_i, L_i = m_i + log(l_i), both written to HBM; returns them."""
    O_i_final = divide_rows(O_i, l_i)                # Alg. 1 l. 12
    L_i = logsumexp(m_i, l_i)                   # Alg. 1 l. 13
    store(hbm, "O", O, rows, O_i_final)
    store(hbm, "L", L, rows, L_i)
    return O_i_final, L_i


def fa2_forward_steps(Q, K, V, *, Br=None, Bc=None, M=None, causal=False, alignment=BOTTOM_RIGHT,
                      softmax_scale=None, keep=None, dropout_p=0.0, limit=None, hbm=None,
                      window_size=(-1, -1), softcap=0.0, alibi_slope=0.0):
    """Yield a Step after every inner step; return (O (Nq, d), L (Nq,))."""
    Q, K, V, problem = prepare(Q, K, V, Br=Br, Bc=Bc, M=M, causal=causal, alignment=alignment,
                               softmax_scale=softmax_scale, keep=keep, dropout_p=dropout_p,
                               limit=limit, window_size=window_size, softcap=softcap,
                               alibi_slope=alibi_slope)
    t = problem.tiling
    hbm = HBM() if hbm is None else hbm
    Nq, d = Q.shape
    O = np.empty((Nq, d), dtype=problem.dtype)          # in HBM, every tile written once
    L = np.empty(Nq, dtype=problem.dtype)

    step = 0
    for i in range(t.Tr):                             # Alg. 1 l. 3
        rows = t.rows(i)
        n_rows = rows.stop - rows.start
        # O_i = 0, l_i = 0, m_i = -inf on chip                   Alg. 1 l. 5
        O_i = np.zeros((n_rows, d), dtype=problem.dtype)
        l_i = np.zeros(n_rows, dtype=problem.dtype)
        m_i = np.full(n_rows, -np.inf, dtype=problem.dtype)
        if len(t.kv_range(i)) == 0:                     # no key visible to Q tile i
            _write_out(hbm, O, L, rows, O_i, l_i, m_i)
            continue
        Q_i = load(hbm, "Q", Q, rows)                   # Alg. 1 l. 4

        j_range = t.kv_range(i)[:problem.limit]
        for j in j_range:                               # Alg. 1 l. 6
            cols = t.cols(j)
            K_j = load(hbm, "K", K, cols)                    # Alg. 1 l. 7
            V_j = load(hbm, "V", V, cols)

            S_ij = scores(problem, Q_i, K_j, i, j)             # scale Q_i K_j^T   Alg. 1 l. 8
            m_new = np.maximum(m_i, S_ij.max(axis=1))           # m_new = max(m_i, rowmax(S_ij))   Alg. 1 l. 9
            P_ij = np.exp(S_ij - safe(m_new)[:, None])          # P~_ij = exp(S_ij - m_new)
            alpha = np.exp(m_i - safe(m_new))                   # e^(m_i - m_new)
            l_i = alpha * l_i + P_ij.sum(axis=1)                # l_i = e^(m_i - m_new) l_i + rowsum(P~_ij)
            O_i = alpha[:, None] * O_i + dropped(P_ij, problem, i, j) @ V_j   # Alg. 1 l. 10
            m_i = m_new

            reads = (("Q_i",) if j == j_range[0] else ()) + ("K_j", "V_j")
            writes = ()
            state = {"O_i": O_i.copy(), "l_i": l_i.copy(), "m_i": m_i.copy()}
            if j == j_range[-1]:                                # the j loop ends: finish O_i, L_i
                O_i_final, L_i = _write_out(hbm, O, L, rows, O_i, l_i, m_i)
                writes = ("O_i", "L_i")
                state.update(O_i_final=O_i_final.copy(), L_i=L_i.copy())
            yield record(ALGORITHM, step, problem, i, j, reads, writes, state, S_ij, P_ij, hbm)
            step += 1

        if len(j_range) == 0:                           # limit = 0: nothing accumulated
            _write_out(hbm, O, L, rows, O_i, l_i, m_i)

    return O, L


def fa2_forward(Q, K, V, **keywords):
    """FlashAttention-2 forward of one head: (O, L). Keywords as fa2_forward_steps."""
    return finish(fa2_forward_steps(Q, K, V, **keywords))


def fa2_forward_state(Q, K, V, **keywords):
    """What a step shows (``flashnumba.stepping``): O and L as written, and each row's m_i, l_i
    after the steps done (read from the last step record of its Q tile)."""
    records, (O, L) = run(fa2_forward_steps(Q, K, V, **keywords))
    m = np.full(Q.shape[0], -np.inf)
    l = np.zeros(Q.shape[0])
    for step in records:
        m[step.rows[0]:step.rows[1]] = step.state["m_i"]
        l[step.rows[0]:step.rows[1]] = step.state["l_i"]
    return {"O": O, "L": L, "m": m, "l": l}
