"""Lesson 8: the online-softmax update of one row inside the FA2 forward kernel, stepped
against the FA2 mirror; the grader names the first (step, block, tile, variable) that diverges.

The grader runs ``lesson_kernel``: the loop of ``flashnumba/kernels/fa2_forward.py`` for
one head in float64, without dropout or grouped heads, with two of its pieces called as
device functions: the row update (this exercise) and the accumulation of O_i (exercise
``fa2_accumulate``).
"""

import functools
import math
import warnings

import numpy as np
from numba import cuda, float64

from flashnumba import registry, stepping
from flashnumba.course.exercises.e13_warp_max import GPU_LIMITS, as_device, launch
from flashnumba.course.grading import grade, kernel_steps
from flashnumba.kernels.fa2_forward import warp_max, warp_sum
from flashnumba.kernels.hardware import WARP_SIZE

ID = "fa2_row_update"
LESSON = 8
TITLE = "FA2's online-softmax update of one row"
SPEC = ("online_softmax_row(S_ij, P_ij, m_i, l_i, alpha, rr, prow, lane): a device function; from "
        "this lane's scores S_ij[rr, t] (column lane + 32 t) set m_i[rr], l_i[rr], alpha[rr] and P_ij[prow, :]")
NAME = "online_softmax_row"


def stub(S_ij, P_ij, m_i, l_i, alpha, rr, prow, lane):
    raise NotImplementedError("FILL ME IN: m~ = warp_max(max_t S_ij[rr, t]); m_new = max(m_i[rr], m~); "
                              "alpha = e^(m_i - m_new); P~ = e^(S - m_new) into P_ij[prow, lane + 32 t]; "
                              "l_i = alpha l_i + warp_sum(rowsum P~); m_i = m_new")


def solution(S_ij, P_ij, m_i, l_i, alpha, rr, prow, lane):
    m_tilde = -math.inf
    for t in range(S_ij.shape[1]):                   # this lane's columns of the row
        m_tilde = max(m_tilde, S_ij[rr, t])
    m_tilde = warp_max(m_tilde)                      # m~ = rowmax(S_ij), in every lane
    m_new = max(m_i[rr], m_tilde)                    # m_new = max(m_i, m~)
    m_safe = m_new
    if m_new == -math.inf:
        m_safe = 0.0                                 # no visible key yet: P~ = 0, not NaN
    alpha[rr] = math.exp(m_i[rr] - m_safe)           # e^(m_i - m_new) rescales the old l_i, O_i
    l_tilde = 0.0
    for t in range(S_ij.shape[1]):
        p = math.exp(S_ij[rr, t] - m_safe)           # P~_ij = exp(S_ij - m_new)
        P_ij[prow, lane + 32 * t] = p
        l_tilde += p
    l_i[rr] = alpha[rr] * l_i[rr] + warp_sum(l_tilde)    # l_i = e^(m_i - m_new) l_i + rowsum(P~_ij)
    m_i[rr] = m_new


def perturbed(S_ij, P_ij, m_i, l_i, alpha, rr, prow, lane):
    m_tilde = -math.inf
    for t in range(S_ij.shape[1]):
        m_tilde = max(m_tilde, S_ij[rr, t])
    m_tilde = warp_max(m_tilde)
    m_new = max(m_i[rr], m_tilde)
    alpha[rr] = math.exp(m_i[rr] - m_new)            # no guard: a row with no visible key gets NaN
    l_tilde = 0.0
    for t in range(S_ij.shape[1]):
        p = math.exp(S_ij[rr, t] - m_new)
        P_ij[prow, lane + 32 * t] = p
        l_tilde += p
    l_i[rr] = alpha[rr] * l_i[rr] + warp_sum(l_tilde)
    m_i[rr] = m_new


NUM_WARPS = 2


@functools.cache
def lesson_kernel(update_row, accumulate, Br, Bc, d):
    """FA2's forward loop for one head (float64), update_row and accumulate as device functions.

    q (Nq, d), k, v (Nk, d) -> out (Nq, d) = O_i / l_i, m, l (Nq): the state after `limit`
    iterations of each block's j loop, as flashnumba.stepping reads it."""
    ROWS_PER_WARP = Br // NUM_WARPS
    COLS_PER_LANE = Bc // WARP_SIZE
    DIMS_PER_LANE = (d + WARP_SIZE - 1) // WARP_SIZE
    V_WIDTH = DIMS_PER_LANE * WARP_SIZE
    THREADS = NUM_WARPS * WARP_SIZE

    @cuda.jit
    def fa2_lesson_kernel(q, k, v, out, m, l, scale, causal, offset, limit):
        Nq, Nk = q.shape[0], k.shape[0]
        i = cuda.blockIdx.x                              # Q tile i: this block
        tid = cuda.threadIdx.x
        lane = tid % WARP_SIZE
        r0 = (tid // WARP_SIZE) * ROWS_PER_WARP          # this warp's first row within Q_i

        Q_i = cuda.shared.array((Br, d), float64)
        K_j = cuda.shared.array((Bc, d), float64)
        V_j = cuda.shared.array((Bc, V_WIDTH), float64)
        P_ij = cuda.shared.array((Br, Bc), float64)
        S_ij = cuda.local.array((ROWS_PER_WARP, COLS_PER_LANE), float64)
        O_i = cuda.local.array((ROWS_PER_WARP, DIMS_PER_LANE), float64)
        m_i = cuda.local.array(ROWS_PER_WARP, float64)
        l_i = cuda.local.array(ROWS_PER_WARP, float64)
        alpha = cuda.local.array(ROWS_PER_WARP, float64)
        for rr in range(ROWS_PER_WARP):                  # m_i = -inf, l_i = 0, O_i = 0
            m_i[rr] = -math.inf
            l_i[rr] = 0.0
            for u in range(DIMS_PER_LANE):
                O_i[rr, u] = 0.0
        for idx in range(tid, Br * d, THREADS):          # Q_i -> shared, times the scale
            row = i * Br + idx // d
            Q_i[idx // d, idx % d] = q[row, idx % d] * scale if row < Nq else 0.0

        n_tiles = (Nk + Bc - 1) // Bc
        if causal:                                       # tiles past the diagonal are skipped
            last = min((i + 1) * Br, Nq) - 1 + offset
            n_tiles = 0 if last < 0 else min(last // Bc + 1, n_tiles)
        for j in range(min(n_tiles, limit)):
            for idx in range(tid, Bc * V_WIDTH, THREADS):    # K_j, V_j -> shared, zero past Nk, d
                c, kk = idx // V_WIDTH, idx % V_WIDTH
                inside = j * Bc + c < Nk and kk < d
                V_j[c, kk] = v[j * Bc + c, kk] if inside else 0.0
                if kk < d:
                    K_j[c, kk] = k[j * Bc + c, kk] if inside else 0.0
            cuda.syncthreads()          # K_j, V_j (and Q_i) fully written before any warp reads them

            for rr in range(ROWS_PER_WARP):              # S_ij = (scale Q_i) K_j^T, this lane's columns
                row = i * Br + r0 + rr
                for t in range(COLS_PER_LANE):
                    c = lane + WARP_SIZE * t
                    acc = 0.0
                    for kk in range(d):
                        acc += Q_i[r0 + rr, kk] * K_j[c, kk]
                    col = j * Bc + c
                    masked = col >= Nk or (causal and col > row + offset)
                    S_ij[rr, t] = -math.inf if masked else acc
                update_row(S_ij, P_ij, m_i, l_i, alpha, rr, r0 + rr, lane)   # the online softmax
            cuda.syncwarp()             # this warp's rows of P_ij written by all its lanes before any reads them
            accumulate(O_i, P_ij, V_j, alpha, r0, lane)  # O_i = diag(alpha) O_i + P~_ij V_j
            cuda.syncthreads()          # every warp done with K_j, V_j, P_ij before the next tile overwrites them

        for rr in range(ROWS_PER_WARP):                  # O_i / l_i (0 for a row with no key); m, l
            row = i * Br + r0 + rr
            if row < Nq:
                for u in range(DIMS_PER_LANE):
                    kk = lane + WARP_SIZE * u
                    if kk < d:
                        out[row, kk] = O_i[rr, u] / l_i[rr] if l_i[rr] != 0.0 else 0.0
                if lane == 0:
                    m[row] = m_i[rr]
                    l[row] = l_i[rr]

    return fa2_lesson_kernel


def run_lesson_kernel(update_row, accumulate, p, k):
    """{"O", "m", "l"} after k iterations of each block's loop, on stepping problem p."""
    Nq, d = p.Q.shape
    kernel = lesson_kernel(as_device(update_row), as_device(accumulate), p.Br, p.Bc, d)
    out, m, l = np.full((Nq, d), np.nan), np.full(Nq, np.nan), np.full(Nq, np.nan)
    offset = p.tiling.offset
    launch(kernel, p.tiling.Tr, NUM_WARPS * WARP_SIZE, p.Q, p.K, p.V, out, m, l, 1.0 / math.sqrt(d),
           bool(p.causal), offset, int(k))
    return {"O": out, "m": m, "l": l}


# the readable FA2 forward kernel: stepping compares the lesson's loop with its mirror and state
ALGORITHM = registry.version(registry.FA2.name).kernel(registry.FORWARD)
CASES = ((10, 70, 5, 4, 32, False), (44, 40, 3, 8, 32, True))   # Nq, Nk, d, Br, Bc, causal


def problems():
    """The stepping problems of both lesson-8 exercises, with a large late score (the max grows)."""
    for Nq, Nk, d, Br, Bc, causal in CASES:
        p = stepping.make_problem(Nq, Nk, d, causal=causal, seed=Nq + Nk, Br=Br, Bc=Bc,
                                  algorithm=ALGORITHM)
        p.K[-1] *= 4.0
        yield p, (f"{'causal, ' if causal else ''}Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}, "
                  f"{NUM_WARPS} warps")


def check_kernel(exercise, update_row, accumulate):
    def kernel(algorithm, problem, k):
        return run_lesson_kernel(update_row, accumulate, problem, k)

    def run():
        for p, case in problems():
            with warnings.catch_warnings():      # a missing -inf guard makes NaN: reported, not warned
                warnings.simplefilter("ignore", RuntimeWarning)   # (np.errstate would not reach the
                kernel_steps(ALGORITHM, p, kernel, case=case)     # simulator's threads)
        return "O, m and l agree with the FA2 mirror after every step, rows with no visible key included"
    return grade(exercise, run, gpu_limits=GPU_LIMITS)


def accumulate_reference(O_i, P_ij, V_j, alpha, r0, lane):
    """O_i = diag(alpha) O_i + P~_ij V_j: what the grader runs beside a student's row update
    (exercise fa2_accumulate's solution, repeated here: that exercise's module imports this one)."""
    for rr in range(O_i.shape[0]):
        for u in range(O_i.shape[1]):
            O_i[rr, u] *= alpha[rr]
    for c in range(P_ij.shape[1]):
        for rr in range(O_i.shape[0]):
            p = P_ij[r0 + rr, c]
            for u in range(O_i.shape[1]):
                O_i[rr, u] += p * V_j[c, lane + WARP_SIZE * u]


def check(implementation):
    return check_kernel(ID, implementation, accumulate_reference)
