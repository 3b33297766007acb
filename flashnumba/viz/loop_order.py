"""Loop order: the tiles of S in the order FlashAttention-1 and -2 compute them.

FA1 (one thread block per head) loops over K/V tiles j outside and Q tiles i
inside, so one block walks every tile, column after column. FA2 swaps the loops
and gives each Q tile i its own thread block: the blocks share nothing and run
in parallel, each walking its row of tiles left to right.

Both panels are drawn from the mirrors' traces: a tile's number is the step at
which the mirror computed it (within its thread block), its colour the block.
"""

from itertools import pairwise

from flashnumba import registry
from flashnumba.geometry import SKIPPED
from flashnumba.viz import style
from flashnumba.viz.traces import record, within_block_step


def schedule(trace, block_of):
    """What the panel draws, from a trace: tile -> (block, step within block), and the visit order."""
    order = [(s.i, s.j) for s in trace.steps]
    blocks = [block_of(s) for s in trace.steps]
    steps = within_block_step(trace.steps, block_of)
    return {
        "order": order,
        "block": dict(zip(order, blocks)),
        "label": dict(zip(order, steps)),
        "kind": {(s.i, s.j): s.kind for s in trace.steps},
    }


def _draw(ax, tiling, sched, title):
    style.score_axes(ax, tiling, title)
    for i in range(tiling.Tr):
        for j in range(tiling.Tc):
            if (i, j) not in sched["block"]:
                style.tile_box(ax, tiling, i, j, face=style.KIND_COLOURS[SKIPPED], edge="white", lw=1.5)
                continue
            face = style.colour(sched["block"][(i, j)])
            style.tile_box(ax, tiling, i, j, face=face, edge="white", lw=1.5, alpha=0.9)
            x, y = style.tile_centre(tiling, i, j)
            ax.text(x, y, str(sched["label"][(i, j)]), ha="center", va="center",
                    fontsize=11, fontweight="bold", color=style.text_colour(face))
    # A thin path through each block's tiles in the order it visits them.
    by_block = {}
    for tile in sched["order"]:
        by_block.setdefault(sched["block"][tile], []).append(tile)
    for tiles in by_block.values():
        for a, b in pairwise(tiles):
            (xa, ya), (xb, yb) = style.tile_centre(tiling, *a), style.tile_centre(tiling, *b)
            neighbours = abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1
            f = 0.3 if neighbours else 0.12    # stop short of the numbers at both ends
            ax.annotate("", xy=(xb - f * (xb - xa), yb - f * (yb - ya)),
                        xytext=(xa + f * (xb - xa), ya + f * (yb - ya)),
                        arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.8,
                                    "alpha": 0.7 if neighbours else 0.35,
                                    "linestyle": "-" if neighbours else (0, (3, 3))})


def loop_order_figure(Nq=32, Nk=32, d=4, Br=8, Bc=8, causal=False, seed=0):
    """FA1's schedule beside FA2's, from the fa1_forward and fa2_forward mirrors' traces."""
    fa1 = record(registry.FA1.mirror_forward, Nq, Nk, d, Br, Bc, causal=causal, seed=seed)
    fa2 = record(registry.FA2.mirror_forward, Nq, Nk, d, Br, Bc, causal=causal, seed=seed)
    # FA1: one thread block per (batch, head) does every tile. FA2: one block per Q tile i.
    s1 = schedule(fa1, block_of=lambda s: 0)
    s2 = schedule(fa2, block_of=lambda s: s.i)

    fig = style.new_figure(9.5, 5.4)
    ax1, ax2 = fig.subplots(1, 2)
    t = fa1.tiling
    _draw(ax1, t, s1, "FlashAttention-1: one thread block per head, all tiles in sequence\n"
          "outer loop: K/V tile j (columns), inner loop: Q tile i (rows)")
    _draw(ax2, t, s2, f"FlashAttention-2: {t.Tr} thread blocks in parallel, one per Q tile i\n"
          "outer loop: Q tile i (one block each), inner loop: K/V tile j")
    fig.suptitle(f"Order in which tiles S_ij = Q_i K_j^T are computed  "
                 f"(Nq={t.Nq}, Nk={t.Nk}, Br={t.Br}, Bc={t.Bc}, Tr={t.Tr}, Tc={t.Tc})",
                 fontsize=10)
    fig.supxlabel("number = step within its thread block;  arrows = order of the steps\n"
                  "colour = thread block: tiles of one colour are computed one after another, "
                  "blocks of different colours at the same time", fontsize=8)
    fig.flashnumba_data = {"tiling": t, registry.FA1.name: s1, registry.FA2.name: s2}
    return fig
