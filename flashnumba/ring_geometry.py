"""Ring attention's geometry: which positions each rank holds, which K/V block visits whom when,
and what each visit computes. The one place the ring mirror, the torch ring, the figure and the
tests read it from.

A sequence of N positions is split over P ranks (N divisible by P; n = N / P per rank).
Each rank keeps its Q and starts with its own K, V; at every step each rank passes the
K/V block it holds to rank r + 1 and receives one from rank r - 1, so

    at step s (0 .. P-1) rank r holds the K/V block of rank src = (r - s) mod P.

Layouts (where rank r's n positions lie in the sequence)

    contiguous   rank r holds [r n, (r + 1) n)
    zigzag       cut the sequence into 2P chunks of n/2 (N divisible by 2P); rank r holds
                 chunk r followed by chunk 2P-1-r, so every rank has one early and one late
                 chunk and causal work is the same on every rank

What one visit computes (a Piece: local query rows x local key columns, in the rank's
own positions; with causal masking, key c is visible to query r when c <= r, Nq = Nk = N)

    not causal                     all rows x all columns, nothing masked
    contiguous, src < r            all x all, nothing masked (every key is earlier)
    contiguous, src = r            the diagonal block: all x all, causal inside it
    contiguous, src > r            skipped (every key is later)
    zigzag, src = r                all x all, causal inside it (local positions are in order)
    zigzag, src < r                all rows x the first half of the columns (chunk src is
                                   earlier than both of r's chunks; chunk 2P-1-src is later)
    zigzag, src > r                the second half of the rows x all columns (chunk 2P-1-r is
                                   later than both of src's chunks; chunk r earlier than both)

So a contiguous causal ring does rank r's work in r + 1 of its P steps (rank P-1 does P
blocks, rank 0 one: the ring waits for the slowest), while a zigzag rank does a diagonal
block and P - 1 half blocks: the same on every rank.
The diagonal block has Nq = Nk, so both causal alignments (bottom-right and top-left)
give the same mask; the kernels are called with their default.
"""

from dataclasses import dataclass

from flashnumba.geometry import FULL, PARTIAL, SKIPPED

CONTIGUOUS = "contiguous"
ZIGZAG = "zigzag"
LAYOUTS = (CONTIGUOUS, ZIGZAG)


@dataclass(frozen=True)
class Piece:
    """What rank `rank` computes when the K/V block of rank `src` visits it, at ring step `step`."""
    rank: int
    src: int
    step: int
    kind: str                 # FULL (nothing masked), PARTIAL (the diagonal block) or SKIPPED
    rows: tuple[int, int]     # (start, stop) of the local query rows computed; (0, 0) if skipped
    cols: tuple[int, int]     # (start, stop) of the visiting block's key columns; (0, 0) if skipped

    @property
    def causal(self):
        """The kernel masks inside the piece (the diagonal block only)."""
        return self.kind == PARTIAL

    @property
    def visible(self):
        """How many (query, key) pairs the piece attends over (the work it does)."""
        n_rows, n_cols = self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]
        if self.kind == PARTIAL:
            return n_rows * (n_rows + 1) // 2          # Nq = Nk: the lower triangle and the diagonal
        return n_rows * n_cols


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    return layout


def check_split(N, world, layout):
    """N positions can be split over `world` ranks in `layout`; returns n = N / world."""
    check_layout(layout)
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    parts = 2 * world if layout == ZIGZAG else world
    if N < parts or N % parts != 0:
        what = f"2 x world size = {parts} chunks" if layout == ZIGZAG else f"world size {world}"
        raise ValueError(f"sequence length N={N} must be a positive multiple of the {what} "
                         f"(layout={layout!r})")
    return N // world


def positions(rank, world, n, layout):
    """The global positions of rank `rank`'s n local positions, in local order (a list of ints)."""
    check_layout(layout)
    if layout == CONTIGUOUS:
        return list(range(rank * n, (rank + 1) * n))
    half = n // 2                                      # chunk size: N / 2P
    late = 2 * world - 1 - rank
    return list(range(rank * half, (rank + 1) * half)) + list(range(late * half, (late + 1) * half))


def source(rank, step, world):
    """The rank whose K/V block rank `rank` holds at ring step `step`: (rank - step) mod P."""
    return (rank - step) % world


def piece(rank, step, world, n, layout, causal):
    """What rank `rank` computes at ring step `step` (see the module docstring's table)."""
    src = source(rank, step, world)
    everything = {"rows": (0, n), "cols": (0, n)}
    if not causal:
        return Piece(rank, src, step, FULL, **everything)
    if src == rank:
        return Piece(rank, src, step, PARTIAL, **everything)
    if layout == CONTIGUOUS:
        if src < rank:
            return Piece(rank, src, step, FULL, **everything)
        return Piece(rank, src, step, SKIPPED, rows=(0, 0), cols=(0, 0))
    half = n // 2
    if src < rank:
        return Piece(rank, src, step, FULL, rows=(0, n), cols=(0, half))
    return Piece(rank, src, step, FULL, rows=(half, n), cols=(0, n))


def schedule(world, n, layout, causal):
    """pieces[step][rank]: the whole ring's schedule."""
    check_layout(layout)
    return [[piece(rank, step, world, n, layout, causal) for rank in range(world)]
            for step in range(world)]


# ---------------------------------------------------------------- shard and unshard

def _xp(x):
    """numpy, or torch for a torch.Tensor (without importing torch otherwise)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch
        return torch
    import numpy
    return numpy


def shard(x, rank, world, layout=CONTIGUOUS, dim=1):
    """Rank `rank`'s slice of a full tensor x (NumPy or torch) along `dim` (the sequence axis of
    the flash layout (batch, seqlen, nheads, headdim) by default), in its local order. A copy."""
    N = x.shape[dim]
    n = check_split(N, world, layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    index = positions(rank, world, n, layout)
    xp = _xp(x)
    if xp.__name__ == "torch":
        return x.index_select(dim, xp.tensor(index, device=x.device)).contiguous()
    return xp.take(x, index, axis=dim)


def unshard(parts, layout=CONTIGUOUS, dim=1):
    """The full tensor from every rank's slice (parts[r] from rank r): the inverse of shard."""
    parts = list(parts)
    world = len(parts)
    if world < 1:
        raise ValueError("unshard needs at least one part")
    n = parts[0].shape[dim]
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"every part must have one shape, got {[tuple(p.shape) for p in parts]}")
    check_split(n * world, world, layout)
    xp = _xp(parts[0])
    order = [pos for r in range(world) for pos in positions(r, world, n, layout)]
    inverse = [0] * len(order)
    for local, pos in enumerate(order):
        inverse[pos] = local                          # global position pos sits at local index
    if xp.__name__ == "torch":
        joined = xp.cat(parts, dim=dim)
        return joined.index_select(dim, xp.tensor(inverse, device=joined.device))
    return xp.take(xp.concatenate(parts, axis=dim), inverse, axis=dim)
