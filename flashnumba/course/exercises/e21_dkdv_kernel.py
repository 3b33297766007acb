"""Lesson 11: the FA2 backward's main kernel: one block per K/V tile, dK_j and dV_j on chip, dQ by atomics.

The kernel is small on purpose: one thread per key of K_j (so each thread owns one
row of dK_j and dV_j, in registers), Q_i and dO_i loaded into shared memory by the
whole block. flashnumba.kernels.fa2_backward does the same with warps splitting the
rows of Q_i; both are stepped against flashnumba.mirror.fa2_backward_state.
"""

import inspect
import math
import re

import numpy as np
from numba import cuda, float32

from flashnumba import registry, stepping
from flashnumba.course.grading import (
    Mismatch,
    call,
    grade,
    kernel_steps,
    on_gpu,
    unconditional_raise,
)

ID = "dkdv_kernel"
LESSON = 11
TITLE = "the dK, dV kernel with dQ by atomics"
SPEC = ("fa2_dkdv(Q, K, V, dO, L, D, Br, Bc, causal, limit) -> (dQ, dK, dV) float32: grid Tc blocks "
        "of Bc threads, thread = key c of K_j; fill in, for each visible row r of Q_i: P, dP, dS, "
        "dV_c, dK_c, and cuda.atomic.add of scale dS K_c into dQ[r]")
NAME = "fa2_dkdv"
# the readable FA2 backward kernel: stepping compares the student's kernel with its mirror and state
ALGORITHM = registry.version(registry.FA2.name).kernel(registry.BACKWARD)


def stub(Q, K, V, dO, L, D, Br, Bc, causal, limit):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    scale = float32(1.0 / math.sqrt(d))
    offset = Nk - Nq                                       # bottom-right: key c visible when c <= r + offset

    @cuda.jit
    def dkdv(Q, K, V, dO, L, D, dQ, dK, dV):
        j = cuda.blockIdx.x                                # this block's K/V tile
        tid = cuda.threadIdx.x
        c = j * Bc + tid                                   # this thread's key
        Q_i = cuda.shared.array((Br, d), float32)
        dO_i = cuda.shared.array((Br, d), float32)
        K_c = cuda.local.array(d, float32)                 # this thread's row of K_j, V_j, dK_j, dV_j
        V_c = cuda.local.array(d, float32)
        dK_c = cuda.local.array(d, float32)
        dV_c = cuda.local.array(d, float32)
        for x in range(d):
            K_c[x] = K[c, x] if c < Nk else 0.0
            V_c[x] = V[c, x] if c < Nk else 0.0
            dK_c[x] = 0.0
            dV_c[x] = 0.0
        i_start = 0
        if causal:                                         # Q tiles above the diagonal are skipped
            i_start = min(max(j * Bc - offset, 0) // Br, Tr)
        for i in range(i_start, min(Tr, i_start + limit)):
            for idx in range(tid, Br * d, Bc):             # the whole block loads Q_i, dO_i
                r, x = i * Br + idx // d, idx % d
                Q_i[idx // d, x] = Q[r, x] if r < Nq else 0.0
                dO_i[idx // d, x] = dO[r, x] if r < Nq else 0.0
            cuda.syncthreads()  # Q_i, dO_i loaded before any thread reads them
            for rr in range(Br):
                r = i * Br + rr
                if c < Nk and r < Nq and not (causal and c > r + offset) and L[r] != -math.inf:
                    pass  # FILL ME IN: S_rc = scale Q_r . K_c, P = exp(S_rc - L_r), dP = dO_r . V_c,
                    #       dS = P (dP - D_r); dV_c += P dO_r, dK_c += dS Q_r (scaled at the end),
                    #       cuda.atomic.add(dQ, (r, x), scale dS K_c[x]) for every x
            cuda.syncthreads()  # every thread done with Q_i, dO_i before the next Q tile overwrites them
        if c < Nk:
            for x in range(d):
                dK[c, x] = scale * dK_c[x]
                dV[c, x] = dV_c[x]

    dQ = np.zeros((Nq, d), dtype=np.float32)               # zeroed before the atomics add into it
    dK = np.zeros((Nk, d), dtype=np.float32)
    dV = np.zeros((Nk, d), dtype=np.float32)
    dkdv[Tc, Bc](Q, K, V, dO, L, D, dQ, dK, dV)
    return dQ, dK, dV


def solution(Q, K, V, dO, L, D, Br, Bc, causal, limit):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    scale = float32(1.0 / math.sqrt(d))
    offset = Nk - Nq                                       # bottom-right: key c visible when c <= r + offset

    @cuda.jit
    def dkdv(Q, K, V, dO, L, D, dQ, dK, dV):
        j = cuda.blockIdx.x                                # this block's K/V tile
        tid = cuda.threadIdx.x
        c = j * Bc + tid                                   # this thread's key
        Q_i = cuda.shared.array((Br, d), float32)
        dO_i = cuda.shared.array((Br, d), float32)
        K_c = cuda.local.array(d, float32)                 # this thread's row of K_j, V_j, dK_j, dV_j
        V_c = cuda.local.array(d, float32)
        dK_c = cuda.local.array(d, float32)
        dV_c = cuda.local.array(d, float32)
        for x in range(d):
            K_c[x] = K[c, x] if c < Nk else 0.0
            V_c[x] = V[c, x] if c < Nk else 0.0
            dK_c[x] = 0.0
            dV_c[x] = 0.0
        i_start = 0
        if causal:                                         # Q tiles above the diagonal are skipped
            i_start = min(max(j * Bc - offset, 0) // Br, Tr)
        for i in range(i_start, min(Tr, i_start + limit)):
            for idx in range(tid, Br * d, Bc):             # the whole block loads Q_i, dO_i
                r, x = i * Br + idx // d, idx % d
                Q_i[idx // d, x] = Q[r, x] if r < Nq else 0.0
                dO_i[idx // d, x] = dO[r, x] if r < Nq else 0.0
            cuda.syncthreads()  # Q_i, dO_i loaded before any thread reads them
            for rr in range(Br):
                r = i * Br + rr
                if c < Nk and r < Nq and not (causal and c > r + offset) and L[r] != -math.inf:
                    s = float32(0.0)
                    dp = float32(0.0)
                    for x in range(d):
                        s += Q_i[rr, x] * K_c[x]           # S_rc = Q_r . K_c
                        dp += dO_i[rr, x] * V_c[x]         # dP_rc = dO_r . V_c
                    p = math.exp(scale * s - L[r])         # P_rc = exp(scale S_rc - L_r)
                    ds = p * (dp - D[r])                   # dS_rc = P_rc (dP_rc - D_r)
                    for x in range(d):
                        dV_c[x] += p * dO_i[rr, x]         # dV_j += P_ij^T dO_i
                        dK_c[x] += ds * Q_i[rr, x]         # dK_j += dS_ij^T Q_i
                        cuda.atomic.add(dQ, (r, x), scale * ds * K_c[x])   # dQ_i += scale dS_ij K_j
            cuda.syncthreads()  # every thread done with Q_i, dO_i before the next Q tile overwrites them
        if c < Nk:
            for x in range(d):
                dK[c, x] = scale * dK_c[x]
                dV[c, x] = dV_c[x]

    dQ = np.zeros((Nq, d), dtype=np.float32)               # zeroed before the atomics add into it
    dK = np.zeros((Nk, d), dtype=np.float32)
    dV = np.zeros((Nk, d), dtype=np.float32)
    dkdv[Tc, Bc](Q, K, V, dO, L, D, dQ, dK, dV)
    return dQ, dK, dV


def perturbed(Q, K, V, dO, L, D, Br, Bc, causal, limit):
    Nq, d = Q.shape
    Nk = K.shape[0]
    Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
    scale = float32(1.0 / math.sqrt(d))
    offset = Nk - Nq

    @cuda.jit
    def dkdv(Q, K, V, dO, L, D, dQ, dK, dV):
        j = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        c = j * Bc + tid
        Q_i = cuda.shared.array((Br, d), float32)
        dO_i = cuda.shared.array((Br, d), float32)
        K_c = cuda.local.array(d, float32)
        V_c = cuda.local.array(d, float32)
        dK_c = cuda.local.array(d, float32)
        dV_c = cuda.local.array(d, float32)
        for x in range(d):
            K_c[x] = K[c, x] if c < Nk else 0.0
            V_c[x] = V[c, x] if c < Nk else 0.0
            dK_c[x] = 0.0
            dV_c[x] = 0.0
        i_start = 0
        if causal:
            i_start = min(max(j * Bc - offset, 0) // Br, Tr)
        for i in range(i_start, min(Tr, i_start + limit)):
            for idx in range(tid, Br * d, Bc):
                r, x = i * Br + idx // d, idx % d
                Q_i[idx // d, x] = Q[r, x] if r < Nq else 0.0
                dO_i[idx // d, x] = dO[r, x] if r < Nq else 0.0
            cuda.syncthreads()
            for rr in range(Br):
                r = i * Br + rr
                if c < Nk and r < Nq and not (causal and c > r + offset) and L[r] != -math.inf:
                    s = float32(0.0)
                    dp = float32(0.0)
                    for x in range(d):
                        s += Q_i[rr, x] * K_c[x]
                        dp += dO_i[rr, x] * V_c[x]
                    p = math.exp(scale * s - L[r])
                    ds = p * dp - D[r]                     # P (dP - D) with the brackets lost
                    for x in range(d):
                        dV_c[x] += p * dO_i[rr, x]
                        dK_c[x] += ds * Q_i[rr, x]
                        cuda.atomic.add(dQ, (r, x), scale * ds * K_c[x])
            cuda.syncthreads()
        if c < Nk:
            for x in range(d):
                dK[c, x] = scale * dK_c[x]
                dV[c, x] = dV_c[x]

    dQ = np.zeros((Nq, d), dtype=np.float32)
    dK = np.zeros((Nk, d), dtype=np.float32)
    dV = np.zeros((Nk, d), dtype=np.float32)
    dkdv[Tc, Bc](Q, K, V, dO, L, D, dQ, dK, dV)
    return dQ, dK, dV


def backward_inputs(p):
    """What the kernels read, float32, for a stepping.Problem: Q, K, V, dO and the forward's L, D."""
    O, L = stepping._forward_outputs(p)                    # the float64 mirror's forward
    D = (p.dO * O).sum(axis=1)                             # D_i = rowsum(dO_i * O_i), the preprocess pass
    return [np.ascontiguousarray(X, dtype=np.float32) for X in (p.Q, p.K, p.V, p.dO, L, D)]


# (Nq, Nk, d, Br, Bc, causal): tiles that do not divide N; Nq > Nk causal has rows with L = -inf
CASES = ((12, 20, 4, 4, 8, False), (13, 10, 3, 4, 8, True))


def _code(implementation):
    """The function's source with comments left out; None if unreadable."""
    try:
        source = inspect.getsource(implementation)
    except (OSError, TypeError):
        return None
    return "\n".join(line.split("#", 1)[0] for line in source.splitlines())


def uses_atomics(implementation):
    """False when the function's source (comments left out) never calls an atomic; None if unreadable."""
    code = _code(implementation)
    return None if code is None else "atomic." in code


def local_atomics(implementation):
    """The names of the thread-local arrays (cuda.local.array) the source passes to an atomic.

    Atomics work on global and shared memory; on a GPU one on a thread's local array is an
    illegal address, which leaves the process's CUDA context unusable: graders refuse it
    before launching."""
    code = _code(implementation) or ""
    local = set(re.findall(r"(\w+)\s*=\s*cuda\.local\.array\(", code))
    return sorted(local & set(re.findall(r"cuda\.atomic\.\w+\(\s*(\w+)", code)))


NO_ATOMIC = ("your kernel adds into dQ without an atomic: every thread of a block (and every block, at "
             "once on a GPU) adds into the same dQ[r, x]; a plain += loses updates. Use "
             "cuda.atomic.add(dQ, (r, x), value)")


def _raise(exception):
    raise exception


def check(implementation):
    def run():
        if local_atomics(implementation):
            raise Mismatch(f"your kernel calls an atomic on the thread-local array "
                           f"{local_atomics(implementation)[0]}: atomics are for global (or shared) "
                           f"memory, where other threads add too; a local array is the thread's own, "
                           f"add into it with +=", variable=local_atomics(implementation)[0])
        first = unconditional_raise(implementation)       # the stub's "not done yet", or a
        if first is not None:                              # student's raise: said before the
            call(_raise, first)                            # source is judged
        if on_gpu() and uses_atomics(implementation) is False:
            raise Mismatch(NO_ATOMIC + " (on a GPU the lost updates make the values wrong too, so "
                           "they are compared once the atomics are in)", variable="dQ")
        for Nq, Nk, d, Br, Bc, causal in CASES:
            case = f"{'causal, ' if causal else ''}Nq={Nq}, Nk={Nk}, d={d}, Br={Br}, Bc={Bc}"
            p = stepping.make_problem(Nq, Nk, d, causal=causal, seed=Nq + Nk, Br=Br, Bc=Bc,
                                      algorithm=ALGORITHM)
            inputs = backward_inputs(p)
            with np.errstate(all="ignore"):
                out = call(implementation, *inputs, Br, Bc, causal, 1)
            if not isinstance(out, tuple) or len(out) != 3:
                raise Mismatch(f"{case}: return (dQ, dK, dV), got {type(out).__name__}")

            def kernel(algorithm, problem, k, inputs=inputs, Br=Br, Bc=Bc, causal=causal):
                # (kernel_steps turns its errors into messages)
                with np.errstate(all="ignore"):
                    out = implementation(*inputs, Br, Bc, causal, k)
                return {name: np.asarray(x, dtype=np.float64) for name, x in zip(("dQ", "dK", "dV"), out)}

            kernel_steps(ALGORITHM, p, kernel, case=case)
        if uses_atomics(implementation) is False:          # the simulator's threads lost nothing
            raise Mismatch("the numbers agree, but " + NO_ATOMIC, variable="dQ")
        return ("dQ, dK, dV agree with mirror.fa2_backward_state after every step of each block's "
                "loop (limit = 1, 2, ...), causal with rows that see no key included")
    return grade(ID, run)
