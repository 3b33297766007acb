"""What the threads of a kernel read and wrote, drawn from a simulator access trace (GPU-Puzzles style).

Each panel is one array (global or shared) as a grid of its elements. The
number in an element is how many times the whole launch read it; the element's
edge is red when the chosen thread read it and green when it wrote it. The
trace comes from ``flashnumba.simulator.access.traced()``, so nothing here is
drawn by hand: it is what the simulated threads did.
"""

import numpy as np

from flashnumba.viz import style


def _as_matrix(counts):
    return counts.reshape(1, -1) if counts.ndim == 1 else counts


def _cell(index, ndim):
    return (0, index[0]) if ndim == 1 else index


def access_figure(trace, names, who, title=None, width=None):
    """One panel per watched array in `names`; `who` = (block, thread) is the thread outlined."""
    shapes = [_as_matrix(trace.per_element(n)).shape for n in names]
    width = width or min(3.0 + 2.2 * sum(max(c, 2) for _, c in shapes) ** 0.8, 14)
    fig = style.new_figure(width, 3.4)
    axes = fig.subplots(1, len(names), width_ratios=[max(c, 2) for _, c in shapes])
    axes = np.atleast_1d(axes)
    block, thread = who
    for ax, name in zip(axes, names):
        reads = trace.per_element(name)
        ndim = reads.ndim
        grid = _as_matrix(reads)
        rows, cols = grid.shape
        style.matrix_axes(ax, rows, cols)
        peak = max(int(grid.max()), 1)
        for r in range(rows):
            for c in range(cols):
                face = style.PALETTE[0] if grid[r, c] else "white"
                alpha = 0.15 + 0.6 * grid[r, c] / peak if grid[r, c] else 1.0
                style.box(ax, r, r + 1, c, c + 1, face=face, edge="lightgrey", lw=0.5, alpha=alpha)
                if grid[r, c] and rows * cols <= 400:
                    ax.text(c + 0.5, r + 0.5, str(grid[r, c]), ha="center", va="center", fontsize=6.5)
        mine_r = trace.elements(name, who, "reads")
        mine_w = trace.elements(name, who, "writes")
        for index in mine_r:
            r, c = _cell(index, ndim)
            style.box(ax, r + 0.06, r + 0.94, c + 0.06, c + 0.94, edge=style.READ, lw=2.0)
        for index in mine_w:
            r, c = _cell(index, ndim)
            style.box(ax, r + 0.14, r + 0.86, c + 0.14, c + 0.86, edge=style.WRITTEN, lw=2.0)
        kind = "shared" if name in trace.shared_names else "global"
        ax.set_title(f"{name} ({kind})\nthis thread: {len(mine_r)} read, {len(mine_w)} written",
                     fontsize=8.5)
    fig.suptitle(title or f"thread {thread} of block {block}: red = it read, green = it wrote; "
                 f"numbers = reads by all threads", fontsize=9.5)
    fig.flashnumba_data = {n: {"reads": trace.elements(n, who, "reads"),
                               "writes": trace.elements(n, who, "writes")} for n in names}
    return fig


def per_thread_figure(traces, name, grid_of):
    """Heat maps over the threads, one per trace: how many elements of `name` each thread read.

    traces: {title: Trace}, drawn side by side on one colour scale. grid_of((block, thread))
    -> (row, col): where a thread sits in the picture (e.g. the entry of S it computes)."""
    maps = {}
    for title, trace in traces.items():
        cells = {grid_of(who): n for who, n in trace.per_thread(name).items()}
        M = np.zeros((max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1), dtype=int)
        for (r, c), n in cells.items():
            M[r, c] = n
        maps[title] = M
    top = max(int(M.max()) for M in maps.values())
    rows, cols = next(iter(maps.values())).shape
    fig = style.new_figure(1.5 + 0.32 * cols * len(maps), 1.2 + 0.3 * rows)
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    for ax, (title, M) in zip(axes, maps.items()):
        im = ax.imshow(M, cmap="Blues", vmin=0, vmax=top)
        for (r, c), n in np.ndenumerate(M):
            ax.text(c, r, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > 0.6 * top else "black")
        ax.set(xticks=[], yticks=[])
        ax.set_title(f"{title}: {M.sum()} in all", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"elements of {name} read")
    fig.suptitle(f"global reads of {name}, per thread (one cell = the thread computing that entry of S)",
                 fontsize=9)
    fig.flashnumba_data = maps
    return fig
