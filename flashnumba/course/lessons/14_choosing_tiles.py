# %% [markdown]
# # Lesson 14: choosing tiles with the real compiler's report
#
# **Goal** (45 minutes, laptop): pick `Br`, `Bc` for the readable FA2 forward kernel
# (`flashnumba.kernels.fa2_forward`, lesson 8) from the three things that bound a tile on a GPU:
# the **shared memory** a block may have, the **registers** a thread may have before values
# spill to (slow, off-chip) local memory, and how many blocks then fit on one streaming
# multiprocessor at once (the **occupancy**). The simulator knows none of these: it runs a 64 KB
# shared array or a 400-float register tile without complaint. NVIDIA's compiler knows, and
# flashnumba asks it, on a machine without a GPU (`flashnumba resources`). You will write the
# occupancy arithmetic and the tile chooser.

# %%
# %matplotlib inline
import importlib.util

import matplotlib.pyplot as plt
import numpy as np

from flashnumba import course
from flashnumba.course import tile_report
from flashnumba.kernels import fa2_forward, hardware
from flashnumba.kernels.common import ConfigError, TileConfig

print("exercises of this lesson:", course.exercises(lesson=14))
print(f"sm_90: {hardware.SM_SHARED_BYTES // 1024} KB of shared memory and {hardware.REGISTERS_PER_SM} "
      f"registers per SM; at most {hardware.STATIC_SMEM_LIMIT // 1024} KB of static shared memory per block")

# %% [markdown]
# ## What one block of `fa2_forward` holds
#
# One thread block owns query tile `Q_i` (`Br` rows) and walks over the key/value tiles. Its
# static shared memory, in float32 (`fa2_forward.smem_bytes`), for the head dim `d` padded to its
# compile-time bucket `d_pad` (`TileConfig.d_pad`: a kernel built for `d_pad = 64` serves every
# `d` from 33 to 64, its tiles zero-padded):
#
#     Q_i   Br x d_pad                    loaded once
#     K_j   Bc x (d_pad + 1)              one padding column: 32 lanes reading 32 rows hit 32 banks
#     V_j   Bc x 32 ceil(d_pad / 32)      padded so every lane owns whole output dims
#     P_ij  Br x Bc                       each warp's rows of P~_ij, read back as broadcasts
#
# and each thread keeps in registers, for each of its `Br / num_warps` rows, its `Bc / 32` scores,
# its `ceil(d_pad / 32)` output dims and 3 scalars (`m`, `l`, the rescale factor): `fa2_forward`
# refuses a config whose register tile is over `MAX_REGISTER_TILE = 128` floats, since the
# compiler must also fit addresses, loop counters and temporaries in the 255 registers a thread may
# have. The library's own check (`fa2_forward.check_config`) on every `Br x Bc` for `d_pad = 64` and
# 4 or 1 warps:

# %%
sizes = (16, 32, 64, 128)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
for ax, num_warps in zip(axes, (4, 1)):
    kb = np.zeros((4, 4))
    for a, Br in enumerate(sizes):
        for b, Bc in enumerate(sizes):
            config = TileConfig(Br=Br, Bc=Bc, d_pad=64, num_warps=num_warps)
            kb[a, b] = fa2_forward.smem_bytes(config) / 1024
            try:
                fa2_forward.check_config(config)
                verdict, colour = "fits", "black"
            except ConfigError as e:
                verdict = ("Bc % 32" if "multiple of 32" in str(e) else
                           "smem" if "shared memory" in str(e) else "registers")
                colour = "firebrick"
            ax.text(b, a, f"{kb[a, b]:.1f} KB\n{verdict}", ha="center", va="center", fontsize=8,
                    color=colour)
    ax.imshow(np.minimum(kb, 60), cmap="Blues", vmin=0, vmax=90)
    ax.set(xticks=range(4), xticklabels=sizes, yticks=range(4), yticklabels=sizes, xlabel="Bc",
           ylabel="Br", title=f"d_pad=64, num_warps={num_warps}: smem (limit 48 KB)")
plt.show()

# %% [markdown]
# ## Exercise 1: the largest tiles that fit
#
# Larger tiles mean fewer passes over `K` and `V` (each `K_j, V_j` is read once per query tile:
# `Tr = ceil(N / Br)` times) and more work per barrier. Write `choose_tiles(d_pad, num_warps)`: among
# `Br, Bc` in `(16, 32, 64, 128)`, the pair with the largest `Br * Bc` (on a tie the larger `Br`)
# that `fa2_forward` accepts: `Br` a multiple of `num_warps`, `Bc` a multiple of 32, at most
# 48 KB of static shared memory, at most 128 register floats per thread; `None` if none fits.
# Compute the sizes yourself from the table above; the grader asks the library's own
# `check_config`, and when your choice does not fit it says why.

# %% [exercise] choose_tiles

# %% [markdown]
# The library's shipped choice for `d_pad = 64` is `fa2_forward.default_config(64)`; it was picked on
# a GPU by timing, among the configs that fit, and need not be the largest:

# %%
print("shipped:", fa2_forward.default_config(64))

# %% [markdown]
# ## The compiler's report
#
# The formulas above are the module's promise. What the GPU will actually allocate is decided by
# `ptxas`, NVIDIA's assembler, when it turns the kernel into machine code: how many registers
# each thread gets, whether anything spilled, how much shared memory the block reserves.
# `flashnumba.tools.resources` compiles kernels for `sm_90` with the real toolchain (NVVM, then
# `ptxas` inside nvJitLink, from the NVIDIA wheels), without a GPU. That takes several seconds of
# CPU per configuration, so this lesson reads a report made once and committed with the course,
# `flashnumba/course/tile_report.json` (`python -m flashnumba.course.tile_report` makes it again):

# %%
report = tile_report.load()
compiler = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("cuda") is not None
print(f"{report['kernel']} on {report['arch']}, made by: {report['command']}")
print("the NVIDIA compiler wheels are " + ("installed here: that command re-measures (a minute or two)"
      if compiler else "not installed here (pip install -e '.[cu13]' to re-measure); the committed "
      "report is what this lesson shows"))
print(f"\n{'config':<24}{'registers':>10}{'spills':>8}{'stack':>7}{'ptxas smem':>12}{'smem_bytes':>12}")
for row in report["rows"]:
    config = TileConfig(Br=row["Br"], Bc=row["Bc"], d_pad=row["d_pad"], num_warps=row["num_warps"])
    print(f"{tile_report.label(row['Br'], row['Bc'], row['d_pad'], row['num_warps']):<24}"
          f"{row['registers']:>10}{row['spill_stores'] + row['spill_loads']:>8}{row['stack_frame']:>7}"
          f"{row['smem']:>12}{fa2_forward.smem_bytes(config):>12}")

# %% [markdown]
# `ptxas`'s shared memory equals the module's `smem_bytes` for every config (the test suite
# asserts that for the shipped ones), nothing spilled, and no stack frame: the register tiles
# stayed in registers. The register count is the compiler's, not the formula's: it is what the
# occupancy arithmetic needs.
#
# ## Occupancy: how many blocks share an SM
#
# An SM runs several blocks at once when their resources fit side by side; while one warp waits
# on memory, another computes. On `sm_90` each of these bounds the number of resident blocks,
# and the smallest wins:
#
#     shared memory   227 KB / (smem rounded up to 128 B, + 1 KB the hardware reserves per block)
#     registers       65536 per SM, allocated per warp in units of 256:
#                     warps that fit = 65536 // (registers x 32 rounded up to 256),
#                     blocks = warps that fit // warps per block
#     threads         2048 per SM
#     blocks          32 per SM
#
# ## Exercise 2: blocks per SM
#
# Write `blocks_per_sm(smem, registers, threads)` (`smem` in bytes per block, `registers` per
# thread, `threads` per block): the number of resident blocks. The grader uses the compiler's
# register counts from the report above, and cases where each bound is the one that binds; a
# wrong answer lists what each bound allows.

# %% [exercise] occupancy

# %% [markdown]
# With the grader's answer (`course.solution("occupancy")`), each measured config's resident warps
# per SM, and which bound binds. More rows per block share each `K_j, V_j` load; more resident
# warps hide more latency; the shipped `d_pad = 64` config (64 x 32, 8 warps) trades a little of the
# second for the first.

# %%
blocks = course.solution("occupancy")
fig, ax = plt.subplots(figsize=(8, 3.2), layout="constrained")
for k, row in enumerate(report["rows"]):
    b = blocks(row["smem"], row["registers"], 32 * row["num_warps"])
    by_smem = blocks(row["smem"], 1, 32)             # the other bounds relaxed: shared memory alone
    ax.bar(f"{row['Br']}x{row['Bc']}\nw={row['num_warps']}", b * row["num_warps"],
           color="C0" if b == by_smem else "C1")
ax.axhline(64, color="gray", lw=0.8, ls="--")
ax.bar([], [], color="C0", label="shared memory binds")
ax.bar([], [], color="C1", label="registers bind")
ax.legend(loc="upper right")
ax.set(ylabel="resident warps per SM", ylim=(0, 70),
       title="fa2_forward, d_pad=64, sm_90 (registers from ptxas); dashed: the 64-warp maximum")
plt.show()

# %% [markdown]
# ## Where this goes
#
# `flashnumba resources` builds every shipped kernel configuration this way and fails on a spill,
# more than 255 registers, more than 48 KB of static shared memory, or shared memory that differs
# from the module's formula (`tests/test_resources.py`). The register-tiled kernels
# (`fa2_fast_forward`) go further: they ask the compiler for a number of blocks per SM with launch
# bounds (`min_blocks_per_sm`), which caps the registers per thread so that many blocks fit; the
# tensor-core kernels move their tiles to dynamic shared memory to go past 48 KB.
