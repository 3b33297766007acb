"""Lesson 12: one tile of the dropout keep-mask, built from the Philox4x32-10 counter-based generator."""

import inspect

import numpy as np

from flashnumba import philox
from flashnumba.course.grading import Mismatch, call, grade

ID = "keep_tile"
LESSON = 12
TITLE = "a tile of the keep-mask from Philox"
SPEC = ("keep_tile(seed, p, b, h, rows, cols) -> bool array (len(rows), len(cols)): key = (seed low "
        "word, high word), counter = (c // 4, r, h, b), x = word c % 4 of philox4x32, keep = x 2^-32 >= p")
NAME = "keep_tile"


def stub(seed, p, b, h, rows, cols):
    raise NotImplementedError("FILL ME IN: for each (r, c): x0..x3 = philox.philox4x32(c // 4, r, h, b, "
                              "k0, k1) as np.uint64, x = word c % 4, keep = x * 2**-32 >= p")


def solution(seed, p, b, h, rows, cols):
    from flashnumba import philox
    k0, k1 = philox.philox_key(seed)                       # (seed mod 2^32, seed // 2^32)
    keep = np.zeros((len(rows), len(cols)), dtype=bool)
    for a, r in enumerate(rows):
        for e, c in enumerate(cols):
            words = philox.philox4x32(np.uint64(c // 4), np.uint64(r), np.uint64(h), np.uint64(b), k0, k1)
            x = words[c % 4]                               # one Philox call serves 4 columns
            keep[a, e] = float(x) * 2.0 ** -32 >= p        # u = x 2^-32 in [0, 1); kept with probability 1 - p
    return keep


def perturbed(seed, p, b, h, rows, cols):
    from flashnumba import philox
    k0, k1 = philox.philox_key(seed)
    keep = np.zeros((len(rows), len(cols)), dtype=bool)
    for a, r in enumerate(rows):
        for e, c in enumerate(cols):
            words = philox.philox4x32(np.uint64(c // 4), np.uint64(r), np.uint64(b), np.uint64(h), k0, k1)
            keep[a, e] = float(words[c % 4]) * 2.0 ** -32 >= p     # head and batch swapped in the counter
    return keep


# (seed, p, b, h, rows, cols): tiles of a (B=2, H=3, Nq=10, Nk=13) mask; a seed above 2^32 uses
# the key's high word; cols starting off a multiple of 4; the last, short tile
B, H, NQ, NK = 2, 3, 10, 13
CASES = ((0, 0.1, 0, 0, range(4), range(8)), (7, 0.5, 1, 2, range(4, 8), range(4, 12)),
         (2 ** 40 + 3, 0.3, 1, 0, range(8, 10), range(8, 13)), (12345, 0.2, 0, 2, range(3, 7), range(5, 11)))
SHORTCUTS = ("keep_mask", "philox.keep(", "dropout_word", "uniforms(")


def check(implementation):
    def run():
        for seed, p, b, h, rows, cols in CASES:
            case = f"seed={seed}, p={p}, batch b={b}, head h={h}, rows {rows.start}..{rows.stop - 1}, " \
                   f"cols {cols.start}..{cols.stop - 1}"
            want = philox.keep_mask(seed, p, B, H, NQ, NK)[b, h][rows.start:rows.stop, cols.start:cols.stop]
            got = call(implementation, seed, p, b, h, rows, cols)
            got = np.asarray(got)
            if got.shape != want.shape:
                raise Mismatch(f"{case}: your tile has shape {got.shape}, expected {want.shape}")
            wrong = np.argwhere(got.astype(bool) != want)
            if len(wrong):
                a, e = (int(x) for x in wrong[0])
                r, c = rows[a], cols[e]
                raise Mismatch(f"{case}: keep[{r}, {c}] = {bool(got[a, e])}, expected {bool(want[a, e])} "
                               f"({len(wrong)} of {want.size} entries differ; word {c % 4} of counter "
                               f"({c // 4}, {r}, {h}, {b}))", i=r, j=c, variable="keep")
        try:
            source = inspect.getsource(implementation)
        except (OSError, TypeError):
            source = ""
        code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
        used = [name for name in SHORTCUTS if name in code]
        if used:
            raise Mismatch(f"the tile matches, but you called {used[0]}: build it from "
                           f"philox.philox4x32 and philox.philox_key, as a kernel would")
        return f"every entry matches philox.keep_mask on {len(CASES)} tiles"
    return grade(ID, run)
