# %% [markdown]
# # Lesson 1: set-up and the float64 oracle
#
# **Goal** (30 minutes, laptop): write attention of one head in NumPy, the way the
# papers define it, and check it against `flashnumba.reference`, the float64 oracle that
# every mirror and kernel of this course is graded against. Then add the causal mask and the
# log-sum-exp `L`, the one number per row that FlashAttention keeps instead of the whole
# probability matrix.
#
# **How this course works.** Each lesson is a notebook. Exercise cells hold a function whose
# body says `FILL ME IN`; write it, run the cell, then run the grading cell below it:
# `course.check(id, function)` runs your function on small problems and prints `PASS`, or
# `FAIL` with the first place your answer differs (the case, the variable, the entry, what was
# expected and what came). Nothing in lessons 1-5 needs a GPU. From a terminal the same
# grader reads a file: `flashnumba course check attention --file my_attention.py`.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import flashnumba
from flashnumba import course, reference

print("flashnumba runs its kernels on:", flashnumba.device())
print("exercises of this lesson:", course.exercises(lesson=1))

# %% [markdown]
# ## Attention, in the papers' names
#
# For one head with queries `Q` (`Nq x d`), keys `K` and values `V` (`Nk x d`):
#
#     S = Q K^T / sqrt(d)             (Nq x Nk)  the scores
#     P = softmax(S), row by row      (Nq x Nk)  each row sums to 1
#     O = P V                         (Nq x d)   the output
#
# The oracle computes exactly this in float64, with the whole `Nq x Nk` matrix in memory. Its
# layout is flash-attn's, `(batch, seqlen, heads, headdim)`; `reference.single_head` takes the
# 2-D arrays of one head and returns `O` and the log-sum-exp `L` of each row.

# %%
rng = np.random.default_rng(0)
Nq, Nk, d = 12, 20, 8
Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
O_ref, L_ref = reference.single_head(Q, K, V)
print("O:", O_ref.shape, " L:", L_ref.shape)

S = Q @ K.T / np.sqrt(d)
P = np.exp(S - L_ref[:, None])          # softmax(S) = exp(S - L): L normalises each row
print("rows of P sum to 1:", np.allclose(P.sum(axis=1), 1.0))

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
for ax, X, title in zip(axes, (S, P), ("S = Q K^T / sqrt(d)", "P = softmax(S) = exp(S - L)")):
    im = ax.imshow(X, cmap="viridis")
    ax.set(title=title, xlabel="key c", ylabel="query r")
    fig.colorbar(im, ax=ax, shrink=0.8)
plt.show()

# %% [markdown]
# ## Softmax without overflow
#
# `exp(S)` overflows float32 once a score passes about 88 (float64: about 709). Softmax does not
# change if every score of a row is shifted by the same number, so subtract the row's maximum
# `m` first: the largest term becomes `exp(0) = 1`, nothing overflows. Every FlashAttention kernel
# keeps this `m` per row; lesson 3 shows how it is updated when the row arrives a tile at a time.

# %%
x = np.array([1000.0, 999.0, 990.0])
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(x) / np.exp(x).sum()
shifted = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
print("naive:  ", naive)
print("shifted:", shifted)

# %% [markdown]
# ## Exercise 1: attention of one head
#
# Write `attention(Q, K, V)` returning `O`. The grader tries shapes with `Nq != Nk`, an odd `d`,
# and inputs scaled by 30 so that a softmax without the max subtracted overflows.

# %% [exercise] attention

# %% [markdown]
# ## The causal mask and its two alignments
#
# A decoder's query `r` may only attend to keys `c <= r + offset`. With as many queries as keys
# the offset is 0. When they differ (a prompt of `Nk` tokens, the last `Nq` of them being
# queried), flash-attn aligns the diagonal **bottom-right**: `offset = Nk - Nq`, so the last
# query sees every key. PyTorch's `is_causal` aligns it **top-left** (`offset = 0`). With
# `Nq > Nk` and bottom-right alignment the first `Nq - Nk` rows see no key at all: their output
# is defined as `O = 0` and their log-sum-exp as `L = -inf` (never NaN).
#
# The figure is drawn from the FA2 mirror's trace: which tiles of `S` it computed in full, which
# it masked in part and which it skipped.

# %%
from flashnumba.viz.causal import causal_skipping_figure

causal_skipping_figure()

# %% [markdown]
# ## Exercise 2: causal attention and its log-sum-exp
#
# Write `causal_attention(Q, K, V)` returning `(O, L)` with the bottom-right causal mask, where
# `L[r] = log(sum_c exp(S[r, c]))` over the visible keys, computed as `m + log(l)` with
# `m = rowmax(S)` and `l = rowsum(exp(S - m))`. A row with no visible key: `O = 0`, `L = -inf`.
# `np.where(cond, S, -np.inf)` masks; watch out for `-inf - (-inf) = NaN`.

# %% [exercise] causal_lse

# %% [markdown]
# ## What the oracle costs
#
# The oracle holds `S` and `P`, two `Nq x Nk` matrices. For a 16k-token sequence that is
# 2 x 16384^2 float64 numbers, 4 GiB per head. Lesson 2 counts what standard attention moves
# through GPU memory because of them; lessons 3 and 4 remove them.

# %%
for N in (1024, 16384, 131072):
    print(f"N = {N:>6}: S and P in float64 take {2 * N * N * 8 / 2**30:10.3f} GiB per head")
