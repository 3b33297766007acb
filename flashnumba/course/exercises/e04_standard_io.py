"""Lesson 2: the HBM traffic of standard attention as a formula in Nq, Nk, d."""

import numpy as np

from flashnumba import mirror
from flashnumba.course.grading import Mismatch, call, grade
from flashnumba.hbm import HBM

ID = "standard_io"
LESSON = 2
TITLE = "standard attention's HBM traffic as a formula"
SPEC = "standard_io(Nq, Nk, d) -> (elements read, elements written) by standard attention's forward"
NAME = "standard_io"


def stub(Nq, Nk, d):
    raise NotImplementedError("FILL ME IN: add up what each of the three passes reads and writes")


def solution(Nq, Nk, d):
    reads = (Nq * d + Nk * d) + Nq * Nk + (Nq * Nk + Nk * d)   # Q, K | S | P, V
    writes = Nq * Nk + Nq * Nk + Nq * d                        # S | P | O
    return reads, writes


def perturbed(Nq, Nk, d):
    reads = (Nq * d + Nk * d) + Nq * Nk + (Nq * Nk + Nq * d)   # V read as if it had Nq rows
    writes = Nq * Nk + Nq * Nk + Nq * d
    return reads, writes


CASES = ((8, 8, 4), (5, 12, 3), (64, 16, 8), (1, 33, 2))


def check(implementation):
    def run():
        for Nq, Nk, d in CASES:
            hbm = HBM()
            mirror.standard_forward(np.ones((Nq, d)), np.ones((Nk, d)), np.ones((Nk, d)), hbm=hbm)
            want = (hbm.total_reads, hbm.total_writes)
            got = call(implementation, Nq, Nk, d)
            try:
                got = (int(got[0]), int(got[1]))
            except (TypeError, ValueError, IndexError) as e:
                raise Mismatch(f"return a pair (reads, writes) of integers, got {got!r}") from e
            if got != want:
                which = "reads" if got[0] != want[0] else "writes"
                raise Mismatch(f"Nq={Nq}, Nk={Nk}, d={d}: you gave (reads, writes) = {got}, the "
                               f"mirror counted {want} ({which} differ; per tensor: reads "
                               f"{dict(hbm.reads)}, writes {dict(hbm.writes)})", variable=which)
        return "your formula matches the mirror's counts, Nq != Nk included"
    return grade(ID, run)
