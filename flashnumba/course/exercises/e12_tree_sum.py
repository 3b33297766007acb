"""Lesson 6: where the barriers go. A tree reduction in shared memory (the row sum of a tile
of P, as FA1's warps combine their partial sums), checked for races on the simulator (on a GPU,
values only, and the grader says so)."""

import numpy as np
from numba import cuda, float64

from flashnumba.course.grading import Mismatch, call, grade, on_gpu, same_array

ID = "tree_sum"
LESSON = 6
TITLE = "barriers in a shared-memory tree reduction"
SPEC = ("tree_sum(n) -> a @cuda.jit kernel(P, l): one block of n threads per row b of P (B, n), n a "
        "power of 2; l[b] = sum of P[b, :] by halving strides in shared memory, with every barrier it needs")
NAME = "tree_sum"


def stub(n):
    @cuda.jit
    def sum_kernel(P, l):
        t = cuda.threadIdx.x
        b = cuda.blockIdx.x
        P_s = cuda.shared.array(n, float64)
        P_s[t] = P[b, t]
        # FILL ME IN: which cuda.syncthreads() calls does this need, and where? (give each its reason)
        stride = n // 2
        while stride > 0:
            if t < stride:
                P_s[t] += P_s[t + stride]        # add the partner's partial sum
            stride //= 2
        if t == 0:
            l[b] = P_s[0]
    return sum_kernel


def solution(n):
    @cuda.jit
    def sum_kernel(P, l):
        t = cuda.threadIdx.x
        b = cuda.blockIdx.x
        P_s = cuda.shared.array(n, float64)
        P_s[t] = P[b, t]
        cuda.syncthreads()                       # every P_s[t] loaded before any thread adds a partner's
        stride = n // 2
        while stride > 0:
            if t < stride:
                P_s[t] += P_s[t + stride]        # add the partner's partial sum
            cuda.syncthreads()                   # this level's sums written before the next level reads
            stride //= 2                         # them (outside the if: every thread must reach it)
        if t == 0:
            l[b] = P_s[0]
    return sum_kernel


def perturbed(n):
    @cuda.jit
    def sum_kernel(P, l):
        t = cuda.threadIdx.x
        b = cuda.blockIdx.x
        P_s = cuda.shared.array(n, float64)
        P_s[t] = P[b, t]
        cuda.syncthreads()                       # the load is fenced ...
        stride = n // 2
        while stride > 0:
            if t < stride:
                P_s[t] += P_s[t + stride]        # ... but a level can read a partner's sum unfinished
            stride //= 2
        if t == 0:
            l[b] = P_s[0]
    return sum_kernel


CASES = ((3, 8), (2, 32))       # (B rows, n threads)


# a block of <= 32 threads is one warp, which a GPU runs in step: a missing barrier goes unseen there
GPU_LIMITS = ("values only, and a missing barrier can still give the right sum; the race check runs "
              "on the simulator: grade with FLASHNUMBA_DEVICE=sim")


def check(implementation):
    def run():
        for B, n in CASES:
            rng = np.random.default_rng(B * n)
            P = rng.random((B, n))
            case = f"P of shape ({B}, {n}), {B} blocks of {n} threads"
            kernel = call(implementation, n)
            if not callable(kernel) or not hasattr(kernel, "__getitem__"):
                raise Mismatch(f"{case}: tree_sum(n) must return a @cuda.jit kernel, got {kernel!r}")
            if on_gpu():                           # values only
                l = np.full(B, np.nan)
                call(kernel[B, n], P, l)
                same_array("l", l, P.sum(axis=1), case=case)
                continue
            from flashnumba.simulator import access
            with access.traced() as trace:
                args = (trace.watch("P", P), trace.watch("l", np.full(B, np.nan)))
                call(kernel[B, n], *args)
            if trace.races:
                raise Mismatch(f"{case}: {trace.races[0]}; expected a cuda.syncthreads() between "
                               f"those two accesses", variable=trace.races[0].array)
            same_array("l", trace.array("l"), P.sum(axis=1), case=case)
        if on_gpu():
            return "l = rowsum(P)"
        return "l = rowsum(P) with no race on shared memory: every barrier is in place"
    return grade(ID, run, gpu_limits=GPU_LIMITS)
