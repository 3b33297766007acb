"""Lesson 8: the accumulation O_i <- diag(e^(m_i - m_new)) O_i + P~_ij V_j inside the FA2 forward
kernel, stepped against the FA2 mirror (the kernel is e15's ``lesson_kernel``)."""

from flashnumba.course.exercises.e15_fa2_row_update import check_kernel
from flashnumba.course.exercises.e15_fa2_row_update import solution as update_row

ID = "fa2_accumulate"
LESSON = 8
TITLE = "FA2's accumulation of O_i"
SPEC = ("accumulate_O(O_i, P_ij, V_j, alpha, r0, lane): a device function; for this warp's rows "
        "rr (P_ij row r0 + rr) and this lane's dims k = lane + 32 u: O_i[rr, u] = alpha[rr] O_i[rr, u] "
        "+ sum_c P_ij[r0 + rr, c] V_j[c, k]")
NAME = "accumulate_O"


def stub(O_i, P_ij, V_j, alpha, r0, lane):
    raise NotImplementedError("FILL ME IN: rescale O_i[rr, :] by alpha[rr], then add "
                              "P_ij[r0 + rr, c] * V_j[c, lane + 32 u] over every column c")


def solution(O_i, P_ij, V_j, alpha, r0, lane):
    for rr in range(O_i.shape[0]):
        for u in range(O_i.shape[1]):
            O_i[rr, u] *= alpha[rr]                      # O_i = diag(e^(m_i - m_new)) O_i
    for c in range(P_ij.shape[1]):
        for rr in range(O_i.shape[0]):
            p = P_ij[r0 + rr, c]                         # the same address for the whole warp
            for u in range(O_i.shape[1]):
                O_i[rr, u] += p * V_j[c, lane + 32 * u]  # + P~_ij V_j, this lane's dims


def perturbed(O_i, P_ij, V_j, alpha, r0, lane):
    for c in range(P_ij.shape[1]):                       # forgot to rescale O_i when the max grows
        for rr in range(O_i.shape[0]):
            p = P_ij[r0 + rr, c]
            for u in range(O_i.shape[1]):
                O_i[rr, u] += p * V_j[c, lane + 32 * u]


def check(implementation):
    return check_kernel(ID, update_row, implementation)
