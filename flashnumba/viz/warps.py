"""Inside one thread block: which warp computes what, and what the warps must exchange.

FlashAttention-1 splits K_j and V_j across the warps of a block ("split-K"):
warp w takes the columns [w*Bc/num_warps, (w+1)*Bc/num_warps) of S_ij = Q_i K_j^T for all Br
rows. Each warp then has only part of every row, so the row max, the row sum
and the product P_ij V_j are partial: the warps write them to shared memory,
synchronise, and add them up.

FlashAttention-2 splits Q_i instead ("split-Q"): warp w owns the rows
[w*Br/num_warps, (w+1)*Br/num_warps) of S_ij, across all Bc columns, and the same rows of O_i.
A row never leaves its warp: its max and sum are reduced across the warp's
lanes with shuffles, and nothing goes through shared memory.

The assignment is computed by warp_rows / warp_cols from (num_warps, Br, Bc),
never drawn by hand. The second figure is FA2's backward across blocks: one
block per K/V tile j owns dK_j and dV_j, while many blocks add into each dQ_i;
it is drawn from the fa2_backward mirror's trace.
"""

import numpy as np

from flashnumba import registry
from flashnumba.geometry import SKIPPED
from flashnumba.viz import style
from flashnumba.viz.traces import record, tile_of, within_block_step

SPLIT_K = "split-K"   # FlashAttention-1: warps split the columns of S_ij (keys of K_j, V_j)
SPLIT_Q = "split-Q"   # FlashAttention-2: warps split the rows of S_ij (queries of Q_i)


def warp_rows(w, num_warps, Br):
    """Split-Q: rows of S_ij (and of Q_i, O_i) owned by warp w: [w*Br/num_warps, (w+1)*Br/num_warps)."""
    return range(w * Br // num_warps, (w + 1) * Br // num_warps)


def warp_cols(w, num_warps, Bc):
    """Split-K: columns of S_ij (rows of K_j, V_j) owned by warp w: [w*Bc/num_warps, (w+1)*Bc/num_warps)."""
    return range(w * Bc // num_warps, (w + 1) * Bc // num_warps)


def owner(scheme, num_warps, Br, Bc):
    """(Br, Bc) int array: which warp computes each entry of S_ij."""
    owners = np.empty((Br, Bc), dtype=int)
    for w in range(num_warps):
        if scheme == SPLIT_Q:
            owners[warp_rows(w, num_warps, Br).start:warp_rows(w, num_warps, Br).stop, :] = w
        elif scheme == SPLIT_K:
            owners[:, warp_cols(w, num_warps, Bc).start:warp_cols(w, num_warps, Bc).stop] = w
        else:
            raise ValueError(f"scheme={scheme!r}: expected {SPLIT_Q!r} or {SPLIT_K!r}")
    return owners


def exchange(scheme, num_warps, Br, d):
    """Floats each warp-group writes to shared memory per inner step to combine partial results.

    Split-K: every warp holds a partial row max and row sum for all Br rows, and
    a partial Br x d product P_ij[:, cols_w] V_j[cols_w, :]; all of it must be
    written to shared memory and combined. Split-Q: nothing.
    """
    if scheme == SPLIT_Q:
        return {}
    return {"partial row max m": num_warps * Br,
            "partial row sum l": num_warps * Br,
            "partial O_i = P_ij V_j": num_warps * Br * d}


def _matrix(ax, title, n_rows, n_cols, row_label=None, col_label=None):
    style.matrix_axes(ax, n_rows, n_cols, row_label=row_label, col_label=col_label)
    ax.set_title(title, fontsize=9)


def _shared(ax, r0, r1, c0, c1, label):
    """A block every warp reads or adds into: grey, with a label."""
    style.box(ax, r0, r1, c0, c1, face="#d9d9d9", edge="black", lw=0.8)
    ax.text((c0 + c1) / 2, (r0 + r1) / 2, label, ha="center", va="center", fontsize=7.5)


def _draw_scheme(axes, scheme, num_warps, Br, Bc, d):
    ax_Q, ax_S, ax_V, ax_O, ax_text = axes
    owners = owner(scheme, num_warps, Br, Bc)
    _matrix(ax_Q, "Q_i\n(Br x d)", Br, d, row_label="query row")
    _matrix(ax_S, "S_ij = Q_i K_j^T, P_ij\n(Br x Bc)", Br, Bc, col_label="key column")
    _matrix(ax_V, "K_j, V_j\n(Bc x d each)", Bc, d, row_label="key row")
    _matrix(ax_O, "O_i\n(Br x d)", Br, d)
    for w in range(num_warps):
        rows, cols = warp_rows(w, num_warps, Br), warp_cols(w, num_warps, Bc)
        mask = owners == w
        r_idx, c_idx = np.nonzero(mask)
        style.box(ax_S, r_idx.min(), r_idx.max() + 1, c_idx.min(), c_idx.max() + 1,
                  face=style.colour(w), edge="white", lw=1.5)
        ax_S.text((c_idx.min() + c_idx.max() + 1) / 2, (r_idx.min() + r_idx.max() + 1) / 2,
                  f"warp {w}", ha="center", va="center", fontsize=8, color="white", fontweight="bold",
                  rotation=90 if scheme == SPLIT_K else 0)
        if scheme == SPLIT_Q:     # warp w: its rows of Q_i and of O_i
            for ax in (ax_Q, ax_O):
                style.box(ax, rows.start, rows.stop, 0, d, face=style.colour(w), edge="white", lw=1.5)
        else:                     # warp w: its rows of K_j and V_j (its keys)
            style.box(ax_V, cols.start, cols.stop, 0, d, face=style.colour(w), edge="white", lw=1.5)
    if scheme == SPLIT_Q:
        _shared(ax_V, 0, Bc, 0, d, "read by\nall warps")
    else:
        _shared(ax_Q, 0, Br, 0, d, "read by\nall warps")
        _shared(ax_O, 0, Br, 0, d, f"sum of\n{num_warps} partial\nP V, via\nshared\nmemory")

    ax_text.axis("off")
    ex = exchange(scheme, num_warps, Br, d)
    if scheme == SPLIT_K:
        lines = ["FlashAttention-1: split-K",
                 "Each warp sees only its columns of",
                 "every row, so rowmax, rowsum and",
                 "P_ij V_j are partial. Per step, via",
                 "shared memory (+ syncthreads):"]
        lines += [f"  {name}: {n} floats" for name, n in ex.items()]
        lines += [f"  total {sum(ex.values())} floats"]
    else:
        lines = ["FlashAttention-2: split-Q",
                 "Each warp owns whole rows of S_ij,",
                 "so m_i, l_i and O_i of its rows are",
                 "complete in the warp. Row max and",
                 "sum: shuffles between the lanes of",
                 "one warp (shfl_xor).",
                 "Shared-memory exchange: 0 floats"]
    ax_text.text(0, 0.62, lines[0], ha="left", va="bottom", fontsize=10, fontweight="bold",
                 transform=ax_text.transAxes)
    ax_text.text(0, 0.6, "\n".join(lines[1:]), ha="left", va="top", fontsize=9,
                 transform=ax_text.transAxes)
    return {"owner": owners, "exchange": ex}


def warp_partition_figure(num_warps=4, Br=16, Bc=16, d=8):
    """FA1's split-K (top) against FA2's split-Q (bottom) inside one thread block."""
    fig = style.new_figure(10, 6.4)
    axes = fig.subplots(2, 5, width_ratios=[d, Bc, d, d, 2.0 * Bc])
    data = {}
    for row, scheme in enumerate((SPLIT_K, SPLIT_Q)):
        data[scheme] = _draw_scheme(axes[row], scheme, num_warps, Br, Bc, d)
    fig.suptitle(f"One thread block, {num_warps} warps, one step: Q_i ({Br} x {d}), "
                 f"K_j and V_j ({Bc} x {d}).  Colour = the warp that computes or owns it", fontsize=10)
    fig.flashnumba_data = data
    return fig


BACKWARD_NOTE = (
    "Block j keeps dK_j and dV_j in SRAM\n"
    "for its whole column of tiles and\n"
    "stores each once, at its last step:\n"
    "no other block touches them.\n"
    "\n"
    "Every step of every block adds its\n"
    "share into dQ_i in HBM:\n"
    "dQ_i += scale dS_ij K_j.\n"
    "Blocks run at the same time, so on\n"
    "a GPU these adds must be atomic.\n"
    "\n"
    "Stripes in a tile of dQ, dK, dV:\n"
    "the blocks that write into it.\n"
    "Grey tiles of S: skipped (causal).")


def backward_blocks_figure(Nq=32, Nk=32, d=4, Br=8, Bc=8, causal=True, seed=0):
    """FA2 backward across thread blocks, from the fa2_backward mirror's trace.

    Left: the tiles of S, coloured by the thread block (K/V tile j) that visits
    them, numbered by step within that block. Right: which blocks write each
    tile of dK, dV (one each) and add into each tile of dQ (many).
    """
    trace = record(registry.FA2.mirror_backward, Nq, Nk, d, Br, Bc, causal=causal, seed=seed)
    t = trace.tiling
    writers = {}     # (tensor, tile) -> blocks that stored into it, in order
    for s in trace.steps:
        for name in s.writes:
            writers.setdefault(tile_of(s, name), []).append(s.j)
    block_step = within_block_step(trace.steps, lambda s: s.j)

    fig = style.new_figure(11, 5.2)
    ax_S, ax_dQ, ax_dK, ax_dV, ax_text = fig.subplots(1, 5, width_ratios=[Nk, 6, 6, 6, 22])
    style.score_axes(ax_S, t, "FA2 backward: one thread block per K/V tile j\n"
                     "(colour = block, number = its step)")
    for i in range(t.Tr):
        for j in range(t.Tc):
            style.tile_box(ax_S, t, i, j, face=style.KIND_COLOURS[SKIPPED], edge="white", lw=1.5)
    for s, n in zip(trace.steps, block_step):
        style.tile_box(ax_S, t, s.i, s.j, face=style.colour(s.j), edge="white", lw=1.5)
        x, y = style.tile_centre(t, s.i, s.j)
        ax_S.text(x, y, str(n), ha="center", va="center", fontsize=10, fontweight="bold", color="white")

    def column(ax, name, n_rows, n_tiles, rows_of):
        style.matrix_axes(ax, n_rows, 1)
        ax.set_aspect("auto")
        ax.set_title(name, fontsize=9, fontweight="bold")
        for n in range(n_tiles):
            r = rows_of(n)
            blocks = writers.get((name, n), [])
            # one stripe per block that writes this tile, in that block's colour
            distinct = sorted(set(blocks))
            for k, b in enumerate(distinct):
                style.box(ax, r.start, r.stop, k / max(len(distinct), 1), (k + 1) / max(len(distinct), 1),
                          face=style.colour(b), edge="white", lw=0.8)
            style.box(ax, r.start, r.stop, 0, 1, edge="black", lw=0.8)
            ax.text(0.5, (r.start + r.stop) / 2,
                    f"{len(distinct)} block{'s' if len(distinct) != 1 else ''}", ha="center",
                    va="center", fontsize=7, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})

    column(ax_dQ, "dQ", Nq, t.Tr, t.rows)
    column(ax_dK, "dK", Nk, t.Tc, t.cols)
    column(ax_dV, "dV", Nk, t.Tc, t.cols)
    ax_dQ.set_ylabel("tile i", fontsize=8)
    ax_dK.set_ylabel("tile j", fontsize=8)

    ax_text.axis("off")
    ax_text.text(0, 0.5, BACKWARD_NOTE, ha="left", va="center", fontsize=8.5,
                 transform=ax_text.transAxes)
    fig.suptitle(f"FlashAttention-2 backward across thread blocks (Nq={Nq}, Nk={Nk}, Br={Br}, Bc={Bc}"
                 f"{', causal' if causal else ''})", fontsize=10)
    fig.flashnumba_data = {"writers": writers, "order": [(s.i, s.j) for s in trace.steps],
                           "block_step": block_step, "tiling": t}
    return fig
