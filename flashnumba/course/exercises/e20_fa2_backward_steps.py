"""Lesson 10: FlashAttention-2's backward (Algorithm 2) tiled in NumPy, graded step by step."""

import numpy as np

from flashnumba import mirror
from flashnumba.course.grading import Mismatch, call, grade, same_array, step_through

ID = "fa2_backward_steps"
LESSON = 10
TITLE = "FA2 Algorithm 2, step by step"
SPEC = ("fa2_backward_steps(dO, Q, K, V, O, L, Br, Bc): D = rowsum(dO * O); for j (K/V tiles) outer, "
        "i inner: recompute P_ij from L_i, update dV_j, dK_j (on chip) and dQ (HBM), yield "
        "{'i', 'j', 'dK_j', 'dV_j', 'dQ'} (copies); return (dQ, dK, dV)")
NAME = "fa2_backward_steps"


def stub(dO, Q, K, V, O, L, Br, Bc):
    raise NotImplementedError("FILL ME IN: D = rowsum(dO * O); dQ = 0; for j: dK_j = dV_j = 0; "
                              "for i: P_ij = exp(S_ij - L_i), dV_j +=, dP_ij, dS_ij, dQ_i +=, "
                              "dK_j +=, yield; write dK_j, dV_j")
    yield


def solution(dO, Q, K, V, O, L, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    scale = 1.0 / np.sqrt(d)
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    D = (dO * O).sum(axis=1)                                  # D_i = rowsum(dO_i * O_i), a pass of its own
    dQ = np.zeros((Nq, d))                                    # dQ = 0 in HBM
    dK = np.zeros((Nk, d))
    dV = np.zeros((Nk, d))
    for j in range(Tc):                                       # one thread block per K/V tile
        cols = slice(j * Bc, min((j + 1) * Bc, Nk))
        K_j, V_j = K[cols], V[cols]
        dK_j = np.zeros_like(K_j)                             # on chip
        dV_j = np.zeros_like(V_j)
        for i in range(Tr):
            rows = slice(i * Br, min((i + 1) * Br, Nq))
            Q_i, dO_i, L_i, D_i = Q[rows], dO[rows], L[rows], D[rows]
            S_ij = scale * (Q_i @ K_j.T)                      # S_ij = scale Q_i K_j^T
            P_ij = np.exp(S_ij - L_i[:, None])                # P_ij = exp(S_ij - L_i): no max, no sum
            dV_j += P_ij.T @ dO_i                             # dV_j += P_ij^T dO_i
            dP_ij = dO_i @ V_j.T                              # dP_ij = dO_i V_j^T
            dS_ij = P_ij * (dP_ij - D_i[:, None])             # dS_ij = P_ij * (dP_ij - D_i)
            dQ[rows] += scale * (dS_ij @ K_j)                 # dQ_i += scale dS_ij K_j (atomics on a GPU)
            dK_j += scale * (dS_ij.T @ Q_i)                   # dK_j += scale dS_ij^T Q_i
            yield {"i": i, "j": j, "dK_j": dK_j.copy(), "dV_j": dV_j.copy(), "dQ": dQ.copy()}
        dK[cols] = dK_j                                       # write dK_j, dV_j once
        dV[cols] = dV_j
    return dQ, dK, dV


def perturbed(dO, Q, K, V, O, L, Br, Bc):
    Nq, d = Q.shape
    Nk = K.shape[0]
    scale = 1.0 / np.sqrt(d)
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    D = (dO * O).sum(axis=1)
    dQ, dK, dV = np.zeros((Nq, d)), np.zeros((Nk, d)), np.zeros((Nk, d))
    for j in range(Tc):
        cols = slice(j * Bc, min((j + 1) * Bc, Nk))
        K_j, V_j = K[cols], V[cols]
        dK_j, dV_j = np.zeros_like(K_j), np.zeros_like(V_j)
        for i in range(Tr):
            rows = slice(i * Br, min((i + 1) * Br, Nq))
            Q_i, dO_i, L_i, D_i = Q[rows], dO[rows], L[rows], D[rows]
            S_ij = scale * (Q_i @ K_j.T)
            P_ij = np.exp(S_ij - L_i[:, None])
            dV_j += P_ij.T @ dO_i
            dS_ij = P_ij * (dO_i @ V_j.T - D_i[:, None])
            dQ[rows] = scale * (dS_ij @ K_j)                  # overwrites dQ_i: forgets the earlier K/V tiles
            dK_j += scale * (dS_ij.T @ Q_i)
            yield {"i": i, "j": j, "dK_j": dK_j.copy(), "dV_j": dV_j.copy(), "dQ": dQ.copy()}
        dK[cols], dV[cols] = dK_j, dV_j
    return dQ, dK, dV


CASES = ((8, 8, 4, 4, 4), (10, 13, 3, 4, 5), (9, 6, 5, 4, 4))   # tiles that do not divide N, Nq != Nk


def check(implementation):
    def run():
        for Nq, Nk, d, Br, Bc in CASES:
            rng = np.random.default_rng(Nq * Nk + 3 * d)
            Q, K, V, dO = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk, Nq))
            O, L = mirror.fa2_forward(Q, K, V, Br=Br, Bc=Bc)
            case = f"Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}"
            records, (dQ, dK, dV) = mirror.run(mirror.fa2_backward_steps(dO, Q, K, V, O, L, Br=Br, Bc=Bc))
            want = [{"i": s.i, "j": s.j, **s.state} for s in records]
            with np.errstate(all="ignore"):
                final = step_through(call(implementation, dO.copy(), Q.copy(), K.copy(), V.copy(),
                                          O.copy(), L.copy(), Br, Bc),
                                     want, ("dK_j", "dV_j", "dQ"), case=case)
            if not isinstance(final, tuple) or len(final) != 3:
                raise Mismatch(f"{case}: the generator must end with `return dQ, dK, dV`, got {final!r}")
            for name, got, ref in zip(("dQ", "dK", "dV"), final, (dQ, dK, dV)):
                same_array(f"returned {name}", got, ref, case=case)
        return (f"dK_j, dV_j and dQ match mirror.fa2_backward_steps after every step on "
                f"{len(CASES)} problems")
    return grade(ID, run)
