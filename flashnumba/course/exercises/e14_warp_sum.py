"""Lesson 7: the row sum of exp(S - m) across the 32 lanes of a warp, by xor shuffles."""

import numpy as np
from numba import cuda

from flashnumba.course.exercises import e13_warp_max
from flashnumba.course.exercises.e13_warp_max import as_device, check_lanes, run_rows, scores
from flashnumba.course.grading import call, grade

ID = "warp_sum"
LESSON = 7
TITLE = "warp sum by shuffles"
SPEC = ("warp_sum(x) -> the sum of x over the 32 lanes of the calling warp, in every lane "
        "(a device function; use cuda.shfl_xor_sync(0xFFFFFFFF, x, offset))")
NAME = "warp_sum"


def stub(x):
    raise NotImplementedError("FILL ME IN: for offset 16, 8, 4, 2, 1: "
                              "x += cuda.shfl_xor_sync(0xFFFFFFFF, x, offset)")


def solution(x):
    offset = 16
    while offset > 0:
        x += cuda.shfl_xor_sync(0xFFFFFFFF, x, offset)   # lane L gets x_L + x_(L ^ offset)
        offset //= 2
    return x                                             # every lane: the same sum of all 32


def perturbed(x):
    offset = 16
    while offset > 0:
        x += cuda.shfl_down_sync(0xFFFFFFFF, x, offset)  # a tree to lane 0: only lane 0 has the sum
        offset //= 2
    return x


def check(implementation):
    def run():
        S = scores(seed=1)
        _, l = call(run_rows, S, as_device(e13_warp_max.solution), call(as_device, implementation))
        m = S.max(axis=1)
        m_safe = np.where(np.isneginf(m), 0.0, m)
        want = np.exp(S - m_safe[:, None]).sum(axis=1)
        check_lanes("l", l, want, "Every lane must end with the sum of all 32 (the kernel uses it in "
                    "every lane): with shfl_xor_sync each lane adds its partner's partial sum; "
                    "shfl_down_sync leaves the whole sum in lane 0 only.", tol=1e-12)
        return "every lane of every warp holds its row's sum, -inf rows included"
    return grade(ID, run, gpu_limits=e13_warp_max.GPU_LIMITS)
