"""Step a kernel and its NumPy mirror side by side.

Every kernel takes ``limit=k``: each thread block stops after k iterations of
its loop and leaves its running state where it can be read. Every mirror takes
the same ``limit`` with the same meaning. ``compare`` runs both for k = 1, 2,
..., T on the same inputs and reports, step by step, the largest difference per
state variable, and names the first (block, i, j, variable) that diverges.

    kernel (registry.kernels())   the loop a thread block runs     state after k iterations
    fa1_forward / _backward        K/V tile j, one block per head    O, l, m / dQ, dK, dV
    fa2_forward, fa2_fast_forward  K/V tile j, for its Q tile i      O (= O_i / l_i), m, l / O, L
    fa2_backward, ...              Q tile i, for its K/V tile j      dQ, dK, dV

(the registry names each version's state variables and loop).
The fast kernels (version 2 of FA2) step against the same mirrors as the readable
ones, with the fast kernels' own tile sizes (their ``default_config``); the fast
forward keeps m and l in registers and writes only what its output holds, O and L.

The mirror computes in float64, the kernel in float32; a variable diverges when
max |kernel - mirror| exceeds TOL times max |mirror| (non-finite entries must
agree exactly: -inf in m where no key was seen yet). A version that reads only
16-bit inputs (fa2_tc, ``Version.dtypes``) gets them in bfloat16, the mirror the
same rounded values, and the tolerance is HALF_TOL: the kernel rounds P_ij (and
dS_ij) to bfloat16 before multiplying, and writes its results in bfloat16.

Both sides can run with PyTorch's top-left causal alignment and with dropout:
the kernel gets (dropout_p, seed) and regenerates its mask with Philox on chip,
the mirror gets the same mask, ``philox.keep_mask(seed, p, 1, 1, Nq, Nk)[0, 0]``
(one head: batch 0, head 0), as ``keep=``.

    python -m flashnumba step fa2_forward --Nq 70 --Nk 100 --d 24 --Br 16 --Bc 32 --causal
    python -m flashnumba step fa2_backward --causal --top-left --dropout 0.1 --seed 3
"""

from dataclasses import dataclass, field

import numpy as np

from flashnumba import dtypes, philox, registry
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT, Tiling

TOL = 1e-5
HALF_TOL = 2 ** -6     # 4 units of bfloat16's rounding (2^-8): P_ij rounded, then the output


def tolerance(algorithm):
    """TOL for a kernel that reads float32, HALF_TOL for one that reads 16-bit inputs only."""
    version, _ = registry.kernel(algorithm)
    return TOL if version.reads(dtypes.FLOAT32) else HALF_TOL


@dataclass
class Problem:
    """One head's inputs (float64), the tile sizes and the options both sides use."""
    Q: np.ndarray
    K: np.ndarray
    V: np.ndarray
    dO: np.ndarray
    Br: int
    Bc: int
    causal: bool
    alignment: str = BOTTOM_RIGHT
    dropout_p: float = 0.0
    dropout_seed: int = 0
    num_warps: int | None = None      # the kernel's warps per block (None: its default config's)
    dtype: str = dtypes.FLOAT32       # what the kernel reads (Q, K, V, dO hold values of this dtype)

    @property
    def tiling(self):
        return Tiling(self.Q.shape[0], self.K.shape[0], self.Br, self.Bc, causal=self.causal,
                      alignment=self.alignment)

    @property
    def keep(self):
        """The (Nq, Nk) keep-mask the kernel regenerates for its one head (None without dropout)."""
        if self.dropout_p == 0.0:
            return None
        return philox.keep_mask(self.dropout_seed, self.dropout_p, 1, 1,
                                self.Q.shape[0], self.K.shape[0])[0, 0]

    def mirror_keywords(self, **extra):
        return dict(Br=self.Br, Bc=self.Bc, causal=self.causal, alignment=self.alignment,
                    keep=self.keep, dropout_p=self.dropout_p, **extra)

    def kernel_keywords(self, **extra):
        if self.num_warps is not None:
            extra["num_warps"] = self.num_warps
        return dict(Br=self.Br, Bc=self.Bc, causal=self.causal, alignment=self.alignment,
                    dropout_p=self.dropout_p, seed=self.dropout_seed, **extra)

    def as_kernel_input(self, X):
        """(N, d) float64 -> (1, N, 1, d) in the kernel's dtype: batch 1, one head."""
        return np.ascontiguousarray(X[None, :, None, :].astype(np.float32), dtype=dtypes.NUMPY[self.dtype])


@dataclass
class Report:
    algorithm: str
    problem: Problem
    rows: list = field(default_factory=list)        # (k, {variable: error})
    divergence: tuple | None = None                # (k, block, i, j, variable, error)
    tol: float = TOL

    @property
    def agrees(self):
        return self.divergence is None

    @property
    def names(self):
        version, direction = registry.kernel(self.algorithm)
        return version.state(direction)

    def table(self):
        names = self.names
        t = self.problem.tiling
        options = f"causal={t.causal}"
        if t.causal:
            options += f" ({t.alignment})"
        if self.problem.dropout_p > 0:
            options += f" dropout_p={self.problem.dropout_p} seed={self.problem.dropout_seed}"
        lines = [(f"{self.algorithm}: Nq={t.Nq} Nk={t.Nk} d={self.problem.Q.shape[1]} "
                  f"Br={t.Br} Bc={t.Bc} {options}; max |kernel - mirror| / max |mirror|"),
                 f"  {'k':>3} " + "".join(f"{n:>10}" for n in names)]
        for k, errs in self.rows:
            lines.append(f"  {k:>3} " + "".join(f"{errs[n]:>10.1e}" for n in names))
        if self.divergence is None:
            lines.append(f"  agree at every step (tolerance {self.tol:.0e})")
        else:
            k, block, i, j, name, err = self.divergence
            lines.append(f"  first divergence: step k={k}, block {block}, tile i={i}, j={j}, "
                         f"variable {name} (error {err:.1e} > {self.tol:.0e})")
        return "\n".join(lines)


def block_loop_length(algorithm, tiling):
    """T: the most iterations any thread block's loop makes."""
    version, direction = registry.kernel(algorithm)
    if version.algorithm.block_per_head:
        return tiling.Tc
    if direction == registry.FORWARD:
        return max(len(tiling.kv_range(i)) for i in range(tiling.Tr))
    return max(len(tiling.q_range(j)) for j in range(tiling.Tc))


# ------------------------------------------------------------------ the two sides

def _forward_outputs(p):
    """O and L of the full forward pass (float64 mirror), the inputs of every backward."""
    return registry.FA2.mirror(registry.FORWARD)(p.Q, p.K, p.V, **p.mirror_keywords())


def mirror_state(algorithm, p, k):
    """The mirror's state after k iterations of each block's loop (float64, one head)."""
    version, direction = registry.kernel(algorithm)
    state = version.algorithm.mirror(direction, "state")
    kw = p.mirror_keywords(limit=k)
    if direction == registry.FORWARD:
        return state(p.Q, p.K, p.V, **kw)
    return state(p.dO, p.Q, p.K, p.V, *_forward_outputs(p), **kw)


def kernel_state(algorithm, p, k):
    """The kernel's state after k iterations of each block's loop (one head, as float64)."""
    version, direction = registry.kernel(algorithm)
    module = version.module(direction)
    q, k_, v, dout = (p.as_kernel_input(X) for X in (p.Q, p.K, p.V, p.dO))
    kw = p.kernel_keywords(limit=k)

    def one_head(name, x):                  # (1, N, 1, d) arrays and (1, 1, N) statistics
        x = np.asarray(x, dtype=np.float64)
        return x[0, :, 0, :] if x.ndim == 4 else x[0, 0]

    if direction == registry.FORWARD:
        return {name: one_head(name, x) for name, x in module.state(q, k_, v, **kw).items()}
    O, L = _forward_outputs(p)
    grads = module.backward(dout, q, k_, v, p.as_kernel_input(O), L[None, None].astype(np.float32), **kw)
    return dict(zip(version.backward_state, (one_head(n, g) for n, g in zip(version.backward_state, grads))))


# ------------------------------------------------------------------ comparing

def error(x, ref):
    """max |x - ref| / max |ref| over finite entries; inf if the non-finite entries differ."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(x)) or not np.array_equal(x[~finite], ref[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(np.abs(ref[finite]).max(), np.finfo(np.float64).tiny)
    return float(np.abs(x[finite] - ref[finite]).max() / scale)


def _locate(algorithm, p, k, name, x, ref):
    """(block, i, j) of the worst entry of variable `name` at step k."""
    t = p.tiling
    bad = np.abs(np.nan_to_num(np.asarray(x, dtype=np.float64) - ref, nan=np.inf, posinf=np.inf,
                               neginf=np.inf))
    row = int(np.unravel_index(np.argmax(bad), bad.shape)[0])
    version, direction = registry.kernel(algorithm)
    if version.algorithm.block_per_head:            # one block per head; outer step j = k - 1
        j = min(k, t.Tc) - 1
        i = row // t.Br if name in ("O", "l", "m", "dQ") else "all"
        return "(b=0, h=0)", i, j
    if direction == registry.FORWARD:               # block = Q tile i
        i = row // t.Br
        js = list(t.kv_range(i))
        return f"i={i}", i, js[min(k, len(js)) - 1] if js else None
    if name == "dQ":                                # dQ sums over every K/V block
        return "all j", row // t.Br, "all"
    j = row // t.Bc                                 # block = K/V tile j
    is_ = list(t.q_range(j))
    return f"j={j}", is_[min(k, len(is_)) - 1] if is_ else None, j


def make_problem(Nq, Nk, d, causal=False, seed=0, Br=None, Bc=None, algorithm=None,
                 alignment=BOTTOM_RIGHT, dropout_p=0.0, dropout_seed=0, num_warps=None):
    """Random inputs for one head (from `seed`), with the kernel's default tile sizes (and warps)
    unless given (algorithm: a kernel name, None for the default version's forward); dropout with
    probability dropout_p, its mask from dropout_seed."""
    if algorithm is None:
        algorithm = registry.version(registry.DEFAULT).kernel(registry.FORWARD)
    rng = np.random.default_rng(seed)
    Q, K, V = rng.standard_normal((Nq, d)), rng.standard_normal((Nk, d)), rng.standard_normal((Nk, d))
    dO = rng.standard_normal((Nq, d))
    version, direction = registry.kernel(algorithm)
    config = version.module(direction).default_config(d)
    dtype = version.input_dtype(dtypes.FLOAT32)
    Q, K, V, dO = (dtypes.round_to(X, dtype).astype(np.float64) for X in (Q, K, V, dO))
    return Problem(Q, K, V, dO, Br or config.Br, Bc or config.Bc, causal, alignment=alignment,
                   dropout_p=float(dropout_p), dropout_seed=int(dropout_seed), num_warps=num_warps,
                   dtype=dtype)


def compare(algorithm, problem, kernel=kernel_state, tol=None):
    """Run mirror and kernel for k = 1..T; return a Report (rows and the first divergence).
    tol: ``tolerance(algorithm)`` unless given."""
    registry.kernel(algorithm)                      # a ValueError naming the kernels if unknown
    tol = tolerance(algorithm) if tol is None else tol
    report = Report(algorithm, problem, tol=tol)
    for k in range(1, block_loop_length(algorithm, problem.tiling) + 1):
        ref = mirror_state(algorithm, problem, k)
        got = kernel(algorithm, problem, k)
        errs = {name: error(got[name], ref[name]) for name in report.names}
        report.rows.append((k, errs))
        if report.divergence is None:
            for name in report.names:
                if errs[name] > tol:
                    block, i, j = _locate(algorithm, problem, k, name, got[name], ref[name])
                    report.divergence = (k, block, i, j, name, errs[name])
                    break
    return report


def main(args):
    import flashnumba
    algorithms = registry.kernels() if args.algorithm == "all" else (args.algorithm,)
    print(f"stepping kernels against mirrors on {flashnumba.device()}\n")
    status = 0
    for algorithm in algorithms:
        p = make_problem(args.Nq, args.Nk, args.d, causal=args.causal, seed=args.seed,
                         Br=args.Br, Bc=args.Bc, algorithm=algorithm,
                         alignment=TOP_LEFT if getattr(args, "top_left", False) else BOTTOM_RIGHT,
                         dropout_p=getattr(args, "dropout", 0.0), dropout_seed=args.seed)
        report = compare(algorithm, p)
        print(report.table(), "\n", flush=True)
        status |= not report.agrees
    return status
