"""Lesson 11: the deterministic dQ pass: one block per Q tile, dQ_i summed on chip in a fixed order."""

import math

import numpy as np
from numba import cuda, float32

from flashnumba import reference, stepping
from flashnumba.course.exercises.e21_dkdv_kernel import ALGORITHM, backward_inputs, uses_atomics
from flashnumba.course.grading import Mismatch, call, grade, same_array

ID = "dq_kernel"
LESSON = 11
TITLE = "dQ without atomics, bitwise reproducible"
SPEC = ("fa2_dq(Q, K, V, dO, L, D, Br, Bc, causal) -> dQ float32: grid Tr blocks of Br threads, "
        "thread = query row r; fill in, for each visible key c of K_j (j = 0, 1, ... in order): "
        "dS_rc from P and dP, dQ_r += dS_rc K_c; no atomics")
NAME = "fa2_dq"


def stub(Q, K, V, dO, L, D, Br, Bc, causal):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    scale = float32(1.0 / math.sqrt(d))
    offset = Nk - Nq                                       # bottom-right: key c visible when c <= r + offset

    @cuda.jit
    def dq_kernel(Q, K, V, dO, L, D, dQ):
        i = cuda.blockIdx.x                                # this block's Q tile
        tid = cuda.threadIdx.x
        r = i * Br + tid                                   # this thread's query row
        K_j = cuda.shared.array((Bc, d), float32)
        V_j = cuda.shared.array((Bc, d), float32)
        Q_r = cuda.local.array(d, float32)                 # this thread's rows of Q_i, dO_i, dQ_i
        dO_r = cuda.local.array(d, float32)
        dQ_r = cuda.local.array(d, float32)
        for x in range(d):
            Q_r[x] = Q[r, x] if r < Nq else 0.0
            dO_r[x] = dO[r, x] if r < Nq else 0.0
            dQ_r[x] = 0.0
        L_r = L[r] if r < Nq else -math.inf
        D_r = D[r] if r < Nq else 0.0                      # noqa: F841 (yours to use below)
        n_tiles = Tc
        if causal:                                         # K/V tiles right of the diagonal are skipped
            n_tiles = max(min((min((i + 1) * Br, Nq) - 1 + offset) // Bc + 1, Tc), 0)
        for j in range(n_tiles):                           # j = 0, 1, ...: the same order every run
            for idx in range(tid, Bc * d, Br):             # the whole block loads K_j, V_j
                c, x = j * Bc + idx // d, idx % d
                K_j[idx // d, x] = K[c, x] if c < Nk else 0.0
                V_j[idx // d, x] = V[c, x] if c < Nk else 0.0
            cuda.syncthreads()  # K_j, V_j loaded before any thread reads them
            for cc in range(Bc):
                c = j * Bc + cc
                if r < Nq and c < Nk and not (causal and c > r + offset) and L_r != -math.inf:
                    pass  # FILL ME IN: S_rc, P_rc = exp(scale S_rc - L_r), dP_rc = dO_r . V_c,
                    #       dS_rc = P_rc (dP_rc - D_r), dQ_r[x] += dS_rc K_c[x]
            cuda.syncthreads()  # every thread done with K_j, V_j before the next tile overwrites them
        if r < Nq:
            for x in range(d):
                dQ[r, x] = scale * dQ_r[x]                 # written once: no atomics

    dQ = np.zeros((Nq, d), dtype=np.float32)
    dq_kernel[Tr, Br](Q, K, V, dO, L, D, dQ)
    return dQ


def solution(Q, K, V, dO, L, D, Br, Bc, causal):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    scale = float32(1.0 / math.sqrt(d))
    offset = Nk - Nq                                       # bottom-right: key c visible when c <= r + offset

    @cuda.jit
    def dq_kernel(Q, K, V, dO, L, D, dQ):
        i = cuda.blockIdx.x                                # this block's Q tile
        tid = cuda.threadIdx.x
        r = i * Br + tid                                   # this thread's query row
        K_j = cuda.shared.array((Bc, d), float32)
        V_j = cuda.shared.array((Bc, d), float32)
        Q_r = cuda.local.array(d, float32)                 # this thread's rows of Q_i, dO_i, dQ_i
        dO_r = cuda.local.array(d, float32)
        dQ_r = cuda.local.array(d, float32)
        for x in range(d):
            Q_r[x] = Q[r, x] if r < Nq else 0.0
            dO_r[x] = dO[r, x] if r < Nq else 0.0
            dQ_r[x] = 0.0
        L_r = L[r] if r < Nq else -math.inf
        D_r = D[r] if r < Nq else 0.0
        n_tiles = Tc
        if causal:                                         # K/V tiles right of the diagonal are skipped
            n_tiles = max(min((min((i + 1) * Br, Nq) - 1 + offset) // Bc + 1, Tc), 0)
        for j in range(n_tiles):                           # j = 0, 1, ...: the same order every run
            for idx in range(tid, Bc * d, Br):             # the whole block loads K_j, V_j
                c, x = j * Bc + idx // d, idx % d
                K_j[idx // d, x] = K[c, x] if c < Nk else 0.0
                V_j[idx // d, x] = V[c, x] if c < Nk else 0.0
            cuda.syncthreads()  # K_j, V_j loaded before any thread reads them
            for cc in range(Bc):
                c = j * Bc + cc
                if r < Nq and c < Nk and not (causal and c > r + offset) and L_r != -math.inf:
                    s = float32(0.0)
                    dp = float32(0.0)
                    for x in range(d):
                        s += Q_r[x] * K_j[cc, x]           # S_rc = Q_r . K_c
                        dp += dO_r[x] * V_j[cc, x]         # dP_rc = dO_r . V_c
                    ds = math.exp(scale * s - L_r) * (dp - D_r)   # dS_rc = P_rc (dP_rc - D_r)
                    for x in range(d):
                        dQ_r[x] += ds * K_j[cc, x]         # dQ_i += dS_ij K_j, on chip
            cuda.syncthreads()  # every thread done with K_j, V_j before the next tile overwrites them
        if r < Nq:
            for x in range(d):
                dQ[r, x] = scale * dQ_r[x]                 # written once: no atomics

    dQ = np.zeros((Nq, d), dtype=np.float32)
    dq_kernel[Tr, Br](Q, K, V, dO, L, D, dQ)
    return dQ


def perturbed(Q, K, V, dO, L, D, Br, Bc, causal):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    scale = float32(1.0 / math.sqrt(d))
    offset = Nk - Nq

    @cuda.jit
    def dq_kernel(Q, K, V, dO, L, D, dQ):
        i = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        r = i * Br + tid
        K_j = cuda.shared.array((Bc, d), float32)
        V_j = cuda.shared.array((Bc, d), float32)
        Q_r = cuda.local.array(d, float32)
        dO_r = cuda.local.array(d, float32)
        dQ_r = cuda.local.array(d, float32)
        for x in range(d):
            Q_r[x] = Q[r, x] if r < Nq else 0.0
            dO_r[x] = dO[r, x] if r < Nq else 0.0
            dQ_r[x] = 0.0
        L_r = L[r] if r < Nq else -math.inf
        D_r = D[r] if r < Nq else 0.0
        n_tiles = Tc
        if causal:
            n_tiles = max(min((min((i + 1) * Br, Nq) - 1 + offset) // Bc + 1, Tc), 0)
        for j in range(n_tiles):
            for idx in range(tid, Bc * d, Br):
                c, x = j * Bc + idx // d, idx % d
                K_j[idx // d, x] = K[c, x] if c < Nk else 0.0
                V_j[idx // d, x] = V[c, x] if c < Nk else 0.0
            cuda.syncthreads()
            for cc in range(Bc):
                c = j * Bc + cc
                if r < Nq and c < Nk and L_r != -math.inf:      # forgets the causal mask inside a tile
                    s = float32(0.0)
                    dp = float32(0.0)
                    for x in range(d):
                        s += Q_r[x] * K_j[cc, x]
                        dp += dO_r[x] * V_j[cc, x]
                    ds = math.exp(scale * s - L_r) * (dp - D_r)
                    for x in range(d):
                        dQ_r[x] += ds * K_j[cc, x]
            cuda.syncthreads()
        if r < Nq:
            for x in range(d):
                dQ[r, x] = scale * dQ_r[x]

    dQ = np.zeros((Nq, d), dtype=np.float32)
    dq_kernel[Tr, Br](Q, K, V, dO, L, D, dQ)
    return dQ


CASES = ((12, 20, 4, 4, 8, False), (13, 10, 3, 4, 8, True), (9, 17, 5, 4, 4, True))
TOL = 1e-5            # float32 kernel against the float64 reference


def check(implementation):
    def run():
        if uses_atomics(implementation):     # before any launch: an atomic on a local array faults a GPU
            raise Mismatch("your kernel calls an atomic: the deterministic pass has one block own each "
                           "Q tile, so it can add on chip (dQ_r[x] += ...) in a fixed order and write "
                           "dQ once", variable="dQ")
        for Nq, Nk, d, Br, Bc, causal in CASES:
            case = f"{'causal, ' if causal else ''}Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}"
            p = stepping.make_problem(Nq, Nk, d, causal=causal, seed=Nq * Nk, Br=Br, Bc=Bc,
                                      algorithm=ALGORITHM)
            inputs = backward_inputs(p)
            dQ_ref, _, _ = reference.single_head_backward(p.dO, p.Q, p.K, p.V, causal=causal)
            with np.errstate(all="ignore"):
                first = call(implementation, *inputs, Br, Bc, causal)
                second = call(implementation, *inputs, Br, Bc, causal)
            same_array("dQ", first, dQ_ref, tol=TOL, case=case)
            if not np.array_equal(np.asarray(first), np.asarray(second)):
                raise Mismatch(f"{case}: two runs on the same inputs gave different dQ bits: this pass "
                               f"must add in a fixed order, each dQ_i on chip, written once")
        return (f"dQ matches reference.single_head_backward (max error <= {TOL:.0e} of max |dQ|) on "
                f"{len(CASES)} problems, and two runs give the same bits")
    return grade(ID, run)
