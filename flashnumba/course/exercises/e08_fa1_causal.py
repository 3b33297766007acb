"""Lesson 4: FlashAttention-1's forward with the causal mask, skipping the tiles it hides."""

import numpy as np

from flashnumba.course.exercises.e07_fa1_steps import check_steps

ID = "fa1_causal"
LESSON = 4
TITLE = "FA1 with the causal mask, skipping hidden tiles"
SPEC = ("fa1_causal_steps(Q, K, V, Br, Bc): as fa1_forward_steps with the bottom-right causal mask "
        "(key c visible to query r when c <= r + Nk - Nq); tiles (i, j) with no visible key are "
        "skipped (no step); rows that have seen no key keep O = 0, l = 0, m = -inf")
NAME = "fa1_causal_steps"


def stub(Q, K, V, Br, Bc):
    raise NotImplementedError("FILL ME IN: skip (i, j) when j*Bc > (last row of Q_i) + Nk - Nq; "
                              "mask S_ij with -inf; guard exp against -inf - (-inf)")
    yield


def solution(Q, K, V, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    offset = Nk - Nq                                  # bottom-right: key c visible when c <= r + offset
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    O = np.zeros((Nq, d))
    l = np.zeros(Nq)
    m = np.full(Nq, -np.inf)
    for j in range(Tc):
        K_j, V_j = K[j * Bc:(j + 1) * Bc], V[j * Bc:(j + 1) * Bc]
        for i in range(Tr):
            last_row = min((i + 1) * Br, Nq) - 1
            if j * Bc > last_row + offset:
                continue                                 # no row of Q_i sees any key of K_j: skipped
            rows = slice(i * Br, (i + 1) * Br)
            Q_i, O_i, l_i, m_i = Q[rows], O[rows], l[rows], m[rows]
            r = np.arange(rows.start, min(rows.stop, Nq))[:, None]
            c = np.arange(j * Bc, min((j + 1) * Bc, Nk))[None, :]
            S_ij = np.where(c <= r + offset, Q_i @ K_j.T / np.sqrt(d), -np.inf)
            m_ij = S_ij.max(axis=1)                          # -inf for a row that sees no key here
            P_ij = np.exp(S_ij - np.where(np.isneginf(m_ij), 0.0, m_ij)[:, None])
            l_ij = P_ij.sum(axis=1)
            m_new = np.maximum(m_i, m_ij)
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)   # no key seen yet: exp(-inf - 0) = 0
            alpha = np.exp(m_i - m_safe)
            beta = np.exp(m_ij - m_safe)
            l_new = alpha * l_i + beta * l_ij
            numerator = (l_i * alpha)[:, None] * O_i + beta[:, None] * (P_ij @ V_j)
            O[rows] = np.divide(numerator, l_new[:, None], out=np.zeros_like(O_i),
                                where=l_new[:, None] > 0)       # a row with l = 0 keeps O = 0
            l[rows] = l_new
            m[rows] = m_new
            yield {"i": i, "j": j, "O": O.copy(), "l": l.copy(), "m": m.copy()}
    return O, l, m


def perturbed(Q, K, V, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    offset = Nk - Nq
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    O, l, m = np.zeros((Nq, d)), np.zeros(Nq), np.full(Nq, -np.inf)
    for j in range(Tc):
        K_j, V_j = K[j * Bc:(j + 1) * Bc], V[j * Bc:(j + 1) * Bc]
        for i in range(Tr):                              # masks correctly but never skips a tile
            rows = slice(i * Br, (i + 1) * Br)
            Q_i, O_i, l_i, m_i = Q[rows], O[rows], l[rows], m[rows]
            r = np.arange(rows.start, min(rows.stop, Nq))[:, None]
            c = np.arange(j * Bc, min((j + 1) * Bc, Nk))[None, :]
            S_ij = np.where(c <= r + offset, Q_i @ K_j.T / np.sqrt(d), -np.inf)
            m_ij = S_ij.max(axis=1)
            P_ij = np.exp(S_ij - np.where(np.isneginf(m_ij), 0.0, m_ij)[:, None])
            m_new = np.maximum(m_i, m_ij)
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
            alpha, beta = np.exp(m_i - m_safe), np.exp(m_ij - m_safe)
            l_new = alpha * l_i + beta * P_ij.sum(axis=1)
            numerator = (l_i * alpha)[:, None] * O_i + beta[:, None] * (P_ij @ V_j)
            O[rows] = np.divide(numerator, l_new[:, None], out=np.zeros_like(O_i), where=l_new[:, None] > 0)
            l[rows], m[rows] = l_new, m_new
            yield {"i": i, "j": j, "O": O.copy(), "l": l.copy(), "m": m.copy()}
    return O, l, m


CASES = ((8, 8, 4, 4, 4), (12, 7, 3, 4, 3), (6, 14, 5, 4, 4))   # Nq > Nk: rows that see no key


def check(implementation):
    return check_steps(ID, implementation, CASES, causal=True)
