# %% [markdown]
# # Lesson 6: CUDA in Numba, on the simulator
#
# **Goal** (60 minutes, laptop): write CUDA kernels in Python with Numba: threads, blocks, shared
# memory and `cuda.syncthreads()`, the barrier, with the reason for each one. You write the
# tiled `S = Q K^T` at the heart of every FlashAttention kernel, count what each thread reads
# from global memory (HBM) the way GPU-Puzzles draws it, and place the barriers of a reduction.
#
# Without a GPU, Numba runs kernels on its **CUDA simulator**: every CUDA thread is a Python
# thread, so a kernel is slow but can be watched. `flashnumba.simulator.access` records each
# thread's reads and writes, and finds two threads touching one shared element, one of them
# writing, with no barrier between them: a race. The graders of this lesson use both.

# %%
# %matplotlib inline
import math
import os

# this lesson watches every simulated thread: it runs on the simulator even where there is a GPU
os.environ["FLASHNUMBA_DEVICE"] = "sim"

import numpy as np

import flashnumba
from flashnumba import course
from flashnumba.simulator import access
from flashnumba.viz.threads import access_figure, per_thread_figure
from numba import cuda, float64           # after flashnumba: it chose the simulator or the GPU

print("kernels run on:", flashnumba.device())
print("exercises of this lesson:", course.exercises(lesson=6))

# %% [markdown]
# ## Threads and blocks
#
# A kernel is a function every thread runs. `kernel[grid, block](args)` launches `grid` blocks of
# `block` threads each (both may be 2-D tuples). A thread finds out who it is from
# `cuda.threadIdx.x, .y` (its place in its block) and `cuda.blockIdx.x, .y` (its block's place in
# the grid), and from those, which piece of the work is its own.
#
# The simplest `S = Q K^T`: one thread per entry `S[r, c]`, reading a row of `Q` and a row of `K`
# straight from global memory. Threads past the end of `S` (the last blocks are partial) do
# nothing.

# %%
T = 4                                      # threads per block: T x T


@cuda.jit
def naive_qk(Q, K, S):
    r = cuda.blockIdx.y * T + cuda.threadIdx.y     # the query this thread serves
    c = cuda.blockIdx.x * T + cuda.threadIdx.x     # the key
    if r < S.shape[0] and c < S.shape[1]:
        acc = 0.0
        for k in range(Q.shape[1]):
            acc += Q[r, k] * K[c, k]               # 2 global reads per multiply-add
        S[r, c] = acc


rng = np.random.default_rng(0)
Nq, Nk, d = 8, 8, 8
Q, K = rng.standard_normal((Nq, d)), rng.standard_normal((Nk, d))
grid = (math.ceil(Nk / T), math.ceil(Nq / T))
with access.traced() as naive:
    args = naive.watch("Q", Q), naive.watch("K", K), naive.watch("S", np.zeros((Nq, Nk)))
    naive_qk[grid, (T, T)](*args)
print("S = Q K^T:", np.allclose(naive.array("S"), Q @ K.T))
print(f"global reads: Q {naive.total('Q')}, K {naive.total('K')} "
      f"(= Nq Nk d each: every thread reads a whole row of Q and of K)")

# %% [markdown]
# What thread `(x=1, y=2)` of block `(1, 0)` did, drawn from the trace: it read row 2 of `Q` and
# row 5 of `K` (red) and wrote `S[2, 5]` (green); the numbers count the reads of all threads.
# Each element of `Q` is read `Nk` times, once by every thread of its row of `S`.

# %%
who = ((1, 0, 0), (1, 2, 0))               # (block, thread), each (x, y, z)
access_figure(naive, ["Q", "K", "S"], who)

# %% [markdown]
# ## Shared memory and the barrier
#
# Global memory is HBM: large and slow. Each block also has **shared memory**, on chip, fast, and
# seen by all threads of the block (and only them): `cuda.shared.array(shape, dtype)`, the shape
# a compile-time constant. A tiled kernel lets the `T x T` threads of a block compute a `T x T`
# tile of `S` in phases of `T` columns of `d`:
#
#     for each phase p:
#         thread (x, y) loads Q[r, p*T + x] into Q_s[y, x] and one element of K into K_s
#         cuda.syncthreads()      # Q_s, K_s fully loaded before any thread reads them
#         acc += sum over kk of Q_s[y, kk] * K_s[x, kk]
#         cuda.syncthreads()      # all reads done before the next phase overwrites Q_s, K_s
#
# Each element is loaded from global memory once per block and then read `T` times from shared
# memory. `cuda.syncthreads()` is a **barrier**: no thread of the block passes it until every
# thread has reached it. The first one is there because thread `(x, y)` reads `Q_s[y, kk]`,
# which thread `(kk, y)` wrote; the second because a fast thread would otherwise start the next
# phase and overwrite `Q_s` while a slow one is still reading it. On a GPU the order of threads is
# not fixed, so a missing barrier gives wrong results only sometimes; the simulator's race check
# finds it every time, whatever order it ran the threads in.
#
# ## Exercise 1: the tiled Q K^T
#
# Write `tiled_qk(T)`, returning a `@cuda.jit` kernel `(Q, K, S)` (define it inside the
# function: `T` is then a compile-time constant). The grader launches it with `(T, T)` threads per
# block on shapes whose sizes are not multiples of `T`, and checks `S` against `Q K^T` in float64,
# that no thread reads more than `ceil(d / T)` elements of `Q` or of `K` from global memory, and
# that no two threads race on shared memory.

# %% [exercise] tiled_qk

# %% [markdown]
# ## What the tiles save
#
# The grader's own launch, traced, with the reference kernel: per thread, the global reads of `Q`
# drop from `d` to `ceil(d / T)`; one thread's panel shows it loading one element of `Q` and one of
# `K` per phase (red in `Q`, `K`) and reading a whole row of each shared tile (red in `Q_s`, `K_s`).

# %%
from flashnumba.course.exercises.e11_tiled_qk import launch_traced

tiled = launch_traced(course.solution("tiled_qk")(T), Q, K, T)
print(f"global reads: Q {tiled.total('Q')} (naive {naive.total('Q')}), "
      f"K {tiled.total('K')} (naive {naive.total('K')})")
entry = lambda w: (w[0][1] * T + w[1][1], w[0][0] * T + w[1][0])      # the S entry a thread computes
per_thread_figure({"naive": naive, "tiled": tiled}, "Q", entry)

# %%
access_figure(tiled, ["Q", "Q_s", "K", "K_s", "S"], who)

# %% [markdown]
# ## A missing barrier, caught
#
# Take the first barrier out. Thread `(0, 0)` may reach the multiply-adds before thread
# `(1, 0)` has stored its element of `Q_s`. The race check names the array, the element, the two
# threads and the barrier count, from one run:

# %%
@cuda.jit
def no_first_barrier(Q, K, S):
    x, y = cuda.threadIdx.x, cuda.threadIdx.y
    r, c = cuda.blockIdx.y * T + y, cuda.blockIdx.x * T + x
    Q_s = cuda.shared.array((T, T), float64)
    K_s = cuda.shared.array((T, T), float64)
    acc = 0.0
    for p in range((Q.shape[1] + T - 1) // T):
        k = p * T + x
        Q_s[y, x] = Q[r, k] if r < Q.shape[0] and k < Q.shape[1] else 0.0
        k_row = cuda.blockIdx.x * T + y
        K_s[y, x] = K[k_row, k] if k_row < K.shape[0] and k < K.shape[1] else 0.0
        for kk in range(T):                       # no barrier: reads what others may not have written
            acc += Q_s[y, kk] * K_s[x, kk]
        cuda.syncthreads()
    if r < S.shape[0] and c < S.shape[1]:
        S[r, c] = acc


broken = launch_traced(no_first_barrier, Q, K, T)
print(broken.races[0])
print("S still equal to Q K^T on the simulator?", np.allclose(broken.array("S"), Q @ K.T))

# %% [markdown]
# Whether `S` comes out wrong depends on the order the threads happened to run in. On a GPU that
# order changes from run to run, so such a kernel passes some tests and fails others; the race
# check does not depend on the order, which is why the graders use it, not only the values.
#
# ## Exercise 2: the barriers of a tree reduction
#
# FA1 splits the columns of each row of `S_ij` across warps, so each warp ends with a partial
# row sum, and the partial sums are added up in shared memory: a **tree reduction**. Thread `t`
# loads one element; then, with strides `n/2, n/4, ..., 1`, thread `t < stride` adds
# `P_s[t + stride]` into `P_s[t]`. The stub below computes it with no barrier at all. Add the
# `cuda.syncthreads()` calls it needs, each with a comment giving its reason. Careful: a barrier
# inside `if t < stride:` would wait for threads that never arrive (on a GPU, undefined).

# %% [exercise] tree_sum

# %% [markdown]
# ## Where this goes
#
# The FA2 kernel (lesson 8) uses exactly these pieces: `Q_i` loaded into shared memory once per
# block, `K_j` and `V_j` once per tile, a barrier after each load ("K_j, V_j fully written before
# any warp reads them") and one at the end of each tile ("every warp done reading K_j, V_j before
# the next tile overwrites them"). Its row max and row sum use no shared memory at all: lesson 7's
# warp shuffles.
