"""Lesson 7: the row max of a tile of S across the 32 lanes of a warp, by xor shuffles."""

import functools
import math
import re

import numpy as np
from numba import cuda

from flashnumba.course.grading import Mismatch, call, grade, unconditional_raise
from flashnumba.kernels.hardware import WARP_SIZE

ID = "warp_max"
LESSON = 7
TITLE = "warp max by shuffles"
SPEC = ("warp_max(x) -> the max of x over the 32 lanes of the calling warp, in every lane "
        "(a device function; use cuda.shfl_xor_sync(0xFFFFFFFF, x, offset))")
NAME = "warp_max"


def stub(x):
    raise NotImplementedError("FILL ME IN: for offset 16, 8, 4, 2, 1: "
                              "x = max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, offset))")


def solution(x):
    offset = 16                                  # butterfly: lanes L and L ^ offset swap values
    while offset > 0:
        x = max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, offset))
        offset //= 2
    return x                                     # every lane: the max of all 32


def perturbed(x):
    offset = 8                                   # starts one level too low: max of 16 lanes only
    while offset > 0:
        x = max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, offset))
        offset //= 2
    return x


COLS_PER_LANE = 2                  # the grader's tile has Bc = 64 columns: lane L owns L and L + 32
WARPS = 2                          # warps per block, one row of S each


# what a GPU cannot report: numba drops an exception raised inside a kernel (it needs debug=True)
GPU_LIMITS = ("an exception raised inside your device function is not reported, unless it is the "
              "function's first statement (as in the stub); FLASHNUMBA_DEVICE=sim reports it")


def as_device(function):
    """A device function for kernels: the function itself if already @cuda.jit(device=True).

    A function whose first statement raises (the stub's NotImplementedError) raises here, on the
    host, before anything is compiled: on a GPU the kernel would drop the exception and run on."""
    first = unconditional_raise(function)
    if first is not None:
        raise first
    if type(function).__module__.startswith("numba"):
        return function
    return _compiled(function)


@functools.cache      # one compiled device function per student function (a GPU compiles once)
def _compiled(function):
    return cuda.jit(device=True)(function)


def row_kernel(reduce_max, reduce_sum):
    """The given kernel: warp w of block b takes row b*WARPS + w of S (rows, 64); every lane
    writes what it holds after each reduction: m[row, lane] = rowmax(S) and, when reduce_sum is
    given, l[row, lane] = rowsum(exp(S - m)) (0 for a row of -inf)."""
    WITH_SUM = reduce_sum is not None            # compile time: grading the max alone leaves l unset
    if reduce_sum is None:
        reduce_sum = reduce_max                  # never called (WITH_SUM is False), but a function

    @cuda.jit
    def row_stats(S, m, l):
        lane = cuda.threadIdx.x % WARP_SIZE
        row = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // WARP_SIZE
        m_lane = -math.inf
        for t in range(COLS_PER_LANE):           # this lane's columns: lane + 32 t
            m_lane = max(m_lane, S[row, lane + WARP_SIZE * t])
        m_row = reduce_max(m_lane)               # m = rowmax(S), in every lane
        m[row, lane] = m_row
        if WITH_SUM:
            m_safe = m_row if m_row != -math.inf else 0.0     # a row of -inf: exp(-inf) = 0
            l_lane = 0.0
            for t in range(COLS_PER_LANE):
                l_lane += math.exp(S[row, lane + WARP_SIZE * t] - m_safe)
            l[row, lane] = reduce_sum(l_lane)    # l = rowsum(exp(S - m)), in every lane
    return row_stats


def scores(rows=4, seed=0):
    """A (rows, 64) tile of S: row 1 masked after column 40, row 3 all -inf (a row with no key)."""
    rng = np.random.default_rng(seed)
    S = 3.0 * rng.standard_normal((rows, COLS_PER_LANE * WARP_SIZE))
    S[0, 37] = 9.0                                # the max in a lane's second column
    S[1, 40:] = -np.inf
    S[3, :] = -np.inf
    return S


_IDS = re.compile(r"^(tid=\[[^\]]*\] ctaid=\[[^\]]*\]):? ?(.*)$", re.DOTALL)


def launch(kernel, grid, block, *args):
    """kernel[grid, block](*args); an error in a simulated thread is re-raised with the thread's
    ids moved to the end, so grading.call reports "your function raised <Error>: <message>"."""
    try:
        kernel[grid, block](*args)
    except Exception as e:
        found = _IDS.match(str(e))
        if not found:
            raise
        ids, text = found.groups()
        try:
            error = type(e)(f"{text} (in the simulated thread {ids})" if not
                            isinstance(e, NotImplementedError) else text)
        except Exception:  # noqa: BLE001 (an exception type that wants other arguments)
            raise e from None
        raise error from e


def run_rows(S, reduce_max, reduce_sum=None):
    """Launch the given kernel on S; returns (m, l), each (rows, 32): what every lane holds."""
    rows = S.shape[0]
    m = np.full((rows, WARP_SIZE), np.nan)
    l = np.full((rows, WARP_SIZE), np.nan)
    kernel = row_kernel(reduce_max, reduce_sum)
    launch(kernel, rows // WARPS, WARPS * WARP_SIZE, S, m, l)
    return m, l


def check_lanes(name, got, want, hint, tol=0.0):
    """Raise Mismatch at the first (row, lane) whose value differs from want[row]."""
    for row in range(got.shape[0]):
        for lane in range(WARP_SIZE):
            g, w = got[row, lane], want[row]
            ok = (g == w) if (tol == 0.0 or not np.isfinite(w)) else abs(g - w) <= tol * max(abs(w), 1.0)
            if not ok:
                raise Mismatch(f"row {row} of S (warp {row % WARPS} of block {row // WARPS}): lane {lane} "
                               f"holds {name} = {float(g)!r}, expected {float(w)!r}. {hint}",
                               variable=name, row=row, lane=lane)


def check(implementation):
    def run():
        S = scores()
        m, _ = call(run_rows, S, call(as_device, implementation))
        check_lanes("m", m, S.max(axis=1),
                    "Every lane must end with the max of all 32: exchange with lanes 16, 8, 4, 2, 1 "
                    "apart (shfl_xor_sync), and keep max(own, partner's) at each step; a row of "
                    "-inf (no visible key) stays -inf.")
        return "every lane of every warp holds its row's max, -inf rows included"
    return grade(ID, run, gpu_limits=GPU_LIMITS)
