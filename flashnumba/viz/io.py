"""IO complexity: HBM traffic measured by the mirrors' counters, with the paper's formulas drawn over it.

Each marker is one run of a mirror (standard attention, FA1, FA2 forward) with
an HBM counter; its height is every element read plus every element written.
The lines are the asymptotic formulas of the FlashAttention paper (Dao et al.
2022, Theorem 2), each with one constant c fitted to the markers:

    standard attention   c (N d + N^2)          independent of the on-chip size M
    FlashAttention       c N^2 d^2 / M          for d <= M <= N d

with Bc = ceil(M / 4d), Br = min(Bc, d). FA1 re-reads and re-writes O, l, m once
per K/V tile (Tc = N / Bc times); FA2 re-reads K and V once per Q tile
(Tr = N / Br times). Once M >= 4 d^2, Br stops at d, and FA2's traffic stops
falling with M: about 2 N^2 + 2 N d.
"""

import numpy as np

from flashnumba import registry
from flashnumba.viz import style
from flashnumba.viz.traces import hbm_counts

ALGORITHMS = {a.mirror_forward: a.title for a in registry.ALGORITHMS}   # mirror -> label
MARKERS = dict(zip(ALGORITHMS, "so^v"))


def formula(algorithm, N, d, M):
    """The paper's bound without its constant: N d + N^2 (standard), N^2 d^2 / M (FlashAttention)."""
    N, M = np.asarray(N, dtype=float), np.asarray(M, dtype=float)
    if algorithm == registry.STANDARD.mirror_forward:
        return N * d + N ** 2 + 0 * M
    return N ** 2 * d ** 2 / M


def measure(algorithm, N, d, M):
    """Total HBM elements (reads + writes) of one forward run, from the mirror's counter."""
    reads, writes = hbm_counts(algorithm, N, d, M=M)
    return sum(reads.values()) + sum(writes.values())


def fit_constant(measured, bound):
    """c minimising the squared log-ratio between measurements and c * bound."""
    return float(np.exp(np.mean(np.log(np.asarray(measured) / np.asarray(bound)))))


def io_figure(d=8, N_fixed=128, Ms=(64, 128, 256, 512, 1024), M_fixed=1024, Ns=(32, 64, 128, 256, 512)):
    """Left: traffic against on-chip size M at fixed N. Right: against N at fixed M."""
    fig = style.new_figure(11, 5.0)
    ax_M, ax_N = fig.subplots(1, 2)
    data = {"d": d, "vs_M": {"N": N_fixed, "M": list(Ms)}, "vs_N": {"M": M_fixed, "N": list(Ns)}}
    panels = ((ax_M, "vs_M", [(N_fixed, M) for M in Ms], list(Ms)),
              (ax_N, "vs_N", [(N, M_fixed) for N in Ns], list(Ns)))
    for ax, key, points, xs in panels:
        for n, (algorithm, label) in enumerate(ALGORITHMS.items()):
            measured = [measure(algorithm, N, d, M) for N, M in points]
            bound = [formula(algorithm, N, d, M) for N, M in points]
            if algorithm == registry.FA2.mirror_forward:
                # the bound is for the regime Br = Bc < d (M < 4 d^2); fit there when possible
                fit_on = [k for k, (N, M) in enumerate(points) if M < 4 * d * d] or range(len(points))
            else:
                fit_on = range(len(points))
            c = fit_constant([measured[k] for k in fit_on], [bound[k] for k in fit_on])
            colour = style.colour(n)
            ax.plot(xs, measured, MARKERS[algorithm], color=colour, ms=7, label=f"{label}: measured")
            fine = np.geomspace(xs[0], xs[-1], 50)
            curve = [c * formula(algorithm, x if key == "vs_N" else N_fixed, d,
                                 x if key == "vs_M" else M_fixed) for x in fine]
            paper = "(N d + N^2)" if algorithm == registry.STANDARD.mirror_forward else "N^2 d^2 / M"
            if algorithm == registry.FA2.mirror_forward and key == "vs_M":
                paper += ", fit for M < 4d^2"
            ax.plot(fine, curve, "-", color=colour, lw=1.2, alpha=0.8,
                    label=f"{label}: {c:.2g} x {paper}")
            data[key][algorithm] = {"measured": measured, "c": c}
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        ax.set_ylabel("HBM elements read + written", fontsize=9)
        ax.legend(fontsize=7.5)
    ax_M.axvline(4 * d * d, color="grey", ls=":", lw=1)
    ax_M.text(4 * d * d * 1.05, ax_M.get_ylim()[0] * 1.3,
              f"M = 4d^2 = {4 * d * d}: Br reaches d.\nBeyond, FA2 stays flat: K, V are\n"
              "read Tr = N / d times whatever M", fontsize=7.5, color="dimgrey")
    Bc, Br = -(-M_fixed // (4 * d)), min(-(-M_fixed // (4 * d)), d)
    if Br < Bc:
        ax_N.text(0.98, 0.03, f"Here Bc = {Bc} but Br = min(Bc, d) = {Br}: FA2 re-reads K, V\n"
                  f"N / {Br} times, FA1 re-reads and re-writes O, l, m N / {Bc} times",
                  transform=ax_N.transAxes, ha="right", va="bottom", fontsize=7.5, color="dimgrey")
    ax_M.set_xlabel("on-chip memory M (floats);  Bc = ceil(M / 4d), Br = min(Bc, d)", fontsize=9)
    ax_M.set_title(f"against on-chip size M   (N = {N_fixed}, d = {d})", fontsize=10)
    ax_N.set_xlabel("sequence length N (= Nq = Nk)", fontsize=9)
    ax_N.set_title(f"against sequence length N   (M = {M_fixed}, d = {d})", fontsize=10)
    fig.suptitle("HBM traffic of one forward pass: markers = the mirrors' HBM counters, "
                 "lines = the paper's bounds (constant c fitted)", fontsize=10)
    fig.flashnumba_data = data
    return fig
