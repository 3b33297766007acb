"""The float64 reference: the oracle everything in flashnumba is checked against.

Written for clarity, never optimised: the full Nq x Nk score matrix is formed.

Layout is flash-attn's: q (batch, Nq, Hq, d), k and v (batch, Nk, Hkv, d), with
Hq % Hkv == 0 (grouped-query attention: query head h reads K/V head
h // (Hq // Hkv)). lse is (batch, Hq, Nq), natural log.

    S = softmax_scale * Q K^T
    S = softcap * tanh(S / softcap)                (softcap > 0 only)
    S = S - slope_h |r + Nk - Nq - c|              (alibi_slopes only; slope of head h, batch b)
    S = -inf where causal or the window hides key c from query r
        (visible: r + offset - left <= c <= r + offset + right, geometry.window_bounds)
    P = softmax(S) row-wise                        (a row with no visible key: P = 0, lse = -inf)
    P_drop = P * keep / (1 - dropout_p)            (keep: boolean, dropped entries -> 0)
    O = P_drop V
"""

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT, causal_offset, window_bounds


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be 4-D (batch, seqlen, nheads, headdim); got "
            f"q.ndim={q.ndim}, k.ndim={k.ndim}, v.ndim={v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    B, Nq, Hq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k {k.shape} does not match q {q.shape} in batch or headdim")
    Hkv = k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"nheads_q={Hq} must be a multiple of nheads_kv={Hkv}")
    return B, Nq, k.shape[1], Hq, Hkv, d


def _expand_heads(x, Hq):
    """(B, N, Hkv, d) -> (B, Hq, N, d): each K/V head repeated for its group of query heads."""
    group = Hq // x.shape[2]
    return np.repeat(np.moveaxis(x, 2, 1), group, axis=1)


def _sum_groups(dx, Hkv):
    """(B, Hq, N, d) -> (B, N, Hkv, d): a K/V head's gradient sums over its query heads."""
    B, Hq, N, d = dx.shape
    return np.moveaxis(dx.reshape(B, Hkv, Hq // Hkv, N, d).sum(axis=2), 1, 2)


def causal_mask(Nq, Nk, alignment=BOTTOM_RIGHT):
    """Boolean (Nq, Nk): True where key c is visible to query r (c <= r + offset)."""
    offset = causal_offset(Nq, Nk, alignment)
    r = np.arange(Nq)[:, None]
    c = np.arange(Nk)[None, :]
    return c <= r + offset


def window_mask(Nq, Nk, causal=False, window_size=(-1, -1), alignment=BOTTOM_RIGHT):
    """Boolean (Nq, Nk): True where key c is visible to query r (r + lo <= c <= r + hi)."""
    lo, hi = window_bounds(Nq, Nk, causal, window_size, alignment)
    r = np.arange(Nq)[:, None]
    c = np.arange(Nk)[None, :]
    return (c >= r + lo) & (c <= r + hi)


def alibi_bias(alibi_slopes, B, Hq, Nq, Nk, alignment=BOTTOM_RIGHT):
    """(B, Hq, Nq, Nk) float64: -slope_bh |r + offset - c| (offset = Nk - Nq bottom-right)."""
    slopes = np.asarray(alibi_slopes, dtype=np.float64)
    if slopes.shape == (Hq,):
        slopes = np.broadcast_to(slopes, (B, Hq))
    if slopes.shape != (B, Hq):
        raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}), got {slopes.shape}")
    offset = causal_offset(Nq, Nk, alignment)
    distance = np.abs(np.arange(Nq)[:, None] + offset - np.arange(Nk)[None, :])
    return -slopes[:, :, None, None] * distance


def _scores(q, k, scale, softcap, alibi_slopes, alignment):
    """(S, dS_final/dS_raw): the final scores (B, Hq, Nq, Nk) before masking, and the softcap's
    derivative 1 - tanh^2 (1 without softcap)."""
    B, Nq, Hq, _ = q.shape
    Nk = k.shape[1]
    Q = np.moveaxis(q.astype(np.float64), 2, 1)                 # (B, Hq, Nq, d)
    K = _expand_heads(k.astype(np.float64), Hq)                  # (B, Hq, Nk, d)
    S = scale * (Q @ np.swapaxes(K, -1, -2))                     # (B, Hq, Nq, Nk)
    dcap = 1.0
    if softcap:
        T = np.tanh(S / softcap)
        S = softcap * T                                          # softcap tanh(S / softcap)
        dcap = 1.0 - T * T
    if alibi_slopes is not None:
        S = S + alibi_bias(alibi_slopes, B, Hq, Nq, Nk, alignment)
    return S, dcap


def _probabilities(q, k, causal, softmax_scale, alignment, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None):
    """P (B, Hq, Nq, Nk), lse (B, Hq, Nq), scale, visible; float64 (_scores gives the softcap's
    derivative)."""
    B, Nq, Nk, Hq, Hkv, d = _check(q, k, k)
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    S, _ = _scores(q, k, scale, softcap, alibi_slopes, alignment)
    visible = window_mask(Nq, Nk, causal, window_size, alignment)
    S = np.where(visible, S, -np.inf)
    m = S.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isneginf(m), 0.0, m)                     # fully masked row: avoid -inf - -inf
    E = np.exp(S - m_safe)
    l = E.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(l == 0, -np.inf, m_safe + np.log(l))[..., 0]   # NaN inputs: NaN
    P = np.where(visible, E / np.where(l > 0, l, 1.0), 0.0)      # a hidden key gets exactly 0, even in a NaN row
    return P, lse, scale, visible


def _dropped(P, dropout_p, dropout_mask):
    if dropout_p == 0.0 and dropout_mask is None:
        return P
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_mask is None:
        raise ValueError("dropout_p > 0 needs dropout_mask, the boolean keep-mask (B, Hq, Nq, Nk)")
    keep = np.asarray(dropout_mask)
    if keep.shape != P.shape:
        raise ValueError(f"dropout_mask must have shape {P.shape}, got {keep.shape}")
    return np.where(keep.astype(bool), P / (1.0 - dropout_p), 0.0)


def attention(q, k, v, causal=False, softmax_scale=None, dropout_p=0.0, dropout_mask=None,
              alignment=BOTTOM_RIGHT, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Returns (out (B, Nq, Hq, d) float64, lse (B, Hq, Nq) float64)."""
    _check(q, k, v)
    P, lse, _, _ = _probabilities(q, k, causal, softmax_scale, alignment, window_size, softcap,
                                     alibi_slopes)
    P_drop = _dropped(P, dropout_p, dropout_mask)
    V = _expand_heads(v.astype(np.float64), q.shape[2])
    O = P_drop @ V                                               # (B, Hq, Nq, d)
    return np.moveaxis(O, 1, 2), lse


def attention_backward(dout, q, k, v, causal=False, softmax_scale=None, dropout_p=0.0,
                       dropout_mask=None, alignment=BOTTOM_RIGHT, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None):
    """Returns (dq, dk, dv) in float64, shaped like q, k, v.

        dV = P_drop^T dO
        dP = (dO V^T) * keep / (1 - p)
        dS = P * (dP - D),   D = rowsum(P * dP) = rowsum(dO * O)
        dS = dS (1 - tanh^2(S_raw / softcap))             (softcap only; ALiBi's bias has no gradient)
        dQ = scale dS K,     dK = scale dS^T Q

    A key hidden by the causal mask gets P = dS = 0 exactly, so a NaN or Inf
    reaches only what it is visible to (a FlashAttention kernel never loads a
    tile above the diagonal, so it could not do otherwise).
    """
    B, Nq, Nk, Hq, Hkv, d = _check(q, k, v)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {q.shape}, got {dout.shape}")
    P, _, scale, visible = _probabilities(q, k, causal, softmax_scale, alignment, window_size,
                                          softcap, alibi_slopes)
    _, dcap = _scores(q, k, scale, softcap, alibi_slopes, alignment)
    P_drop = _dropped(P, dropout_p, dropout_mask)
    Q = np.moveaxis(q.astype(np.float64), 2, 1)
    K = _expand_heads(k.astype(np.float64), Hq)
    V = _expand_heads(v.astype(np.float64), Hq)
    dO = np.moveaxis(dout.astype(np.float64), 2, 1)
    dV = np.swapaxes(P_drop, -1, -2) @ dO
    dP = _dropped(dO @ np.swapaxes(V, -1, -2), dropout_p, dropout_mask)
    D = np.where(visible, P * dP, 0.0).sum(axis=-1, keepdims=True)
    dS = np.where(visible, P * (dP - D) * dcap, 0.0)
    dQ = scale * (dS @ K)
    dK = scale * (np.swapaxes(dS, -1, -2) @ Q)
    return np.moveaxis(dQ, 1, 2), _sum_groups(dK, Hkv), _sum_groups(dV, Hkv)


def single_head(Q, K, V, causal=False, softmax_scale=None, alignment=BOTTOM_RIGHT):
    """Convenience for one head: Q (Nq, d), K, V (Nk, d) -> (O (Nq, d), L (Nq,))."""
    out, lse = attention(Q[None, :, None, :], K[None, :, None, :], V[None, :, None, :],
                         causal=causal, softmax_scale=softmax_scale, alignment=alignment)
    return out[0, :, 0, :], lse[0, 0]


def single_head_backward(dO, Q, K, V, causal=False, softmax_scale=None, alignment=BOTTOM_RIGHT):
    """Convenience for one head: returns (dQ, dK, dV), each 2-D."""
    dq, dk, dv = attention_backward(dO[None, :, None, :], Q[None, :, None, :],
                                    K[None, :, None, :], V[None, :, None, :],
                                    causal=causal, softmax_scale=softmax_scale,
                                    alignment=alignment)
    return dq[0, :, 0, :], dk[0, :, 0, :], dv[0, :, 0, :]
