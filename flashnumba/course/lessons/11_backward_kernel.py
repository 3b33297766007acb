# %% [markdown]
# # Lesson 11: the FA2 backward kernel, dQ by atomics, then deterministically
#
# **Goal** (60 minutes, laptop; a GPU if you have one): turn lesson 10's Algorithm 2 into CUDA.
# One thread block per K/V tile `j` keeps `dK_j` and `dV_j` on chip for its whole life and writes
# them once; `dQ` is a sum over every key, so every block adds into it, with float32 **atomic
# adds**. You write the heart of that kernel and it is graded *step by step* on the simulator
# against the float64 mirror, which names the first step, block and variable that go wrong. Then
# you see why atomics make `dQ` differ in its last bits from run to run on a GPU, and write the
# deterministic alternative: a separate pass, one block per Q tile, that sums `dQ_i` on chip in a
# fixed order.

# %%
# %matplotlib inline
import inspect
import math  # noqa: F401 (the exercise cells' kernels use math, cuda, float32)

import matplotlib.pyplot as plt
import numpy as np
from numba import cuda, float32  # noqa: F401

from flashnumba import course, mirror, stepping
from flashnumba.kernels import fa2_backward

print("exercises of this lesson:", course.exercises(lesson=11))

# %% [markdown]
# ## Three kernels
#
# `flashnumba/kernels/fa2_backward.py` launches, in order:
#
# 1. `preprocess`: `D_i = rowsum(dO_i * O_i)`, one warp per 4 rows, shuffles to add across lanes
#    (lesson 7);
# 2. `dkdv`, grid `(Tc, batch x heads)`: block `j` loads `K_j, V_j` once, then walks the Q tiles
#    `i` the causal mask lets it see (lesson 9), recomputing `P_ij` from `L_i` (lesson 10);
#    its warps split the rows of `Q_i` for `S_ij, dP_ij, dS_ij` (phase A) and the keys of `K_j` for
#    `dK_j, dV_j` (phase B); each adds its `scale dS_ij K_j` into `dQ` with `cuda.atomic.add`;
# 3. `dq`, only with `deterministic=True`: grid `(Tr, batch x heads)`, block `i` recomputes
#    `dS_ij` for every `j` in order and writes `dQ_i` once; `dkdv` then skips its atomics.
#
# The atomic part of `dkdv`, as it is in the file:

# %%
source = inspect.getsource(fa2_backward.build)
start = source.index("# dQ_i += scale dS_ij K_j for this warp's rows")
end = source.index("cuda.syncthreads()  # every warp done reading Q_i")
print(inspect.cleandoc("            " + source[start:end]))

# %% [markdown]
# Which block touches what, drawn from the backward mirror's trace (causal): each `dK_j`, `dV_j`
# tile has one writer; each `dQ_i` tile is added to by every block whose column of tiles reaches
# row `i`.

# %%
from flashnumba.viz.warps import backward_blocks_figure

backward_blocks_figure(Nq=16, Nk=16, d=4, Br=4, Bc=4, causal=True)

# %% [markdown]
# ## Stepping a kernel next to its mirror
#
# Every flashnumba kernel takes `limit=k`: each block stops after `k` iterations of its loop (here:
# `k` Q tiles) and writes what it has. The mirror takes the same `limit`. `stepping.compare` runs
# both for `k = 1, 2, ...` and reports the largest relative difference of each variable: the
# library kernel agrees at every step.

# %%
p = stepping.make_problem(24, 40, 8, causal=True, Br=16, Bc=32, algorithm="fa2_backward")
print(stepping.compare("fa2_backward", p).table())

# %% [markdown]
# ## Exercise 1: the dK, dV kernel with dQ by atomics
#
# A smaller kernel with the same structure as `dkdv`: grid of `Tc` blocks, `Bc` threads each, and
# thread `c` owns key `c` of `K_j` (its rows of `K_j, V_j, dK_j, dV_j` live in registers). The block
# loads `Q_i, dO_i` into shared memory together, then each thread walks the rows `r` of `Q_i`. The
# launcher, the loads, the barriers and the causal skip are written; fill in the body for one
# visible `(r, c)`:
#
#     S_rc  = Q_r . K_c                       (dot product over d)
#     P_rc  = exp(scale S_rc - L_r)           (recomputed from L: lesson 10)
#     dP_rc = dO_r . V_c
#     dS_rc = P_rc (dP_rc - D_r)
#     dV_c += P_rc dO_r,   dK_c += dS_rc Q_r  (dK is multiplied by scale once, at the end)
#     dQ_r += scale dS_rc K_c                 (every thread of the block adds into the same dQ_r:
#                                              cuda.atomic.add(dQ, (r, x), value) for each x)
#
# The grader launches it with `limit = 1, 2, ...` and compares `dQ, dK, dV` with
# `mirror.fa2_backward_state` after every step; on a mismatch it prints the table above for your
# kernel. (On the simulator, kernels run as Python threads: a few seconds per grade.)

# %% [exercise] dkdv_kernel

# %% [markdown]
# ## Why atomics are not reproducible
#
# Float32 addition is not associative: `(a + b) + c` and `a + (b + c)` can differ in the last bit.
# With atomics, the blocks of `dkdv` add their `scale dS_ij K_j` into `dQ_i` in the order they
# happen to arrive, which on a GPU can change from run to run. Here are the contributions the `Tc`
# blocks make to `dQ` (read off the mirror's trace as the change of `dQ` at each step), added in
# float32 in 200 random block orders:

# %%
p = stepping.make_problem(8, 128, 4, Br=8, Bc=8, algorithm="fa2_backward")
O, L = mirror.fa2_forward(p.Q, p.K, p.V, Br=8, Bc=8)
records, (dQ, _, _) = mirror.run(mirror.fa2_backward_steps(p.dO, p.Q, p.K, p.V, O, L, Br=8, Bc=8))
before = np.zeros_like(dQ)
parts = []                                     # block j's scale dS_0j K_j, in float32
for s in records:
    parts.append((s.state["dQ"] - before).astype(np.float32))
    before = s.state["dQ"]
rng = np.random.default_rng(0)
in_order = np.zeros_like(parts[0])
for part in parts:
    in_order += part
sums = []
for _ in range(200):
    total = np.zeros_like(parts[0])
    for j in rng.permutation(len(parts)):
        total += parts[j]
    sums.append(total)
sums = np.array(sums)
differ = (sums != in_order).any(axis=(1, 2))
spread = np.abs(sums - in_order).max(axis=(1, 2)) / np.abs(in_order).max()
print(f"{len(parts)} blocks add into dQ_0; {differ.sum()} of {len(sums)} orders give dQ bits that differ "
      f"from the order j = 0, 1, ...; distinct results per entry (max): "
      f"{max(len(np.unique(sums[:, r, x])) for r in range(8) for x in range(4))}")
fig, ax = plt.subplots(figsize=(6, 2.8), layout="constrained")
ax.hist(spread, bins=30, color="#4e79a7")
ax.axvline(np.finfo(np.float32).eps, color="black", ls="--", lw=1, label="float32 epsilon")
ax.legend(fontsize=8)
ax.set_xlabel("max |sum in this order - sum in order j = 0, 1, ...| / max |dQ_0|")
ax.set_ylabel("block orders")
ax.set_title(f"dQ_0 summed over {len(parts)} blocks in 200 random orders", fontsize=9)
plt.show()

# %% [markdown]
# What the simulator does: it runs the blocks of a launch one after another, always in the same
# order, and in the library's `dkdv` no two threads of one block add into the same
# entry, so two runs should give the same bits here; on a GPU the blocks run at once and arrive in
# no fixed order, so nothing makes two runs agree. In the exercise's kernel
# the threads of one block *do* add into the same `dQ_r` at once; the simulator runs them as
# Python threads, whose interleaving may or may not change between runs. Both, measured:

# %%
p = stepping.make_problem(12, 40, 4, Br=4, Bc=8, algorithm="fa2_backward")
q, k, v, dout = (p.as_kernel_input(X) for X in (p.Q, p.K, p.V, p.dO))
O, L = mirror.fa2_forward(p.Q, p.K, p.V, Br=4, Bc=8)
out, lse = p.as_kernel_input(O), L[None, None].astype(np.float32)
library = [fa2_backward.fa2_backward(dout, q, k, v, out, lse, Br=16, Bc=32)[0] for _ in range(2)]
print("library dkdv, atomics, two runs: identical bits:", np.array_equal(*library))
from flashnumba.course.exercises.e21_dkdv_kernel import backward_inputs

inputs = backward_inputs(p)
exercise = [course.solution("dkdv_kernel")(*inputs, 4, 8, False, 99)[0] for _ in range(3)]
print("exercise kernel (the solution), three runs: identical bits:",
      all(np.array_equal(exercise[0], x) for x in exercise[1:]))

# %% [markdown]
# ## Exercise 2: dQ without atomics
#
# The deterministic pass (`deterministic=True` in flashnumba, as in flash-attn): grid of `Tr`
# blocks, `Br` threads each; thread `r` owns query row `r` and keeps `dQ_r` in registers. The block
# walks `j = 0, 1, ...` (only the tiles left of the diagonal when causal), loads `K_j, V_j` into
# shared memory together, and each thread adds, for every visible key `c` of the tile,
#
#     dS_rc = exp(scale Q_r . K_c - L_r) (dO_r . V_c - D_r),     dQ_r += dS_rc K_c
#
# then writes `scale dQ_r` once. It recomputes `S` and `dP`, work `dkdv` already did: that is the
# price of reproducibility. The grader compares with the float64 reference, runs your kernel twice
# and compares the bits, and refuses atomics.

# %% [exercise] dq_kernel

# %% [markdown]
# The library's own deterministic pass against its atomic one, on the problem above: the same
# numbers to float32 rounding, and the same bits run after run.

# %%
det = [fa2_backward.fa2_backward(dout, q, k, v, out, lse, Br=16, Bc=32, deterministic=True)[0]
       for _ in range(2)]
print("deterministic, two runs: identical bits:", np.array_equal(*det))
print("max |deterministic - atomics| / max |dQ| =",
      float(np.abs(det[0] - library[0]).max() / np.abs(det[0]).max()))
