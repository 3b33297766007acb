# %% [markdown]
# # Lesson 5: IO complexity
#
# **Goal** (45 minutes, laptop): count what FlashAttention-1 and -2 move between HBM and the
# chip as a function of the on-chip memory `M`, write the counts as formulas, and find where
# they cross standard attention's. Two surprises come out of the counts: with a small `M`, FA1
# moves *more* than standard attention, and FA2's choice `Br = min(Bc, d)` makes its traffic stop
# falling once `M` passes `4 d^2`.
#
# Every number here comes from a mirror's `HBM` counter (lesson 2), run at the `M` given: the
# mirrors pick their tiles by the paper's rule `Bc = ceil(M / 4d)`, `Br = min(Bc, d)`
# (`flashnumba.geometry.default_block_sizes`).

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from flashnumba import course, mirror
from flashnumba.geometry import default_block_sizes
from flashnumba.hbm import HBM

print("exercises of this lesson:", course.exercises(lesson=5))


def traffic(forward, N, d, M=None):
    """Elements read + written by one forward run of `forward` (a mirror) with Nq = Nk = N."""
    hbm = HBM()
    X = np.ones((N, d))
    if M is None:
        forward(X, X, X, hbm=hbm)
    else:
        forward(X, X, X, M=M, hbm=hbm)
    return hbm

# %% [markdown]
# ## Where the on-chip memory goes
#
# With `M` floats of SRAM, FA1 holds a `Bc x d` tile of `K` and one of `V`, a `Br x d` tile of `Q`
# and of `O`, and the `Br x Bc` scores: about `4 Bc d` floats when `Br <= Bc`, hence
# `Bc = ceil(M / 4d)`. The paper caps `Br` at `d` so that `S_ij` (`Br x Bc`) never outgrows the
# `K_j` tile (`Bc x d`). So the tiles grow with `M` like this:

# %%
d = 8
print(f"d = {d}:   M    Bc   Br")
for M in (16, 64, 128, 256, 512, 1024, 4096):
    Br, Bc = default_block_sizes(M, d)
    print(f"      {M:>6} {Bc:>4} {Br:>4}" + ("   <- Br stopped at d" if Br < Bc else ""))

# %% [markdown]
# ## FA1: one pass over the rows per K/V tile
#
# FA1's outer loop walks the `Tc = ceil(Nk / Bc)` tiles `K_j, V_j`; for each one it reads every
# row's `Q_i, O_i, l_i, m_i` from HBM and writes `O_i, l_i, m_i` back (lesson 4). `K` and `V` are
# read once in all. So each extra K/V tile costs a whole pass over `Q` and `O`, about `3 Nq d`
# elements; a small `M` means a narrow `Bc`, many tiles, many passes.
#
# The counter, tensor by tensor, at two sizes of `M`:

# %%
N = 64
for M in (64, 1024):
    hbm = traffic(mirror.fa1_forward, N, d, M)
    Br, Bc = default_block_sizes(M, d)
    print(f"M = {M:>5} (Bc = {Bc:>3}, Tc = {-(-N // Bc):>2}): reads {dict(hbm.reads)}\n"
          f"{'':>31}writes {dict(hbm.writes)}   total {hbm.total}")
print("standard attention (no M):", traffic(mirror.standard_forward, N, d).total)

# %% [markdown]
# ## Exercise 1: FA1's traffic as a formula
#
# Write `fa1_io(Nq, Nk, d, M)` returning `(elements read, elements written)` of FA1's forward,
# arithmetic only. The grader compares it with the mirror's counter on five problems, `Nq != Nk`,
# a partial last tile and an `M` so large that one tile holds all the keys among them.

# %% [exercise] fa1_io

# %% [markdown]
# ## Why FA1 at small M moves more than standard attention
#
# Standard attention moves `4 N^2 + 4 N d` elements whatever `M` is (lesson 2, with `Nq = Nk = N`).
# FA1 moves `2 N d + Tc (3 N d + 4 N)`. With `Tc ~ N / Bc ~ 4 N d / M`, FA1's traffic is about
# `12 N^2 d^2 / M`, the paper's `Theta(N^2 d^2 / M)`, which is below `4 N^2` only when `M` is above
# about `3 d^2`: each pass over the rows rewrites all of `O` (`N d` elements), so a pass is
# worth it only when it covers a tile of at least about `3d / 4` keys. Below that, FA1 re-reads
# and re-writes `O` more often than standard attention reads and writes `S` and `P`.
#
# Measured, for every `M`:

# %%
N, d = 64, 8
Ms = np.unique(np.geomspace(16, 4 * d * N, 24).astype(int))
measured = {name: [traffic(f, N, d, M).total for M in Ms]
            for name, f in (("FA1", mirror.fa1_forward), ("FA2", mirror.fa2_forward))}
standard = traffic(mirror.standard_forward, N, d).total
first_below = next(M for M, t in zip(Ms, measured["FA1"]) if t <= standard)

fig, ax = plt.subplots(figsize=(8, 3.6), layout="constrained")
ax.plot(Ms, measured["FA1"], "o-", ms=3, label="FA1 (mirror's counter)")
ax.plot(Ms, measured["FA2"], "^-", ms=3, label="FA2 (mirror's counter)")
ax.axhline(standard, color="grey", ls="--", label=f"standard attention: {standard}")
ax.axvline(4 * d * d, color="grey", ls=":", lw=1)
ax.text(4 * d * d * 0.95, standard * 3, "M = 4 d^2:\nBr reaches d", fontsize=8, color="dimgrey",
        ha="right")
ax.axvline(first_below, color="C0", ls=":", lw=1)
ax.text(first_below * 1.05, standard * 0.35, f"first M sampled here with\nFA1 <= standard: {first_below}",
        fontsize=8, color="C0")
ax.set(xscale="log", yscale="log", xlabel="on-chip memory M (floats)",
       ylabel="HBM elements read + written", title=f"one forward pass, N = {N}, d = {d}")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Exercise 2: the crossover
#
# Write `fa1_crossover(N, d)`: the smallest `M` (an integer number of floats) at which FA1's
# reads + writes, with `Nq = Nk = N`, are at most standard attention's; `None` when no `M` is
# (for tiny problems even a single pass moves more). A search over `M` with your `fa1_io` works;
# the closed form is shorter: `FA1 <= standard` is a bound on `Tc`, which is a bound on `Bc`, which
# is a bound on `M`. The grader checks with the mirrors that FA1 is at or below standard attention
# at your `M` and above it at `M - 1`.

# %% [exercise] fa1_crossover

# %% [markdown]
# ## FA2: Br = min(Bc, d) changes the count
#
# FA2 swaps the loops: each Q tile is a thread block that keeps `O_i, l_i, m_i` on chip and
# streams every `K_j, V_j` past it. `O` and `L` are written once; `Q` is read once; `K` and `V`
# are read once **per Q tile**, `Tr = ceil(Nq / Br)` times. So FA2's traffic is set by `Br`, not by
# `Bc`, and `Br = min(Bc, d)` stops growing at `d`: past `M = 4 d^2` a larger SRAM makes wider
# K/V tiles but the same number of Q tiles, and FA2's count stays flat at about `2 N^2 + 2 N d`
# (the plateau in the figure above). FA1's count, set by `Bc`, keeps falling, and at large `M`
# it is below FA2's. What FA2 buys is elsewhere: its Q tiles are independent thread blocks that
# run in parallel and write `O` once, where FA1's passes over `O` form a serial chain. And its
# kernels need not follow the rule: `flashnumba/kernels/fa2_forward.py` defaults to `Br = 64` for
# head dims up to 32, fewer Q tiles and so fewer re-reads of `K` and `V` than `Br = d` would give.
#
# The paper's bounds drawn over the mirrors' counts, against `M` and against `N`
# (`flashnumba.viz.io`, at small sizes):

# %%
from flashnumba.viz.io import io_figure

io_figure(d=8, N_fixed=64, Ms=(32, 64, 128, 256, 512), M_fixed=512, Ns=(16, 32, 64, 128))

# %% [markdown]
# ## Exercise 3: FA2's traffic as a formula
#
# Write `fa2_io(Nq, Nk, d, M)` returning `(elements read, elements written)` of FA2's forward.
# One of the grader's problems has `M > 4 d^2`, where `Br` and `Bc` part ways.

# %% [exercise] fa2_io

# %% [markdown]
# ## Try it
#
# With your formulas, where does FA2 cross standard attention at `N = 64, d = 8`? How does the
# answer move with `d`? (FA2 always moves `Nq d + Tr 2 Nk d` reads: the crossover is a bound on
# `Tr`.) Check your answer against `traffic(mirror.fa2_forward, N, d, M)`.

# %%
N, d = 64, 8
# BEGIN SOLUTION
fa2_first = next(M for M in range(1, 4 * d * N) if sum(fa2_io(N, N, d, M)) <= 4 * N * N + 4 * N * d)
print("FA2 at or below standard attention from M =", fa2_first,
      "; the mirror there:", traffic(mirror.fa2_forward, N, d, fa2_first).total,
      "<=", traffic(mirror.standard_forward, N, d).total)
# END SOLUTION
# STUDENT: fa2_first = ...
