"""What every figure shares: colours, the tile grid of a matrix, and deterministic saving.

A matrix is drawn the way it is printed: row 0 at the top, column 0 at the left,
one unit per element, so a tile of Br rows and Bc columns is a Br x Bc box.
"""


import io

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from flashnumba.geometry import FULL, PARTIAL, SKIPPED

# Tile kinds under the causal mask (colour-blind safe: blue / orange / grey).
KIND_COLOURS = {FULL: "#4e79a7", PARTIAL: "#f28e2b", SKIPPED: "#e8e8e8"}
KIND_LABELS = {
    FULL: "computed, nothing masked",
    PARTIAL: "computed, then partly masked",
    SKIPPED: "skipped: never loaded or computed",
}

# On-chip status of a tile (the "what is in SRAM" pictures).
ON_CHIP = "#9ecae9"      # in SRAM during this step
READ = "#e15759"         # loaded from HBM in this step (edge colour)
WRITTEN = "#59a14f"      # stored to HBM in this step (edge colour)
DONE = "#d9d9d9"         # visited in an earlier step

# One colour per thread block or warp: matplotlib's 'tab10' cycle.
PALETTE = [matplotlib.colormaps["tab10"](k) for k in range(10)]


def colour(k):
    """The k-th qualitative colour (thread block k, warp k)."""
    return PALETTE[k % len(PALETTE)]


def new_figure(width, height):
    """A Figure with no pyplot state (nothing global, nothing shown), laid out by constrained_layout."""
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def matrix_axes(ax, n_rows, n_cols, row_label=None, col_label=None, row_ticks=None, col_ticks=None):
    """Set ax up to show an n_rows x n_cols matrix: row 0 on top, square elements."""
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_aspect("equal")
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xticks([] if col_ticks is None else col_ticks)
    ax.set_yticks([] if row_ticks is None else row_ticks)
    ax.tick_params(labelsize=7, length=2)
    if row_label:
        ax.set_ylabel(row_label, fontsize=8)
    if col_label:
        ax.set_xlabel(col_label, fontsize=8)


def box(ax, row0, row1, col0, col1, face="none", edge="black", lw=0.6, **kw):
    """Draw the rectangle covering rows [row0, row1) and columns [col0, col1)."""
    patch = Rectangle((col0, row0), col1 - col0, row1 - row0, facecolor=face, edgecolor=edge,
                      linewidth=lw, **kw)
    ax.add_patch(patch)
    return patch


def tile_box(ax, tiling, i, j, **kw):
    """Draw tile (i, j) of the score matrix S: rows of Q tile i, columns of K/V tile j."""
    r, c = tiling.rows(i), tiling.cols(j)
    return box(ax, r.start, r.stop, c.start, c.stop, **kw)


def tile_centre(tiling, i, j):
    """(x, y) of the middle of tile (i, j), for a label."""
    r, c = tiling.rows(i), tiling.cols(j)
    return (c.start + c.stop) / 2, (r.start + r.stop) / 2


def score_axes(ax, tiling, title=None):
    """Axes for the Nq x Nk score matrix S: tile indices at the tile centres, boundaries as minor ticks."""
    t = tiling
    matrix_axes(ax, t.Nq, t.Nk,
                row_label=f"Q tile i  ({t.Nq} query rows)",
                col_label=f"K/V tile j  ({t.Nk} key columns)",
                row_ticks=[(t.rows(i).start + t.rows(i).stop) / 2 for i in range(t.Tr)],
                col_ticks=[(t.cols(j).start + t.cols(j).stop) / 2 for j in range(t.Tc)])
    ax.set_yticklabels([str(i) for i in range(t.Tr)])
    ax.set_xticklabels([str(j) for j in range(t.Tc)])
    ax.tick_params(length=0)
    if title:
        ax.set_title(title, fontsize=9)


def text_colour(face):
    """Black or white, whichever reads better on a face colour."""
    r, g, b = matplotlib.colors.to_rgb(face)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def save(figure_or_animation, path, fps=2):
    """Write a PNG (Figure) or GIF (Animation) with no timestamps or version strings.

    The same figure always gives the same bytes, so regenerated figures only
    change in git when the picture changes.
    """
    from matplotlib.animation import Animation, PillowWriter

    if isinstance(figure_or_animation, Animation):
        figure_or_animation.save(str(path), writer=PillowWriter(fps=fps))
    else:
        figure_or_animation.savefig(str(path), metadata={"Software": None})





def png_bytes(fig):
    """The PNG of a figure as bytes (the tests check that a figure renders)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
