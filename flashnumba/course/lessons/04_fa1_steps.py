# %% [markdown]
# # Lesson 4: FlashAttention-1, Algorithm 1, as a step generator
#
# **Goal** (60 minutes, laptop): write FlashAttention-1's forward pass (Dao et al. 2022,
# Algorithm 1) in NumPy, tile by tile, as a generator that yields its state after every inner
# step, and have it graded step by step against `flashnumba.mirror.fa1_forward_steps`: the grader
# names the first step, tile `(i, j)` and variable where yours differs. Then add the causal mask
# and skip the tiles it hides.

# %%
# %matplotlib inline
import numpy as np

from flashnumba import course, mirror, reference
from flashnumba.geometry import Tiling

print("exercises of this lesson:", course.exercises(lesson=4))

# %% [markdown]
# ## Algorithm 1
#
# `S` is cut into tiles `S_ij` of `Br x Bc`: `Tr = ceil(Nq / Br)` query tiles `Q_i` and
# `Tc = ceil(Nk / Bc)` key/value tiles `K_j, V_j`. FA1 keeps `O`, `l`, `m` in HBM and updates the
# rows of `Q_i` each time a new `K_j` arrives: lesson 3's online softmax, with the output
# rescaled by the same factors.
#
#     O = 0 (Nq x d), l = 0 (Nq), m = -inf (Nq)                          in HBM
#     for j in 0 .. Tc-1:                       load K_j, V_j
#         for i in 0 .. Tr-1:                   load Q_i, O_i, l_i, m_i
#             S_ij  = Q_i K_j^T / sqrt(d)
#             m~_ij = rowmax(S_ij),  P~_ij = exp(S_ij - m~_ij),  l~_ij = rowsum(P~_ij)
#             m_new = max(m_i, m~_ij)
#             l_new = e^(m_i - m_new) l_i + e^(m~_ij - m_new) l~_ij
#             O_i  <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j)
#             l_i <- l_new,  m_i <- m_new                                 write O_i, l_i, m_i
#
# `O_i` is kept normalised after every step, so it has to be multiplied back by `l_i` before the
# new tile is added: that is the `diag(l_i)` in the update.
#
# The mirror is a generator too: `mirror.nth(steps, k)` runs it to step `k` and shows the record.

# %%
rng = np.random.default_rng(0)
Nq, Nk, d, Br, Bc = 16, 16, 4, 8, 8
Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
print(mirror.nth(mirror.fa1_forward_steps(Q, K, V, Br=Br, Bc=Bc), 2))

# %% [markdown]
# The order the tiles are visited in, drawn from the FA1 and FA2 mirrors' traces
# (`flashnumba.viz.loop_order`): FA1's single thread block walks `j` outside and `i` inside; FA2
# (lesson 8) gives each `Q_i` its own block.

# %%
from flashnumba.viz.loop_order import loop_order_figure

loop_order_figure()

# %% [markdown]
# What is on chip at one step, and the HBM traffic so far (`flashnumba.viz.on_chip`), again from
# the traces:

# %%
from flashnumba.viz.on_chip import on_chip_figure

on_chip_figure(k=5)

# %% [markdown]
# ## Exercise 1: Algorithm 1 as a step generator
#
# Write `fa1_forward_steps(Q, K, V, Br, Bc)`. After each inner step `(i, j)` yield
# `{"i": i, "j": j, "O": O.copy(), "l": l.copy(), "m": m.copy()}` (the whole HBM arrays, copied:
# a generator that yields the arrays themselves shows only their final values), and end with
# `return O, l, m`. Use the scale `1 / sqrt(d)`; the last tile of each dimension may be smaller
# than `Br` or `Bc` (slicing past the end is fine in NumPy). The grader runs `Nq != Nk` with
# partial tiles, and makes one late score large so the running max grows at the last tile.

# %% [exercise] fa1_steps

# %% [markdown]
# At the end, `m + log(l)` is the log-sum-exp of every row and `O` is the oracle's. Run your
# generator to the end with `mirror.run` (as here the mirror's) and check yours the same way:

# %%
records, (O, l, m) = mirror.run(mirror.fa1_forward_steps(Q, K, V, Br=Br, Bc=Bc))
O_ref, L_ref = reference.single_head(Q, K, V)
print("steps:", len(records), " max |O - O_ref| =", np.abs(O - O_ref).max(),
      " max |m + log l - L| =", np.abs(m + np.log(l) - L_ref).max())

# %% [markdown]
# ## The causal mask: skip what it hides
#
# With the bottom-right causal mask (lesson 1) key `c` is visible to query `r` when
# `c <= r + offset`, `offset = Nk - Nq`. A tile whose first key column lies right of the last row's
# diagonal, `j Bc > (last row of Q_i) + offset`, is all `-inf`: it contributes nothing, and FA1
# skips it (no step, no HBM traffic). A tile the diagonal crosses is computed with `S_ij` masked;
# the others need no mask. `Tiling` names the three kinds; the figure shows them for three shapes
# and both alignments:

# %%
t = Tiling(Nq=12, Nk=7, Br=4, Bc=3, causal=True)
for kind in ("full", "partial", "skipped"):
    print(f"{kind:>8}: {t.count(kind)} tiles")
print("Q tiles that visit K/V tile j:", {j: list(t.q_range(j)) for j in range(t.Tc)})

# %%
from flashnumba.viz.causal import causal_skipping_figure

causal_skipping_figure()

# %% [markdown]
# ## Exercise 2: the causal FA1, tiles skipped
#
# Write `fa1_causal_steps(Q, K, V, Br, Bc)`: exercise 1 with the bottom-right mask, yielding only
# for the tiles it visits (the grader compares your loop order with the mirror's and stops at the
# first tile you visit that it skips). With `Nq > Nk` some rows see no key in a visited tile, or
# in any: they must keep `O = 0, l = 0, m = -inf` with no NaN, so guard every
# `exp(x - m)` where `m` can be `-inf` (lesson 3) and every division by `l`.

# %% [exercise] fa1_causal
