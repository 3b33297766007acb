# %% [markdown]
# # Lesson 13: half precision and flash-attn's 2x-dense-error rule
#
# **Goal** (45 minutes, laptop): see what float16 and bfloat16 keep of a float32, round a float32
# to bfloat16 with nothing but integer operations, and learn the rule flash-attn (and flashnumba's
# tests) use to call a half-precision kernel correct: its largest error against the float64 answer
# may be at most **2x the largest error of the plain dense attention computed in the same dtype**
# (3x for gradients). You will write the rounding and the rule's checker.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np

import flashnumba
from flashnumba import course, dtypes, reference
from flashnumba.tools.emulation import attention_in_dtype

print("exercises of this lesson:", course.exercises(lesson=13))

# %% [markdown]
# ## Three ways to spend 32 or 16 bits
#
# A binary float is `(-1)^sign x 1.mantissa x 2^(exponent - bias)`. The three storage dtypes of
# flashnumba (`flashnumba.dtypes.SUPPORTED`) split their bits differently:
#
#     float32   1 sign | 8 exponent | 23 mantissa     spacing near 1: 2^-23    largest ~3.4e38
#     float16   1 sign | 5 exponent | 10 mantissa     spacing near 1: 2^-10    largest 65504
#     bfloat16  1 sign | 8 exponent |  7 mantissa     spacing near 1: 2^-7     largest ~3.4e38
#
# bfloat16 is the top half of a float32: the same exponent, so the same range, and 16 fewer
# mantissa bits. float16 keeps three more mantissa bits than bfloat16 but overflows above 65504,
# which is why an un-rescaled `exp` or a long un-normalised sum is dangerous in float16 and not in
# bfloat16. Here is one number in the three, bit by bit:

# %%
x = np.float32(1 / 3)
f32 = int(x.view(np.uint32))
f16 = int(np.float16(x).view(np.uint16))
bf16 = int(np.array(x).astype(ml_dtypes.bfloat16).view(np.uint16))
print(f"float32   {f32:032b}  = {float(x)!r}")
print(f"float16   {f16:016b}                  = {float(np.float16(x))!r}")
print(f"bfloat16  {bf16:016b}                  = {float(dtypes.round_to(x, 'bfloat16'))!r}")
print(f"the float32's top 16 bits: {f32 >> 16:016b} (bfloat16 rounds them, it does not just cut)")

# %% [markdown]
# Rounding to the nearest representable value makes a relative error of at most half the spacing:
# the **unit roundoff** `u = 2^-11` for float16 and `2^-8` for bfloat16, whatever the magnitude,
# as long as the value is in the dtype's normal range. Below that range (float16 below `6.1e-5`)
# the spacing stops shrinking and the relative error grows; above float16's 65504 there is only
# `inf`. Measured with `flashnumba.dtypes.round_to` on values spread over 16 orders of magnitude:

# %%
rng = np.random.default_rng(0)
values = 10.0 ** rng.uniform(-9, 7, 4000)
fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
for name, colour, u in (("float16", "C0", 2.0 ** -11), ("bfloat16", "C1", 2.0 ** -8)):
    with np.errstate(over="ignore"):                 # float16: above 65504 is inf
        rounded = dtypes.round_to(values, name).astype(np.float64)
    with np.errstate(invalid="ignore"):
        rel = np.abs(rounded - values) / values
    ax.scatter(values, np.where(np.isinf(rounded), 1.0, rel), s=2, color=colour,
               label=f"{name} (u = 2^{int(np.log2(u))})")
    ax.axhline(u, color=colour, lw=0.8, ls="--")
ax.axvline(65504, color="C0", lw=0.8, ls=":")
ax.text(65504 * 1.5, 2e-5, "float16\noverflows\n(inf)", fontsize=8, color="C0")
ax.set(xscale="log", yscale="log", ylim=(1e-9, 2), xlabel="|x|",
       ylabel="|round(x) - x| / |x|", title="relative rounding error; dashed: the unit roundoff u")
ax.legend(loc="lower left", markerscale=4)
plt.show()

# %% [markdown]
# ## Exercise 1: round to bfloat16 with integer operations
#
# Since bfloat16 is the top half of a float32, rounding is integer arithmetic on the float32's
# bits (the way PyTorch and TensorFlow do it on a CPU): the 16 bits dropped are a fraction of the
# last kept bit. Add `0x7FFF` to the bits, plus 1 when the last kept bit (bit 16) is 1, and clear
# the low 16 bits: above halfway the carry rounds up, below it does not, and at exactly halfway
# (`0x8000`) the result is the neighbour whose last bit is 0 ("ties to even", IEEE 754's default,
# which keeps long sums from drifting one way). A carry out of the mantissa bumps the exponent,
# which is right; the largest float32 rounds up to `inf`, also right. A NaN must stay NaN.
#
# Write `round_bf16(x)` for a float32 array: it returns the rounded values as float32. The grader
# compares bit for bit with `ml_dtypes` on ties, subnormals, infinities, NaN and the largest
# float32, and names the first value you get wrong with its bits.

# %% [exercise] round_bf16

# %% [markdown]
# ## What "correct" means in half precision
#
# A kernel that stores `q, k, v` and `out` in bfloat16 cannot match the float64 reference to
# `1e-5`: its inputs and its output are rounded. So flash-attn's tests compare against the float64
# reference computed **on the rounded inputs**, and hold the kernel's largest error to twice the
# largest error of the plain dense attention computed in the same dtype, the way PyTorch computes
# it without upcasting: each product accumulates in float32 and every stored intermediate (`S`,
# the softmax `P`, `P V`) is rounded to the dtype (`flashnumba.tools.emulation.attention_in_dtype`).
#
# Why that yardstick? It is the accuracy users already accept from `softmax(Q K^T) V` in half
# precision, it scales with the problem (more keys, larger errors for both) and it is tight
# enough to catch a kernel that stored `P` in half precision and lost the softmax's small terms.
# FlashAttention keeps `S_ij` and `P~_ij` in float32 registers and rounds only `O` at the end, so
# it should land *below* the dense error: the factor 2 is headroom for a different order of
# summation, not an invitation to be twice as bad.
#
# Below, flashnumba's default kernel on the simulator, in both half dtypes, causal, `Nq != Nk`.
# Each bar is a largest error against the float64 reference on the same rounded inputs: the
# float64 answer rounded once (the best any kernel can store), flashnumba's kernel, and the dense
# attention in the dtype; the ratio kernel / dense is what the rule bounds.

# %%
B, Nq, Nk, H, d = 1, 24, 40, 2, 16
errors = {}
for name in ("float16", "bfloat16"):
    q, k, v = (rng.standard_normal((B, n, H, d)).astype(dtypes.NUMPY[name]) for n in (Nq, Nk, Nk))
    out = flashnumba.flash_attn_func(q, k, v, causal=True)             # float32 inside, stored in dtype
    q64, k64, v64 = (t.astype(np.float64) for t in (q, k, v))
    ref, _ = reference.attention(q64, k64, v64, causal=True)
    dense = attention_in_dtype(q64, k64, v64, name, causal=True)
    errors[name] = {"rounded once": np.abs(dtypes.round_to(ref, name) - ref).max(),
                    "flashnumba": np.abs(out.astype(np.float64) - ref).max(),
                    "dense in dtype": np.abs(dense - ref).max()}
    print(f"{name:>8}: " + ", ".join(f"{key} {value:.2e}" for key, value in errors[name].items())
          + f"   ratio flashnumba / dense = {errors[name]['flashnumba'] / errors[name]['dense in dtype']:.2f}")

fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
labels = list(errors["float16"])
for n, name in enumerate(errors):
    ax.bar(np.arange(3) + 0.4 * n, [errors[name][key] for key in labels], width=0.4, label=name)
ax.set_xticks(np.arange(3) + 0.2, labels)
ax.set(yscale="log", ylabel="max |x - float64 reference|",
       title=f"causal, Nq={Nq}, Nk={Nk}, d={d}: the kernel rounds once, the dense attention at every step")
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise 2: the rule's checker
#
# Write `half_verdict(out, dense, ref, limit)`: `ratio = max|out - ref| / max|dense - ref|` and
# `passed = ratio <= limit` (`limit` is 2 for outputs, 3 for gradients). Two edge cases matter in
# a test suite: a NaN or inf in `out` where `ref` is finite must fail (the ratio is `inf`; NumPy's
# `max` of an array with a NaN is NaN, and `NaN <= 2` is False only by luck), and when the dense
# attention happens to be exact (`max|dense - ref| = 0`) the ratio is 0 if `out` is exact too and
# `inf` otherwise. The grader tries outputs with 1x, 1.9x, 2.5x and 3x the dense error, a NaN, and
# an error concentrated in one row or one entry (which the *largest* error sees and a mean would
# hide).

# %% [exercise] half_rule

# %% [markdown]
# ## Where this goes
#
# `flashnumba accuracy` prints this ratio for every algorithm, dtype, output and gradient
# (`flashnumba.tools.accuracy`), and `tests/test_api_dtypes.py` asserts it. The tensor-core
# kernels take their `mma` operands in float16 or bfloat16 and accumulate in float32: the same
# "round once at the edges" discipline, inside the instruction. Which lane of a warp holds which
# element of those 16-bit operands is drawn below (`flashnumba.viz.mma_fragments`): the last panel
# is why `P_ij` can be rounded to 16 bits in registers and fed straight back to the tensor cores.

# %%
from flashnumba.viz.mma_fragments import mma_fragments_figure

mma_fragments_figure()
