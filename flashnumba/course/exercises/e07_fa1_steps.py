"""Lesson 4: FlashAttention-1's forward (Algorithm 1) as a step generator, graded step by step."""

import numpy as np

from flashnumba import mirror
from flashnumba.course.grading import Mismatch, call, grade, same_array, step_through

ID = "fa1_steps"
LESSON = 4
TITLE = "FA1 Algorithm 1, step by step"
SPEC = ("fa1_forward_steps(Q, K, V, Br, Bc): for j (K/V tiles) outer, i (Q tiles) inner, update "
        "O, l, m (HBM arrays) and yield {'i', 'j', 'O', 'l', 'm'} (copies) after each (i, j); "
        "return (O, l, m)")
NAME = "fa1_forward_steps"


def stub(Q, K, V, Br, Bc):
    raise NotImplementedError("FILL ME IN: O = 0, l = 0, m = -inf; for j: for i: S_ij, m~_ij, "
                              "P~_ij, l~_ij, m_new, l_new, O_i <- ...; yield; return O, l, m")
    yield


def solution(Q, K, V, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)              # ceil(Nq / Br), ceil(Nk / Bc)
    O = np.zeros((Nq, d))                            # O = 0, l = 0, m = -inf in HBM
    l = np.zeros(Nq)
    m = np.full(Nq, -np.inf)
    for j in range(Tc):
        K_j, V_j = K[j * Bc:(j + 1) * Bc], V[j * Bc:(j + 1) * Bc]
        for i in range(Tr):
            rows = slice(i * Br, (i + 1) * Br)
            Q_i, O_i, l_i, m_i = Q[rows], O[rows], l[rows], m[rows]
            S_ij = Q_i @ K_j.T / np.sqrt(d)                  # S_ij = scale Q_i K_j^T
            m_ij = S_ij.max(axis=1)                          # m~_ij = rowmax(S_ij)
            P_ij = np.exp(S_ij - m_ij[:, None])              # P~_ij = exp(S_ij - m~_ij)
            l_ij = P_ij.sum(axis=1)                          # l~_ij = rowsum(P~_ij)
            m_new = np.maximum(m_i, m_ij)                    # m_new = max(m_i, m~_ij)
            alpha = np.exp(m_i - m_new)                      # e^(m_i - m_new)
            beta = np.exp(m_ij - m_new)                      # e^(m~_ij - m_new)
            l_new = alpha * l_i + beta * l_ij
            # O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j)
            O[rows] = ((l_i * alpha)[:, None] * O_i + beta[:, None] * (P_ij @ V_j)) / l_new[:, None]
            l[rows] = l_new
            m[rows] = m_new
            yield {"i": i, "j": j, "O": O.copy(), "l": l.copy(), "m": m.copy()}
    return O, l, m


def perturbed(Q, K, V, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    O, l, m = np.zeros((Nq, d)), np.zeros(Nq), np.full(Nq, -np.inf)
    for j in range(Tc):
        K_j, V_j = K[j * Bc:(j + 1) * Bc], V[j * Bc:(j + 1) * Bc]
        for i in range(Tr):
            rows = slice(i * Br, (i + 1) * Br)
            Q_i, O_i, l_i, m_i = Q[rows], O[rows], l[rows], m[rows]
            S_ij = Q_i @ K_j.T / np.sqrt(d)
            m_ij = S_ij.max(axis=1)
            P_ij = np.exp(S_ij - m_ij[:, None])
            m_new = np.maximum(m_i, m_ij)
            alpha, beta = np.exp(m_i - m_new), np.exp(m_ij - m_new)
            l_new = alpha * l_i + beta * P_ij.sum(axis=1)
            O[rows] = (l_i[:, None] * O_i + beta[:, None] * (P_ij @ V_j)) / l_new[:, None]   # O_i not rescaled
            l[rows], m[rows] = l_new, m_new
            yield {"i": i, "j": j, "O": O.copy(), "l": l.copy(), "m": m.copy()}
    return O, l, m


def mirror_states(Q, K, V, Br, Bc, causal=False):
    """flashnumba.mirror.fa1_forward_steps' state after every inner step, as the exercise yields it."""
    records, _ = mirror.run(mirror.fa1_forward_steps(Q, K, V, Br=Br, Bc=Bc, causal=causal))
    return [{"i": s.i, "j": s.j, **s.state} for s in records]


def check_steps(exercise, implementation, cases, causal):
    """Step the student's generator next to the mirror on each (Nq, Nk, d, Br, Bc) case."""
    def run():
        for Nq, Nk, d, Br, Bc in cases:
            rng = np.random.default_rng(Nq * Nk + d)
            Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            K[-1] *= 4.0                  # a large late score: the running max grows at the last tile
            case = f"{'causal, ' if causal else ''}Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}"
            want = mirror_states(Q, K, V, Br, Bc, causal)
            with np.errstate(all="ignore"):
                final = step_through(call(implementation, Q.copy(), K.copy(), V.copy(), Br, Bc), want,
                                     ("O", "l", "m"), case=case)
            if not isinstance(final, tuple) or len(final) != 3:
                raise Mismatch(f"{case}: the generator must end with `return O, l, m`, got {final!r}")
            for name, got in zip("Olm", final):
                same_array(f"returned {name}", got, want[-1][name], case=case)
        return (f"O, l and m match the mirror (mirror.fa1_forward_steps) after every step "
                f"on {len(cases)} problems")
    return grade(exercise, run)


CASES = ((8, 8, 4, 4, 4), (10, 13, 3, 4, 5))     # Nq, Nk not multiples of Br, Bc; Nq != Nk


def check(implementation):
    return check_steps(ID, implementation, CASES, causal=False)
