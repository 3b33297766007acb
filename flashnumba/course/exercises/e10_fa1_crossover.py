"""Lesson 5: the on-chip size M from which FA1 moves no more through HBM than standard attention."""

from flashnumba import mirror
from flashnumba.course.exercises.e09_fa1_io import measured
from flashnumba.course.grading import Mismatch, call, grade

ID = "fa1_crossover"
LESSON = 5
TITLE = "the crossover M of FA1 and standard attention"
SPEC = ("fa1_crossover(N, d) -> the smallest M (floats, >= 1) at which FA1's forward reads + writes "
        "(Nq = Nk = N) are at most standard attention's; None if no M is")
NAME = "fa1_crossover"


def stub(N, d):
    raise NotImplementedError("FILL ME IN: standard moves 4N^2 + 4Nd; FA1 2Nd + Tc (3Nd + 4N) with "
                              "Tc = ceil(N / Bc), Bc = ceil(M / 4d): find the largest Tc allowed, then M")


def solution(N, d):
    # FA1 <= standard  <=>  2Nd + Tc (3Nd + 4N) <= 4N^2 + 4Nd  <=>  Tc <= (4N + 2d) / (3d + 4)
    Tc_max = (4 * N + 2 * d) // (3 * d + 4)
    if Tc_max == 0:
        return None                              # even one pass (Tc = 1) moves more
    Bc_min = -(-N // Tc_max)                     # ceil(N / Bc) <= Tc_max  <=>  Bc >= ceil(N / Tc_max)
    return 4 * d * (Bc_min - 1) + 1              # smallest M with ceil(M / 4d) >= Bc_min


def perturbed(N, d):
    # forgets that FA1 reads K and V once (2Nd): Tc <= 4(N + d) / (3d + 4)
    Tc_max = (4 * N + 4 * d) // (3 * d + 4)
    if Tc_max == 0:
        return None
    Bc_min = -(-N // Tc_max)
    return 4 * d * (Bc_min - 1) + 1


CASES = ((64, 8), (100, 4), (48, 16), (17, 3), (1, 1))     # (1, 1): FA1 never moves less


def _totals(N, d, M):
    fa1 = sum(measured(mirror.fa1_forward, N, N, d, M)[:2])
    standard = sum(measured(lambda Q, K, V, M, hbm: mirror.standard_forward(Q, K, V, hbm=hbm),
                            N, N, d, M)[:2])
    return fa1, standard


def check(implementation):
    def run():
        for N, d in CASES:
            got = call(implementation, N, d)
            M_all = 4 * d * N                                 # Bc >= N: a single pass
            fa1_all, standard = _totals(N, d, M_all)
            case = f"N={N}, d={d} (standard attention moves {standard} elements)"
            if fa1_all > standard:                            # no M works
                if got is not None:
                    raise Mismatch(f"{case}: you gave M={got}, expected None: even with one K/V tile "
                                   f"(M={M_all}) FA1 moves {fa1_all} elements", variable="M")
                continue
            if got is None or int(got) != got or got < 1:
                raise Mismatch(f"{case}: you gave {got!r}, expected a positive integer M (at M={M_all}, "
                               f"one K/V tile, FA1 moves {fa1_all})", variable="M")
            got = int(got)
            fa1, _ = _totals(N, d, got)
            if fa1 > standard:
                raise Mismatch(f"{case}: at your M={got} (Bc={-(-got // (4 * d))}) the mirror's FA1 "
                               f"moves {fa1} > {standard}; expected a larger M", variable="M")
            if got > 1:
                below, _ = _totals(N, d, got - 1)
                if below <= standard:
                    raise Mismatch(f"{case}: at M={got - 1} (Bc={-(-(got - 1) // (4 * d))}) the mirror's "
                                   f"FA1 already moves {below} <= {standard}; expected the smallest such "
                                   f"M, yours is {got}", variable="M")
        return "your crossover M is the smallest at which the mirrors' counts favour FA1, on every case"
    return grade(ID, run)
