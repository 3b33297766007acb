"""Lesson 12: dropout inside FA2's online softmax: l sums P~, O accumulates (P~ o Z) V."""

import numpy as np

from flashnumba import mirror, philox, reference
from flashnumba.course.grading import Mismatch, call, grade, same_array, step_through

ID = "dropout_forward"
LESSON = 12
TITLE = "dropout in the online softmax"
SPEC = ("fa2_dropout_steps(Q, K, V, keep, p, Br, Bc): FA2 forward (i outer, j inner) with "
        "Z = keep / (1 - p): l_i sums P~_ij undropped, O_i += (P~_ij * Z_ij) V_j; yield "
        "{'i', 'j', 'O_i', 'l_i', 'm_i'} after each tile; return (O, L)")
NAME = "fa2_dropout_steps"


def stub(Q, K, V, keep, p, Br, Bc):
    raise NotImplementedError("FILL ME IN: lesson 9's FA2 loop (no mask) with Z_ij = keep_ij / (1 - p) "
                              "multiplying P~_ij in O_i's update only, not in l_i's")
    yield


def solution(Q, K, V, keep, p, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    Z = np.where(keep, 1.0 / (1.0 - p), 0.0)              # Z = keep / (1 - p): E[Z] = 1
    O = np.zeros((Nq, d))
    L = np.zeros(Nq)
    for i in range(Tr):
        rows = slice(i * Br, min((i + 1) * Br, Nq))
        Q_i = Q[rows]
        n = Q_i.shape[0]
        O_i, l_i, m_i = np.zeros((n, d)), np.zeros(n), np.full(n, -np.inf)
        for j in range(Tc):
            cols = slice(j * Bc, min((j + 1) * Bc, Nk))
            S_ij = Q_i @ K[cols].T / np.sqrt(d)
            m_new = np.maximum(m_i, S_ij.max(axis=1))
            P_ij = np.exp(S_ij - m_new[:, None])           # P~_ij = exp(S_ij - m_new)
            alpha = np.exp(m_i - m_new)
            l_i = alpha * l_i + P_ij.sum(axis=1)           # the softmax's sum: every key, kept or not
            O_i = alpha[:, None] * O_i + (P_ij * Z[rows, cols]) @ V[cols]   # dropout on P, before P V
            m_i = m_new
            yield {"i": i, "j": j, "O_i": O_i.copy(), "l_i": l_i.copy(), "m_i": m_i.copy()}
        O[rows] = O_i / l_i[:, None]
        L[rows] = m_i + np.log(l_i)                        # L does not depend on dropout
    return O, L


def perturbed(Q, K, V, keep, p, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    Z = np.where(keep, 1.0 / (1.0 - p), 0.0)
    O, L = np.zeros((Nq, d)), np.zeros(Nq)
    for i in range(Tr):
        rows = slice(i * Br, min((i + 1) * Br, Nq))
        Q_i = Q[rows]
        n = Q_i.shape[0]
        O_i, l_i, m_i = np.zeros((n, d)), np.zeros(n), np.full(n, -np.inf)
        for j in range(Tc):
            cols = slice(j * Bc, min((j + 1) * Bc, Nk))
            S_ij = Q_i @ K[cols].T / np.sqrt(d)
            m_new = np.maximum(m_i, S_ij.max(axis=1))
            P_ij = np.exp(S_ij - m_new[:, None]) * Z[rows, cols]     # dropped before the sum, too
            alpha = np.exp(m_i - m_new)
            l_i = alpha * l_i + P_ij.sum(axis=1)
            O_i = alpha[:, None] * O_i + P_ij @ V[cols]
            m_i = m_new
            yield {"i": i, "j": j, "O_i": O_i.copy(), "l_i": l_i.copy(), "m_i": m_i.copy()}
        O[rows] = O_i / l_i[:, None]
        L[rows] = m_i + np.log(l_i)
    return O, L


CASES = ((8, 8, 4, 4, 4, 0.2, 1), (10, 13, 3, 4, 5, 0.5, 2), (7, 9, 5, 8, 4, 0.1, 2 ** 33 + 5))


def check(implementation):
    def run():
        for Nq, Nk, d, Br, Bc, p, seed in CASES:
            rng = np.random.default_rng(Nq * Nk + d)
            Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            keep = philox.keep_mask(seed, p, 1, 1, Nq, Nk)[0, 0]
            case = f"Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}, p={p}"
            records, _ = mirror.run(mirror.fa2_forward_steps(Q, K, V, Br=Br, Bc=Bc, keep=keep, dropout_p=p))
            want = [{"i": s.i, "j": s.j, **s.state} for s in records]
            with np.errstate(all="ignore"):
                final = step_through(call(implementation, Q.copy(), K.copy(), V.copy(), keep.copy(), p,
                                          Br, Bc), want, ("O_i", "l_i", "m_i"), case=case)
            if not isinstance(final, tuple) or len(final) != 2:
                raise Mismatch(f"{case}: the generator must end with `return O, L`, got {final!r}")
            out, lse = reference.attention(Q[None, :, None], K[None, :, None], V[None, :, None],
                                           dropout_p=p, dropout_mask=keep[None, None])
            same_array("returned O", final[0], out[0, :, 0], case=case)
            same_array("returned L", final[1], lse[0, 0], case=case)
        return (f"every step matches mirror.fa2_forward_steps with dropout, and O, L match "
                f"reference.attention(dropout_mask=...) on {len(CASES)} problems")
    return grade(ID, run)
