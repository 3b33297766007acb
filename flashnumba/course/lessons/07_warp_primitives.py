# %% [markdown]
# # Lesson 7: warp primitives
#
# **Goal** (45 minutes, laptop): reduce a row of scores to its max and its sum across the 32
# threads of a warp with **shuffles**, register-to-register exchanges with no shared memory and
# no block barrier, as FlashAttention-2 does for every row of every tile. Then see what happens
# when only some lanes of a warp reach a shuffle.
#
# Numba's own simulator has no warp intrinsics; `flashnumba.simulator` adds them
# (`shfl_sync`, `shfl_xor_sync`, `shfl_down_sync`, `syncwarp`, the votes, ...) with the GPU's
# rules, and turns what would hang or return garbage on a GPU into an error naming the lanes.

# %%
# %matplotlib inline
import inspect
import math
import os

# this lesson watches every simulated thread: it runs on the simulator even where there is a GPU
os.environ["FLASHNUMBA_DEVICE"] = "sim"

import matplotlib.pyplot as plt
import numpy as np

import flashnumba
from flashnumba import course
from flashnumba.kernels import fa2_forward
from flashnumba.simulator.errors import WarpDivergenceError
from numba import cuda                     # after flashnumba: it chose the simulator or the GPU

print("kernels run on:", flashnumba.device())
print("exercises of this lesson:", course.exercises(lesson=7))

# %% [markdown]
# ## Warps and lanes
#
# The threads of a block run in **warps** of 32: thread `t` is lane `t % 32` of warp `t // 32`.
# The lanes of a warp can read each other's registers:
#
#     cuda.shfl_xor_sync(mask, value, offset)    lane L receives the value of lane L ^ offset
#     cuda.shfl_down_sync(mask, value, delta)    lane L receives the value of lane L + delta
#     cuda.shfl_sync(mask, value, src_lane)      every lane receives lane src_lane's value
#
# `mask` names the lanes taking part (`0xFFFFFFFF`: all 32); every lane named must call the same
# shuffle. With `shfl_xor_sync` and offsets 16, 8, 4, 2, 1, lane `L` is paired with `L ^ 16`, then
# `L ^ 8`, ...: a **butterfly**. Taking `max(own, partner's)` at each level, after 5 levels every
# lane holds the max of all 32. The kernel below records what each lane holds after each level;
# the picture is that record (the arrows: lane 5's partner at each level).

# %%
@cuda.jit
def butterfly_max(x, history):
    lane = cuda.threadIdx.x
    v = x[lane]
    history[0, lane] = v
    offset, level = 16, 1
    while offset > 0:
        v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, offset))   # partner: lane ^ offset
        history[level, lane] = v
        offset //= 2
        level += 1


x = np.random.default_rng(7).permutation(32).astype(np.float64)
history = np.zeros((6, 32))
butterfly_max[1, 32](x, history)
print("every lane ends with the max:", bool((history[-1] == x.max()).all()))

fig, ax = plt.subplots(figsize=(11, 3.4), layout="constrained")
ax.imshow(history, cmap="viridis", aspect="auto")
for (level, lane), v in np.ndenumerate(history):
    ax.text(lane, level, f"{v:.0f}", ha="center", va="center", fontsize=7,
            color="white" if v < 20 else "black")
lane = 5
for level, offset in enumerate((16, 8, 4, 2, 1), start=1):
    ax.annotate("", xy=(lane ^ offset, level - 0.3), xytext=(lane, level - 0.7),
                arrowprops={"arrowstyle": "<->", "color": "red", "lw": 1.2})
ax.set(yticks=range(6), yticklabels=["start"] + [f"xor {o}" for o in (16, 8, 4, 2, 1)],
       xticks=range(0, 32, 4), xlabel="lane", title="max by xor butterfly: what each lane holds after each level")
plt.show()

# %% [markdown]
# ## Exercise 1: warp max
#
# Write `warp_max(x)` returning the max of `x` over the 32 lanes, in every lane. It is a **device
# function**: the grader compiles it with `cuda.jit(device=True)`, which makes it callable from
# kernels (and only from them), as the library's own `warp_max` is. The grader calls it from a given
# kernel in which each warp reduces one row of a `4 x 64` tile of `S`: lane `L` first takes the
# max of its two columns `L` and `L + 32`, then calls your function, and every lane writes what
# it got. One row is `-inf` after column 40 (masked keys), one is all `-inf` (a query that sees no
# key: the max must stay `-inf`).

# %% [exercise] warp_max
# the grader compiles this as a device function, cuda.jit(device=True)(...), and calls it from its kernel

# %% [markdown]
# The FA2 kernel of this library uses the same function for `m~ = rowmax(S_ij)` and, for the
# row sum, its twin; its source:

# %%
print(inspect.getsource(fa2_forward.warp_sum))
print("used in the kernel as:")
kernel_source = inspect.getsource(fa2_forward.build)
print("\n".join(line for line in kernel_source.splitlines() if "= warp_" in line))

# %% [markdown]
# ## Exercise 2: warp sum
#
# Write `warp_sum(x)`: the sum over the 32 lanes, in every lane. In the grader's kernel each lane
# adds `exp(S - m)` over its two columns (with `m` from a correct warp max) and calls your
# function; every lane must end with the row's `l`, since every lane then uses it (in FA2 each
# lane rescales its own part of `O_i` by it). `shfl_down_sync` builds a tree that leaves the sum
# in lane 0 only; the butterfly leaves it everywhere, and since `a + b == b + a` in floating point
# every lane gets bitwise the same sum.

# %% [exercise] warp_sum
# the grader compiles this as a device function, cuda.jit(device=True)(...), and calls it from its kernel

# %% [markdown]
# ## A divergent shuffle
#
# A shuffle is a meeting of the lanes its mask names. If some of them never arrive (a branch
# that only half the warp takes) a GPU hangs or returns undefined values, depending on the
# architecture. The simulator sees every lane, so it stops the block and says who was where:

# %%
@cuda.jit
def half_warp_max(x, out):
    lane = cuda.threadIdx.x
    v = x[lane]
    if lane < 16:                              # only lanes 0-15 reach the shuffle ...
        offset = 16
        while offset > 0:                      # ... whose mask names all 32
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, offset))
            offset //= 2
    out[lane] = v


try:
    half_warp_max[1, 32](x, np.zeros(32))
except WarpDivergenceError as error:
    print(type(error).__name__, ":", error)

# %% [markdown]
# Two correct fixes: every lane calls the shuffle and only the result is used conditionally;
# or the mask names exactly the lanes that call it, here `0x0000FFFF`, with offsets 8, 4, 2, 1
# so that no lane's partner is outside the mask (a partner outside the mask gives an undefined
# value: the simulator returns NaN for it, so that a use shows).

# %%
@cuda.jit
def half_warp_max_fixed(x, out):
    lane = cuda.threadIdx.x
    v = x[lane]
    if lane < 16:
        offset = 8
        while offset > 0:                      # lanes 0-15 only, partners inside 0-15
            v = max(v, cuda.shfl_xor_sync(0x0000FFFF, v, offset))
            offset //= 2
    out[lane] = v


out = np.zeros(32)
half_warp_max_fixed[1, 32](x, out)
print("lanes 0-15 hold the max of lanes 0-15:", bool((out[:16] == x[:16].max()).all()))

# %% [markdown]
# ## Why FA2 needs shuffles and FA1 needs shared memory
#
# FA1 splits the columns of `S_ij` across the warps of a block (split-K): each warp has part of
# every row, so every row max, row sum and `P_ij V_j` product is partial and goes through shared
# memory and a block barrier (lesson 6's tree sum). FA2 splits the rows (split-Q): a row never
# leaves its warp, so its max and sum are warp shuffles and the warps exchange nothing. The
# assignment, computed by `flashnumba.viz.warps` from the number of warps and the tile sizes:

# %%
from flashnumba.viz.warps import warp_partition_figure

warp_partition_figure()
