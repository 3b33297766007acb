# %% [markdown]
# # Lesson 3: online softmax and merging log-sum-exps
#
# **Goal** (45 minutes, laptop): compute a softmax row without ever holding the whole row, by
# keeping a running maximum `m` and a running sum `l` and rescaling the sum whenever the maximum
# grows; then merge two partial attention results by their log-sum-exps, rows that saw no key
# included. This is the whole trick of FlashAttention (it never writes `S` or `P`), and the same
# merge is what split-KV decoding and ring attention do one level up.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from flashnumba import course, reference
from flashnumba.merge import merge

print("exercises of this lesson:", course.exercises(lesson=3))

# %% [markdown]
# ## A row, one tile at a time
#
# Split row `r` of `S` into column tiles `S_j` of `Bc` scores. After tiles `0..j` keep
#
#     m   = max of every score seen                      (the running max)
#     l   = sum of exp(score - m) over every score seen  (the running sum)
#
# When tile `j` arrives, the maximum can only grow: `m_new = max(m, rowmax(S_j))`. The old sum was
# taken relative to the old `m`, so it is rescaled by `exp(m - m_new)` (1 when the maximum stays
# put, below 1 when it grows) before the new tile's terms are added:
#
#     l_new = exp(m - m_new) l + rowsum(exp(S_j - m_new))
#
# At the end `m + log(l)` is the row's log-sum-exp `L`, exactly. Start from `m = -inf`,
# `l = 0`; a row whose scores are all `-inf` so far (every key masked) must stay at `m = -inf`,
# `l = 0`, which needs care: `exp(-inf - (-inf))` is NaN.

# %%
rng = np.random.default_rng(1)
row = 2.0 * rng.standard_normal(24)
row[14] = 6.0                       # a late, large score: the running max jumps
Bc = 6
m, l = -np.inf, 0.0
print(" j   rowmax(S_j)   m_new   exp(m - m_new)      l")
for j in range(len(row) // Bc):
    S_j = row[j * Bc:(j + 1) * Bc]
    m_new = max(m, S_j.max())
    rescale = np.exp(m - m_new)
    l = rescale * l + np.exp(S_j - m_new).sum()
    m = m_new
    print(f"{j:>2} {S_j.max():>12.3f} {m:>8.3f} {rescale:>14.3f} {l:>8.3f}")
print("m + log l =", m + np.log(l), "  log sum exp(row) =", np.log(np.exp(row).sum()))

# %% [markdown]
# The same quantities inside the FA2 mirror, for the rows of one query tile whose running maximum
# changes most often, read from the mirror's trace step by step (`flashnumba.viz.online_softmax`):
# the rescale factor drops below 1 exactly when a tile brings a larger score, and `m + log l`
# lands on the oracle's log-sum-exp after the last tile.

# %%
from flashnumba.viz.online_softmax import online_softmax_figure

online_softmax_figure()

# %% [markdown]
# ## Exercise 1: the online softmax as a step generator
#
# Write `online_softmax_steps(S, Bc)`, a generator over a whole block of rows `S` (`Nq x Nk`):
# after column tile `j` (the last one may be narrower than `Bc`) it yields
# `{"i": 0, "j": j, "m": m, "l": l}` with copies of the running `m` and `l` (one entry per row),
# and at the end `return m, l`. The grader steps your generator next to the float64 answer and
# names the first tile and the first row where `m` or `l` differs. Its `S` has a row that is all
# `-inf` and a row that is `-inf` until the last tile.

# %% [exercise] online_softmax

# %% [markdown]
# ## Merging two partial results
#
# Split the keys into two disjoint sets `a` and `b`, and attend over each: part `p` gives its
# normalised output `O_p` and its log-sum-exp `L_p`. Since `exp(L_p)` is part `p`'s share of
# the softmax denominator,
#
#     L = log(exp(L_a) + exp(L_b))                 (computed from m = max(L_a, L_b))
#     O = exp(L_a - L) O_a + exp(L_b - L) O_b
#
# A part that saw no key has `L_p = -inf`: weight 0, and its `O_p` (possibly NaN: 0 / 0) is
# ignored. A row that neither part saw has `O = 0`, `L = -inf`. `flashnumba.merge.merge` does
# this for any number of parts; here it rebuilds attention over all keys from two halves:

# %%
Nq, Nk, d = 6, 10, 4
Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
O_ref, L_ref = reference.single_head(Q, K, V)
scale = 1.0 / np.sqrt(d)                       # the halves keep the whole problem's scale
O_a, L_a = reference.single_head(Q, K[:4], V[:4], softmax_scale=scale)
O_b, L_b = reference.single_head(Q, K[4:], V[4:], softmax_scale=scale)
O, L = merge((O_a, O_b), (L_a, L_b))
print("merged O equals the whole:", np.allclose(O, O_ref, rtol=1e-12, atol=1e-12))
print("merged L equals the whole:", np.allclose(L, L_ref, rtol=1e-12, atol=1e-12))

fig, ax = plt.subplots(figsize=(6, 2.8), layout="constrained")
w_a = np.exp(L_a - L)
ax.bar(range(Nq), w_a, label="exp(L_a - L): keys 0-3")
ax.bar(range(Nq), 1 - w_a, bottom=w_a, label="exp(L_b - L): keys 4-9")
ax.set(xlabel="query row", ylabel="weight of each part", title="each row's two weights sum to 1")
ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.show()

# %% [markdown]
# ## Exercise 2: merge two parts, empty ones included
#
# Write `merge_two(O_a, L_a, O_b, L_b)` returning `(O, L)` for arrays of shape `(Nq, d)` and
# `(Nq,)`, without calling `flashnumba.merge`. The grader builds the parts from a causal problem
# with `Nq > Nk`, so some rows have `L_a = -inf` and some have both parts empty (their `O_p` is
# NaN); it compares your merge with the oracle's attention over all keys.

# %% [exercise] merge

# %% [markdown]
# ## Where this goes
#
# FlashAttention-1 (lesson 4) runs exercise 1 on tiles of `S = Q_i K_j^T` it computes on chip and
# never stores: besides `m_i` and `l_i` it keeps the output `O_i`, rescaled by the same factor
# `exp(m_i - m_new)`. Exercise 2 is one step of that update with whole blocks of keys as the
# parts: split-KV decoding merges the blocks of a long KV cache this way, and ring attention
# merges the K/V slices that pass each GPU.
