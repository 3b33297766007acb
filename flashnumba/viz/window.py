"""Sliding windows: the band of tiles a window computes, and the tiles it skips on both sides.

flash-attn's window_size=(left, right): query r sees key c when
r + Nk - Nq - left <= c <= r + Nk - Nq + right (causal: right = 0). A Q tile
visits only the K/V tiles that meet the band, kv_tile_start(i) <= j <
kv_tile_end(i) (``flashnumba.geometry``), so the work and the K/V reads grow as
N w instead of N^2. Each panel is drawn from the FA2 forward mirror's trace: a
tile it visited is coloured by the kind its Step reports, a tile it never
visited is skipped; masked entries inside visited tiles are shaded; the band's
edges are drawn dashed. Each title counts the tiles and the K reads against
full attention's.
"""

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from flashnumba import registry
from flashnumba.geometry import FULL, PARTIAL, SKIPPED
from flashnumba.viz import style
from flashnumba.viz.causal import tile_kinds
from flashnumba.viz.traces import record

# (Nq, Nk, causal, window_size, what the case stands for)
CASES = (
    (48, 48, True, (10, -1), "causal, left = 10 (Mistral-style)"),
    (48, 48, False, (6, 6), "symmetric, left = right = 6"),
    (24, 48, False, (5, 2), "Nq < Nk, left = 5, right = 2"),
)


def _edges(ax, t):
    """The band's two staircases: x = r + lo on the left, r + hi + 1 on the right, row by row."""
    for bound, shift in ((t.lo, 0), (t.offset, 1)):
        xs, ys = [], []
        for r in range(t.Nq):
            x = min(max(r + bound + shift, 0), t.Nk)
            xs += [x, x]
            ys += [r, r + 1]
        ax.plot(xs, ys, color="black", lw=1.0, ls="--")


def _draw(ax, panel, title):
    t = panel["tiling"]
    style.score_axes(ax, t, title)
    for (i, j), kind in panel["kind"].items():
        style.tile_box(ax, t, i, j, face=style.KIND_COLOURS[kind], edge="white", lw=1.5)
    r = np.arange(t.Nq)[:, None]
    c = np.arange(t.Nk)[None, :]
    overlay = np.zeros((t.Nq, t.Nk, 4))
    overlay[(c > r + t.offset) | (c < r + t.lo)] = (1, 1, 1, 0.65)      # hidden by the window
    ax.imshow(overlay, extent=(0, t.Nk, t.Nq, 0), interpolation="nearest", zorder=2)
    _edges(ax, t)


def window_figure(Br=8, Bc=8, d=4, seed=0, cases=CASES):
    """One panel per case: the tiles FA2's forward visits under a sliding window."""
    fig = style.new_figure(4.2 * len(cases), 5.2)
    axes = fig.subplots(1, len(cases), squeeze=False)[0]
    data = []
    for ax, (Nq, Nk, causal, window_size, what) in zip(axes, cases):
        trace = record(registry.FA2.mirror_forward, Nq, Nk, d, Br, Bc, causal=causal,
                       window_size=window_size, seed=seed)
        full = record(registry.FA2.mirror_forward, Nq, Nk, d, Br, Bc, seed=seed)
        panel = tile_kinds(trace)
        panel.update(Nq=Nq, Nk=Nk, causal=causal, window_size=window_size, case=what,
                     k_reads=trace.hbm.reads["K"], k_reads_full=full.hbm.reads["K"])
        n = panel["counts"]
        _draw(ax, panel, f"{what}\nNq = {Nq}, Nk = {Nk}: {n[FULL]} full, {n[PARTIAL]} partial, "
                         f"{n[SKIPPED]} skipped\nK read {panel['k_reads']} floats "
                         f"(full attention: {panel['k_reads_full']})")
        data.append(panel)
    handles = [Patch(facecolor=style.KIND_COLOURS[k], edgecolor="grey", label=style.KIND_LABELS[k])
               for k in (FULL, PARTIAL, SKIPPED)]
    handles += [Line2D([], [], color="black", ls="--",
                       label="band: key c visible to query r iff r + lo <= c <= r + hi")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(f"Sliding window: the band of tiles S_ij computed, the rest skipped "
                 f"(Br = {Br}, Bc = {Bc})", fontsize=11)
    fig.flashnumba_data = {"panels": data}
    return fig
