# %% [markdown]
# # Lesson 2: standard attention and its HBM traffic
#
# **Goal** (40 minutes, laptop): see what standard attention moves between the GPU's
# high-bandwidth memory (HBM, tens of GB, slow) and its on-chip memory (SRAM, a few hundred KB
# per streaming multiprocessor, fast), count it element by element, and write the count as a
# formula. That count, `Theta(N d + N^2)`, is what FlashAttention attacks.
#
# Every mirror in `flashnumba.mirror` reads and writes its big arrays through an
# `flashnumba.hbm.HBM` counter: `hbm.read(name, X)` counts `X.size` elements read from tensor
# `name` and returns `X`; `hbm.write(name, X)` counts a write.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

from flashnumba import course, mirror, reference
from flashnumba.hbm import HBM

print("exercises of this lesson:", course.exercises(lesson=2))

# %% [markdown]
# ## The three passes
#
# A GPU computes standard attention (FlashAttention paper, Algorithm 0) as three kernels, each
# reading its inputs from HBM and writing its result back, because `S` and `P` are too large to
# stay on chip:
#
#     1. read Q, K;   write S = Q K^T / sqrt(d)
#     2. read S;      write P = softmax(S)
#     3. read P, V;   write O = P V
#
# `mirror.standard_forward_steps` is a generator: it yields a record (`Step`) after each pass,
# with what the pass read and wrote and the HBM counts so far.

# %%
rng = np.random.default_rng(0)
Nq, Nk, d = 16, 24, 8
Q, K, V = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
hbm = HBM()
records, (O, P) = mirror.run(mirror.standard_forward_steps(Q, K, V, hbm=hbm))
for step in records:
    print(f"pass {step.step + 1}: read {', '.join(step.reads):<6} wrote {', '.join(step.writes):<3}"
          f"   HBM so far: {sum(step.hbm_reads.values()):>5} read, {sum(step.hbm_writes.values()):>5} written")
O_ref, _ = reference.single_head(Q, K, V)
print("O equals the oracle's:", np.allclose(O, O_ref, rtol=1e-12, atol=1e-12))
print(hbm)

# %% [markdown]
# The counter's totals per tensor, as a picture: the `Nq x Nk` matrices `S` and `P` are each
# written once and read once, and they dominate as soon as `N` is larger than `d`.

# %%
def traffic_bars(hbm, title):
    names = list(dict.fromkeys([*hbm.reads, *hbm.writes]))
    reads = [hbm.reads.get(n, 0) for n in names]
    writes = [hbm.writes.get(n, 0) for n in names]
    _, ax = plt.subplots(figsize=(6, 2.8), layout="constrained")
    ax.bar(names, reads, label="read")
    ax.bar(names, writes, bottom=reads, label="written")
    ax.set(ylabel="elements", title=title)
    ax.legend()
    plt.show()

traffic_bars(hbm, f"standard attention, Nq={Nq}, Nk={Nk}, d={d}")

# %% [markdown]
# ## Exercise 1: standard attention through a counter
#
# Write `standard_attention(Q, K, V, hbm)` in the three passes above. Read every input of a pass
# with `hbm.read` (even `S` that pass 1 just wrote: a new kernel starts with empty SRAM) and
# write every result with `hbm.write`, using the tensor names `"Q", "K", "V", "S", "P", "O"`. The
# grader compares your `O` with the oracle and your counts, tensor by tensor, with the mirror's.

# %% [exercise] standard_hbm

# %% [markdown]
# ## Exercise 2: the traffic as a formula
#
# Write `standard_io(Nq, Nk, d)` returning `(elements read, elements written)` for any sizes,
# from the three passes (no mirror, no counter: arithmetic only). With `Nq = Nk = N` it is
# `Theta(N d + N^2)`, the paper's bound.

# %% [exercise] standard_io

# %% [markdown]
# ## Why this is the number to beat
#
# Count with the mirror at `d = 64` and growing `N`: the share of the traffic that is `S` and `P`
# climbs towards all of it, and on a GPU attention is then limited by that traffic, not by its
# arithmetic. Standard attention's traffic grows with `N^2`; FlashAttention
# writes only per-row statistics (`l` and `m`, or `L`) instead of `S` and `P`. The figure is drawn
# from the mirrors' traces (`flashnumba.viz.memory`).

# %%
for N in (64, 256, 1024):
    counter = HBM()
    X = rng.standard_normal((N, 64))
    mirror.standard_forward(X, X, X, hbm=counter)
    big = sum(counter.reads[n] + counter.writes[n] for n in ("S", "P"))
    print(f"N = {N:>5}: {counter.total:>10,} elements, {100 * big / counter.total:4.1f} % of them S and P")

# %%
from flashnumba.viz.memory import memory_figure

memory_figure()
