"""Lesson 16: what a rank computes when a K/V block visits it, under causal masking and the zigzag layout."""

from flashnumba.course.grading import Mismatch, call, grade
from flashnumba.ring_geometry import ZIGZAG, piece

ID = "zigzag"
LESSON = 16
TITLE = "the causal zigzag schedule"
SPEC = ("zigzag_piece(rank, step, world, n) -> (rows, cols): the (start, stop) local query rows and key "
        "columns rank computes at ring step step (causal, zigzag, n positions per rank); None if skipped")
NAME = "zigzag_piece"


def stub(rank, step, world, n):
    raise NotImplementedError("FILL ME IN: src = (rank - step) % world; compare chunks rank, 2*world-1-rank "
                              "with chunks src, 2*world-1-src to find which rows see which columns")


def solution(rank, step, world, n):
    src = (rank - step) % world                 # the rank whose K/V block is here
    half = n // 2                               # chunk size: each rank holds chunks rank, 2 world - 1 - rank
    if src == rank:
        return (0, n), (0, n)                   # its own block: causal inside it
    if src < rank:
        return (0, n), (0, half)                # chunk src is earlier than both of rank's chunks;
                                                # chunk 2 world - 1 - src later than both
    return (half, n), (0, n)                    # src > rank: only rank's late chunk sees src's block


def perturbed(rank, step, world, n):
    src = (rank - step) % world
    half = n // 2
    if src == rank:
        return (0, n), (0, n)
    if src < rank:
        return (0, n), (half, n)                # the late half of the columns: wrong chunk
    return (half, n), (0, n)


def _want(rank, step, world, n):
    p = piece(rank, step, world, n, ZIGZAG, causal=True)
    return None if p.rows == (0, 0) else (p.rows, p.cols)


def _positions(rank, world, n):
    half = n // 2
    late = 2 * world - 1 - rank
    return f"chunks {rank} and {late} = positions [{rank * half}, {(rank + 1) * half}) and [{late * half}, {(late + 1) * half})"


def check(implementation):
    def run():
        for world, n in ((1, 4), (2, 4), (3, 2), (4, 6), (5, 8)):
            for step in range(world):
                for rank in range(world):
                    want = _want(rank, step, world, n)
                    got = call(implementation, rank, step, world, n)
                    if got is not None:
                        try:
                            got = tuple(tuple(int(x) for x in pair) for pair in got)
                        except (TypeError, ValueError) as e:
                            raise Mismatch(f"world={world}, n={n}, rank {rank}, step {step}: return "
                                           f"((row0, row1), (col0, col1)) or None, got {got!r}") from e
                    if got != want:
                        src = (rank - step) % world
                        raise Mismatch(
                            f"world={world}, n={n}, rank {rank}, step {step} (block of rank {src} "
                            f"visiting): zigzag_piece = {got}, expected {want}; rank {rank} holds "
                            f"{_positions(rank, world, n)}, rank {src} holds {_positions(src, world, n)}",
                            step=step, i=rank, j=src, variable="piece")
        return "every (rank, step) computes the right rows and columns, for 1 to 5 ranks"
    return grade(ID, run)
