"""A packed (varlen) batch: each sequence's own tiles on the diagonal of the packed score matrix.

flash_attn_varlen_func packs sequences of different lengths along one axis
(cu_seqlens). Sequence b's queries attend only to its own keys, so of the
packed total_q x total_k score matrix only the diagonal blocks exist, each cut
into its own tiles (a tile never straddles two sequences). The figure draws
every sequence's tiles from the FA2 forward mirror's trace of that sequence
(causal, bottom-right), placed at its cu_seqlens offsets, and counts the tiles
computed against a batch padded to the longest sequence.
"""

from matplotlib.patches import Patch

from flashnumba import registry
from flashnumba.geometry import FULL, PARTIAL, SKIPPED
from flashnumba.viz import style
from flashnumba.viz.causal import tile_kinds
from flashnumba.viz.traces import record

LENGTHS = ((5, 5), (26, 26), (1, 1), (13, 20))        # (Nq, Nk) of each sequence; one of length 1


def varlen_figure(lengths=LENGTHS, Br=8, Bc=8, d=4, seed=0):
    """The packed score matrix: each sequence's tiles, by kind, at its cu_seqlens offsets."""
    total_q = sum(n for n, _ in lengths)
    total_k = sum(n for _, n in lengths)
    fig = style.new_figure(7.5, 7.0)
    ax = fig.subplots()
    style.matrix_axes(ax, total_q, total_k, "packed query rows (cu_seqlens_q)", "packed keys (cu_seqlens_k)")
    panels, r0, c0 = [], 0, 0
    for b, (Nq, Nk) in enumerate(lengths):
        trace = record(registry.FA2.mirror_forward, Nq, Nk, d, Br, Bc, causal=True, seed=seed + b)
        panel = tile_kinds(trace)
        t = panel["tiling"]
        for (i, j), kind in panel["kind"].items():
            rows, cols = t.rows(i), t.cols(j)
            style.box(ax, r0 + rows.start, r0 + rows.stop, c0 + cols.start, c0 + cols.stop,
                      face=style.KIND_COLOURS[kind], edge="white", lw=1.0)
        style.box(ax, r0, r0 + Nq, c0, c0 + Nk, edge=style.colour(b), lw=2.0)
        ax.text(c0 + Nk + 0.5, r0 + Nq / 2, f"seq {b}\n{Nq} x {Nk}", fontsize=7, va="center",
                color=style.colour(b))
        panel.update(Nq=Nq, Nk=Nk, row0=r0, col0=c0)
        panels.append(panel)
        r0, c0 = r0 + Nq, c0 + Nk
    computed = sum(p["counts"][FULL] + p["counts"][PARTIAL] for p in panels)
    longest_q = max(n for n, _ in lengths)
    longest_k = max(n for _, n in lengths)
    padded = len(lengths) * (-(-longest_q // Br)) * (-(-longest_k // Bc))
    handles = [Patch(facecolor=style.KIND_COLOURS[k], edgecolor="grey", label=style.KIND_LABELS[k])
               for k in (FULL, PARTIAL, SKIPPED)]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(f"A varlen batch: {len(lengths)} sequences packed, causal, Br = {Br}, Bc = {Bc}\n"
                 f"{computed} tiles computed; padded to the longest, the kernel would visit up to {padded}",
                 fontsize=10)
    fig.flashnumba_data = {"panels": panels, "computed": computed, "padded_tiles": padded}
    return fig
