# %% [markdown]
# # Lesson 10: the backward pass in NumPy, P recomputed from L
#
# **Goal** (60 minutes, laptop): derive attention's gradients `dQ, dK, dV` from `dO`, see why the
# softmax's gradient needs only one number per row, `D_i = rowsum(dO_i * O_i)`, and why
# FlashAttention never stores `P`: it recomputes each tile from the log-sum-exp `L` the forward
# kept. Then write FlashAttention-2's backward (Dao 2023, Algorithm 2) tile by tile and have it
# graded step by step against `flashnumba.mirror.fa2_backward_steps`.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from flashnumba import course, mirror, reference

print("exercises of this lesson:", course.exercises(lesson=10))

# %% [markdown]
# ## The chain rule through attention
#
# Forward, one head: `S = scale Q K^T`, `P = softmax(S)` row by row, `O = P V`. Given `dO = dLoss/dO`:
#
#     dV = P^T dO                       (O = P V is linear in V)
#     dP = dO V^T                       (and in P)
#     dS = P * (dP - D),   D_r = sum_c P_rc dP_rc        (the softmax's Jacobian, row by row)
#     dQ = scale dS K,     dK = scale dS^T Q
#
# The softmax step: for one row `p = softmax(s)`, `dp_c/ds_k = p_c (delta_ck - p_k)`, so
# `ds_k = p_k (dp_k - sum_c p_c dp_c)`. The sum is one number per row, `D_r`. And since
# `dP = dO V^T` and `O = P V`,
#
#     D_r = sum_c P_rc (dO_r . V_c) = dO_r . (sum_c P_rc V_c) = dO_r . O_r
#
# so `D = rowsum(dO * O)` needs only `dO` and `O`: `O(N d)` work, no `P`. Checked on numbers:

# %%
rng = np.random.default_rng(0)
Nq, Nk, d = 6, 9, 4
Q, K, V, dO = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk, Nq))
scale = 1 / np.sqrt(d)
S = scale * Q @ K.T
P = np.exp(S - S.max(axis=1, keepdims=True))
P /= P.sum(axis=1, keepdims=True)
O = P @ V
dP = dO @ V.T
print("rowsum(P * dP)  =", np.round((P * dP).sum(axis=1), 6))
print("rowsum(dO * O)  =", np.round((dO * O).sum(axis=1), 6))

# %% [markdown]
# ## Recomputing P from L
#
# Standard attention's backward reads `P` (`Nq x Nk`) back from HBM. FlashAttention never wrote it:
# the forward kept only `L_r = log sum_c exp(S_rc)`, one float per row, and
#
#     P_rc = exp(S_rc - L_r)
#
# is each probability exactly, already normalised: no running max, no sum, tile by tile. A row with
# `L_r = -inf` (no visible key, lesson 9) gets `P_r = 0`: use 0 in place of `L_r` in the
# exponent where it is `-inf`, and set the masked entries to 0. The picture: `P`, `dP` and `dS` of a
# causal problem, `P` recomputed from the reference's `L`:

# %%
O_ref, L_ref = reference.single_head(Q, K, V, causal=True)
visible = reference.causal_mask(Nq, Nk)
P_again = np.where(visible, np.exp(np.where(visible, S, 0.0) - L_ref[:, None]), 0.0)
dS = P_again * (dO @ V.T - (dO * O_ref).sum(axis=1)[:, None])
fig, axes = plt.subplots(1, 3, figsize=(10, 2.8), layout="constrained")
for ax, (name, X) in zip(axes, (("P = exp(S - L)", P_again), ("dP = dO V^T", dO @ V.T),
                                ("dS = P * (dP - D)", dS))):
    lim = np.abs(X).max()
    im = ax.imshow(X, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("key c")
    ax.set_ylabel("query r")
    fig.colorbar(im, ax=ax, shrink=0.8)
plt.show()
S_masked = np.where(visible, S, -np.inf)
P_softmax = np.exp(S_masked - S_masked.max(axis=1, keepdims=True))
P_softmax /= P_softmax.sum(axis=1, keepdims=True)
print("max |exp(S - L) - softmax(S)| =", np.abs(P_again - P_softmax).max())

# %% [markdown]
# `dS` is 0 wherever `P` is: a masked key gets no gradient, and neither does anything a row with
# no visible key touched. dP is dense (it does not know about the mask); the product with `P` masks it.
#
# ## Exercise 1: the backward maths
#
# Write `attention_backward(dO, Q, K, V, O, L, causal)` returning `(dQ, dK, dV)`, with the scale
# `1 / sqrt(d)` and the bottom-right mask when `causal` (key `c` visible to query `r` when
# `c <= r + Nk - Nq`). Recompute `P` from `L` (do not redo the softmax), and take `D` from `dO`
# and `O`. The grader compares with `reference.single_head_backward` in float64 on problems with
# `Nq != Nk`, causal and not, and rows whose `L` is `-inf` (their gradients are 0, never NaN).

# %% [exercise] backward_dense

# %% [markdown]
# ## Algorithm 2: the backward, tiled
#
# FA2's backward makes `K/V` tiles the outer loop, one thread block each, because then `dK_j` and
# `dV_j`, sums over every query, stay on chip until the block ends and are written once. The price
# is `dQ_i`: a sum over every key, added to by every block (lesson 11 does this with atomics).
#
#     D = rowsum(dO * O)                                            (a pass of its own)
#     dQ = 0                                                        in HBM
#     for j in 0 .. Tc-1:                                           one thread block each
#         load K_j, V_j;   dK_j = 0, dV_j = 0                       on chip
#         for i in 0 .. Tr-1:
#             load Q_i, dO_i, dQ_i, L_i, D_i
#             S_ij = scale Q_i K_j^T,   P_ij = exp(S_ij - L_i)
#             dV_j  <- dV_j + P_ij^T dO_i
#             dP_ij = dO_i V_j^T,       dS_ij = P_ij * (dP_ij - D_i)
#             dQ_i  <- dQ_i + scale dS_ij K_j                      (written back to HBM)
#             dK_j  <- dK_j + scale dS_ij^T Q_i
#         write dK_j, dV_j
#
# Who computes what, drawn from the mirror's trace: each block (colour) walks down its column of
# tiles; dK and dV tiles have one writer each, dQ tiles have one per block.

# %%
from flashnumba.viz.warps import backward_blocks_figure

backward_blocks_figure(Nq=16, Nk=16, d=4, Br=4, Bc=4, causal=False)

# %% [markdown]
# One step of the mirror: what it loads, what it writes, and its state.

# %%
O2, L2 = mirror.fa2_forward(Q, K, V, Br=4, Bc=4)
print(mirror.nth(mirror.fa2_backward_steps(dO, Q, K, V, O2, L2, Br=4, Bc=4), 1))

# %% [markdown]
# ## Exercise 2: Algorithm 2 as a step generator
#
# Write `fa2_backward_steps(dO, Q, K, V, O, L, Br, Bc)` (no mask): compute `D` first; then for each
# `j` (outer) and `i` (inner) update as above and yield
# `{"i": i, "j": j, "dK_j": dK_j.copy(), "dV_j": dV_j.copy(), "dQ": dQ.copy()}` (`dQ` the whole
# `Nq x d` array); end with `return dQ, dK, dV`. The last tiles may be short. The grader steps your
# generator next to the mirror and names the first step, tile and variable that differ.

# %% [exercise] fa2_backward_steps

# %% [markdown]
# **Try it:** how many times is each element of `dQ` written to HBM by Algorithm 2, and how many
# times each element of `dK`? (Count the mirror's `dQ` traffic: `hbm_writes` of its
# last step, divided by the number of elements of `dQ`.)

# %%
# BEGIN SOLUTION
records, _ = mirror.run(mirror.fa2_backward_steps(dO[:6], Q[:6], K[:8], V[:8],
                                                  *mirror.fa2_forward(Q[:6], K[:8], V[:8], Br=2, Bc=2),
                                                  Br=2, Bc=2))
last = records[-1]
print(f"each element of dQ written {last.hbm_writes['dQ'] / (6 * d):.0f} times (Tc = {8 // 2} K/V tiles), "
      f"each element of dK {last.hbm_writes['dK'] / (8 * d):.0f} time")
# END SOLUTION
# STUDENT: dQ_writes_per_element = ...
