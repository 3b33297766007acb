"""Lesson 3: merging two partial attention results by their log-sum-exps."""

import numpy as np

from flashnumba import reference
from flashnumba.course.grading import Mismatch, call, grade, same_array

ID = "merge"
LESSON = 3
TITLE = "merging partial results by log-sum-exp"
SPEC = ("merge_two(O_a, L_a, O_b, L_b) -> (O, L) of attention over the union of two disjoint key sets; "
        "a part with L = -inf saw no key and weighs 0; a row no part saw: O = 0, L = -inf")
NAME = "merge_two"


def stub(O_a, L_a, O_b, L_b):
    raise NotImplementedError("FILL ME IN: L = log(e^L_a + e^L_b) computed from m = max(L_a, L_b); "
                              "O = e^(L_a - L) O_a + e^(L_b - L) O_b")


def solution(O_a, L_a, O_b, L_b):
    m = np.maximum(L_a, L_b)
    m_safe = np.where(np.isneginf(m), 0.0, m)        # both parts empty: avoid -inf - (-inf)
    w_a = np.exp(L_a - m_safe)                         # e^(L_a - m), 0 for an empty part
    w_b = np.exp(L_b - m_safe)
    total = w_a + w_b
    seen = total > 0
    with np.errstate(divide="ignore"):
        L = np.where(seen, m_safe + np.log(np.where(seen, total, 1.0)), -np.inf)
    share_a = np.where(seen, w_a / np.where(seen, total, 1.0), 0.0)
    share_b = np.where(seen, w_b / np.where(seen, total, 1.0), 0.0)
    O = share_a[:, None] * np.nan_to_num(O_a) + share_b[:, None] * np.nan_to_num(O_b)
    return O, L


def perturbed(O_a, L_a, O_b, L_b):
    m = np.maximum(L_a, L_b)                           # no guard: -inf - (-inf) = NaN
    w_a, w_b = np.exp(L_a - m), np.exp(L_b - m)
    L = m + np.log(w_a + w_b)
    O = (w_a[:, None] * O_a + w_b[:, None] * O_b) / (w_a + w_b)[:, None]
    return O, L


CASES = ((6, 10, 4, 4), (9, 7, 3, 5))      # (Nq, Nk, d, split): keys [:split] in part a, the rest in b


def check(implementation):
    def run():
        for Nq, Nk, d, split in CASES:
            rng = np.random.default_rng(Nq * Nk + d)
            Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            O_ref, L_ref = reference.single_head(Q, K, V, causal=True)    # some rows see no key
            O_a, L_a = _part(Q, K, V, 0, split)          # an empty part's O_p is NaN: ignore it
            O_b, L_b = _part(Q, K, V, split, Nk)
            case = (f"causal Nq={Nq}, Nk={Nk}, d={d}, keys 0:{split} in part a and {split}:{Nk} in b "
                    f"(rows with L_a = -inf: {np.flatnonzero(np.isneginf(L_a)).tolist()}, "
                    f"with both -inf: {np.flatnonzero(np.isneginf(L_a) & np.isneginf(L_b)).tolist()})")
            with np.errstate(all="ignore"):
                out = call(implementation, O_a, L_a, O_b, L_b)
            if not isinstance(out, tuple) or len(out) != 2:
                raise Mismatch(f"{case}: return a pair (O, L), got {type(out).__name__}")
            same_array("O", out[0], O_ref, case=case)
            same_array("L", out[1], L_ref, case=case)
        return "the merge equals attention over all keys, empty parts and empty rows included"
    return grade(ID, run)


def _part(Q, K, V, c0, c1):
    """(O_p, L_p): causal (bottom-right over all Nk keys) attention restricted to keys c0:c1."""
    Nq, Nk = Q.shape[0], K.shape[0]
    S = Q @ K.T / np.sqrt(Q.shape[1])
    r, c = np.arange(Nq)[:, None], np.arange(Nk)[None, :]
    S = np.where((c <= r + Nk - Nq) & (c >= c0) & (c < c1), S, -np.inf)
    m = S.max(axis=1)
    m_safe = np.where(np.isneginf(m), 0.0, m)
    E = np.exp(S - m_safe[:, None])
    l = E.sum(axis=1)
    O = np.divide(E @ V, l[:, None], out=np.full((Nq, Q.shape[1]), np.nan), where=l[:, None] > 0)
    with np.errstate(divide="ignore"):
        return O, np.where(l > 0, m_safe + np.log(l), -np.inf)
