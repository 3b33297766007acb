"""Memory footprint: what each algorithm keeps in HBM beyond its inputs Q, K, V and output O.

Standard attention writes the whole Nq x Nk score matrix S and probability
matrix P (P is also what its backward reads): quadratic in N. FlashAttention
writes only per-row statistics: FA1 l and m (2 N floats), FA2 L = m + log l
(N floats), which its backward uses to recompute P tile by tile.

Measured from the mirrors' traces: for every tensor other than O that a run
stores to HBM, the distinct tiles it stores, each counted once at the size the
HBM counter recorded for it. Bytes assume float32 (4 bytes per element).
"""

import numpy as np

from flashnumba import mirror, registry
from flashnumba.hbm import HBM
from flashnumba.mirror.trace import run
from flashnumba.viz import style
from flashnumba.viz.traces import problem, tile_of

BYTES = 4   # float32
OUTPUTS = {"O"}
STORES = {registry.STANDARD: "S and P (N x N each)", registry.FA1: "l and m (N each)",
          registry.FA2: "L = m + log l (N)"}      # what each algorithm keeps in HBM beyond O
ALGORITHMS = {a.mirror_forward: f"{a.title}: {STORES[a]}" for a in registry.ALGORITHMS}


def extra_elements(steps):
    """Elements of HBM a run's steps store into, beyond the outputs: {tensor: elements}.

    Each distinct tile (or, for standard attention's whole-matrix passes, each
    tensor) counts once, at the size the HBM counter grew by when it was stored.
    """
    seen, sizes, before = set(), {}, {}
    for s in steps:
        for name in s.writes:
            tile = (name, None) if s.i is None else tile_of(s, name)
            tensor = tile[0]
            grew = s.hbm_writes[tensor] - before.get(tensor, 0)
            if tensor not in OUTPUTS and tile not in seen:
                seen.add(tile)
                sizes[tensor] = sizes.get(tensor, 0) + grew   # a step stores one tile per tensor
        before = dict(s.hbm_writes)
    return sizes


def footprint(algorithm, N, d=8, Br=8, Bc=8, seed=0):
    """{tensor: elements} stored beyond O by one forward run on N queries and N keys."""
    x = problem(N, N, d, seed)
    if algorithm == registry.STANDARD.mirror_forward:
        steps, _ = run(mirror.standard_forward_steps(x["Q"], x["K"], x["V"], hbm=HBM()))
    else:
        steps, _ = run(getattr(mirror, algorithm + "_steps")(x["Q"], x["K"], x["V"], Br=Br, Bc=Bc,
                                                              hbm=HBM()))
    return extra_elements(steps)


def memory_figure(Ns=(16, 32, 64, 128, 256), d=8, N_max=16384, d_io=64):
    """Extra bytes against N: measured points, and the formulas 2N^2, 2N, N carried on to N_max."""
    fig = style.new_figure(8.5, 5.4)
    ax = fig.subplots()
    data = {"N": list(Ns), "bytes": {}, "tensors": {}}
    far = np.geomspace(Ns[0], N_max, 60)
    per_N = {registry.STANDARD.mirror_forward: lambda N: 2 * N * N, registry.FA1.mirror_forward: lambda N: 2 * N,
             registry.FA2.mirror_forward: lambda N: N}
    for n, (algorithm, label) in enumerate(ALGORITHMS.items()):
        sizes = [footprint(algorithm, N, d) for N in Ns]
        measured = [BYTES * sum(s.values()) for s in sizes]
        colour = style.colour(n)
        ax.plot(Ns, measured, "o", color=colour, ms=7, label=f"{label}: measured")
        ax.plot(far, BYTES * per_N[algorithm](far), "--", color=colour, lw=1.2)
        data["bytes"][algorithm] = measured
        data["tensors"][algorithm] = sorted(sizes[-1])
        ax.annotate(_human(BYTES * per_N[algorithm](N_max)), (N_max, BYTES * per_N[algorithm](N_max)),
                    xytext=(4, 0), textcoords="offset points", fontsize=8, va="center", color=colour)
    qkvo = BYTES * 4 * far * d_io
    ax.plot(far, qkvo, ":", color="grey", lw=1.2, label=f"for scale: Q, K, V, O themselves (4 N d, d = {d_io})")
    ax.annotate(_human(BYTES * 4 * N_max * d_io), (N_max, BYTES * 4 * N_max * d_io), xytext=(4, 0),
                textcoords="offset points", fontsize=8, va="center", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlim(Ns[0] / 1.3, N_max * 3)
    ticks = [2 ** k for k in range(6, 36, 4)]
    ax.set_yticks(ticks, [_human(b) for b in ticks])
    ax.grid(alpha=0.3, which="major")
    ax.set_xlabel("sequence length N (= Nq = Nk)", fontsize=9)
    ax.set_ylabel("bytes in HBM beyond Q, K, V, O (float32, one head)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Memory beyond inputs and outputs. Markers: measured by the mirrors (N <= {Ns[-1]});\n"
                 f"dashed: the same counts, 2 N^2, 2 N and N, carried on to N = {N_max}", fontsize=10)
    fig.flashnumba_data = data
    return fig


def _human(n_bytes):
    """1024 -> '1 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.3g} PiB"
