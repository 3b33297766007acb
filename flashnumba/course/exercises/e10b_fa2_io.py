"""Lesson 5: FlashAttention-2's HBM traffic, where Br = min(Bc, d) decides the count."""

from flashnumba import mirror
from flashnumba.course.exercises.e09_fa1_io import check_formula

ID = "fa2_io"
LESSON = 5
TITLE = "FA2's HBM traffic, and why Br = min(Bc, d) matters"
SPEC = ("fa2_io(Nq, Nk, d, M) -> (elements read, elements written) by FA2's forward with "
        "Bc = ceil(M / 4d), Br = min(Bc, d)")
NAME = "fa2_io"


def stub(Nq, Nk, d, M):
    raise NotImplementedError("FILL ME IN: each Q tile (Tr = ceil(Nq / Br) of them) reads Q_i once and "
                              "every K_j, V_j; O and L are written once")


def solution(Nq, Nk, d, M):
    Bc = -(-M // (4 * d))                        # Bc = ceil(M / 4d)
    Br = min(Bc, d)                              # Br = min(Bc, d): stops growing at d
    Tr = -(-Nq // Br)                            # Tr = ceil(Nq / Br) thread blocks
    reads = Nq * d + Tr * 2 * Nk * d             # Q once | K, V once per Q tile
    writes = Nq * d + Nq                         # O and L, once
    return reads, writes


def perturbed(Nq, Nk, d, M):
    Bc = -(-M // (4 * d))
    Tr = -(-Nq // Bc)                            # Br taken as Bc: wrong once M > 4 d^2
    reads = Nq * d + Tr * 2 * Nk * d
    writes = Nq * d + Nq
    return reads, writes


CASES = ((16, 16, 4, 32), (13, 29, 3, 50), (64, 64, 8, 1024), (10, 7, 5, 10**4))


def check(implementation):
    return check_formula(ID, implementation, mirror.fa2_forward, CASES,
                         "Each Q tile is one thread block that streams all of K and V; how many "
                         "rows does a Q tile have once M > 4 d^2?")
