"""Lesson 2: standard attention in three passes through HBM, every read and write counted."""

import numpy as np

from flashnumba import mirror
from flashnumba.course.grading import call, grade, same_array, same_counts
from flashnumba.hbm import HBM

ID = "standard_hbm"
LESSON = 2
TITLE = "standard attention, counting HBM traffic"
SPEC = ("standard_attention(Q, K, V, hbm) -> O, in three passes (S = scale Q K^T; P = softmax(S); "
        "O = P V), each reading its inputs with hbm.read(name, X) and writing with hbm.write(name, X)")
NAME = "standard_attention"


def stub(Q, K, V, hbm):
    raise NotImplementedError("FILL ME IN: pass 1 reads Q, K and writes S; pass 2 reads S and "
                              "writes P; pass 3 reads P, V and writes O")


def solution(Q, K, V, hbm):
    d = Q.shape[1]
    # 1. read Q, K; write S = scale Q K^T
    S = hbm.read("Q", Q) @ hbm.read("K", K).T / np.sqrt(d)
    hbm.write("S", S)
    # 2. read S; write P = softmax(S)
    S = hbm.read("S", S)
    E = np.exp(S - S.max(axis=1, keepdims=True))
    P = E / E.sum(axis=1, keepdims=True)
    hbm.write("P", P)
    # 3. read P, V; write O = P V
    O = hbm.read("P", P) @ hbm.read("V", V)
    hbm.write("O", O)
    return O


def perturbed(Q, K, V, hbm):
    d = Q.shape[1]
    S = hbm.read("Q", Q) @ hbm.read("K", K).T / np.sqrt(d)
    hbm.write("S", S)
    E = np.exp(S - S.max(axis=1, keepdims=True))     # uses S still "on chip": forgot to read it back
    P = E / E.sum(axis=1, keepdims=True)
    hbm.write("P", P)
    O = hbm.read("P", P) @ hbm.read("V", V)
    hbm.write("O", O)
    return O


CASES = ((8, 8, 4), (5, 12, 3))


def check(implementation):
    def run():
        for Nq, Nk, d in CASES:
            rng = np.random.default_rng(Nq + 31 * Nk)
            Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            want = HBM()
            O_ref, _ = mirror.standard_forward(Q, K, V, hbm=want)
            got = HBM()
            case = f"Nq={Nq}, Nk={Nk}, d={d}"
            same_array("O", call(implementation, Q.copy(), K.copy(), V.copy(), got), O_ref, case=case)
            same_counts("hbm.reads", got.reads, want.reads, case=case)
            same_counts("hbm.writes", got.writes, want.writes, case=case)
        return "O and every HBM read and write match the mirror's (mirror.standard_forward)"
    return grade(ID, run)
