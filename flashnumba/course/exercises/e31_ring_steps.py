"""Lesson 16: ring attention's forward, one rank and one ring step at a time, merged by log-sum-exp."""

import numpy as np

from flashnumba.course.grading import Mismatch, call, grade, same_array, step_through
from flashnumba.mirror.ring import ring_forward_steps
from flashnumba.mirror.trace import run

ID = "ring_steps"
LESSON = 16
TITLE = "ring attention: merge each visiting block"
SPEC = ("ring_steps(Q (N, d), K, V, world, causal) yields {'i': r, 'j': src, 'O_r': (n, d), 'L_r': (n,)} "
        "for each step s, then each rank r (contiguous layout, src = r - s mod world); returns (O, L)")
NAME = "ring_steps"


def stub(Q, K, V, world, causal):
    raise NotImplementedError("FILL ME IN: shard Q, K, V into world blocks of n rows; at step s rank r "
                              "attends to block (r - s) % world and merges by log-sum-exp; yield, return")
    yield


def solution(Q, K, V, world, causal):
    from flashnumba import reference
    from flashnumba.merge import merge_pair
    N, d = Q.shape
    n = N // world
    scale = 1.0 / np.sqrt(d)                           # the whole problem's scale, on every block

    def block(X, r):
        return X[r * n:(r + 1) * n]                      # rank r's rows: the contiguous layout

    O = [np.zeros((n, d)) for _ in range(world)]        # O_r = 0
    L = [np.full(n, -np.inf) for _ in range(world)]     # L_r = -inf
    for s in range(world):
        for r in range(world):
            j = (r - s) % world                          # the block visiting rank r at step s
            if not causal or j < r:                      # every key is earlier: nothing masked
                O_rj, L_rj = reference.single_head(block(Q, r), block(K, j), block(V, j),
                                                   softmax_scale=scale)
                O[r], L[r] = merge_pair(O[r], L[r], O_rj, L_rj)
            elif j == r:                                 # the diagonal block: causal inside it
                O_rj, L_rj = reference.single_head(block(Q, r), block(K, j), block(V, j),
                                                   causal=True, softmax_scale=scale)
                O[r], L[r] = merge_pair(O[r], L[r], O_rj, L_rj)
            # j > r under causal: every key is later; skipped, the block only passes on
            yield {"i": r, "j": j, "O_r": O[r].copy(), "L_r": L[r].copy()}
    return np.concatenate(O), np.concatenate(L)


def perturbed(Q, K, V, world, causal):
    from flashnumba import reference
    from flashnumba.merge import merge_pair
    N, d = Q.shape
    n = N // world

    def block(X, r):
        return X[r * n:(r + 1) * n]

    O = [np.zeros((n, d)) for _ in range(world)]
    L = [np.full(n, -np.inf) for _ in range(world)]
    for s in range(world):
        for r in range(world):
            j = (r - s) % world
            if not causal or j <= r:                     # the diagonal block left unmasked
                O_rj, L_rj = reference.single_head(block(Q, r), block(K, j), block(V, j))
                O[r], L[r] = merge_pair(O[r], L[r], O_rj, L_rj)
            yield {"i": r, "j": j, "O_r": O[r].copy(), "L_r": L[r].copy()}
    return np.concatenate(O), np.concatenate(L)


def mirror_states(Q, K, V, world, causal):
    """The ring mirror's states for one batch, one head, as 2-D arrays; and its (O, L)."""
    steps, (O, L) = run(ring_forward_steps(Q[None, :, None, :], K[None, :, None, :], V[None, :, None, :],
                                           world=world, causal=causal))
    states = [{"i": st.i, "j": st.j, "O_r": st.state["O_r"][0, :, 0, :], "L_r": st.state["L_r"][0, 0]}
              for st in steps]
    return states, O[0, :, 0, :], L[0, 0]


CASES = ((12, 3, 5, False), (16, 4, 3, True), (10, 5, 4, True))      # (N, world, d, causal)


def check(implementation):
    def run_cases():
        for N, world, d, causal in CASES:
            rng = np.random.default_rng(N * world + d)
            Q, K, V = (rng.standard_normal((N, d)) for _ in range(3))
            states, O, L = mirror_states(Q, K, V, world, causal)
            case = f"N={N}, world={world} (n={N // world}), d={d}, {'causal' if causal else 'not causal'}"
            with np.errstate(all="ignore"):
                final = step_through(call(implementation, Q.copy(), K.copy(), V.copy(), world, causal),
                                     states, ("O_r", "L_r"), case=case)
            if not isinstance(final, tuple) or len(final) != 2:
                raise Mismatch(f"{case}: the generator must end with `return O, L` (every rank's "
                               f"O_r and L_r joined in rank order), got {final!r}")
            same_array("returned O", final[0], O, case=case)
            same_array("returned L", final[1], L, case=case)
        return "every rank's O_r and L_r match the ring mirror after every ring step"
    return grade(ID, run_cases)
