"""Lesson 3: the online softmax, a row block of scores read one column tile at a time."""

import numpy as np

from flashnumba.course.grading import Mismatch, call, grade, same_array, step_through

ID = "online_softmax"
LESSON = 3
TITLE = "online softmax: running max and sum"
SPEC = ("online_softmax_steps(S (Nq, Nk), Bc) yields {'i': 0, 'j': j, 'm': m, 'l': l} after column "
        "tile j (m = running row max, l = running sum of exp(S - m)); returns (m, l)")
NAME = "online_softmax_steps"


def stub(S, Bc):
    raise NotImplementedError("FILL ME IN: for each tile S[:, j*Bc:(j+1)*Bc]: m_new = max(m, rowmax), "
                              "l = exp(m - m_new) l + rowsum(exp(S_j - m_new)); yield, then return")
    yield


def solution(S, Bc):
    Nq, Nk = S.shape
    m = np.full(Nq, -np.inf)                    # running max: nothing seen yet
    l = np.zeros(Nq)                            # running sum of exp(S - m)
    for j in range(-(-Nk // Bc)):               # Tc = ceil(Nk / Bc) column tiles
        S_j = S[:, j * Bc:(j + 1) * Bc]
        m_new = np.maximum(m, S_j.max(axis=1))  # m_new = max(m, rowmax(S_j))
        m_safe = np.where(np.isneginf(m_new), 0.0, m_new)   # a row with only -inf so far
        l = np.exp(m - m_safe) * l + np.exp(S_j - m_safe[:, None]).sum(axis=1)
        m = m_new
        yield {"i": 0, "j": j, "m": m.copy(), "l": l.copy()}
    return m, l


def perturbed(S, Bc):
    Nq, Nk = S.shape
    m = np.full(Nq, -np.inf)
    l = np.zeros(Nq)
    for j in range(-(-Nk // Bc)):
        S_j = S[:, j * Bc:(j + 1) * Bc]
        m_new = np.maximum(m, S_j.max(axis=1))
        m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
        l = l + np.exp(S_j - m_safe[:, None]).sum(axis=1)     # forgot to rescale the old sum
        m = m_new
        yield {"i": 0, "j": j, "m": m.copy(), "l": l.copy()}
    return m, l


def mirror_states(S, Bc):
    """The float64 answer after every column tile: the max and sum over the columns seen so far."""
    states = []
    for j in range(-(-S.shape[1] // Bc)):
        seen = S[:, :(j + 1) * Bc]
        m = seen.max(axis=1)
        m_safe = np.where(np.isneginf(m), 0.0, m)
        states.append({"i": 0, "j": j, "m": m, "l": np.exp(seen - m_safe[:, None]).sum(axis=1)})
    return states


def _scores(Nq, Nk, seed):
    """Scores with a causal-like -inf pattern: row 0 sees no key, row 1 only the last tile."""
    rng = np.random.default_rng(seed)
    S = 3.0 * rng.standard_normal((Nq, Nk))
    S[:, -3:] += 5.0                                     # later tiles raise the max: rescaling matters
    S[0, :] = -np.inf
    S[1, :-2] = -np.inf
    return S


CASES = ((4, 16, 4), (6, 13, 5), (5, 9, 16))    # (Nq, Nk, Bc): Nk not a multiple of Bc, Bc > Nk


def check(implementation):
    def run():
        for Nq, Nk, Bc in CASES:
            S = _scores(Nq, Nk, seed=Nq * Nk)
            case = f"S of shape ({Nq}, {Nk}), Bc={Bc} (row 0 all -inf, row 1 -inf until the end)"
            with np.errstate(all="ignore"):
                final = step_through(call(implementation, S.copy(), Bc), mirror_states(S, Bc),
                                     ("m", "l"), case=case)
            want = mirror_states(S, Bc)[-1]
            if not isinstance(final, tuple) or len(final) != 2:
                raise Mismatch(f"{case}: the generator must end with `return m, l`, got {final!r}")
            same_array("returned m", final[0], want["m"], case=case)
            same_array("returned l", final[1], want["l"], case=case)
        return "m and l match after every tile, rows of -inf included"
    return grade(ID, run)
