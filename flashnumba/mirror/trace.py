"""The step record: what a mirror did at one inner step, for lessons, tests and figures.

Every ``*_steps`` generator yields one ``Step`` after each inner step (one tile
(i, j) of S visited), and returns the algorithm's output tuple when it ends:

    steps = fa2_forward_steps(Q, K, V, Br=16, Bc=16)
    print(nth(steps, 7))                         # "show me step 7"
    records, (O, L) = run(fa2_forward_steps(Q, K, V, Br=16, Bc=16))

Fields (names are stable: figures are drawn from them)

    algorithm   "fa1_forward", "fa1_backward", "fa2_forward", "fa2_backward",
                "standard_forward" or "standard_backward"
    step        0-based count of records in this run
    i, j        tile indices: Q tile i (rows), K/V tile j (columns); None for
                standard attention, whose passes cover the whole matrix
    kind        geometry.FULL or geometry.PARTIAL (skipped tiles have no record);
                None for standard attention
    rows, cols  (start, stop) of tile i's query rows and tile j's key columns
    reads       tile names loaded from HBM at this step, in order, e.g.
                ("K_j", "V_j", "Q_i", "O_i", "l_i", "m_i"); K_j, V_j (FA1, FA2
                backward) or Q_i (FA2 forward) appear at the first inner step of
                the outer tile, when they are loaded
    writes      tile names stored to HBM at this step, e.g. ("O_i", "l_i", "m_i")
    state       name -> copy of the running state after the step:
                  fa1_forward   "O", "l", "m": the whole HBM arrays
                  fa2_forward   "O_i" (unnormalised), "l_i", "m_i": the on-chip tile;
                                the step that finishes Q tile i adds "O_i_final"
                                (= diag(l_i)^-1 O_i, as written) and "L_i"
                  fa1_backward, fa2_backward
                                "dK_j", "dV_j" (on chip) and "dQ" (whole HBM array)
                  standard      the matrix the pass wrote ("S", "P", "O", "dV", ...)
    S_ij        this tile's scores scale Q_i K_j^T (-inf where masked)
    P_ij        this tile's probabilities, as the algorithm has them:
                  fa1_forward   P~_ij = exp(S_ij - m~_ij)      (local row max)
                  fa2_forward   P~_ij = exp(S_ij - m_i_new)    (running row max)
                  backward      P_ij, normalised (before dropout)
    hbm_reads, hbm_writes
                cumulative element counts per tensor ("Q", "K", ...) up to and
                including this step
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Step:
    """One inner step of a mirror (see the module docstring for each field)."""
    algorithm: str
    step: int
    i: int | None
    j: int | None
    kind: str | None
    rows: tuple[int, int] | None
    cols: tuple[int, int] | None
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    state: dict = field(default_factory=dict)
    S_ij: np.ndarray | None = None
    P_ij: np.ndarray | None = None
    hbm_reads: dict = field(default_factory=dict)
    hbm_writes: dict = field(default_factory=dict)

    @property
    def hbm_total(self):
        """Elements read plus written so far."""
        return sum(self.hbm_reads.values()) + sum(self.hbm_writes.values())

    def __str__(self):
        where = "whole matrix" if self.i is None else (
            f"tile (i={self.i}, j={self.j}) {self.kind}, "
            f"rows {self.rows[0]}:{self.rows[1]}, cols {self.cols[0]}:{self.cols[1]}")
        lines = [f"{self.algorithm} step {self.step}: {where}",
                 f"  reads  {' '.join(self.reads) or '-'}   writes {' '.join(self.writes) or '-'}"]
        lines += [f"  {name} = {_brief(value)}" for name, value in self.state.items()]
        lines.append(f"  HBM so far: {sum(self.hbm_reads.values()):,} elements read, "
                     f"{sum(self.hbm_writes.values()):,} written")
        return "\n".join(lines)


def _brief(x):
    """A vector in full (short) or abbreviated; a matrix by its shape."""
    x = np.asarray(x)
    if x.ndim == 1:
        return np.array2string(x, precision=3, threshold=8, edgeitems=3)
    return f"<{' x '.join(map(str, x.shape))} array>"


def record(algorithm, step, problem, i, j, reads, writes, state, S_ij, P_ij, hbm):
    """A Step for tile (i, j) of `problem`, with the HBM counts so far."""
    t = problem.tiling
    rows, cols = t.rows(i), t.cols(j)
    hbm_reads, hbm_writes = hbm.snapshot()
    return Step(algorithm, step, i, j, t.kind(i, j), (rows.start, rows.stop),
                (cols.start, cols.stop), tuple(reads), tuple(writes), state,
                S_ij, P_ij, hbm_reads, hbm_writes)


def run(steps):
    """Run a ``*_steps`` generator to the end: (list of Step records, the algorithm's output)."""
    records = []
    while True:
        try:
            records.append(next(steps))
        except StopIteration as stop:
            return records, stop.value


def finish(steps):
    """Run a ``*_steps`` generator to the end, keeping only its output."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def nth(steps, k):
    """Step k (0-based) of a ``*_steps`` generator; the generator is advanced past it."""
    if k < 0:
        raise IndexError(f"step {k}: steps are counted from 0")
    count = 0
    for step in steps:
        if count == k:
            return step
        count += 1
    raise IndexError(f"step {k}: the run has only {count} steps")
