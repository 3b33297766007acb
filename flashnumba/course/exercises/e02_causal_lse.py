"""Lesson 1: causal attention with its log-sum-exp, rows that see no key included."""

import numpy as np

from flashnumba import reference
from flashnumba.course.grading import Mismatch, call, grade, same_array

ID = "causal_lse"
LESSON = 1
TITLE = "causal attention and the log-sum-exp"
SPEC = ("causal_attention(Q, K, V) -> (O, L): key c visible to query r when c <= r + Nk - Nq "
        "(bottom-right); L = log sum_c exp(S_rc); a row with no visible key: O = 0, L = -inf")
NAME = "causal_attention"


def stub(Q, K, V):
    raise NotImplementedError("FILL ME IN: mask S with -inf where c > r + (Nk - Nq), "
                              "then O and L = m + log(l), O = 0 and L = -inf for an empty row")


def solution(Q, K, V):
    Nq, d = Q.shape
    Nk = K.shape[0]
    S = Q @ K.T / np.sqrt(d)
    r = np.arange(Nq)[:, None]
    c = np.arange(Nk)[None, :]
    S = np.where(c <= r + (Nk - Nq), S, -np.inf)           # bottom-right causal mask
    m = S.max(axis=1)                                      # -inf for a row with no visible key
    m_safe = np.where(np.isneginf(m), 0.0, m)              # avoid -inf - (-inf) = NaN
    E = np.exp(S - m_safe[:, None])                        # exp(-inf) = 0 for hidden keys
    l = E.sum(axis=1)
    O = np.divide(E @ V, l[:, None], out=np.zeros((Nq, V.shape[1])), where=l[:, None] > 0)
    with np.errstate(divide="ignore"):
        L = np.where(l > 0, m_safe + np.log(l), -np.inf)
    return O, L


def perturbed(Q, K, V):
    Nq, d = Q.shape
    Nk = K.shape[0]
    S = Q @ K.T / np.sqrt(d)
    S = np.where(np.tri(Nq, Nk, 0, dtype=bool), S, -np.inf)   # top-left diagonal: wrong when Nq != Nk
    m = S.max(axis=1)
    E = np.exp(S - m[:, None])
    l = E.sum(axis=1)
    return (E @ V) / l[:, None], m + np.log(l)


CASES = ((8, 8, 4), (6, 11, 3), (12, 5, 5))      # Nq > Nk: the first Nq - Nk rows see no key


def check(implementation):
    def run():
        for Nq, Nk, d in CASES:
            rng = np.random.default_rng(7 * Nq + Nk)
            Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            O_ref, L_ref = reference.single_head(Q, K, V, causal=True)
            case = f"causal, Nq={Nq}, Nk={Nk}, d={d}"
            with np.errstate(all="ignore"):
                out = call(implementation, Q.copy(), K.copy(), V.copy())
            if not isinstance(out, tuple) or len(out) != 2:
                raise Mismatch(f"{case}: return a pair (O, L), got {type(out).__name__}")
            same_array("O", out[0], O_ref, case=case)
            same_array("L", out[1], L_ref, case=case)
        return "O and L match the reference, Nq != Nk and rows with no visible key included"
    return grade(ID, run)
