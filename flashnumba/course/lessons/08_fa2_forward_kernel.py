# %% [markdown]
# # Lesson 8: the FA2 forward kernel
#
# **Goal** (60 minutes, laptop): read `flashnumba/kernels/fa2_forward.py` next to the FA2 mirror,
# line for line; step the kernel against the mirror with `flashnumba.stepping`; then write its
# two central pieces, the online-softmax update of a row and the accumulation of `O_i`, as device
# functions that the grader plugs into a copy of the kernel's loop and steps against the mirror,
# naming the first (step, block, tile, variable) where yours goes wrong.

# %%
# %matplotlib inline
import inspect
import math

import matplotlib.pyplot as plt
import numpy as np

import flashnumba
from flashnumba import course, stepping
from flashnumba.course.exercises import e15_fa2_row_update as lesson_loop
from flashnumba.kernels import fa2_forward
from flashnumba.kernels.fa2_forward import warp_max, warp_sum
from flashnumba.mirror import fa2_forward_steps
from numba import cuda                     # after flashnumba: it chose the simulator or the GPU

print("kernels run on:", flashnumba.device())
print("exercises of this lesson:", course.exercises(lesson=8))


def show(function, first, last):
    """Print the lines of function's source from the one containing `first` to the one containing `last`."""
    function = inspect.unwrap(function)                  # a cached kernel factory: its own source
    lines, start = inspect.getsourcelines(function)
    a = next(k for k, line in enumerate(lines) if first in line)
    b = next(k for k in range(a, len(lines)) if last in lines[k])
    path = inspect.getsourcefile(function).split("flashnumba/", 1)[-1]
    print(f"{path}, lines {start + a}-{start + b}:")
    for k in range(a, b + 1):
        print(f"{start + k:>4} {lines[k].rstrip()}")

# %% [markdown]
# ## The mirror's inner loop
#
# One thread block per Q tile `i`; its loop over `j` streams `K_j, V_j` past `Q_i` and keeps
# `O_i` (unnormalised), `l_i` and `m_i` on chip. In NumPy, a whole tile at a time:

# %%
show(fa2_forward_steps, "for j in j_range:", "m_i = m_new")

# %% [markdown]
# ## The same loop in the kernel
#
# In the kernel the tile is spread over threads (lesson 7's split-Q): warp `w` owns rows
# `r0 .. r0 + ROWS_PER_WARP` of `Q_i`, and lane `L` of it owns score columns `L + 32 t` and output
# dims `L + 32 u`. The mirror's `S_ij.max(axis=1)` becomes a per-lane max and a `warp_max`; its
# `P_ij.sum(axis=1)` a per-lane sum and a `warp_sum`; its `P_ij @ V_j` a loop over the columns of
# `P_ij`, which each lane reads back from shared memory after a `syncwarp` (a lane holds only its
# own columns of `P_ij` in registers, and needs all of them). Each barrier says what it fences.

# %%
show(fa2_forward.build, "for j in range(n_tiles):", "every warp done reading K_j")

# %% [markdown]
# ## Stepping the kernel against the mirror
#
# Every kernel takes `limit=k`: each block stops after `k` iterations of its `j` loop and writes
# its state (`O_i / l_i`, `m_i`, `l_i`) out; the mirror takes the same `limit`. `stepping.compare`
# runs both for `k = 1, 2, ...` and reports the largest relative difference of each variable at
# each step (the kernel computes in float32, the mirror in float64). Here on a causal problem
# with `Nq != Nk`, partial tiles and 2 warps per block:

# %%
kernel_name = lesson_loop.ALGORITHM           # the readable FA2 forward kernel, as the registry names it
p = stepping.make_problem(20, 70, 8, Br=8, Bc=32, algorithm=kernel_name, num_warps=2, causal=True)
report = stepping.compare(kernel_name, p)
print(report.table())

# %% [markdown]
# ## The loop you will complete
#
# The grader runs a copy of that loop for one head in float64, without dropout or grouped heads
# (`flashnumba/course/exercises/e15_fa2_row_update.py`), in which the two pieces you write are
# device-function calls:

# %%
show(lesson_loop.lesson_kernel, "for j in range(min(n_tiles, limit)):", "every warp done with K_j")

# %% [markdown]
# ## Exercise 1: the online-softmax update of one row
#
# Write `online_softmax_row(S_ij, P_ij, m_i, l_i, alpha, rr, prow, lane)`. The calling lane holds
# the scores `S_ij[rr, t]` of row `rr` (of its warp) in columns `lane + 32 t`, `t < S_ij.shape[1]`,
# already scaled and set to `-inf` where masked. Update, for that row, in every lane:
#
#     m~       = rowmax(S_ij)                        your max over t, then warp_max
#     m_new    = max(m_i[rr], m~)
#     alpha[rr] = e^(m_i[rr] - m_new)                 the kernel rescales O_i by it next
#     P~_ij    = e^(S_ij - m_new)                    into P_ij[prow, lane + 32 t] (shared memory)
#     l_i[rr]  = alpha[rr] l_i[rr] + rowsum(P~_ij)    your sum over t, then warp_sum
#     m_i[rr]  = m_new
#
# A row that has seen no visible key has `m_new = -inf`: compute with `0` in its place, so that
# `P~ = e^(-inf) = 0` and `alpha = 1`, never `e^(-inf - (-inf)) = NaN`. `warp_max` and `warp_sum`
# are the library's (lesson 7). The grader steps the kernel with your function next to the mirror
# on a problem whose largest score comes in the last tile, and on a causal one with rows that see
# no key.

# %% [exercise] fa2_row_update
# the grader compiles this as a device function, cuda.jit(device=True)(...), and calls it from its kernel

# %% [markdown]
# ## What a failure looks like
#
# The grader's message for an update that forgets the `-inf` guard (the perturbed solution the
# course's tests use): the step, the block, the tile and the variable where the kernel first
# leaves the mirror, and the whole stepping table.

# %%
print(course.check("fa2_row_update", course.perturbed("fa2_row_update")))

# %% [markdown]
# ## Exercise 2: the accumulation of O_i
#
# Write `accumulate_O(O_i, P_ij, V_j, alpha, r0, lane)`: for each of the warp's rows `rr`
# (`O_i.shape[0]` of them; row `r0 + rr` of `P_ij`) and each of the lane's output dims
# `k = lane + 32 u` (`u < O_i.shape[1]`):
#
#     O_i[rr, u] = alpha[rr] O_i[rr, u] + sum over c of P_ij[r0 + rr, c] V_j[c, k]
#
# `O_i` stays unnormalised until the loop ends, where the kernel divides it by `l_i` once: the
# FA2 paper's deferred normalisation, which FA1 (lesson 4) does at every step.

# %% [exercise] fa2_accumulate
# the grader compiles this as a device function, cuda.jit(device=True)(...), and calls it from its kernel

# %% [markdown]
# ## Where each step goes wrong, drawn
#
# The stepping report of the grader's loop with a correct update and the accumulation that forgets
# `alpha` (the perturbed solution), step by step: `m` and `l` stay on the mirror's values, `O`
# leaves it at the first step where a row's maximum grows, because the old `O_i` was summed
# relative to the old maximum.

# %%
def step_loop(accumulate):
    """The stepping report of the grader's loop with the correct row update and `accumulate`."""
    update = course.solution("fa2_row_update")
    return stepping.compare(kernel_name, p, kernel=lambda algorithm, problem, k:
                            lesson_loop.run_lesson_kernel(update, accumulate, problem, k))


good = step_loop(course.solution("fa2_accumulate"))
bad = step_loop(course.perturbed("fa2_accumulate"))
fig, axes = plt.subplots(1, 2, figsize=(9, 3), layout="constrained", sharey=True)
for ax, rep, title in zip(axes, (good, bad), ("correct accumulation", "O_i not rescaled by alpha")):
    steps = [k for k, _ in rep.rows]
    for name in rep.names:
        ax.semilogy(steps, [max(errs[name], 1e-17) for _, errs in rep.rows], "o-", label=name)
    ax.axhline(stepping.TOL, color="grey", ls="--", lw=1, label="tolerance")
    ax.set(title=title, xlabel="step k (iterations of each block's loop)", xticks=steps)
axes[0].set_ylabel("max |kernel - mirror| / max |mirror|")
axes[1].legend(fontsize=8)
plt.show()
