"""The m16n8k16 fragment layout: which lane holds which element of A, B and C, and how S_ij's
accumulators become P_ij's A fragments.

``mma.sync.m16n8k16`` spreads its operands over the 32 lanes of a warp. Each
lane (lane = 4 g + t) holds 8 elements of A (16 x 16, in 4 registers of two
16-bit halves), 4 of B (16 x 8, 2 registers) and 4 of C (16 x 8, 4 fp32
registers). The layout is read from ``kernels.mma`` (``a_elements``,
``b_elements``, ``c_elements``: the same functions the simulator's stand-in
rebuilds the matrices with), not drawn by hand.

The last panel is FA2's trick on the tensor cores: the accumulators of two
n-tiles of S_ij (keys 0-7 and 8-15) are, lane for lane, the A fragment of
P_ij for the next product P_ij V_j: the lane that holds S[r, c] as an
accumulator is the lane that must hold P[r, c] as an operand, so P_ij is
packed to 16 bits in registers and never goes through shared memory.
``handoff_lanes()`` checks that for every element; the figure draws it.

    mma_fragments_figure()   the four panels; fig.flashnumba_data holds the lane maps
"""

import numpy as np
from matplotlib.patches import Patch

from flashnumba.kernels.mma import a_elements, b_elements, c_elements
from flashnumba.viz import style

WARP_SIZE = 32


def lane_map(elements, shape):
    """(lane, register) of every element of a matrix of `shape`, from a layout function."""
    lane_of = np.full(shape, -1)
    register_of = np.full(shape, -1)
    for lane in range(WARP_SIZE):
        for reg, place in enumerate(elements(lane)):
            for r, c in (place if isinstance(place[0], tuple) else (place,)):
                assert lane_of[r, c] == -1, f"element ({r}, {c}) held twice"
                lane_of[r, c], register_of[r, c] = lane, reg
    assert (lane_of >= 0).all(), "an element no lane holds"
    return lane_of, register_of


def handoff_lanes():
    """For the 16 x 16 tile S_ij (two n-tiles of 8 keys): (lane holding S[r, c] as accumulator,
    lane holding P[r, c] in P's A fragment, A register it goes to). The first two are equal."""
    c_lane, _ = lane_map(c_elements, (16, 8))
    a_lane, a_reg = lane_map(a_elements, (16, 16))
    s_lane = np.concatenate([c_lane, c_lane], axis=1)        # n-tile 0: keys 0-7, 1: keys 8-15
    return s_lane, a_lane, a_reg


def _panel(ax, lanes, registers, title, labels):
    n_rows, n_cols = lanes.shape
    style.matrix_axes(ax, n_rows, n_cols, row_ticks=range(0, n_rows, 8), col_ticks=range(0, n_cols, 8))
    for r in range(n_rows):
        for c in range(n_cols):
            face = style.colour(int(registers[r, c]))
            style.box(ax, r, r + 1, c, c + 1, face=face, edge="white", lw=0.4)
            ax.text(c + 0.5, r + 0.5, str(lanes[r, c]), ha="center", va="center", fontsize=5,
                    color=style.text_colour(face))
    ax.set_title(title, fontsize=8, pad=14)
    handles = [Patch(facecolor=style.colour(k)) for k in range(len(labels))]
    ax.legend(handles=handles, labels=labels, fontsize=6, loc="upper center",
              bbox_to_anchor=(0.5, -0.01), ncol=2, frameon=False, handlelength=1)


def mma_fragments_figure():
    """A, B, C of one m16n8k16 (number = lane, colour = register) and S's accumulators as P's A."""
    fig = style.new_figure(13, 5.4)
    axes = fig.subplots(1, 4, width_ratios=[16, 8, 8, 16])
    a_lane, a_reg = lane_map(a_elements, (16, 16))
    b_lane, b_reg = lane_map(b_elements, (16, 8))
    c_lane, c_reg = lane_map(c_elements, (16, 8))
    _panel(axes[0], a_lane, a_reg, "A (16 x 16): Q_i or P_ij", ["a0", "a1", "a2", "a3"])
    _panel(axes[1], b_lane, b_reg, "B (16 x 8): K_j^T or V_j", ["b0", "b1"])
    _panel(axes[2], c_lane, c_reg, "C, D (16 x 8), fp32", ["c0", "c1", "c2", "c3"])
    s_lane, p_lane, p_reg = handoff_lanes()
    _panel(axes[3], s_lane, p_reg, "S_ij accumulators (2 n-tiles) = P_ij's A",
           ["a0 = S0 c0,c1", "a1 = S0 c2,c3", "a2 = S1 c0,c1", "a3 = S1 c2,c3"])
    fig.suptitle("mma.sync.m16n8k16: number = lane (4g + t), colour = register.\nThe lane holding "
                 "S_ij[r, c] as an accumulator holds P_ij[r, c] as an operand.", fontsize=9)
    fig.flashnumba_data = {"A": (a_lane, a_reg), "B": (b_lane, b_reg), "C": (c_lane, c_reg),
                           "handoff": (s_lane, p_lane, p_reg)}
    return fig
