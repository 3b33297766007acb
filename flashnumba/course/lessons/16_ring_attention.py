# %% [markdown]
# # Lesson 16: ring attention, the log-sum-exp merge across GPUs
#
# **Goal** (45 minutes, laptop): split a sequence too long for one GPU over `P` ranks in a ring
# (Liu, Zaharia and Abbeel 2023). Each rank keeps its queries `Q_r`; the key/value blocks travel
# around the ring, one hop per step; each rank attends to the block that is visiting and merges the
# partial result into its own by the log-sum-exps (lesson 3's merge, one level up). With a causal
# mask, half the visits have nothing to do, and how the sequence is laid out over the ranks decides
# whether the work is balanced. You will write the ring's forward pass as a step generator, graded
# against `flashnumba.mirror.ring`, and the zigzag layout's schedule.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from flashnumba import course, reference
from flashnumba.mirror.ring import ring_forward
from flashnumba.ring_geometry import LAYOUTS, positions, schedule

print("exercises of this lesson:", course.exercises(lesson=16))

# %% [markdown]
# ## The ring
#
# With `P` ranks and `N = P n` positions, rank `r` holds `n` query rows and starts with its own
# block of `n` keys and values. At ring step `s = 0 .. P-1`, rank `r` holds the K/V block of rank
# `src = (r - s) mod P`, computes `O_rj, L_rj = attention(Q_r, K_j, V_j)` (FlashAttention on one
# GPU, with the *whole* problem's scale `1 / sqrt(d)`), merges
#
#     L_r <- log(exp(L_r) + exp(L_rj)),   O_r <- exp(L_r_old - L_r) O_r + exp(L_rj - L_r) O_rj
#
# and passes the block to rank `r + 1` while receiving the next from `r - 1`. After `P` steps every
# rank has seen every block, and `O_r, L_r` are exactly attention over the whole sequence: the
# merge does not care in which order the blocks arrive. The communication of step `s + 1`
# overlaps the computation of step `s`, so with blocks large enough, the ring costs no more than
# its slowest rank's attention. `flashnumba.mirror.ring` runs the ring on simulated ranks:

# %%
rng = np.random.default_rng(0)
N, d, P = 16, 4, 4
Q, K, V = (rng.standard_normal((1, N, 1, d)) for _ in range(3))
for causal in (False, True):
    O, L = ring_forward(Q, K, V, world=P, causal=causal)
    O_ref, L_ref = reference.attention(Q, K, V, causal=causal)
    print(f"causal={causal}: ring on {P} ranks vs one call, max |O - O_ref| = {np.abs(O - O_ref).max():.1e}, "
          f"max |L - L_ref| = {np.abs(L - L_ref).max():.1e}")

# %% [markdown]
# ## Exercise 1: the ring's forward, step by step
#
# Write `ring_steps(Q, K, V, world, causal)` for one head (`Q, K, V` of shape `(N, d)`, `N` a
# multiple of `world`, the contiguous layout: rank `r` holds rows `[r n, (r + 1) n)`). For each
# ring step `s`, then each rank `r`, yield `{"i": r, "j": src, "O_r": ..., "L_r": ...}` (copies)
# after rank `r` has merged the visiting block; at the end `return O, L` for the whole sequence
# (the ranks' `O_r`, `L_r` in rank order). You may call `flashnumba.reference.single_head` with
# `softmax_scale=1 / sqrt(d)` on a block and `flashnumba.merge.merge_pair`. The ring attends one
# sequence to itself, so `Nq = Nk = N` with or without the mask (flashnumba's rings refuse `K` of
# another length). Under `causal` (key `c` visible to query `r` when `c <= r`; with `Nq = Nk` both
# alignments of lesson 9 agree), a block of an earlier rank is seen whole, a rank's own block is
# causal inside, and a block of a later rank is skipped: the rank still yields, with `O_r, L_r`
# unchanged. The grader steps your generator next to the ring
# mirror (`flashnumba.mirror.ring.ring_forward_steps`); in its messages, "step k" counts yields
# (`k = s world + r`), `i` is the rank and `j` the visiting block.

# %% [exercise] ring_steps

# %% [markdown]
# ## Causal masking: the contiguous ring waits for its last rank
#
# In the contiguous layout, rank `r` has work at `r + 1` of its `P` steps: rank 0 computes one
# (diagonal) block, rank `P - 1` computes at every step, and each step waits for the busiest rank.
# The **zigzag** layout cuts the sequence into `2P` chunks of `n / 2` and gives rank `r` chunks `r`
# and `2P - 1 - r`: one early and one late chunk each. Then every visit of another rank's block
# has exactly half a block of work. The ring mirror's trace, drawn by `flashnumba.viz.ring`
# (left: ranks x steps; right: which ring step computes each part of `S`):

# %%
from flashnumba.viz.ring import ring_schedule_figure

ring_schedule_figure(world=4, n=8)

# %% [markdown]
# ## Exercise 2: the zigzag schedule
#
# Write `zigzag_piece(rank, step, world, n)`: under causal masking and the zigzag layout, the local
# query rows `(start, stop)` and the visiting block's local key columns `(start, stop)` that
# `rank` computes at ring step `step`, or `None` if it computes nothing. Local positions are in
# the rank's order: its early chunk (local `0 .. n/2 - 1`), then its late chunk. Compare the
# chunks: a chunk of an earlier position sees all of a later one's keys, a later chunk sees none
# of them. (There is no `None` in the zigzag: that is the point.) The grader compares with
# `flashnumba.ring_geometry.piece` for 1 to 5 ranks and says which chunks each rank holds.

# %% [exercise] zigzag

# %% [markdown]
# Work per rank for a longer ring, counted from the schedule (`Piece.visible`: the (query, key)
# pairs a visit attends over, in whole blocks of `n x n`):

# %%
P, n = 8, 16
fig, ax = plt.subplots(figsize=(6.5, 3), layout="constrained")
for k, layout in enumerate(LAYOUTS):
    pieces = schedule(P, n, layout, causal=True)
    work = [sum(pieces[s][r].visible for s in range(P)) / n ** 2 for r in range(P)]
    ax.bar(np.arange(P) + 0.4 * k, work, width=0.4, label=f"{layout}: slowest rank {max(work):.2f} blocks")
ax.set(xlabel="rank", ylabel="work (blocks of n x n)", title=f"causal ring, P = {P}: the ring waits for the slowest rank")
ax.legend()
plt.show()
print("rank 1's positions, zigzag:", positions(1, P, n, "zigzag"))

# %% [markdown]
# ## Where this goes
#
# `flashnumba.distributed.ring` runs this ring on real GPUs: flashnumba's kernels on each visit,
# the blocks passed on with `torch.distributed`, the next block in flight while the current one is
# computed. Its backward passes `dK_j, dV_j` around the ring with their blocks
# (`ring_backward_steps` in the mirror), and one last hop brings each block's gradient home. Split-KV decoding (one query, a long KV cache) is
# the same merge without a ring: the cache's blocks are attended in parallel and merged once.
