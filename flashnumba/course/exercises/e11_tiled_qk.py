"""Lesson 6: a tiled Q K^T kernel with shared memory, graded on the simulator: values, each
thread's global reads, and a race check on shared memory (a missing barrier is named).
On a GPU the grader checks the values only, and says so."""

import math

import numpy as np
from numba import cuda, float64

from flashnumba.course.grading import Mismatch, call, grade, on_gpu, same_array

ID = "tiled_qk"
LESSON = 6
TITLE = "a tiled Q K^T kernel in shared memory"
SPEC = ("tiled_qk(T) -> a @cuda.jit kernel(Q, K, S) writing S = Q K^T; launched with blocks of "
        "(T, T) threads, grid (ceil(Nk / T), ceil(Nq / T)); T x T tiles of Q and K staged in shared memory")
NAME = "tiled_qk"


def stub(T):
    raise NotImplementedError("FILL ME IN: Q_s, K_s = cuda.shared.array((T, T), float64); for each "
                              "phase p: load Q_s[y, x], K_s[y, x], syncthreads, accumulate, syncthreads")


def solution(T):
    @cuda.jit
    def qk_kernel(Q, K, S):
        x, y = cuda.threadIdx.x, cuda.threadIdx.y
        r = cuda.blockIdx.y * T + y              # this thread's row of S (a query)
        c = cuda.blockIdx.x * T + x              # this thread's column of S (a key)
        Q_s = cuda.shared.array((T, T), float64)
        K_s = cuda.shared.array((T, T), float64)
        Nq, d = Q.shape
        Nk = K.shape[0]
        acc = 0.0
        for p in range((d + T - 1) // T):        # phases: T columns of d at a time
            k = p * T + x
            Q_s[y, x] = Q[r, k] if r < Nq and k < d else 0.0
            k_row = cuda.blockIdx.x * T + y      # K tile rows are this block's columns of S
            K_s[y, x] = K[k_row, k] if k_row < Nk and k < d else 0.0
            cuda.syncthreads()                   # Q_s, K_s fully loaded before any thread reads them
            for kk in range(T):
                acc += Q_s[y, kk] * K_s[x, kk]   # S[r, c] += Q[r, k] K[c, k]
            cuda.syncthreads()                   # everyone done reading before the next phase overwrites
        if r < Nq and c < Nk:
            S[r, c] = acc
    return qk_kernel


def perturbed(T):
    @cuda.jit
    def qk_kernel(Q, K, S):
        x, y = cuda.threadIdx.x, cuda.threadIdx.y
        r = cuda.blockIdx.y * T + y
        c = cuda.blockIdx.x * T + x
        Q_s = cuda.shared.array((T, T), float64)
        K_s = cuda.shared.array((T, T), float64)
        Nq, d = Q.shape
        Nk = K.shape[0]
        acc = 0.0
        for p in range((d + T - 1) // T):
            k = p * T + x
            Q_s[y, x] = Q[r, k] if r < Nq and k < d else 0.0
            k_row = cuda.blockIdx.x * T + y
            K_s[y, x] = K[k_row, k] if k_row < Nk and k < d else 0.0
            cuda.syncthreads()
            for kk in range(T):
                acc += Q_s[y, kk] * K_s[x, kk]
            # forgot the second barrier: a fast thread overwrites Q_s while others still read it
        if r < Nq and c < Nk:
            S[r, c] = acc
    return qk_kernel


CASES = ((8, 8, 8, 4), (7, 10, 5, 4), (3, 5, 9, 2))     # (Nq, Nk, d, T): partial tiles, d % T != 0


def launch_traced(kernel, Q, K, T):
    """Run kernel on Q, K with the grader's launch, watching every access; returns the Trace."""
    from flashnumba.simulator import access
    Nq, Nk = Q.shape[0], K.shape[0]
    with access.traced() as trace:
        args = (trace.watch("Q", Q), trace.watch("K", K), trace.watch("S", np.full((Nq, Nk), np.nan)))
        kernel[(math.ceil(Nk / T), math.ceil(Nq / T)), (T, T)](*args)
    return trace


# what a GPU cannot see: it runs the kernel but records no thread's accesses
GPU_LIMITS = ("values only; the race check and the count of each thread's global reads need the "
              "simulator's trace: grade with FLASHNUMBA_DEVICE=sim")


def check(implementation):
    def run():
        for Nq, Nk, d, T in CASES:
            rng = np.random.default_rng(Nq * Nk + d)
            Q, K = rng.standard_normal((Nq, d)), rng.standard_normal((Nk, d))
            case = f"Nq={Nq}, Nk={Nk}, d={d}, T={T}"
            kernel = call(implementation, T)
            if not callable(kernel) or not hasattr(kernel, "__getitem__"):
                raise Mismatch(f"{case}: tiled_qk(T) must return a @cuda.jit kernel, got {kernel!r}")
            if on_gpu():                           # values only (accesses need the simulator)
                S = np.full((Nq, Nk), np.nan)
                call(kernel[(math.ceil(Nk / T), math.ceil(Nq / T)), (T, T)], Q, K, S)
                same_array("S", S, Q @ K.T, case=case)
                continue
            trace = call(launch_traced, kernel, Q, K, T)
            if trace.races:
                raise Mismatch(f"{case}: {trace.races[0]}; expected a cuda.syncthreads() between "
                               f"the two accesses (the barrier's reason: the other thread may run "
                               f"first on a GPU)", variable=trace.races[0].array)
            same_array("S", trace.array("S"), Q @ K.T, case=case)
            phases = math.ceil(d / T)
            for name in ("Q", "K"):
                most = max(trace.per_thread(name).values(), default=0)
                if most > phases:
                    who = max(trace.per_thread(name), key=trace.per_thread(name).get)
                    raise Mismatch(f"{case}: thread {who[1]} of block {who[0]} read {most} elements "
                                   f"of {name} from global memory; expected at most ceil(d / T) = "
                                   f"{phases}, one per phase: load the tile cooperatively into "
                                   f"shared memory, then read the shared tile", variable=name)
            writes = trace.per_element("S", "writes")
            if writes.max() != 1 or writes.min() != 1:
                raise Mismatch(f"{case}: S{list(np.argwhere(writes != 1)[0])} was written "
                               f"{writes[tuple(np.argwhere(writes != 1)[0])]} times, expected once")
        if on_gpu():
            return f"S = Q K^T on {len(CASES)} shapes (partial tiles, d not a multiple of T)"
        return (f"S = Q K^T on {len(CASES)} shapes (partial tiles, d not a multiple of T), "
                f"at most ceil(d / T) global reads of Q and of K per thread, no race on shared memory")
    return grade(ID, run, gpu_limits=GPU_LIMITS)
