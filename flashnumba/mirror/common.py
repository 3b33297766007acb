"""What every mirror shares: the problem's set-up, HBM loads and stores, the guards.

Set-up (``prepare``) turns the keywords every mirror accepts into plain values:

    Br, Bc   given, or from on-chip memory M (in floats) by FlashAttention's rule
             Bc = ceil(M / 4d), Br = min(Bc, d)         (geometry.default_block_sizes)
    M        DEFAULT_M = 4 * 64 * 64 = 16384 floats (64 KiB of float32) when neither
             Br, Bc nor M is given: d = 64 then gets Br = Bc = 64
    scale    softmax_scale, default 1 / sqrt(d)
    Z        the dropout matrix of FA1's backward (Algorithm 4): Z = keep / (1 - p),
             so kept entries are scaled up and dropped ones are 0 (None: no dropout)
    limit    each thread block's loop stops after `limit` iterations (None: no limit)
    window_size, softcap, alibi_slope
             flash-attn's sliding window (left, right), -1 unbounded (geometry.Tiling
             skips the tiles outside the band); S = softcap tanh(S / softcap) when
             softcap > 0; S -= alibi_slope |r + Nk - Nq - c| (this head's slope)

A load copies a tile out of an HBM array and counts it; a store writes a tile
back and counts it. The keep-mask is not counted: on a GPU it is regenerated on
chip from a random seed, never read from HBM. Initialising an output in HBM
(O = 0, dQ = 0, ...: a memset) is not counted either, as in the papers' IO analysis.
"""

import math
from dataclasses import dataclass

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT, PARTIAL, Tiling, default_block_sizes

DEFAULT_M = 4 * 64 * 64   # floats of on-chip memory: Br = Bc = 64 at d = 64


@dataclass(frozen=True)
class Problem:
    """One head's attention problem, resolved: tiles, scale, dropout matrix, step limit."""
    tiling: Tiling
    d: int
    scale: float
    Z: np.ndarray | None      # (Nq, Nk) keep / (1 - p), or None without dropout
    limit: int | None         # iterations of each thread block's loop, None for all
    dtype: np.dtype
    softcap: float = 0.0      # S = softcap tanh(S / softcap) when > 0
    alibi_slope: float = 0.0  # S -= slope |r + Nk - Nq - c|


def as_matrix(name, X, dtype):
    """X as a 2-D (N, d) array of the compute dtype, or a ValueError naming it."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d) for one head, got shape {X.shape}")
    return X.astype(dtype, copy=False)


def compute_dtype(*arrays):
    """The inputs' floating dtype (float64 for integer inputs): the mirrors compute in it."""
    dtype = np.result_type(*arrays)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def prepare(Q, K, V, *, Br, Bc, M, causal, alignment, softmax_scale, keep, dropout_p, limit,
            window_size=(-1, -1), softcap=0.0, alibi_slope=0.0):
    """Check one head's Q (Nq, d), K, V (Nk, d) and resolve the keywords; returns (Q, K, V, Problem)."""
    dtype = compute_dtype(Q, K, V)
    Q, K, V = (as_matrix(name, X, dtype) for name, X in (("Q", Q), ("K", K), ("V", V)))
    Nq, d = Q.shape
    Nk = K.shape[0]
    if K.shape != V.shape:
        raise ValueError(f"K and V must have the same shape, got {K.shape} and {V.shape}")
    if K.shape[1] != d:
        raise ValueError(f"K has head dim {K.shape[1]}, expected Q's head dim {d}")
    if Nq < 1 or Nk < 1 or d < 1:
        raise ValueError(f"need Nq, Nk, d >= 1, got Nq={Nq}, Nk={Nk}, d={d}")

    # Bc = ceil(M / 4d), Br = min(Bc, d); an explicit Br or Bc wins over the rule
    rule_Br, rule_Bc = default_block_sizes(DEFAULT_M if M is None else M, d)
    Br = rule_Br if Br is None else Br
    Bc = rule_Bc if Bc is None else Bc
    tiling = Tiling(Nq, Nk, Br, Bc, causal=causal, alignment=alignment, window_size=window_size)

    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)

    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if keep is None:
        if dropout_p > 0.0:
            raise ValueError("dropout_p > 0 needs keep, the boolean (Nq, Nk) keep-mask of this head")
        Z = None
    else:
        keep = np.asarray(keep)
        if keep.shape != (Nq, Nk):
            raise ValueError(f"keep must have shape {(Nq, Nk)}, got {keep.shape}")
        Z = np.where(keep.astype(bool), 1.0 / (1.0 - dropout_p), 0.0).astype(dtype)

    if limit is not None and (int(limit) != limit or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    limit = None if limit is None else int(limit)

    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0: none), got {softcap}")
    return Q, K, V, Problem(tiling, d, scale, Z, limit, np.dtype(dtype), float(softcap),
                            float(alibi_slope))


# ---------------------------------------------------------------- HBM traffic

def load(hbm, name, X, index):
    """Copy the tile X[index] of HBM tensor `name` on chip, counting it."""
    return hbm.read(name, X[index].copy())


def store(hbm, name, X, index, tile):
    """Write an on-chip tile back to X[index] of HBM tensor `name`, counting it."""
    X[index] = tile
    hbm.write(name, tile)


# ---------------------------------------------------------------- on-chip math

def scores(problem, Q_i, K_j, i, j):
    """S_ij = scale Q_i K_j^T, softcapped and ALiBi-biased when asked, with -inf where the causal
    mask or the window hides a key (PARTIAL tiles only)."""
    S_ij = problem.scale * (Q_i @ K_j.T)
    if problem.softcap:
        S_ij = problem.softcap * np.tanh(S_ij / problem.softcap)     # softcap tanh(S / softcap)
    if problem.alibi_slope:
        t = problem.tiling
        r = np.arange(t.rows(i).start, t.rows(i).stop)[:, None]
        c = np.arange(t.cols(j).start, t.cols(j).stop)[None, :]
        offset = t.Nk - t.Nq if t.alignment == BOTTOM_RIGHT else 0
        S_ij = S_ij - problem.alibi_slope * np.abs(r + offset - c)   # ALiBi: -slope |r + Nk - Nq - c|
    if problem.tiling.kind(i, j) == PARTIAL:
        S_ij = np.where(problem.tiling.mask(i, j), S_ij, -np.inf)
    return S_ij


def softcap_derivative(problem, Q_i, K_j):
    """d S_ij / d(scale Q_i K_j^T) = 1 - tanh^2(scale Q_i K_j^T / softcap); 1 without softcap.
    The backward multiplies dS_ij by it (ALiBi's bias is constant: nothing to carry)."""
    if not problem.softcap:
        return 1.0
    return 1.0 - np.square(np.tanh(problem.scale * (Q_i @ K_j.T) / problem.softcap))


def dropped(X_ij, problem, i, j):
    """X_ij * Z_ij: dropout applied to a tile (unchanged without dropout)."""
    if problem.Z is None:
        return X_ij
    t = problem.tiling
    return X_ij * problem.Z[t.rows(i), t.cols(j)]


def safe(m):
    """m with -inf replaced by 0, so that exp(x - m) never meets -inf - (-inf) = NaN.

    A row that has seen no visible key has m = -inf and every x = -inf: exp(-inf - 0) = 0.
    """
    return np.where(np.isneginf(m), 0.0, m).astype(m.dtype, copy=False)


def divide_rows(X, l):
    """diag(l)^-1 X, leaving rows with l = 0 (no visible key) at 0."""
    return np.divide(X, l[:, None], out=np.zeros_like(X), where=l[:, None] > 0)


def logsumexp(m, l):
    """L = m + log(l), and -inf for a row with l = 0 (no visible key)."""
    log_l = np.log(np.where(l > 0, l, 1.0))
    return np.where(l > 0, safe(m) + log_l, -np.inf).astype(m.dtype, copy=False)
