"""The float64 reference: the oracle everything in flashnumba is checked against.

Written for clarity, never optimised: the full Nq x Nk score matrix is formed.

Layout is flash-attn's: q (batch, Nq, Hq, d), k and v (batch, Nk, Hkv, d), with
Hq % Hkv == 0 (grouped-query attention: query head h reads K/V head
h // (Hq // Hkv)). lse is (batch, Hq, Nq), natural log.

    S = softmax_scale * Q K^T                      (masked: -inf where causal hides the key)
    P = softmax(S) row-wise                        (a row with no visible key: P = 0, lse = -inf)
    P_drop = P * keep / (1 - dropout_p)            (keep: boolean, dropped entries -> 0)
    O = P_drop V
"""

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT, causal_offset


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


def _probabilities(q, k, causal, softmax_scale, alignment):
    """P (B, Hq, Nq, Nk) and lse (B, Hq, Nq) in float64."""
    B, Nq, Nk, Hq, Hkv, d = _check(q, k, k)
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    Q = np.moveaxis(q.astype(np.float64), 2, 1)                 # (B, Hq, Nq, d)
    K = _expand_heads(k.astype(np.float64), Hq)                  # (B, Hq, Nk, d)
    S = scale * (Q @ np.swapaxes(K, -1, -2))                     # (B, Hq, Nq, Nk)
    visible = causal_mask(Nq, Nk, alignment) if causal else np.ones((Nq, Nk), dtype=bool)
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
              alignment=BOTTOM_RIGHT):
    """Returns (out (B, Nq, Hq, d) float64, lse (B, Hq, Nq) float64)."""
    _check(q, k, v)
    P, lse, _, _ = _probabilities(q, k, causal, softmax_scale, alignment)
    P_drop = _dropped(P, dropout_p, dropout_mask)
    V = _expand_heads(v.astype(np.float64), q.shape[2])
    O = P_drop @ V                                               # (B, Hq, Nq, d)
    return np.moveaxis(O, 1, 2), lse


def attention_backward(dout, q, k, v, causal=False, softmax_scale=None, dropout_p=0.0,
                       dropout_mask=None, alignment=BOTTOM_RIGHT):
    """Returns (dq, dk, dv) in float64, shaped like q, k, v.

        dV = P_drop^T dO
        dP = (dO V^T) * keep / (1 - p)
        dS = P * (dP - D),   D = rowsum(P * dP) = rowsum(dO * O)
        dQ = scale dS K,     dK = scale dS^T Q

    A key hidden by the causal mask gets P = dS = 0 exactly, so a NaN or Inf
    reaches only what it is visible to (a FlashAttention kernel never loads a
    tile above the diagonal, so it could not do otherwise).
    """
    B, Nq, Nk, Hq, Hkv, d = _check(q, k, v)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {q.shape}, got {dout.shape}")
    P, _, scale, visible = _probabilities(q, k, causal, softmax_scale, alignment)
    P_drop = _dropped(P, dropout_p, dropout_mask)
    Q = np.moveaxis(q.astype(np.float64), 2, 1)
    K = _expand_heads(k.astype(np.float64), Hq)
    V = _expand_heads(v.astype(np.float64), Hq)
    dO = np.moveaxis(dout.astype(np.float64), 2, 1)
    dV = np.swapaxes(P_drop, -1, -2) @ dO
    dP = _dropped(dO @ np.swapaxes(V, -1, -2), dropout_p, dropout_mask)
    D = np.where(visible, P * dP, 0.0).sum(axis=-1, keepdims=True)
    dS = np.where(visible, P * (dP - D), 0.0)
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
