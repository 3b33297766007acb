"""Standard attention (Dao et al. 2022, Algorithm 0 forward, Algorithm 3 backward): the IO baseline.

Every intermediate Nq x Nk matrix goes through HBM, one pass per line:

    forward                                      backward (given P from the forward)
    1. read Q, K;   write S = scale Q K^T        1. read P, dO;  write dV = (P * Z)^T dO
    2. read S;      write P = softmax(S)         2. read dO, V;  write dP = (dO V^T) * Z
    3. read P, V;   write O = (P * Z) V          3. read P, dP;  write dS = P * (dP - rowsum(P * dP))
                                                 4. read dS, K;  write dQ = scale dS K
                                                 5. read dS, Q;  write dK = scale dS^T Q

HBM traffic is Theta(N d + N^2) whatever the on-chip memory: the N^2 terms are
the point of the comparison. The causal mask is applied as S is written (-inf
above the diagonal); dropout (Z = keep / (1 - p)) as P is read, so neither costs
a pass of its own. A row with no visible key gets P = 0, O = 0.

Each pass yields a Step with i = j = None (it covers the whole matrix).
"""

import numpy as np

from flashnumba.geometry import BOTTOM_RIGHT
from flashnumba.hbm import HBM
from flashnumba.mirror.common import as_matrix, divide_rows, prepare, safe
from flashnumba.mirror.trace import Step, finish


def _pass(algorithm, step, reads, writes, state, hbm, S=None, P=None):
    """The Step record of one whole-matrix pass."""
    hbm_reads, hbm_writes = hbm.snapshot()
    return Step(algorithm, step, None, None, None, None, None, tuple(reads), tuple(writes),
                state, S, P, hbm_reads, hbm_writes)


def standard_forward_steps(Q, K, V, *, causal=False, alignment=BOTTOM_RIGHT, softmax_scale=None,
                           keep=None, dropout_p=0.0, hbm=None):
    """Yield a Step after each pass; return (O (Nq, d), P (Nq, Nk)).

    P is what the standard backward needs (FlashAttention keeps only l, m or L).
    """
    Q, K, V, problem = prepare(Q, K, V, causal=causal, alignment=alignment,
                               softmax_scale=softmax_scale, keep=keep, dropout_p=dropout_p,
                               **_one_tile(Q, K))
    hbm = HBM() if hbm is None else hbm
    name = "standard_forward"

    # 1. S = scale Q K^T, masked
    S = problem.scale * (hbm.read("Q", Q) @ hbm.read("K", K).T)
    if causal:
        S = np.where(problem.tiling.mask(0, 0), S, -np.inf)
    hbm.write("S", S)
    yield _pass(name, 0, ("Q", "K"), ("S",), {"S": S.copy()}, hbm, S=S)

    # 2. P = softmax(S) = diag(l)^-1 exp(S - m)
    S_read = hbm.read("S", S)
    m = S_read.max(axis=1)
    E = np.exp(S_read - safe(m)[:, None])
    P = divide_rows(E, E.sum(axis=1))
    hbm.write("P", P)
    yield _pass(name, 1, ("S",), ("P",), {"P": P.copy()}, hbm, S=S, P=P)

    # 3. O = (P * Z) V
    O = _dropped(hbm.read("P", P), problem) @ hbm.read("V", V)
    hbm.write("O", O)
    yield _pass(name, 2, ("P", "V"), ("O",), {"O": O.copy()}, hbm, S=S, P=P)
    return O, P


def standard_backward_steps(dO, Q, K, V, P, *, causal=False, alignment=BOTTOM_RIGHT,
                            softmax_scale=None, keep=None, dropout_p=0.0, hbm=None):
    """Yield a Step after each pass; return (dQ (Nq, d), dK (Nk, d), dV (Nk, d))."""
    Q, K, V, problem = prepare(Q, K, V, causal=causal, alignment=alignment,
                               softmax_scale=softmax_scale, keep=keep, dropout_p=dropout_p,
                               **_one_tile(Q, K))
    hbm = HBM() if hbm is None else hbm
    dO = as_matrix("dO", dO, problem.dtype)
    P = as_matrix("P", P, problem.dtype)
    t = problem.tiling
    if dO.shape != Q.shape or P.shape != (t.Nq, t.Nk):
        raise ValueError(f"dO must have Q's shape {Q.shape} and P shape {(t.Nq, t.Nk)}; "
                         f"got {dO.shape}, {P.shape}")
    name = "standard_backward"

    # 1. dV = (P * Z)^T dO
    dV = _dropped(hbm.read("P", P), problem).T @ hbm.read("dO", dO)
    hbm.write("dV", dV)
    yield _pass(name, 0, ("P", "dO"), ("dV",), {"dV": dV.copy()}, hbm, P=P)

    # 2. dP = (dO V^T) * Z
    dP = _dropped(hbm.read("dO", dO) @ hbm.read("V", V).T, problem)
    hbm.write("dP", dP)
    yield _pass(name, 1, ("dO", "V"), ("dP",), {"dP": dP.copy()}, hbm, P=P)

    # 3. dS = P * (dP - D),  D = rowsum(P * dP)
    P_read, dP_read = hbm.read("P", P), hbm.read("dP", dP)
    D = (P_read * dP_read).sum(axis=1)
    dS = P_read * (dP_read - D[:, None])
    hbm.write("dS", dS)
    yield _pass(name, 2, ("P", "dP"), ("dS",), {"dS": dS.copy()}, hbm, P=P)

    # 4. dQ = scale dS K
    dQ = problem.scale * (hbm.read("dS", dS) @ hbm.read("K", K))
    hbm.write("dQ", dQ)
    yield _pass(name, 3, ("dS", "K"), ("dQ",), {"dQ": dQ.copy()}, hbm, P=P)

    # 5. dK = scale dS^T Q
    dK = problem.scale * (hbm.read("dS", dS).T @ hbm.read("Q", Q))
    hbm.write("dK", dK)
    yield _pass(name, 4, ("dS", "Q"), ("dK",), {"dK": dK.copy()}, hbm, P=P)
    return dQ, dK, dV


def _one_tile(Q, K):
    """Standard attention does not tile: one tile, Br = Nq, Bc = Nk, covers the whole of S."""
    return dict(Br=np.shape(Q)[0], Bc=np.shape(K)[0], M=None, limit=None)


def _dropped(P, problem):
    """P * Z (P itself without dropout)."""
    return P if problem.Z is None else P * problem.Z


def standard_forward(Q, K, V, **keywords):
    """Standard attention forward of one head: (O, P). Keywords as standard_forward_steps."""
    return finish(standard_forward_steps(Q, K, V, **keywords))


def standard_backward(dO, Q, K, V, P, **keywords):
    """Standard attention backward of one head: (dQ, dK, dV). Keywords as standard_backward_steps."""
    return finish(standard_backward_steps(dO, Q, K, V, P, **keywords))
