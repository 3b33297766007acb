"""Lesson 9: the FA2 forward (Q tiles outer) with either causal alignment, skipping hidden tiles."""

import numpy as np

from flashnumba import mirror
from flashnumba.course.grading import Mismatch, call, grade, same_array, step_through

ID = "fa2_causal"
LESSON = 9
TITLE = "FA2 forward, causal, tiles skipped"
SPEC = ("fa2_causal_steps(Q, K, V, Br, Bc, offset): for i (Q tiles) outer, j inner over the K/V tiles "
        "Q_i sees (c <= r + offset), yield {'i', 'j', 'O_i', 'l_i', 'm_i'} (O_i unnormalised) after "
        "each; return (O, L) with O = 0, L = -inf for a row that sees no key")
NAME = "fa2_causal_steps"


def stub(Q, K, V, Br, Bc, offset):
    raise NotImplementedError("FILL ME IN: for i: O_i = 0, l_i = 0, m_i = -inf; for j while "
                              "j*Bc <= last row + offset: mask S_ij, update m_i, l_i, O_i, yield; "
                              "then O_i / l_i and L_i = m_i + log l_i (-inf where l_i = 0)")
    yield


def solution(Q, K, V, Br, Bc, offset):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    O = np.zeros((Nq, d))
    L = np.full(Nq, -np.inf)
    for i in range(Tr):
        rows = slice(i * Br, min((i + 1) * Br, Nq))
        Q_i = Q[rows]
        n = Q_i.shape[0]
        O_i, l_i, m_i = np.zeros((n, d)), np.zeros(n), np.full(n, -np.inf)
        last_row = rows.stop - 1
        for j in range(Tc):
            if j * Bc > last_row + offset:
                break                                     # this tile and every later one: skipped
            cols = slice(j * Bc, min((j + 1) * Bc, Nk))
            r = np.arange(rows.start, rows.stop)[:, None]
            c = np.arange(cols.start, cols.stop)[None, :]
            S_ij = np.where(c <= r + offset, Q_i @ K[cols].T / np.sqrt(d), -np.inf)
            m_new = np.maximum(m_i, S_ij.max(axis=1))        # m_new = max(m_i, rowmax(S_ij))
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)  # a row with no key yet: no NaN
            P_ij = np.exp(S_ij - m_safe[:, None])            # P~_ij = exp(S_ij - m_new)
            alpha = np.exp(m_i - m_safe)                     # e^(m_i - m_new)
            l_i = alpha * l_i + P_ij.sum(axis=1)
            O_i = alpha[:, None] * O_i + P_ij @ V[cols]
            m_i = m_new
            yield {"i": i, "j": j, "O_i": O_i.copy(), "l_i": l_i.copy(), "m_i": m_i.copy()}
        seen = l_i > 0
        O[rows] = np.divide(O_i, l_i[:, None], out=np.zeros_like(O_i), where=seen[:, None])
        L[rows] = np.where(seen, np.where(seen, m_i, 0.0) + np.log(np.where(seen, l_i, 1.0)), -np.inf)
    return O, L


def perturbed(Q, K, V, Br, Bc, offset):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    O = np.zeros((Nq, d))
    L = np.full(Nq, -np.inf)
    for i in range(Tr):
        rows = slice(i * Br, min((i + 1) * Br, Nq))
        Q_i = Q[rows]
        n = Q_i.shape[0]
        O_i, l_i, m_i = np.zeros((n, d)), np.zeros(n), np.full(n, -np.inf)
        for j in range(Tc):
            if j * Bc > rows.start + offset:              # skips by the FIRST row: drops visible keys
                break
            cols = slice(j * Bc, min((j + 1) * Bc, Nk))
            r = np.arange(rows.start, rows.stop)[:, None]
            c = np.arange(cols.start, cols.stop)[None, :]
            S_ij = np.where(c <= r + offset, Q_i @ K[cols].T / np.sqrt(d), -np.inf)
            m_new = np.maximum(m_i, S_ij.max(axis=1))
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
            P_ij = np.exp(S_ij - m_safe[:, None])
            alpha = np.exp(m_i - m_safe)
            l_i = alpha * l_i + P_ij.sum(axis=1)
            O_i = alpha[:, None] * O_i + P_ij @ V[cols]
            m_i = m_new
            yield {"i": i, "j": j, "O_i": O_i.copy(), "l_i": l_i.copy(), "m_i": m_i.copy()}
        seen = l_i > 0
        O[rows] = np.divide(O_i, l_i[:, None], out=np.zeros_like(O_i), where=seen[:, None])
        L[rows] = np.where(seen, np.where(seen, m_i, 0.0) + np.log(np.where(seen, l_i, 1.0)), -np.inf)
    return O, L


# (Nq, Nk, d, Br, Bc, alignment): Nq < Nk both ways; Nq > Nk bottom-right leaves rows 0..Nq-Nk-1
# with no visible key (a whole Q tile of them when Nq - Nk >= Br)
CASES = ((12, 12, 4, 4, 4, "bottom-right"), (10, 17, 3, 4, 5, "bottom-right"),
         (10, 17, 3, 4, 5, "top-left"), (14, 5, 4, 4, 3, "bottom-right"), (14, 5, 4, 4, 3, "top-left"))


def check(implementation):
    def run():
        for Nq, Nk, d, Br, Bc, alignment in CASES:
            rng = np.random.default_rng(Nq * Nk + d)
            Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            K[-1] *= 4.0
            case = f"Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}, {alignment}"
            offset = Nk - Nq if alignment == "bottom-right" else 0
            records, (O_ref, L_ref) = mirror.run(mirror.fa2_forward_steps(
                Q, K, V, Br=Br, Bc=Bc, causal=True, alignment=alignment))
            want = [{"i": s.i, "j": s.j, **s.state} for s in records]
            with np.errstate(all="ignore"):
                final = step_through(call(implementation, Q.copy(), K.copy(), V.copy(), Br, Bc, offset),
                                     want, ("O_i", "l_i", "m_i"), case=case)
            if not isinstance(final, tuple) or len(final) != 2:
                raise Mismatch(f"{case}: the generator must end with `return O, L`, got {final!r}")
            same_array("returned O", final[0], O_ref, case=case)
            same_array("returned L", final[1], L_ref, case=case)
        return (f"every visited tile, O_i, l_i, m_i and the final O, L match mirror.fa2_forward_steps "
                f"on {len(CASES)} problems, both alignments, rows with no key included")
    return grade(ID, run)
