"""Lesson 5: FlashAttention-1's HBM traffic as a formula in Nq, Nk, d and the on-chip size M."""

import numpy as np

from flashnumba import mirror
from flashnumba.course.grading import Mismatch, call, grade
from flashnumba.hbm import HBM

ID = "fa1_io"
LESSON = 5
TITLE = "FA1's HBM traffic as a formula"
SPEC = ("fa1_io(Nq, Nk, d, M) -> (elements read, elements written) by FA1's forward with "
        "Bc = ceil(M / 4d), Br = min(Bc, d)")
NAME = "fa1_io"


def stub(Nq, Nk, d, M):
    raise NotImplementedError("FILL ME IN: K, V are read once; for each of the Tc = ceil(Nk / Bc) "
                              "K/V tiles every row's Q_i, O_i, l_i, m_i is read and O_i, l_i, m_i written")


def solution(Nq, Nk, d, M):
    Bc = -(-M // (4 * d))                        # Bc = ceil(M / 4d); Br does not change the count
    Tc = -(-Nk // Bc)                            # Tc = ceil(Nk / Bc) passes over the rows
    reads = 2 * Nk * d + Tc * (2 * Nq * d + 2 * Nq)     # K, V once | per pass: Q, O (Nq x d), l, m (Nq)
    writes = Tc * (Nq * d + 2 * Nq)                     # per pass: O, l, m
    return reads, writes


def perturbed(Nq, Nk, d, M):
    Bc = -(-M // (4 * d))
    Tc = Nk // Bc                                # floor: forgets the last, partial K/V tile
    reads = 2 * Nk * d + Tc * (2 * Nq * d + 2 * Nq)
    writes = Tc * (Nq * d + 2 * Nq)
    return reads, writes


CASES = ((16, 16, 4, 64), (13, 29, 3, 50), (10, 7, 5, 20), (64, 64, 8, 1024), (9, 12, 2, 10**6))


def measured(forward, Nq, Nk, d, M):
    """(reads, writes, counter) of one mirror forward run with on-chip size M."""
    hbm = HBM()
    forward(np.ones((Nq, d)), np.ones((Nk, d)), np.ones((Nk, d)), M=M, hbm=hbm)
    return hbm.total_reads, hbm.total_writes, hbm


def check_formula(exercise, implementation, forward, cases, hint):
    """Compare implementation(Nq, Nk, d, M) with the mirror's counters on each case."""
    def run():
        for Nq, Nk, d, M in cases:
            reads, writes, hbm = measured(forward, Nq, Nk, d, M)
            got = call(implementation, Nq, Nk, d, M)
            try:
                got = (int(got[0]), int(got[1]))
            except (TypeError, ValueError, IndexError) as e:
                raise Mismatch(f"return a pair (reads, writes) of integers, got {got!r}") from e
            if got != (reads, writes):
                Bc = -(-M // (4 * d))
                which = "reads" if got[0] != reads else "writes"
                raise Mismatch(f"Nq={Nq}, Nk={Nk}, d={d}, M={M} (Bc={Bc}, Br={min(Bc, d)}): you gave "
                               f"(reads, writes) = {got}, expected the mirror's {(reads, writes)} "
                               f"({which} differ; per tensor: reads {dict(hbm.reads)}, writes "
                               f"{dict(hbm.writes)}). {hint}", variable=which)
        return f"your formula matches the mirror's counts on {len(cases)} problems"
    return grade(exercise, run)


def check(implementation):
    return check_formula(ID, implementation, mirror.fa1_forward, CASES,
                         "Tc = ceil(Nk / Bc): a partial last tile is a whole pass over the rows.")
