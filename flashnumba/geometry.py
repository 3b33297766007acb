"""Tile geometry: the one place that says which tiles exist and which are visited.

The score matrix S (Nq x Nk) is cut into Tr x Tc tiles. Q tile i covers query
rows [i*Br, min((i+1)*Br, Nq)); K/V tile j covers key columns
[j*Bc, min((j+1)*Bc, Nk)). The last tile of each axis may be short.

Causal masking: key c is masked for query r when c > r + offset, where

    offset = Nk - Nq   bottom-right alignment (flash-attn >= 2.1, the default here)
    offset = 0         top-left alignment (PyTorch's is_causal)

A tile wholly above the diagonal is *skipped*: never loaded, never computed.

Every function here uses only integer arithmetic and min/max, so the kernels
compile the same functions as device functions (``flashnumba.kernels.geometry``)
and the mirrors, kernels and figures agree by construction.
"""

import math

BOTTOM_RIGHT = "bottom-right"
TOP_LEFT = "top-left"

SKIPPED = "skipped"   # every entry masked: never loaded or computed
PARTIAL = "partial"   # some entries masked: computed, then masked
FULL = "full"         # no entry masked


def num_tiles(N, B):
    """Tr = ceil(Nq / Br) or Tc = ceil(Nk / Bc)."""
    return (N + B - 1) // B


def default_block_sizes(M, d):
    """FlashAttention's rule for on-chip memory of M floats: Bc = ceil(M / 4d), Br = min(Bc, d)."""
    if M < 1 or d < 1:
        raise ValueError(f"M and d must be >= 1, got M={M}, d={d}")
    Bc = math.ceil(M / (4 * d))
    Br = min(Bc, d)
    return Br, Bc


def causal_offset(Nq, Nk, alignment=BOTTOM_RIGHT):
    """The diagonal's offset: key c is visible to query r when c <= r + offset."""
    if alignment == BOTTOM_RIGHT:
        return Nk - Nq
    if alignment == TOP_LEFT:
        return 0
    raise ValueError(f"alignment={alignment!r}: expected {BOTTOM_RIGHT!r} or {TOP_LEFT!r}")


def row_end(i, Br, Nq):
    """One past the last query row of Q tile i."""
    return min((i + 1) * Br, Nq)


def col_end(j, Bc, Nk):
    """One past the last key column of K/V tile j."""
    return min((j + 1) * Bc, Nk)


def kv_tile_end(i, Br, Bc, Nq, Nk, offset):
    """Under causal masking, Q tile i visits K/V tiles j < kv_tile_end (0 if none).

    The last row of the tile sees keys up to (last row + offset); tiles past
    that column are skipped.
    """
    Tc = (Nk + Bc - 1) // Bc
    last_visible_col = min((i + 1) * Br, Nq) - 1 + offset
    if last_visible_col < 0:
        return 0
    return min(last_visible_col // Bc + 1, Tc)


def q_tile_start(j, Br, Bc, Nq, offset):
    """Under causal masking, K/V tile j is visited by Q tiles i >= q_tile_start (Tr if none).

    The first row that sees key j*Bc is j*Bc - offset.
    """
    Tr = (Nq + Br - 1) // Br
    first_row = max(j * Bc - offset, 0)
    if first_row >= Nq:
        return Tr
    return first_row // Br


def tile_kind(i, j, Br, Bc, Nq, Nk, causal, offset):
    """SKIPPED, PARTIAL or FULL for tile (i, j)."""
    if not causal:
        return FULL
    first_row, last_row = i * Br, row_end(i, Br, Nq) - 1
    first_col, last_col = j * Bc, col_end(j, Bc, Nk) - 1
    if first_col > last_row + offset:
        return SKIPPED
    if last_col <= first_row + offset:
        return FULL
    return PARTIAL


class Tiling:
    """The tiles of one attention problem, for code that wants them by name."""

    def __init__(self, Nq, Nk, Br, Bc, causal=False, alignment=BOTTOM_RIGHT):
        for name, value in (("Nq", Nq), ("Nk", Nk), ("Br", Br), ("Bc", Bc)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.Nq, self.Nk, self.Br, self.Bc = int(Nq), int(Nk), int(Br), int(Bc)
        self.causal = bool(causal)
        self.alignment = alignment
        self.offset = causal_offset(self.Nq, self.Nk, alignment)
        self.Tr = num_tiles(self.Nq, self.Br)
        self.Tc = num_tiles(self.Nk, self.Bc)

    def rows(self, i):
        """Slice of query rows in Q tile i."""
        return slice(i * self.Br, row_end(i, self.Br, self.Nq))

    def cols(self, j):
        """Slice of key columns in K/V tile j."""
        return slice(j * self.Bc, col_end(j, self.Bc, self.Nk))

    def kind(self, i, j):
        return tile_kind(i, j, self.Br, self.Bc, self.Nq, self.Nk, self.causal, self.offset)

    def kv_range(self, i):
        """The K/V tiles j that Q tile i visits, in order."""
        if not self.causal:
            return range(self.Tc)
        return range(kv_tile_end(i, self.Br, self.Bc, self.Nq, self.Nk, self.offset))

    def q_range(self, j):
        """The Q tiles i that visit K/V tile j, in order."""
        if not self.causal:
            return range(self.Tr)
        return range(q_tile_start(j, self.Br, self.Bc, self.Nq, self.offset), self.Tr)

    def mask(self, i, j):
        """Boolean (rows, cols) array: True where key is visible to query in tile (i, j)."""
        import numpy as np
        r = np.arange(self.rows(i).start, self.rows(i).stop)[:, None]
        c = np.arange(self.cols(j).start, self.cols(j).stop)[None, :]
        if not self.causal:
            return np.ones((r.shape[0], c.shape[1]), dtype=bool)
        return c <= r + self.offset

    def count(self, kind):
        """How many tiles are of this kind (SKIPPED, PARTIAL or FULL)."""
        return sum(self.kind(i, j) == kind for i in range(self.Tr) for j in range(self.Tc))

    def __repr__(self):
        return (f"Tiling(Nq={self.Nq}, Nk={self.Nk}, Br={self.Br}, Bc={self.Bc}, "
                f"causal={self.causal}, alignment={self.alignment!r}, Tr={self.Tr}, Tc={self.Tc})")
