"""Recording what a mirror did: the one place the figures call the NumPy mirrors.

Every picture of a schedule is drawn from the ``Step`` records a mirror yielded
while it ran (``flashnumba.mirror``), never from a loop written here. Problems
are small and seeded, so the same call gives the same trace.
"""

from dataclasses import dataclass, field

import numpy as np

from flashnumba import mirror, registry
from flashnumba.geometry import BOTTOM_RIGHT, Tiling, default_block_sizes
from flashnumba.hbm import HBM
from flashnumba.mirror.trace import run

# the tiled algorithms' mirrors, forward then backward: "fa1_forward", "fa2_forward", ...
ALGORITHMS = registry.mirrors()


@dataclass
class Trace:
    """What one mirror run did: its steps, the tiling it ran on, and what it returned."""
    algorithm: str            # e.g. "fa2_forward"
    steps: list               # flashnumba.mirror.trace.Step, in the order they happened
    tiling: Tiling
    d: int
    result: tuple             # the mirror's outputs, e.g. (O, L)
    hbm: HBM = field(default_factory=HBM)
    inputs: dict = field(default_factory=dict)


def problem(Nq, Nk, d, seed=0):
    """Seeded Q (Nq, d), K, V (Nk, d) and dO (Nq, d) in float64."""
    rng = np.random.default_rng(seed)
    return {"Q": rng.standard_normal((Nq, d)), "K": rng.standard_normal((Nk, d)),
            "V": rng.standard_normal((Nk, d)), "dO": rng.standard_normal((Nq, d))}


def block_sizes(d, Br=None, Bc=None, M=None):
    """(Br, Bc) given explicitly, or from on-chip memory M by the paper's rule."""
    if M is not None:
        return default_block_sizes(M, d)
    if Br is None or Bc is None:
        raise ValueError("give Br and Bc, or M")
    return Br, Bc


def record(algorithm, Nq, Nk, d, Br=None, Bc=None, M=None, causal=False,
           alignment=BOTTOM_RIGHT, seed=0, window_size=(-1, -1)):
    """Run ``flashnumba.mirror.<algorithm>_steps`` on a seeded problem; return its Trace.

    A backward first runs its forward (untraced, uncounted) for O and the statistics.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
    Br, Bc = block_sizes(d, Br, Bc, M)
    x = problem(Nq, Nk, d, seed)
    hbm = HBM()
    options = {"Br": Br, "Bc": Bc, "causal": causal, "alignment": alignment}
    if window_size != (-1, -1):               # only FA2's mirrors take a window
        options["window_size"] = window_size
    steps_of = getattr(mirror, algorithm + "_steps")
    if algorithm.endswith("_forward"):
        gen = steps_of(x["Q"], x["K"], x["V"], hbm=hbm, **options)
    else:
        forward = getattr(mirror, algorithm.replace("_backward", "_forward"))
        saved = forward(x["Q"], x["K"], x["V"], **options)     # FA1: (O, l, m); FA2: (O, L)
        gen = steps_of(x["dO"], x["Q"], x["K"], x["V"], *saved, hbm=hbm, **options)
    steps, result = run(gen)
    tiling = Tiling(Nq, Nk, Br, Bc, causal=causal, alignment=alignment, window_size=window_size)
    return Trace(algorithm, steps, tiling, d, result, hbm, x)


def hbm_counts(algorithm, N, d, M=None, Br=None, Bc=None, seed=0):
    """The HBM counter after one forward run of N queries and N keys: (reads, writes) dicts.

    algorithm: registry.STANDARD.mirror_forward (no tiling), registry.FA1.mirror_forward or registry.FA2.mirror_forward.
    """
    x = problem(N, N, d, seed)
    hbm = HBM()
    if algorithm == registry.STANDARD.mirror_forward:
        mirror.standard_forward(x["Q"], x["K"], x["V"], hbm=hbm)
    else:
        Br, Bc = block_sizes(d, Br, Bc, M)
        getattr(mirror, algorithm)(x["Q"], x["K"], x["V"], Br=Br, Bc=Bc, hbm=hbm)
    return dict(hbm.reads), dict(hbm.writes)


def within_block_step(steps, block_of):
    """For each step, its position among the steps of the same thread block.

    block_of(step) names the block: step.i for FA2 forward (one block per Q
    tile), step.j for FA2 backward (one block per K/V tile).
    """
    seen = {}
    out = []
    for s in steps:
        b = block_of(s)
        out.append(seen.get(b, 0))
        seen[b] = seen.get(b, 0) + 1
    return out


def tile_of(step, name):
    """A tile name of a Step's reads or writes, resolved: "Q_i" -> ("Q", step.i), "dK_j" -> ("dK", step.j)."""
    tensor, index = name.rsplit("_", 1)
    if index not in ("i", "j"):
        raise ValueError(f"tile name {name!r}: expected <tensor>_i or <tensor>_j")
    return tensor, step.i if index == "i" else step.j
