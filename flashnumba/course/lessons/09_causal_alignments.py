# %% [markdown]
# # Lesson 9: the causal mask's two alignments, and the tiles it lets us skip
#
# **Goal** (45 minutes, laptop): know exactly which keys a query sees under a causal mask when
# `Nq != Nk`, for both conventions in use (top-left, PyTorch's `is_causal`; bottom-right,
# flash-attn's since 2.1 and flashnumba's default); classify every tile `S_ij` as **full**
# (nothing masked), **partial** (the diagonal crosses it) or **skipped** (everything masked: never
# loaded, never computed); and write the causal FA2 forward that skips, including the rows that see
# no key at all, whose log-sum-exp is `L = -inf`.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from flashnumba import course, mirror, reference
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT, Tiling, causal_offset

print("exercises of this lesson:", course.exercises(lesson=9))

# %% [markdown]
# ## One rule, two offsets
#
# Every causal mask in flashnumba is the same rule with an offset: key `c` is visible to query `r`
# when
#
#     c <= r + offset,     offset = Nk - Nq   (bottom-right)   or   offset = 0   (top-left)
#
# With `Nq = Nk` the two agree. They differ when the queries are a suffix of a longer sequence
# (decoding with a KV cache: `Nq < Nk`, the last query must see every key, so the diagonal ends in
# the bottom-right corner) and when there are more queries than keys (`Nq > Nk`: bottom-right
# leaves the first `Nq - Nk` rows with **no visible key**). `reference.causal_mask` draws both:

# %%
Nq, Nk = 4, 7
for alignment in (TOP_LEFT, BOTTOM_RIGHT):
    print(f"{alignment}, offset = {causal_offset(Nq, Nk, alignment)}:")
    print(reference.causal_mask(Nq, Nk, alignment).astype(int))
print(f"bottom-right with Nq = 7 > Nk = 4 (offset = {causal_offset(7, 4)}):")
print(reference.causal_mask(7, 4, BOTTOM_RIGHT).astype(int))

# %% [markdown]
# A row with no visible key has no softmax: all its scores are `-inf`. The convention (the
# reference's, flash-attn's, every flashnumba kernel's) is `O_r = 0` and `L_r = -inf`, never NaN,
# and such a row also gets no gradient. The oracle shows it:

# %%
rng = np.random.default_rng(0)
d = 4
Q, K, V = rng.standard_normal((7, d)), rng.standard_normal((4, d)), rng.standard_normal((4, d))
O_ref, L_ref = reference.single_head(Q, K, V, causal=True)
print("L =", np.round(L_ref, 3))
print("O rows 0-2 =", O_ref[:3].tolist())

# %% [markdown]
# ## Full, partial, skipped
#
# Cut `S` into `Br x Bc` tiles. For tile `(i, j)` only four numbers matter: its first and last
# query rows, its first and last key columns (the last tiles may be short). The tile is
#
#     skipped   when first_col > last_row + offset    (even its last row sees none of K_j)
#     full      when last_col <= first_row + offset   (even its first row sees all of K_j)
#     partial   otherwise                              (computed, then masked entry by entry)
#
# `flashnumba.geometry` is the one place that says this; the mirrors, the kernels (compiled as
# device functions) and the figures all call it. The figure runs the FA2 forward mirror and colours
# each tile by what the mirror actually did: a tile with no step record was skipped.

# %%
from flashnumba.viz.causal import causal_skipping_figure

causal_skipping_figure(Br=4, Bc=4, cases=((12, 12, "Nq = Nk"), (8, 16, "Nq < Nk"), (16, 8, "Nq > Nk")))

# %% [markdown]
# ## Exercise 1: classify the tiles
#
# Write `tile_kinds(Nq, Nk, Br, Bc, offset)`, returning a `Tr x Tc` array (dtype `object` is fine)
# of the strings `"full"`, `"partial"`, `"skipped"`. The grader compares every tile with
# `flashnumba.geometry` on square and rectangular problems, both offsets, tiles that do not divide
# `N`, and names the first tile you got wrong with its rows and columns.

# %% [exercise] tile_kinds

# %% [markdown]
# ## How much work does skipping save?
#
# With `Nq = Nk = N` and square tiles, about half of the `Tr x Tc` tiles are skipped once `N` is
# many tiles long: `Tr (Tr - 1) / 2` of `Tr^2`, and the `Tr` diagonal tiles are partial. A
# decoding step (`Nq` small, `Nk` long, bottom-right) skips almost nothing: its few queries are at
# the end and see every key. The counts come from `Tiling.count`:

# %%
Ns = [16, 32, 64, 128, 256, 512]
fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
for label, shape in (("Nq = Nk = N", lambda N: (N, N)), ("Nq = 16, Nk = N (decoding)", lambda N: (16, N))):
    skipped = []
    for N in Ns:
        t = Tiling(*shape(N), Br=16, Bc=16, causal=True)
        skipped.append(t.count("skipped") / (t.Tr * t.Tc))
    ax.plot(Ns, skipped, marker="o", label=label)
ax.axhline(0.5, color="grey", lw=0.8, ls=":")
ax.set_xscale("log", base=2)
ax.set_xlabel("N (Br = Bc = 16, bottom-right)")
ax.set_ylabel("fraction of tiles skipped")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **Try it:** how many tiles of a `Nq = Nk = 100`, `Br = Bc = 16` causal problem are computed (full
# or partial)? Compare with the formula above (the last tile is short).

# %%
# BEGIN SOLUTION
t = Tiling(100, 100, 16, 16, causal=True)
computed = t.count("full") + t.count("partial")
print(f"Tr = Tc = {t.Tr}: {computed} of {t.Tr * t.Tc} tiles computed; Tr (Tr + 1) / 2 = {t.Tr * (t.Tr + 1) // 2}")
# END SOLUTION
# STUDENT: computed = ...

# %% [markdown]
# ## Exercise 2: the causal FA2 forward, skipping
#
# FA2 gives each Q tile `i` its own thread block, which walks `j = 0, 1, ...` and stops at the first
# skipped tile (every later tile of that row of tiles is skipped too). Write
# `fa2_causal_steps(Q, K, V, Br, Bc, offset)`:
#
#     for i:   O_i = 0, l_i = 0, m_i = -inf                         (on chip)
#         for j while j Bc <= (last row of Q_i) + offset:
#             S_ij  = Q_i K_j^T / sqrt(d), -inf where c > r + offset
#             m_new = max(m_i, rowmax(S_ij));  P~_ij = exp(S_ij - m_new)
#             l_i  <- e^(m_i - m_new) l_i + rowsum(P~_ij);  O_i <- e^(m_i - m_new) O_i + P~_ij V_j
#             m_i  <- m_new;  yield {"i", "j", "O_i", "l_i", "m_i"}     (copies; O_i unnormalised)
#         O_i = O_i / l_i,  L_i = m_i + log(l_i)       (O_i = 0, L_i = -inf where l_i = 0)
#     return O, L
#
# A Q tile whose rows all see no key visits no tile and yields nothing. In a visited tile a row can
# still see no key yet (`m_new = -inf`): guard `exp(x - m_new)` and `exp(m_i - m_new)` against
# `-inf - (-inf)` by using 0 in place of `m_new` there (lesson 3). The grader steps your generator
# next to `mirror.fa2_forward_steps` with both alignments and `Nq > Nk`.

# %% [exercise] fa2_causal

# %% [markdown]
# The mirror on the `Nq > Nk` problem of the figure (`Nq = 16`, `Nk = 8`, bottom-right, so
# `offset = -8`): rows 0-7, Q tiles 0 and 1, see no key, so those blocks visit nothing and write
# `O_i = 0`, `L_i = -inf`; the first step belongs to tile 2, whose row 8 sees key 0 only.

# %%
rng = np.random.default_rng(1)
Q, K, V = rng.standard_normal((16, 4)), rng.standard_normal((8, 4)), rng.standard_normal((8, 4))
records, (O, L) = mirror.run(mirror.fa2_forward_steps(Q, K, V, Br=4, Bc=4, causal=True))
print("visited tiles:", [(s.i, s.j) for s in records])
print(records[0])
print("L =", np.round(L, 3))
