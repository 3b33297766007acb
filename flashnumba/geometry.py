"""Tile geometry: the one place that says which tiles exist and which are visited.

The score matrix S (Nq x Nk) is cut into Tr x Tc tiles. Q tile i covers query
rows [i*Br, min((i+1)*Br, Nq)); K/V tile j covers key columns
[j*Bc, min((j+1)*Bc, Nk)). The last tile of each axis may be short.

Causal masking: key c is masked for query r when c > r + offset, where

    offset = Nk - Nq   bottom-right alignment (flash-attn >= 2.1, the default here)
    offset = 0         top-left alignment (PyTorch's is_causal)

A tile wholly above the diagonal is *skipped*: never loaded, never computed.

Sliding window (flash-attn's ``window_size=(left, right)``, -1 unbounded):
query r sees key c when

    r + offset - left <= c <= r + offset + right      offset as above (bottom-right: Nk - Nq)

causal is the same with right = 0. Both sides become one band of visible keys,
``r + lo <= c <= r + hi`` (``window_bounds``); an unbounded side gets a bound
that never binds (lo = -Nq, hi = Nk). A tile wholly left of the band or wholly
right of it is skipped, so a Q tile visits K/V tiles
kv_tile_start(i) <= j < kv_tile_end(i), and a K/V tile is visited by Q tiles
q_tile_start(j) <= i < q_tile_end(j): O(N w) work instead of O(N^2).

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


def window_bounds(Nq, Nk, causal=False, window_size=(-1, -1), alignment=BOTTOM_RIGHT):
    """(lo, hi): key c is visible to query r when r + lo <= c <= r + hi.

    window_size (left, right) as flash-attn's, -1 unbounded; causal sets right = 0.
    With neither, (lo, hi) = (-Nq, Nk): every key is visible."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return -Nq, Nk
    offset = causal_offset(Nq, Nk, alignment)
    lo = -Nq if left < 0 else offset - left
    hi = Nk if right < 0 else offset + right
    return max(lo, -Nq), min(hi, Nk)


def is_windowed(causal, window_size):
    """True when some key may be hidden (causal or a bounded window side)."""
    return bool(causal) or window_size[0] >= 0 or window_size[1] >= 0


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


def kv_tile_start(i, Br, Bc, Nk, lo):
    """Under a window, Q tile i visits K/V tiles j >= kv_tile_start (Tc if none left of Nk).

    The first row of the tile sees keys from (first row + lo); tiles wholly left
    of that column are skipped."""
    Tc = (Nk + Bc - 1) // Bc
    first_visible_col = i * Br + lo
    if first_visible_col < 0:
        return 0
    if first_visible_col >= Nk:
        return Tc
    return first_visible_col // Bc


def q_tile_end(j, Br, Bc, Nq, Nk, lo):
    """Under a window, K/V tile j is visited by Q tiles i < q_tile_end (0 if none).

    The last key of the tile, c, is seen by rows up to c - lo."""
    Tr = (Nq + Br - 1) // Br
    last_row = min((j + 1) * Bc, Nk) - 1 - lo
    if last_row < 0:
        return 0
    return min(last_row // Br + 1, Tr)


def q_tile_start(j, Br, Bc, Nq, offset):
    """Under causal masking, K/V tile j is visited by Q tiles i >= q_tile_start (Tr if none).

    The first row that sees key j*Bc is j*Bc - offset.
    """
    Tr = (Nq + Br - 1) // Br
    first_row = max(j * Bc - offset, 0)
    if first_row >= Nq:
        return Tr
    return first_row // Br


def tile_kind(i, j, Br, Bc, Nq, Nk, causal, offset, lo=None):
    """SKIPPED, PARTIAL or FULL for tile (i, j); offset is the band's upper bound hi (the causal
    diagonal), lo its lower bound (None: unbounded)."""
    if not causal:
        return FULL
    first_row, last_row = i * Br, row_end(i, Br, Nq) - 1
    first_col, last_col = j * Bc, col_end(j, Bc, Nk) - 1
    if first_col > last_row + offset:
        return SKIPPED
    if lo is not None and last_col < first_row + lo:
        return SKIPPED
    if last_col <= first_row + offset and (lo is None or first_col >= last_row + lo):
        return FULL
    return PARTIAL


class Tiling:
    """The tiles of one attention problem, for code that wants them by name."""

    def __init__(self, Nq, Nk, Br, Bc, causal=False, alignment=BOTTOM_RIGHT, window_size=(-1, -1)):
        for name, value in (("Nq", Nq), ("Nk", Nk), ("Br", Br), ("Bc", Bc)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.Nq, self.Nk, self.Br, self.Bc = int(Nq), int(Nk), int(Br), int(Bc)
        self.window_size = (int(window_size[0]), int(window_size[1]))
        self.windowed = self.window_size != (-1, -1)
        self.causal = bool(causal) or self.windowed    # some key may be hidden: tiles can be skipped
        self.alignment = alignment
        if self.windowed:
            self.lo, self.offset = window_bounds(self.Nq, self.Nk, causal, self.window_size, alignment)
        else:
            self.lo, self.offset = None, causal_offset(self.Nq, self.Nk, alignment)
        self.Tr = num_tiles(self.Nq, self.Br)
        self.Tc = num_tiles(self.Nk, self.Bc)

    def rows(self, i):
        """Slice of query rows in Q tile i."""
        return slice(i * self.Br, row_end(i, self.Br, self.Nq))

    def cols(self, j):
        """Slice of key columns in K/V tile j."""
        return slice(j * self.Bc, col_end(j, self.Bc, self.Nk))

    def kind(self, i, j):
        return tile_kind(i, j, self.Br, self.Bc, self.Nq, self.Nk, self.causal, self.offset, self.lo)

    def kv_range(self, i):
        """The K/V tiles j that Q tile i visits, in order."""
        if not self.causal:
            return range(self.Tc)
        end = kv_tile_end(i, self.Br, self.Bc, self.Nq, self.Nk, self.offset)
        if self.lo is None:
            return range(end)
        return range(min(kv_tile_start(i, self.Br, self.Bc, self.Nk, self.lo), end), end)

    def q_range(self, j):
        """The Q tiles i that visit K/V tile j, in order."""
        if not self.causal:
            return range(self.Tr)
        start = q_tile_start(j, self.Br, self.Bc, self.Nq, self.offset)
        if self.lo is None:
            return range(start, self.Tr)
        return range(start, max(start, q_tile_end(j, self.Br, self.Bc, self.Nq, self.Nk, self.lo)))

    def mask(self, i, j):
        """Boolean (rows, cols) array: True where key is visible to query in tile (i, j)."""
        import numpy as np
        r = np.arange(self.rows(i).start, self.rows(i).stop)[:, None]
        c = np.arange(self.cols(j).start, self.cols(j).stop)[None, :]
        if not self.causal:
            return np.ones((r.shape[0], c.shape[1]), dtype=bool)
        if self.lo is None:
            return c <= r + self.offset
        return (c <= r + self.offset) & (c >= r + self.lo)

    def count(self, kind):
        """How many tiles are of this kind (SKIPPED, PARTIAL or FULL)."""
        return sum(self.kind(i, j) == kind for i in range(self.Tr) for j in range(self.Tc))

    def __repr__(self):
        return (f"Tiling(Nq={self.Nq}, Nk={self.Nk}, Br={self.Br}, Bc={self.Bc}, "
                f"causal={self.causal}, alignment={self.alignment!r}, window_size={self.window_size}, "
                f"Tr={self.Tr}, Tc={self.Tc})")
