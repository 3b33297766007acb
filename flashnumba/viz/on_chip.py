"""What is on chip at step k: the tiles in SRAM, what was loaded and stored, the HBM traffic so far.

Each HBM tensor (Q, K, V, O and the statistics) is drawn as a column of tiles:
Q tile i is rows [i*Br, (i+1)*Br) of Q, K/V tile j rows [j*Bc, (j+1)*Bc) of K or V.
At step k the mirror works on tile (i, j) of S, and its on-chip working set is

    Q_i, K_j, V_j, S_ij, P_ij, O_i, l_i, m_i                 (forward, FA1 and FA2)

FA1 loads Q_i, O_i, l_i, m_i from HBM and stores O_i, l_i, m_i back at every
step; FA2 loads Q_i once per thread block, keeps O_i, l_i, m_i on chip and
stores O_i, L_i once. Which tiles were loaded and stored, and the running
counts, come from the mirror's Step records (``reads``, ``writes``,
``hbm_reads``, ``hbm_writes``), not from a loop written here.
"""

from collections import Counter

from matplotlib.animation import FuncAnimation
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from flashnumba import registry
from flashnumba.viz import style
from flashnumba.viz.traces import record, tile_of

# HBM tensors, in the order drawn; those tiled like Q (by Q tile i) and the 1-column ones.
ORDER = ("Q", "K", "V", "O", "l", "m", "L")
BY_Q_TILE = {"Q", "O", "l", "m", "L", "dO", "D", "dQ"}
VECTORS = {"l", "m", "L", "D"}


def tensors_of(trace):
    """The HBM tensors a run touched, in drawing order."""
    last = trace.steps[-1]
    names = set(last.hbm_reads) | set(last.hbm_writes)
    return [n for n in ORDER if n in names]


def step_view(trace, k):
    """What the picture of step k shows, taken from the trace's first k + 1 steps."""
    step = trace.steps[k]
    tile_reads, tile_writes = Counter(), Counter()
    for s in trace.steps[:k + 1]:
        tile_reads.update(tile_of(s, name) for name in s.reads)
        tile_writes.update(tile_of(s, name) for name in s.writes)
    tensors = tensors_of(trace)
    on_chip = {(x, step.i if x in BY_Q_TILE else step.j) for x in tensors}
    return {
        "k": k, "i": step.i, "j": step.j,
        "tensors": tensors,
        "on_chip": on_chip,                                   # the working set's tiles, by HBM tensor
        "read": [tile_of(step, name) for name in step.reads],     # loaded from HBM at step k
        "written": [tile_of(step, name) for name in step.writes], # stored to HBM at step k
        "tile_reads": dict(tile_reads), "tile_writes": dict(tile_writes),
        "visited": [(s.i, s.j) for s in trace.steps[:k + 1]],
        "hbm_reads": dict(step.hbm_reads), "hbm_writes": dict(step.hbm_writes),
    }



NAMES = {a.mirror_forward: a.title for a in (registry.FA1, registry.FA2)}
NOTES = {
    registry.FA1.mirror_forward: ["O, l, m live in HBM: every step",
                    "loads O_i, l_i, m_i and stores",
                    "them back."],
    registry.FA2.mirror_forward: ["O_i, l_i, m_i stay in SRAM for a",
                    "whole row of tiles; its last step",
                    "stores O_i and L_i = m_i + log l_i."],
}
LEGEND = [Patch(facecolor=style.ON_CHIP, edgecolor="grey", label="tile in SRAM at this step"),
          Patch(facecolor="white", edgecolor=style.READ, lw=2.5, label="loaded from HBM at this step"),
          Patch(facecolor="white", edgecolor=style.WRITTEN, hatch="///", lw=0,
                label="stored to HBM at this step"),
          Patch(facecolor=style.DONE, edgecolor="white", label="S tile visited earlier (number = step)")]
FOOTNOTE = "r, w in a tile: how many times that tile has been read from / written to HBM so far"


def _layout(fig, row, n_rows, tensors, tiling, d):
    """Axes for one algorithm: S, then each HBM tensor, then a text panel."""
    widths = [tiling.Nk * 0.9] + [3 if x in VECTORS else d for x in tensors] + [34]
    height = 0.9 / n_rows
    top = 0.93 - row * height
    gs = fig.add_gridspec(1, len(widths), width_ratios=widths, left=0.04, right=0.99,
                          top=top - 0.085, bottom=top - height + 0.01, wspace=0.25)
    return [fig.add_subplot(gs[0, c]) for c in range(len(widths))]


class _Row:
    """The artists of one algorithm's row, built once; show(k) recolours them for step k."""

    def __init__(self, axes, trace, title):
        self.trace, self.title = trace, title
        t, d = trace.tiling, trace.d
        self.tensors = tensors_of(trace)
        ax_S, ax_text = axes[0], axes[-1]

        # S = Q K^T: one box and one label per tile
        style.score_axes(ax_S, t)
        ax_S.set_title("S = Q K^T: tiles visited", fontsize=8)
        self.S_box, self.S_text = {}, {}
        for i in range(t.Tr):
            for j in range(t.Tc):
                self.S_box[i, j] = style.tile_box(ax_S, t, i, j)
                x, y = style.tile_centre(t, i, j)
                self.S_text[i, j] = ax_S.text(x, y, "", ha="center", va="center", fontsize=7)
        self.heading = ax_S.annotate("", xy=(0, 1), xycoords="axes fraction", xytext=(0, 34),
                                     textcoords="offset points", fontsize=10, fontweight="bold",
                                     ha="left", va="bottom")

        # each HBM tensor, per tile: a fill, a 'stored' hatch, a 'loaded' edge, an r/w count
        self.tiles = {}
        for ax, name in zip(axes[1:-1], self.tensors):
            by_q = name in BY_Q_TILE
            width = 1 if name in VECTORS else d
            style.matrix_axes(ax, t.Nq if by_q else t.Nk, width)
            ax.set_aspect("auto" if name in VECTORS else "equal")
            ax.set_title(name, fontsize=9, fontweight="bold")
            for n in range(t.Tr if by_q else t.Tc):
                rows = t.rows(n) if by_q else t.cols(n)
                a, b = rows.start, rows.stop
                self.tiles[name, n] = (
                    style.box(ax, a, b, 0, width, edge="grey", lw=0.6),
                    style.box(ax, a, b, 0, width, edge=style.WRITTEN, lw=0, hatch="///"),
                    style.box(ax, a, b, 0, width, edge=style.READ, lw=2.5, clip_on=False, zorder=3),
                    ax.text(width / 2, (a + b) / 2, "", ha="center", va="center", fontsize=6.5,
                            linespacing=1.0, zorder=4,
                            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.6}))

        ax_text.axis("off")
        self.text = ax_text.text(0, 1, "", ha="left", va="top", fontsize=8, family="monospace",
                                 transform=ax_text.transAxes)

    def show(self, k):
        """Recolour everything for step k; returns the step's view (what was drawn)."""
        view = step_view(self.trace, k)
        done = {tile: n for n, tile in enumerate(view["visited"])}
        for tile, patch in self.S_box.items():
            label = self.S_text[tile]
            if tile == (view["i"], view["j"]):
                patch.set(facecolor=style.ON_CHIP, edgecolor="black", linewidth=2, zorder=2)
                label.set(text="S_ij\nP_ij", color="black")
            elif tile in done:
                patch.set(facecolor=style.DONE, edgecolor="white", linewidth=1, zorder=1)
                label.set(text=str(done[tile]), color="dimgrey")
            else:
                patch.set(facecolor="white", edgecolor="lightgrey", linewidth=0.5, zorder=1)
                label.set(text="")
        for tile, (fill, hatch, edge, label) in self.tiles.items():
            fill.set_facecolor(style.ON_CHIP if tile in view["on_chip"] else "white")
            hatch.set_visible(tile in view["written"])
            edge.set_visible(tile in view["read"])
            r, w = view["tile_reads"].get(tile, 0), view["tile_writes"].get(tile, 0)
            label.set_text(f"r{r}\nw{w}" if r or w else "")
        self.heading.set_text(f"{self.title}   step {k} of {len(self.trace.steps)}: "
                              f"tile (i={view['i']}, j={view['j']})")
        self.text.set_text(_summary(self.trace, view))
        # what the artists now show, read back from them (tests compare it with the Step)
        view["drawn"] = {
            "read": sorted(tile for tile, parts in self.tiles.items() if parts[2].get_visible()),
            "written": sorted(tile for tile, parts in self.tiles.items() if parts[1].get_visible()),
            "on_chip": sorted(tile for tile, parts in self.tiles.items()
                              if parts[0].get_facecolor()[:3] == _rgb(style.ON_CHIP)),
        }
        return view


def _sram_floats(t, d):
    """Q_i, K_j, V_j, S_ij (P_ij overwrites it), O_i, l_i, m_i."""
    return t.Br * d + 2 * t.Bc * d + t.Br * t.Bc + t.Br * d + 2 * t.Br


def _rgb(colour):
    return tuple(to_rgb(colour))


def _summary(trace, view):
    """The text panel: HBM counts so far, this step's loads and stores, the SRAM contents."""
    t, d = trace.tiling, trace.d
    step = trace.steps[view["k"]]
    reads, writes = view["hbm_reads"], view["hbm_writes"]
    lines = ["HBM traffic so far (elements)",
             f"  {'':6}{'read':>8}{'written':>9}"]
    lines += [f"  {x:6}{reads.get(x, 0):8}{writes.get(x, 0):9}" for x in view["tensors"]]
    lines += [f"  {'total':6}{sum(reads.values()):8}{sum(writes.values()):9}",
              "",
              f"loaded now: {' '.join(step.reads) or '-'}",
              f"stored now: {' '.join(step.writes) or '-'}",
              "",
              *NOTES[trace.algorithm],
              "",
              "in SRAM: Q_i, K_j, V_j, S_ij (then",
              f"P_ij), O_i, l_i, m_i: {_sram_floats(t, d)} floats"]
    return "\n".join(lines)


def _figure(traces, dpi):
    fig = Figure(figsize=(13, 4.2 * len(traces)), dpi=dpi)
    rows = [_Row(_layout(fig, n, len(traces), tensors_of(tr), tr.tiling, tr.d), tr, NAMES[tr.algorithm])
            for n, tr in enumerate(traces)]
    fig.legend(handles=LEGEND, loc="upper center", ncols=4, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.text(0.5, 0.96, FOOTNOTE, ha="center", fontsize=8)
    return fig, rows


def _traces(Nq, Nk, d, Br, Bc, causal, seed):
    return [record(a, Nq, Nk, d, Br, Bc, causal=causal, seed=seed) for a in NAMES]


def _show(rows, k):
    """Every row at step k (a row with fewer steps stays on its last)."""
    return {row.trace.algorithm: row.show(min(k, len(row.trace.steps) - 1)) for row in rows}


def on_chip_figure(k=6, Nq=32, Nk=32, d=8, Br=8, Bc=8, causal=False, seed=0):
    """FA1 above FA2, both at step k."""
    fig, rows = _figure(_traces(Nq, Nk, d, Br, Bc, causal, seed), dpi=100)
    fig.flashnumba_data = _show(rows, k)
    return fig


def on_chip_animation(Nq=32, Nk=32, d=8, Br=8, Bc=8, causal=False, seed=0, dpi=75):
    """The same picture for every step k: an Animation (save it as a GIF with PillowWriter).

    The views drawn are collected in ``animation.flashnumba_data["frames"]`` as frames are drawn.
    """
    fig, rows = _figure(_traces(Nq, Nk, d, Br, Bc, causal, seed), dpi=dpi)
    n_frames = max(len(row.trace.steps) for row in rows)
    data = {"n_frames": n_frames, "frames": {}}

    def draw(k):
        data["frames"][k] = _show(rows, k)
        return []

    animation = FuncAnimation(fig, draw, frames=n_frames, init_func=list, blit=False,
                              repeat=False, cache_frame_data=False)
    fig.flashnumba_data = animation.flashnumba_data = data
    return animation
