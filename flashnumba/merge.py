"""Merging partial attention results by their log-sum-exps, written once.

Attention of a query row over a set of keys can be computed in parts: split
the keys into disjoint sets, attend over each, and merge. Part p gives its
normalised output O_p and its log-sum-exp L_p = log sum_{j in p} exp(S_j); the
whole is

    L = log(sum_p exp(L_p))                       (computed as m + log sum_p exp(L_p - m),
                                                   m = max_p L_p, so nothing overflows)
    O = sum_p exp(L_p - L) * O_p                  (each part weighted by its share of the sum)

This is FA1's online softmax (Algorithm 1, lines 10-12) one level up: there
the parts are K/V tiles, here they are whole blocks of keys. Split-KV
decoding merges the blocks of a long KV cache this way; ring attention merges
the K/V slices that visit a rank.

A part that saw no key has L_p = -inf and weight 0 (its O_p is ignored, even
if it is NaN); a row that no part saw gets O = 0 and L = -inf, as the
reference gives for a fully masked row. A NaN in some L_p makes that row NaN.

Works on NumPy arrays and on PyTorch tensors (CPU or CUDA) alike; the shapes
are O_p (..., d) and L_p (...), float32 or float64.
"""

import numpy as np


def _xp(x):
    """numpy, or torch for a torch.Tensor (without importing torch otherwise)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch
        return torch
    return np


def merge(O_parts, L_parts):
    """(O, L) of the whole from the parts' (O_p, L_p); see the module docstring."""
    O_parts, L_parts = list(O_parts), list(L_parts)
    if len(O_parts) != len(L_parts) or not O_parts:
        raise ValueError(f"merge needs as many outputs as log-sum-exps, at least one; "
                         f"got {len(O_parts)} and {len(L_parts)}")
    for O_p, L_p in zip(O_parts, L_parts):
        if tuple(O_p.shape[:-1]) != tuple(L_p.shape):
            raise ValueError(f"each O_p must have shape L_p.shape + (d,); got O_p {tuple(O_p.shape)} "
                             f"and L_p {tuple(L_p.shape)}")
    with np.errstate(divide="ignore", invalid="ignore"):     # log 0 = -inf is meant (NumPy warns)
        return _merge(_xp(L_parts[0]), O_parts, L_parts)


def _merge(xp, O_parts, L_parts):
    m = L_parts[0]
    for L_p in L_parts[1:]:
        m = xp.maximum(m, L_p)                                  # m = max_p L_p (NaN propagates)
    m_safe = xp.where(xp.isinf(m) & (m < 0), xp.zeros_like(m), m)   # every part empty: avoid -inf - -inf
    weights = [xp.exp(L_p - m_safe) for L_p in L_parts]         # exp(L_p - m), 0 for an empty part
    total = weights[0]
    for w in weights[1:]:
        total = total + w                                       # sum_p exp(L_p - m)
    L = m_safe + xp.log(total)                                  # -inf where no part saw a key
    seen = total > 0
    O = xp.zeros_like(O_parts[0])
    for O_p, w in zip(O_parts, weights):
        share = xp.where(seen, w / xp.where(seen, total, xp.ones_like(total)), xp.zeros_like(w))
        contribution = share[..., None] * O_p
        O = O + xp.where((share > 0)[..., None], contribution, xp.zeros_like(contribution))
    O = O + (total * 0)[..., None]                              # a NaN L_p: the row is NaN (else + 0)
    return O, L


def merge_pair(O_a, L_a, O_b, L_b):
    """merge of two parts: the step a ring or a split-KV combine takes once per arriving part."""
    return merge((O_a, O_b), (L_a, L_b))
