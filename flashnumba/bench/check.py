"""Validate before timing: every result is compared with a float64 reference first.

Two references:

- ``flashnumba.reference`` (NumPy, float64, the whole problem) at a modest
  shape, run first for every implementation (and on the simulator by --sim);
- at each benchmarked shape, where the whole float64 problem would be too big,
  a float64 computation on the GPU of a *subset*: the first and last query rows
  of a few heads (rows are independent given all keys, so their O and dQ are
  exact), and, for the backward, dK and dV of one head, accumulated over
  chunks of query rows.

A result passes when ||x - ref|| / ||ref|| <= tolerance for every output and
it holds no NaN. A failure is reported as WRONG and is never timed.
"""

import math

import numpy as np

# ||x - ref|| / ||ref||: float32 arithmetic lands far below 1e-4; TF32 near 3e-4; bf16 ~ 1e-2.
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}
ROWS_CHECKED = 128          # first and last ROWS_CHECKED query rows
HEADS_CHECKED = 2           # of batch 0
CHUNK_ROWS = 2048           # query rows per chunk for dK, dV of one head


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (NumPy arrays or torch tensors); inf if x holds NaN or inf."""
    if hasattr(x, "detach"):                      # torch
        x = x.detach().double()
        ref = ref.detach().double()
        if not bool(x.isfinite().all()) and bool(ref.isfinite().all()):
            return math.inf
        diff = float((x - ref).nan_to_num(0.0, posinf=0.0, neginf=0.0).norm())
        if bool(x.isnan().any()):
            return math.inf
        denom = float(ref.nan_to_num(0.0, posinf=0.0, neginf=0.0).norm())
    else:
        x = np.asarray(x, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if np.isnan(x).any():
            return math.inf
        diff = float(np.linalg.norm(np.nan_to_num(x - ref, nan=0.0, posinf=0.0, neginf=0.0)))
        denom = float(np.linalg.norm(np.nan_to_num(ref, nan=0.0, posinf=0.0, neginf=0.0)))
    return diff / denom if denom > 0 else diff


def verdict(outputs, references, dtype, names=None):
    """(ok, worst error, text) for lists of outputs and references of the same length."""
    tol = TOLERANCE[dtype]
    names = names or [f"out{i}" for i in range(len(outputs))]
    errors = [rel_err(x, r) for x, r in zip(outputs, references)]
    worst = max(errors)
    text = ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors))
    ok = all(e <= tol for e in errors)
    return ok, worst, ("ok" if ok else "WRONG") + f" ({text}; tolerance {tol:.0e})"


# ---------------------------------------------------------------------------
# float64 references on the GPU, for a subset of rows / heads (torch)
# ---------------------------------------------------------------------------

def checked_rows(N):
    """Indices of the query rows checked at a big shape: the first and last ROWS_CHECKED."""
    if N <= 2 * ROWS_CHECKED:
        return list(range(N))
    return list(range(ROWS_CHECKED)) + list(range(N - ROWS_CHECKED, N))


def _masked_probabilities(torch, q_rows, k, rows, Nk, Nq, causal, scale):
    """P (heads, R, Nk) float64 and lse for query rows `rows`; q_rows (heads, R, d), k (heads, Nk, d)."""
    S = scale * (q_rows @ k.transpose(-1, -2))
    if causal:
        r = torch.as_tensor(rows, device=S.device)[:, None]
        c = torch.arange(Nk, device=S.device)[None, :]
        S = S.masked_fill(c > r + (Nk - Nq), -math.inf)
    m = S.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    E = torch.exp(S - m)
    l = E.sum(dim=-1, keepdim=True)
    P = E / torch.where(l > 0, l, torch.ones_like(l))
    return P


def reference_rows(q, k, v, causal, scale, dout=None, heads=HEADS_CHECKED):
    """float64 O (and dQ, given dout) for batch 0, the first `heads` heads, rows checked_rows(N).

    q, k, v, dout: torch (B, N, H, d) on the GPU, any float dtype. Returns a dict of
    (heads, R, d) tensors: {"out": ..., "dq": ...}.
    """
    import torch
    Nq, Nk = q.shape[1], k.shape[1]
    rows = checked_rows(Nq)
    hs = list(range(min(heads, q.shape[2])))
    index = torch.as_tensor(rows, device=q.device)
    Q = q[0].index_select(0, index)[:, hs].double().transpose(0, 1)       # (h, R, d)
    K = k[0][:, hs].double().transpose(0, 1)                              # (h, Nk, d)
    V = v[0][:, hs].double().transpose(0, 1)
    P = _masked_probabilities(torch, Q, K, rows, Nk, Nq, causal, scale)
    O = P @ V
    result = {"out": O}
    if dout is not None:
        dO = dout[0].index_select(0, index)[:, hs].double().transpose(0, 1)
        dP = dO @ V.transpose(-1, -2)
        D = (dO * O).sum(dim=-1, keepdim=True)
        result["dq"] = scale * ((P * (dP - D)) @ K)
    return result


def reference_dkdv(q, k, v, dout, causal, scale, head=0):
    """float64 dK, dV (Nk, d) of batch 0, head `head`, accumulated over chunks of query rows."""
    import torch
    Nq, Nk = q.shape[1], k.shape[1]
    Q = q[0, :, head].double()
    K = k[0, :, head].double()
    V = v[0, :, head].double()
    dO_all = dout[0, :, head].double()
    dK = torch.zeros_like(K)
    dV = torch.zeros_like(V)
    for start in range(0, Nq, CHUNK_ROWS):
        rows = list(range(start, min(start + CHUNK_ROWS, Nq)))
        Qc = Q[rows[0]:rows[-1] + 1]
        dO = dO_all[rows[0]:rows[-1] + 1]
        P = _masked_probabilities(torch, Qc[None], K[None], rows, Nk, Nq, causal, scale)[0]
        O = P @ V
        dP = dO @ V.T
        D = (dO * O).sum(dim=-1, keepdim=True)
        dS = P * (dP - D)
        dV += P.T @ dO
        dK += scale * (dS.T @ Qc)
    return dK, dV


def pick_rows(x, heads=HEADS_CHECKED):
    """The subset of a (B, N, H, d) result that reference_rows computes: (heads, R, d)."""
    import torch
    rows = torch.as_tensor(checked_rows(x.shape[1]), device=x.device)
    hs = list(range(min(heads, x.shape[2])))
    return x[0].index_select(0, rows)[:, hs].transpose(0, 1)
