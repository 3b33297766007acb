"""Ring attention's schedule: which rank holds which K/V block at each step, and what it computes.

Drawn from the ring mirror's trace (``flashnumba.mirror.ring``), one row per layout
(contiguous, zigzag), causal masking:

    left    ranks x ring steps: the cell of rank r at step s names the visiting block j
            (j = r - s mod P) and is coloured by what the visit computes (full, the
            diagonal block, skipped); the number is the share of a whole block's
            (query, key) pairs it attends over; the last column sums each rank's work
    right   the whole N x N score matrix in global positions: every piece a visit
            computed, coloured by the ring step that computed it; what no visit
            computes (grey) is the causal mask's hidden half

Contiguous: rank P-1 works at every step and rank 0 at one, so every step waits for
the busiest rank. Zigzag: every rank does one diagonal block and P-1 half blocks.
"""

import numpy as np
from matplotlib.patches import Patch

from flashnumba.geometry import FULL, PARTIAL, SKIPPED
from flashnumba.mirror.ring import ring_forward_steps
from flashnumba.mirror.trace import run
from flashnumba.ring_geometry import LAYOUTS, positions
from flashnumba.viz import style

RING_KIND_LABELS = {
    FULL: "computed, nothing masked",
    PARTIAL: "the diagonal block: causal inside it",
    SKIPPED: "skipped: every key is later (the block still passes on)",
}


def ring_trace(world, n, layout, d=4, seed=0):
    """The forward ring mirror's Steps on a seeded causal problem (one batch, one head)."""
    rng = np.random.default_rng(seed)
    Q, K, V = rng.standard_normal((3, 1, world * n, 1, d))
    steps, _ = run(ring_forward_steps(Q, K, V, world=world, layout=layout, causal=True))
    return steps


def schedule_of(steps, world, n, layout):
    """What a panel draws, read off the trace: per (step, rank) the visiting block, the kind, the
    share of a whole block's pairs computed; per rank the sum; the score matrix coloured by step."""
    cells = {}
    owner = np.full((world * n, world * n), -1)              # ring step that computed each pair
    for count, s in enumerate(steps):
        ring_step = count // world
        rows, cols = slice(*s.rows), slice(*s.cols)
        q_pos = positions(s.i, world, n, layout)[rows]
        k_pos = positions(s.j, world, n, layout)[cols]
        visible = np.ones((len(q_pos), len(k_pos)), dtype=bool)
        if s.kind == PARTIAL:
            visible = np.arange(len(k_pos))[None, :] <= np.arange(len(q_pos))[:, None]
        if len(q_pos):
            block = owner[np.ix_(q_pos, k_pos)]
            block[visible] = ring_step
            owner[np.ix_(q_pos, k_pos)] = block
        cells[(ring_step, s.i)] = {"block": s.j, "kind": s.kind,
                                   "work": int(visible.sum()) / (n * n)}
    work = [sum(cells[(step, r)]["work"] for step in range(world)) for r in range(world)]
    return {"cells": cells, "work": work, "owner": owner, "world": world, "n": n, "layout": layout}


def _draw_schedule(ax, panel):
    world = panel["world"]
    style.matrix_axes(ax, world, world + 1, row_label="rank r (holds Q_r)",
                      col_label="ring step s", row_ticks=[r + 0.5 for r in range(world)],
                      col_ticks=[s + 0.5 for s in range(world + 1)])
    ax.set_yticklabels([str(r) for r in range(world)])
    ax.set_xticklabels([str(s) for s in range(world)] + ["work"])
    ax.tick_params(length=0)
    for (step, rank), cell in panel["cells"].items():
        face = style.KIND_COLOURS[cell["kind"]]
        style.box(ax, rank, rank + 1, step, step + 1, face=face, edge="white", lw=1.5)
        share = "" if cell["kind"] == SKIPPED else f"\n{cell['work']:.2f}"
        ax.text(step + 0.5, rank + 0.5, f"K/V {cell['block']}{share}", ha="center", va="center",
                fontsize=7, color=style.text_colour(face))
    for rank, total in enumerate(panel["work"]):
        ax.text(world + 0.5, rank + 0.5, f"{total:.2f}", ha="center", va="center", fontsize=8,
                fontweight="bold")


def _draw_matrix(ax, panel):
    owner = panel["owner"]
    N = owner.shape[0]
    style.matrix_axes(ax, N, N, row_label="query position (global)", col_label="key position (global)")
    image = np.ones((N, N, 4))
    image[:] = (0.91, 0.91, 0.91, 1.0)
    for step in range(panel["world"]):
        image[owner == step] = style.colour(step)
    ax.imshow(image, extent=(0, N, N, 0), interpolation="nearest")
    chunk = panel["n"] // 2 if panel["layout"] == "zigzag" else panel["n"]   # grid at chunk edges
    ax.set_xticks(np.arange(0, N + 1, chunk))
    ax.set_yticks(np.arange(0, N + 1, chunk))
    ax.tick_params(labelsize=6, length=2)
    ax.grid(color="white", lw=0.5)


def ring_schedule_figure(world=4, n=8, seed=0):
    """Rows: contiguous, zigzag (causal). Left: ranks x steps; right: the score matrix by step."""
    fig = style.new_figure(10, 4.2 * len(LAYOUTS))
    axes = fig.subplots(len(LAYOUTS), 2, squeeze=False, width_ratios=[1.2, 1])
    panels = []
    for row, layout in enumerate(LAYOUTS):
        panel = schedule_of(ring_trace(world, n, layout, seed=seed), world, n, layout)
        what = ("rank r holds positions [r n, (r+1) n)" if layout == "contiguous"
                else "rank r holds chunks r and 2P-1-r of 2P")
        _draw_schedule(axes[row, 0], panel)
        axes[row, 0].set_title(f"{layout}: {what}\nwork per rank (in whole blocks): "
                               f"max {max(panel['work']):.2f}, min {min(panel['work']):.2f}", fontsize=9)
        _draw_matrix(axes[row, 1], panel)
        axes[row, 1].set_title(f"{layout}: S (N = {world * n}) coloured by the ring step computing it",
                               fontsize=9)
        panels.append(panel)
    handles = [Patch(facecolor=style.KIND_COLOURS[k], edgecolor="grey", label=RING_KIND_LABELS[k])
               for k in (FULL, PARTIAL, SKIPPED)]
    handles += [Patch(facecolor=style.colour(s), label=f"computed at step {s}") for s in range(world)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"Ring attention, causal, P = {world} ranks: at step s rank r holds the K/V block "
                 f"of rank r - s mod P", fontsize=11)
    fig.flashnumba_data = {"panels": panels}
    return fig
