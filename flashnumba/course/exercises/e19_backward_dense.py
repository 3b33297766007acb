"""Lesson 10: attention's backward pass in NumPy, P recomputed from the log-sum-exp L."""

import numpy as np

from flashnumba import reference
from flashnumba.course.grading import Mismatch, call, grade, same_array

ID = "backward_dense"
LESSON = 10
TITLE = "the backward maths, P recomputed from L"
SPEC = ("attention_backward(dO, Q, K, V, O, L, causal) -> (dQ, dK, dV): P = exp(scale Q K^T - L) "
        "(0 where masked, bottom-right), D = rowsum(dO * O), dP = dO V^T, dS = P * (dP - D), "
        "dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO")
NAME = "attention_backward"


def stub(dO, Q, K, V, O, L, causal):
    raise NotImplementedError("FILL ME IN: recompute P = exp(S - L) (0 where masked or L = -inf), "
                              "D = rowsum(dO * O), dV = P^T dO, dP = dO V^T, dS = P (dP - D), "
                              "dQ = scale dS K, dK = scale dS^T Q")


def solution(dO, Q, K, V, O, L, causal):
    Nq, d = Q.shape
    Nk = K.shape[0]
    scale = 1.0 / np.sqrt(d)
    S = scale * (Q @ K.T)                                       # S = scale Q K^T
    visible = np.ones((Nq, Nk), dtype=bool)
    if causal:
        visible = np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + (Nk - Nq)
    seen = np.isfinite(L)                                       # L = -inf: the row saw no key
    L_safe = np.where(seen, L, 0.0)
    P = np.where(visible & seen[:, None], np.exp(np.where(visible, S, 0.0) - L_safe[:, None]), 0.0)
    D = (dO * O).sum(axis=1)                                    # D_i = rowsum(dO_i * O_i)
    dV = P.T @ dO                                               # dV = P^T dO
    dP = dO @ V.T                                               # dP = dO V^T
    dS = P * (dP - D[:, None])                                  # dS = P * (dP - D)
    dQ = scale * (dS @ K)                                       # dQ = scale dS K
    dK = scale * (dS.T @ Q)                                     # dK = scale dS^T Q
    return dQ, dK, dV


def perturbed(dO, Q, K, V, O, L, causal):
    Nq, d = Q.shape
    Nk = K.shape[0]
    scale = 1.0 / np.sqrt(d)
    S = scale * (Q @ K.T)
    visible = np.ones((Nq, Nk), dtype=bool)
    if causal:
        visible = np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + (Nk - Nq)
    seen = np.isfinite(L)
    L_safe = np.where(seen, L, 0.0)
    P = np.where(visible & seen[:, None], np.exp(np.where(visible, S, 0.0) - L_safe[:, None]), 0.0)
    dP = dO @ V.T
    D = dP.sum(axis=1)                                          # rowsum(dP), not rowsum(P * dP)
    dS = P * (dP - D[:, None])
    return scale * (dS @ K), scale * (dS.T @ Q), P.T @ dO


CASES = ((8, 8, 4, False), (6, 11, 3, False), (9, 9, 5, True), (7, 12, 4, True),
         (12, 5, 3, True))      # Nq > Nk, causal: the first Nq - Nk rows see no key, L = -inf


def check(implementation):
    def run():
        for Nq, Nk, d, causal in CASES:
            rng = np.random.default_rng(11 * Nq + Nk)
            Q, K, V, dO = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk, Nq))
            O, L = reference.single_head(Q, K, V, causal=causal)
            want = reference.single_head_backward(dO, Q, K, V, causal=causal)
            case = f"{'causal, ' if causal else ''}Nq={Nq}, Nk={Nk}, d={d}"
            with np.errstate(all="ignore"):
                out = call(implementation, dO.copy(), Q.copy(), K.copy(), V.copy(), O.copy(), L.copy(),
                           causal)
            if not isinstance(out, tuple) or len(out) != 3:
                raise Mismatch(f"{case}: return (dQ, dK, dV), got {type(out).__name__}")
            for name, got, ref in zip(("dQ", "dK", "dV"), out, want):
                same_array(name, got, ref, case=case)
        return ("dQ, dK, dV match reference.single_head_backward (float64), causal with Nq != Nk "
                "and rows with L = -inf included")
    return grade(ID, run)
