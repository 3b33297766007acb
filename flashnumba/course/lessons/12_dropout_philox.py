# %% [markdown]
# # Lesson 12: dropout with Philox, the same mask forward and backward
#
# **Goal** (45 minutes, laptop): apply dropout to attention's probabilities without ever storing the
# `Nq x Nk` mask. A counter-based generator, Philox4x32-10 (Salmon et al. 2011, the one curand and
# flash-attn use), makes each keep bit a pure function of `(seed, batch, head, row, column)`, so a
# thread regenerates exactly the bits of its own tile, in the forward and again in the backward.
# You build a tile of flashnumba's mask from Philox, then put dropout into the online softmax: it
# multiplies `P` before `P V` and leaves the softmax's sum, and `L`, alone.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

import flashnumba
from flashnumba import course, philox, reference, stepping
from flashnumba.geometry import Tiling

print("exercises of this lesson:", course.exercises(lesson=12))

# %% [markdown]
# ## Dropout on P
#
# With probability `p` each entry of `P` is dropped; the kept ones are scaled by `1 / (1 - p)` so
# that the expected output is unchanged:
#
#     Z = keep / (1 - p),    O = (P * Z) V,    E[Z] = 1  so  E[O] = P V
#
# The backward needs the *same* `Z`: `dV = (P * Z)^T dO`, `dP = (dO V^T) * Z`, then
# `dS = P * (dP - D)` as before (lesson 10). Standard attention could keep the mask in HBM (`Nq Nk`
# bits per head, read again in the backward); FlashAttention keeps nothing, so it must be able to
# make the same bits twice.
#
# ## A counter-based generator
#
# Philox maps a 128-bit counter and a 64-bit key to 128 random bits in 10 rounds of multiplies and
# xors; no state is carried from one call to the next, so any thread can ask for any counter. In
# flashnumba (`flashnumba/philox.py`):
#
#     key     = (seed mod 2^32, seed // 2^32)
#     counter = (c // 4, r, h, b)          one call serves 4 consecutive key columns
#     x       = word c % 4 of philox4x32(counter, key)
#     keep    = x 2^-32 >= p               kept with probability 1 - p
#
# The same Python source is compiled as CUDA device functions (`flashnumba/kernels/philox.py`), so
# the kernels and the reference's mask cannot drift apart. One call, by hand:

# %%
k0, k1 = philox.philox_key(42)
words = philox.philox4x32(np.uint64(0), np.uint64(3), np.uint64(0), np.uint64(0), k0, k1)
print("row 3, columns 0-3, seed 42: words", [hex(int(x)) for x in words])
print("u = x 2^-32:", [round(float(x) * 2.0 ** -32, 4) for x in words])
print("keep_mask row 3, columns 0-3, p = 0.6:", philox.keep_mask(42, 0.6, 1, 1, 4, 4)[0, 0, 3])

# %% [markdown]
# The mask of one head, with the tiles a kernel would draw it in: each block regenerates only the
# bits of its own tile. Right: the uniforms `u` are flat, so the fraction kept is close to
# `1 - p`.

# %%
p_drop, Nq, Nk = 0.3, 48, 64
t = Tiling(Nq, Nk, 16, 16)
keep = philox.keep_mask(42, p_drop, 1, 1, Nq, Nk)[0, 0]
u = philox.uniforms(42, 1, 1, 256, 256).ravel()
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained", width_ratios=[1.3, 1])
ax0.imshow(keep, cmap="Greys_r", interpolation="nearest", extent=(0, Nk, Nq, 0))
for i in range(t.Tr):
    for j in range(t.Tc):
        r, c = t.rows(i), t.cols(j)
        ax0.add_patch(plt.Rectangle((c.start, r.start), c.stop - c.start, r.stop - r.start,
                                    fill=False, edgecolor="#f28e2b", lw=1.5))
ax0.set_title(f"keep-mask, seed 42, p = {p_drop} (white = kept), tiles 16 x 16", fontsize=9)
ax0.set_xlabel("key column c")
ax0.set_ylabel("query row r")
ax1.hist(u, bins=32, color="#4e79a7")
ax1.axvline(p_drop, color="black", ls="--", lw=1)
ax1.set_title(f"u = x 2^-32 of 256 x 256 entries; kept (u >= p): {(u >= p_drop).mean():.3f}", fontsize=9)
ax1.set_xlabel("u")
plt.show()

# %% [markdown]
# ## Exercise 1: a tile of the keep-mask
#
# Write `keep_tile(seed, p, b, h, rows, cols)`: the boolean keep bits of the entries
# `(r, c)`, `r in rows`, `c in cols` (two `range`s), of batch `b`, head `h`, built from
# `philox.philox_key` and `philox.philox4x32` (pass every counter word as `np.uint64`). The grader
# compares with `philox.keep_mask` on tiles that start mid-group (`c` not a multiple of 4), a seed
# above `2^32` and `b != h`, and does not accept `keep_mask` or `philox.keep` themselves.

# %% [exercise] keep_tile

# %% [markdown]
# ## Unbiased: the average of many masks
#
# `E[O] = P V`: averaging the dropped output over many seeds converges to attention without
# dropout, the error shrinking like `1 / sqrt(seeds)`. Each mask from `philox.keep_mask`, each
# output from the float64 reference:

# %%
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, n, 1, 8)) for n in (16, 24, 24))
dense, _ = reference.attention(q, k, v)
running, errors, counts = np.zeros_like(dense), [], [1, 4, 16, 64, 256]
for s in range(1, counts[-1] + 1):
    mask = philox.keep_mask(s, 0.3, 1, 1, 16, 24)
    running += reference.attention(q, k, v, dropout_p=0.3, dropout_mask=mask)[0]
    if s in counts:
        errors.append(np.abs(running / s - dense).max())
fig, ax = plt.subplots(figsize=(5, 2.8), layout="constrained")
ax.loglog(counts, errors, marker="o", label="max |mean of dropped O - O|")
ax.loglog(counts, errors[0] / np.sqrt(counts), ls=":", color="grey", label="1 / sqrt(seeds)")
ax.set_xlabel("seeds averaged (p = 0.3)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Dropout inside the online softmax
#
# In FA2's forward (lesson 9's loop) dropout touches one line. The running max `m_i` and sum `l_i`
# belong to the softmax, which is computed on the undropped scores; only the product with `V_j`
# sees `Z_ij`:
#
#     m_new = max(m_i, rowmax(S_ij)),   P~_ij = exp(S_ij - m_new)
#     l_i  <- e^(m_i - m_new) l_i + rowsum(P~_ij)                 (no Z here)
#     O_i  <- e^(m_i - m_new) O_i + (P~_ij * Z_ij) V_j
#
# and at the end `O_i / l_i` and `L_i = m_i + log(l_i)`, the same `L` as without dropout: the
# backward recomputes `P` from it, then applies the regenerated `Z`.
#
# ## Exercise 2: the dropout forward, step by step
#
# Write `fa2_dropout_steps(Q, K, V, keep, p, Br, Bc)` (no causal mask; `keep` is the boolean
# `Nq x Nk` mask), yielding `{"i", "j", "O_i", "l_i", "m_i"}` after every tile like lesson 9's
# exercise, and returning `(O, L)`. The grader steps it next to `mirror.fa2_forward_steps(...,
# keep=keep, dropout_p=p)` and compares `O, L` with `reference.attention(..., dropout_mask=...)`.

# %% [exercise] dropout_forward

# %% [markdown]
# ## The kernels regenerate the same mask
#
# flashnumba's kernels draw the keep bits with the device build of the same Philox functions, in
# the forward, again in the backward (in `dkdv`, and in the deterministic `dq` pass), and in the
# kernel that returns `S_dmask` (flash-attn's `return_attn_probs`: `P` with the dropped entries
# negated). On the simulator, small sizes:

# %%
rng = np.random.default_rng(1)
B, N, H, d, seed = 1, 16, 1, 8, 5
q, k, v = (rng.standard_normal((B, N, H, d)).astype(np.float32) for _ in range(3))
out, lse, S_dmask = flashnumba.flash_attn_func(q, k, v, dropout_p=0.25, causal=True, seed=seed,
                                               return_attn_probs=True)
keep = philox.keep_mask(seed, 0.25, B, H, N, N)
out_ref, _ = reference.attention(q, k, v, causal=True, dropout_p=0.25, dropout_mask=keep)
print("kernel's dropped entries == philox.keep_mask's:", np.array_equal(np.signbit(S_dmask), ~keep))
print("max |out - reference with that mask| =", float(np.abs(out - out_ref).max()))
p = stepping.make_problem(24, 40, 8, causal=True, Br=16, Bc=32, algorithm="fa2_backward",
                          dropout_p=0.2, dropout_seed=3)
print(stepping.compare("fa2_backward", p).table())

# %% [markdown]
# **Try it:** with another seed the kernel's output changes, and with the same seed it does not
# (the mask is a function of the seed). Check both on the forward above.

# %%
# BEGIN SOLUTION
again = flashnumba.flash_attn_func(q, k, v, dropout_p=0.25, causal=True, seed=seed)
other = flashnumba.flash_attn_func(q, k, v, dropout_p=0.25, causal=True, seed=seed + 1)
print("same seed, same bits:", np.array_equal(again, out), "  other seed differs:", not np.array_equal(other, out))
# END SOLUTION
# STUDENT: same_seed_same_bits = ...
