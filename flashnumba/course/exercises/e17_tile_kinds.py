"""Lesson 9: classify every tile of S under the causal mask, for both alignments of the diagonal."""

import numpy as np

from flashnumba.course.grading import Mismatch, call, grade
from flashnumba.geometry import Tiling

ID = "tile_kinds"
LESSON = 9
TITLE = "full, partial and skipped tiles"
SPEC = ("tile_kinds(Nq, Nk, Br, Bc, offset) -> (Tr, Tc) array of 'full' / 'partial' / 'skipped': "
        "key c visible to query r when c <= r + offset; skipped = no entry visible, full = every "
        "entry visible (last tiles may be short)")
NAME = "tile_kinds"


def stub(Nq, Nk, Br, Bc, offset):
    raise NotImplementedError("FILL ME IN: for each tile compare its first key column with its last "
                              "row's diagonal (skipped) and its last key column with its first "
                              "row's diagonal (full)")


def solution(Nq, Nk, Br, Bc, offset):
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)                # ceil(Nq / Br), ceil(Nk / Bc)
    kinds = np.empty((Tr, Tc), dtype=object)
    for i in range(Tr):
        first_row, last_row = i * Br, min((i + 1) * Br, Nq) - 1
        for j in range(Tc):
            first_col, last_col = j * Bc, min((j + 1) * Bc, Nk) - 1
            if first_col > last_row + offset:          # even the last row sees none of K_j
                kinds[i, j] = "skipped"
            elif last_col <= first_row + offset:       # even the first row sees all of K_j
                kinds[i, j] = "full"
            else:
                kinds[i, j] = "partial"
    return kinds


def perturbed(Nq, Nk, Br, Bc, offset):
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    kinds = np.empty((Tr, Tc), dtype=object)
    for i in range(Tr):
        first_row, last_row = i * Br, (i + 1) * Br - 1      # forgets that the last Q tile is short
        for j in range(Tc):
            first_col, last_col = j * Bc, (j + 1) * Bc - 1  # and the last K/V tile
            if first_col > last_row + offset:
                kinds[i, j] = "skipped"
            elif last_col <= first_row + offset:
                kinds[i, j] = "full"
            else:
                kinds[i, j] = "partial"
    return kinds


# (Nq, Nk, Br, Bc, alignment): square, Nq < Nk (a KV cache), Nq > Nk (rows that see no key),
# tiles that do not divide N
CASES = ((16, 16, 4, 4, "bottom-right"), (10, 23, 4, 5, "bottom-right"), (10, 23, 4, 5, "top-left"),
         (23, 10, 4, 3, "bottom-right"), (23, 10, 4, 3, "top-left"), (13, 13, 8, 8, "bottom-right"),
         (7, 30, 3, 4, "bottom-right"), (30, 7, 8, 4, "bottom-right"))


def check(implementation):
    def run():
        for Nq, Nk, Br, Bc, alignment in CASES:
            t = Tiling(Nq, Nk, Br, Bc, causal=True, alignment=alignment)
            case = f"Nq={Nq}, Nk={Nk}, Br={Br}, Bc={Bc}, {alignment} (offset={t.offset})"
            got = call(implementation, Nq, Nk, Br, Bc, t.offset)
            got = np.asarray(got, dtype=object)
            if got.shape != (t.Tr, t.Tc):
                raise Mismatch(f"{case}: your array has shape {got.shape}, expected (Tr, Tc) = "
                               f"{(t.Tr, t.Tc)}")
            for i in range(t.Tr):
                for j in range(t.Tc):
                    want = t.kind(i, j)
                    if got[i, j] != want:
                        rows, cols = t.rows(i), t.cols(j)
                        raise Mismatch(f"{case}: tile (i={i}, j={j}) is {got[i, j]!r}, expected {want!r} "
                                       f"(rows {rows.start}..{rows.stop - 1}, key columns "
                                       f"{cols.start}..{cols.stop - 1}; visible when c <= r + {t.offset})",
                                       i=i, j=j, variable="kind")
        return f"every tile's kind matches flashnumba.geometry on {len(CASES)} tilings, both alignments"
    return grade(ID, run)
