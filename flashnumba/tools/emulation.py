"""The same dense attention computed in a storage dtype: the yardstick of the float16 / bfloat16 rule.

The official library's rule for half precision: a kernel's error against the
float64 reference (``flashnumba.reference``) may be at most 2x (3x for
gradients) the error of the plain dense attention computed in that dtype, the
way PyTorch computes it without upcasting: products accumulate in float32 and
every intermediate (S, the softmax, P V, ...) is rounded to the dtype as it is
stored. This module computes that dense attention; ``tools.accuracy`` and the
tests compare against it.
"""

import numpy as np

from flashnumba.dtypes import round_to
from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.reference import (
    _check,
    _dropped,
    _expand_heads,
    _sum_groups,
    alibi_bias,
    window_mask,
)


def _in_dtype(dtype):
    return lambda x: round_to(x, dtype)


def _probabilities_in_dtype(q, k, causal, softmax_scale, dropout_p, dropout_mask, alignment, r,
                            window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """P, P o Z, scale, Q, K and the softcap's derivative 1 - tanh^2 (1 without softcap), in the
    dtype: S = softcap tanh(S / softcap), then + the ALiBi bias, each step rounded, then masked."""
    B, Nq, Nk, Hq, _, d = _check(q, k, k)
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    Q = np.moveaxis(r(q), 2, 1)
    K = _expand_heads(r(k), Hq)
    S = r(r(Q @ np.swapaxes(K, -1, -2)) * np.float32(scale))
    dcap = np.float32(1.0)
    if softcap:
        T = r(np.tanh(S / np.float32(softcap)))
        S = r(np.float32(softcap) * T)
        dcap = r(np.float32(1.0) - T * T)
    if alibi_slopes is not None:
        S = r(S + alibi_bias(alibi_slopes, B, Hq, Nq, Nk, alignment).astype(np.float32))
    S = np.where(window_mask(Nq, Nk, causal, window_size, alignment), S, np.float32(-np.inf))
    m = S.max(axis=-1, keepdims=True)
    E = np.exp(S - np.where(np.isneginf(m), np.float32(0.0), m))
    l = E.sum(axis=-1, keepdims=True)
    P = r(E / np.where(l > 0, l, np.float32(1.0)))
    P_drop = r(_dropped(P, dropout_p, dropout_mask).astype(np.float32))
    return P, P_drop, scale, Q, K, dcap


def attention_in_dtype(q, k, v, dtype, causal=False, softmax_scale=None, dropout_p=0.0,
                       dropout_mask=None, alignment=BOTTOM_RIGHT, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None):
    """out (B, Nq, Hq, d) as float32 values of `dtype` ('float16' or 'bfloat16'), every step rounded."""
    r = _in_dtype(dtype)
    _, P_drop, _, _, _, _ = _probabilities_in_dtype(q, k, causal, softmax_scale, dropout_p, dropout_mask,
                                                    alignment, r, window_size, softcap, alibi_slopes)
    V = _expand_heads(r(v), q.shape[2])
    return np.moveaxis(r(P_drop @ V), 1, 2)


def attention_backward_in_dtype(dout, q, k, v, dtype, causal=False, softmax_scale=None, dropout_p=0.0,
                                dropout_mask=None, alignment=BOTTOM_RIGHT, window_size=(-1, -1),
                                softcap=0.0, alibi_slopes=None):
    """(dq, dk, dv) as float32 values of `dtype`, every step rounded (as autograd through
    the dense attention in that dtype computes them)."""
    r = _in_dtype(dtype)
    Hq, Hkv = q.shape[2], k.shape[2]
    P, P_drop, scale, Q, K, dcap = _probabilities_in_dtype(q, k, causal, softmax_scale, dropout_p,
                                                           dropout_mask, alignment, r, window_size,
                                                           softcap, alibi_slopes)
    V = _expand_heads(r(v), Hq)
    dO = np.moveaxis(r(dout), 2, 1)
    dV = r(np.swapaxes(P_drop, -1, -2) @ dO)
    dP = r(_dropped(r(dO @ np.swapaxes(V, -1, -2)), dropout_p, dropout_mask).astype(np.float32))
    dS = r(r(r(P * (dP - (P * dP).sum(axis=-1, keepdims=True))) * dcap) * np.float32(scale))
    dQ = r(dS @ K)
    dK = r(np.swapaxes(dS, -1, -2) @ Q)
    return (np.moveaxis(dQ, 1, 2), r(_sum_groups(dK, Hkv)), r(_sum_groups(dV, Hkv)))
