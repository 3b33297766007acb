"""Causal skipping: which tiles of S are computed in full, computed and partly masked, or skipped.

Key c is visible to query r when c <= r + offset. The offset depends on how the
diagonal is aligned when Nq != Nk:

    bottom-right  offset = Nk - Nq   the last query sees every key (flash-attn >= 2.1)
    top-left      offset = 0         query r sees keys 0..r (PyTorch's is_causal)

With Nq = Nk the two agree. Each panel is drawn from the FA2 forward mirror's
trace: a tile it visited is coloured by the kind its Step reports, a tile it
never visited is skipped. Masked entries inside visited tiles are shaded.
"""

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from flashnumba import registry
from flashnumba.geometry import BOTTOM_RIGHT, FULL, PARTIAL, SKIPPED, TOP_LEFT
from flashnumba.viz import style
from flashnumba.viz.traces import record

# (Nq, Nk, what the case stands for)
CASES = (
    (32, 32, "Nq = Nk"),
    (24, 40, "Nq < Nk"),      # e.g. new queries against a longer KV cache
    (40, 24, "Nq > Nk"),
)


def tile_kinds(trace):
    """What a panel draws: tile -> kind from the mirror's steps, SKIPPED for tiles it never visited."""
    t = trace.tiling
    visited = {(s.i, s.j): s.kind for s in trace.steps}
    kinds = {(i, j): visited.get((i, j), SKIPPED) for i in range(t.Tr) for j in range(t.Tc)}
    counts = {kind: sum(k == kind for k in kinds.values()) for kind in (FULL, PARTIAL, SKIPPED)}
    return {"kind": kinds, "counts": counts, "visited": list(visited), "tiling": t}


def _diagonal(ax, t):
    """The staircase between visible and masked entries: x = r + offset + 1 on row r."""
    xs, ys = [], []
    for r in range(t.Nq):
        x = min(max(r + t.offset + 1, 0), t.Nk)
        xs += [x, x]
        ys += [r, r + 1]
    ax.plot(xs, ys, color="black", lw=1.0, ls="--")


def _draw(ax, panel, title):
    t = panel["tiling"]
    style.score_axes(ax, t, title)
    for (i, j), kind in panel["kind"].items():
        style.tile_box(ax, t, i, j, face=style.KIND_COLOURS[kind], edge="white", lw=1.5)
    # masked entries (c > r + offset) of the tiles that are computed: pale overlay
    r = np.arange(t.Nq)[:, None]
    c = np.arange(t.Nk)[None, :]
    overlay = np.zeros((t.Nq, t.Nk, 4))
    overlay[c > r + t.offset] = (1, 1, 1, 0.65)
    ax.imshow(overlay, extent=(0, t.Nk, t.Nq, 0), interpolation="nearest", zorder=2)
    _diagonal(ax, t)
    n_rows_blind = min(max(-t.offset, 0), t.Nq)
    if n_rows_blind:
        ax.text(t.Nk / 2, n_rows_blind / 2, f"rows 0-{n_rows_blind - 1}\nsee no key:\n"
                "O = 0, L = -inf", ha="center", va="center", fontsize=7, zorder=3)


def causal_skipping_figure(Br=8, Bc=8, d=4, seed=0, cases=CASES):
    """Rows: Nq = Nk, Nq < Nk, Nq > Nk. Columns: bottom-right and top-left alignment."""
    fig = style.new_figure(8.5, 3.6 * len(cases))
    axes = fig.subplots(len(cases), 2, squeeze=False)
    data = []
    for row, (Nq, Nk, what) in enumerate(cases):
        for col, alignment in enumerate((BOTTOM_RIGHT, TOP_LEFT)):
            trace = record(registry.FA2.mirror_forward, Nq, Nk, d, Br, Bc, causal=True, alignment=alignment, seed=seed)
            panel = tile_kinds(trace)
            panel.update(Nq=Nq, Nk=Nk, alignment=alignment, case=what)
            n = panel["counts"]
            offset = (f"offset = Nk - Nq = {trace.tiling.offset}" if alignment == BOTTOM_RIGHT
                      else "offset = 0")
            _draw(axes[row, col], panel,
                  f"{what} (Nq = {Nq}, Nk = {Nk}), {alignment}\n{offset}:  "
                  f"{n[FULL]} full, {n[PARTIAL]} partial, {n[SKIPPED]} skipped")
            data.append(panel)
    handles = [Patch(facecolor=style.KIND_COLOURS[k], edgecolor="grey", label=style.KIND_LABELS[k])
               for k in (FULL, PARTIAL, SKIPPED)]
    handles += [Patch(facecolor=(0.95, 0.8, 0.6), edgecolor="grey", label="masked entry (set to -inf)"),
                Line2D([], [], color="black", ls="--", label="diagonal: key c visible to query r iff c <= r + offset")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(f"Causal masking: which tiles S_ij are computed (Br = {Br}, Bc = {Bc})", fontsize=11)
    fig.flashnumba_data = {"panels": data}
    return fig
