"""Lesson 1: attention of one head in NumPy, numerically stable, checked against the oracle."""

import numpy as np

from flashnumba import reference
from flashnumba.course.grading import call, grade, same_array

ID = "attention"
LESSON = 1
TITLE = "attention of one head in NumPy"
SPEC = "attention(Q (Nq, d), K (Nk, d), V (Nk, d)) -> O = softmax(Q K^T / sqrt(d)) V, (Nq, d)"
NAME = "attention"


def stub(Q, K, V):
    raise NotImplementedError("FILL ME IN: S = Q K^T / sqrt(d), P = softmax(S) row-wise, O = P V")


def solution(Q, K, V):
    d = Q.shape[1]
    S = Q @ K.T / np.sqrt(d)                      # S = scale Q K^T
    m = S.max(axis=1, keepdims=True)              # subtract the row max: exp never overflows
    E = np.exp(S - m)
    P = E / E.sum(axis=1, keepdims=True)          # P = softmax(S)
    return P @ V                                  # O = P V


def perturbed(Q, K, V):
    S = Q @ K.T                                   # forgot the scale 1 / sqrt(d)
    E = np.exp(S - S.max(axis=1, keepdims=True))
    return (E / E.sum(axis=1, keepdims=True)) @ V


CASES = (  # (Nq, Nk, d, input scale): the last one overflows exp without the max subtracted
    (8, 8, 4, 1.0), (5, 13, 3, 1.0), (17, 6, 7, 1.0), (16, 16, 8, 30.0))


def check(implementation):
    def run():
        for Nq, Nk, d, size in CASES:
            rng = np.random.default_rng(Nq * 100 + Nk)
            Q, K, V = (size * rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            O_ref, _ = reference.single_head(Q, K, V)
            case = f"Nq={Nq}, Nk={Nk}, d={d}" + (f", inputs scaled by {size:g}" if size != 1 else "")
            same_array("O", call(implementation, Q.copy(), K.copy(), V.copy()), O_ref, case=case)
        return f"O matches the float64 reference on {len(CASES)} shapes, large scores included"
    return grade(ID, run)
