# %% [markdown]
# # Lesson 15 (capstone): autograd, and a tiny transformer trained with FlashAttention
#
# **Goal** (60 minutes, laptop, needs `torch`: `pip install -e '.[torch]'`): make attention a
# `torch.autograd.Function` whose forward keeps only what FlashAttention keeps (`q, k, v`, the
# output `O` and the log-sum-exp `L`, never the `N x N` matrix `P`) and whose backward recomputes
# the rest (lessons 10 and 11); wire it into a multi-head self-attention layer; then train
# flashnumba's tiny character-level transformer (`flashnumba.train`) for a few steps with
# flashnumba's kernels, on the simulator, next to PyTorch's own attention from the same weights.

# %%
# %matplotlib inline
import copy

import matplotlib.pyplot as plt
import numpy as np
import torch

import flashnumba
from flashnumba import course, reference, train

print("exercises of this lesson:", course.exercises(lesson=15))
_ = torch.manual_seed(0)

# %% [markdown]
# ## What autograd keeps
#
# Autograd records every operation of the forward pass and saves the tensors its backward will
# need. Written as PyTorch operations, `softmax(Q K^T / sqrt(d)) V` saves the probabilities `P`,
# `N x N` per head, for the backward's `dV = P^T dO` and `dS = P o (dP - D)`. FlashAttention's
# backward recomputes `P_ij = exp(S_ij - L_i)` tile by tile from `Q`, `K` and the saved `L`, so
# its `autograd.Function` saves `q, k, v, out` and `lse`: linear in `N`.
# `flashnumba.torch.FlashAttnFunction` is that function. Measured with PyTorch's saved-tensor
# hooks (`torch.autograd.graph.saved_tensors_hooks` sees every tensor saved for backward), one head,
# `d = 8`, float32:

# %%
def saved_bytes(attend, N, d=8):
    """Bytes autograd saves for backward during one forward of attend(q, k, v) (1, N, 1, d)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()   # each storage once
        return t

    q, k, v = (torch.randn(1, N, 1, d, requires_grad=True) for _ in range(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend(q, k, v)
    return sum(seen.values())


def dense(q, k, v):
    """softmax(Q K^T / sqrt(d)) V with PyTorch operations, flash layout (B, N, H, d)."""
    S = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(S, dim=-1), v)


Ns = (8, 16, 32, 64)
saved = {"PyTorch operations (saves P)": [saved_bytes(dense, N) for N in Ns],
         "FlashAttnFunction (saves O and L)": [saved_bytes(flashnumba.flash_attn_func, N) for N in Ns]}
fig, ax = plt.subplots(figsize=(6.5, 3), layout="constrained")
for label, values in saved.items():
    ax.plot(Ns, values, "o-", label=label)
    print(f"{label:>34}: " + ", ".join(f"N={N}: {b} B" for N, b in zip(Ns, values)))
ax.set(xscale="log", yscale="log", xticks=Ns, xticklabels=Ns, xlabel="N", ylabel="bytes saved for backward",
       title="one head, d = 8: quadratic against linear")
ax.legend()
plt.show()

# %% [markdown]
# ## Exercise 1: the autograd Function
#
# Write `attention_autograd(forward, backward)`, returning a function `attend(q, k, v)` on torch
# tensors in flash layout `(B, N, H, d)` that autograd can differentiate. `forward(q, k, v)` and
# `backward(dout, q, k, v, out, lse)` work on NumPy arrays, as flashnumba's kernels do:
#
#     class Attention(torch.autograd.Function):
#         @staticmethod
#         def forward(ctx, q, k, v): ...     # call forward on NumPy copies, ctx.save_for_backward(...)
#         @staticmethod
#         def backward(ctx, dout): ...       # ctx.saved_tensors, call backward, return dq, dk, dv
#     return Attention.apply
#
# Outputs and gradients come back in the inputs' dtype. The grader's `backward` is FA2's: it
# rebuilds `P` from the `lse` you saved, so it only works if you pass it the forward's own `out`
# and `lse`; it checks `out` and `dq, dk, dv` of `loss = sum(out * W)` against the float64
# reference, in float64 and float32.

# %% [exercise] autograd

# %% [markdown]
# With flashnumba's kernels inside (the library's `FlashAttnFunction`, which is this exercise
# with device arrays), the gradients of a causal, `Nq != Nk`, two-head problem against the
# float64 reference, run on the simulator here:

# %%
q, k, v = (torch.randn(1, n, 2, 8, dtype=torch.float32, requires_grad=True) for n in (12, 20, 20))
W = torch.randn(1, 12, 2, 8)
out = flashnumba.flash_attn_func(q, k, v, causal=True)
(out * W).sum().backward()
arrays = [t.detach().double().numpy() for t in (q, k, v)]
want_out, _ = reference.attention(*arrays, causal=True)
wants = reference.attention_backward(W.double().numpy(), *arrays, causal=True)
for name, got, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), (want_out, *wants)):
    got = got.detach().double().numpy()
    print(f"{name}: max |flashnumba - float64| / max |float64| = "
          f"{np.abs(got - want).max() / np.abs(want).max():.1e}")

# %% [markdown]
# ## Exercise 2: a multi-head self-attention layer around any core
#
# A transformer layer projects its input `x (B, N, E)` to queries, keys and values, splits the
# embedding into `heads` heads of `d = E / heads`, attends per head, concatenates the heads and
# projects back. Write `self_attention(x, W_q, W_k, W_v, W_o, heads, attend)` with
# `q = x @ W_q` (and `k`, `v` alike), viewed as `(B, N, heads, d)`: flash layout, head `h` is
# columns `h d .. h d + d - 1` of the projection. Then `o = attend(q, k, v)` (causal, flash layout),
# `o.reshape(B, N, E) @ W_o`. The grader compares the output and the gradients of all four
# weights with PyTorch's `scaled_dot_product_attention` path, whose layout is `(B, heads, N, d)`:
# splitting the heads the wrong way round gives the right shapes and the wrong numbers.
# (`flashnumba.torch.MultiheadSelfAttention` is this layer with `nn.Linear` projections.)

# %% [exercise] self_attention

# %% [markdown]
# ## Training with FlashAttention
#
# `flashnumba.train.TinyTransformer` is a one-layer character-level GPT over
# `flashnumba/data/sonnets.txt`, built on `MultiheadSelfAttention`, whose core is switchable:
# `"flashnumba"` (`flash_attn_func`, through `FlashAttnFunction`: forward and backward kernels,
# here on the simulator) or `"torch"` (`scaled_dot_product_attention`). Both runs below start
# from one set of weights (a deep copy) and see the same batches, so the gap between the loss
# curves is the attention's rounding and nothing else. Sized for the simulator: one sequence of 16
# characters per step, 4 steps. (`python -m flashnumba.train` runs the full comparison; on a GPU
# its default is a real model.)

# %%
text = train.load_text()
chars = train.Characters(text)
ids = chars.encode(text)
T, steps = 16, 4
batches = [train.windows(ids, starts, T) for starts in train.training_starts(len(ids), steps, 1, T, seed=0)]
_ = torch.manual_seed(0)
start = train.TinyTransformer(len(chars), T, dim=32, layers=1, heads=2)
losses = {}
for name in ("flashnumba", "torch"):
    model = copy.deepcopy(start)
    model.set_attention(name)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses[name] = []
    for x, y in batches:
        loss = train.lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()                      # "flashnumba": flashnumba's backward kernels
        opt.step()
        losses[name].append(loss.item())
    print(f"{name:>10}: " + "  ".join(f"{value:.6f}" for value in losses[name]))
print("largest |difference| between the curves:",
      f"{max(abs(a - b) for a, b in zip(losses['flashnumba'], losses['torch'])):.1e}",
      f"(log of the vocabulary, the loss of a uniform guess: {np.log(len(chars)):.4f})")

fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
ax.plot(losses["torch"], "o-", label="torch attention", lw=3, alpha=0.4)
ax.plot(losses["flashnumba"], "x--", label="flashnumba kernels (simulator)")
ax.set(xlabel="step", ylabel="training loss", title="same weights, same batches: the same curve")
ax.legend()
plt.show()

# %% [markdown]
# ## Where this goes
#
# You have now gone from the float64 oracle to a model that trains through FlashAttention's
# backward. `python -m flashnumba.train --device cuda` trains a four-layer model for 300 steps on a
# GPU with both attentions and prints their gap and time per step; `--dtype bfloat16` trains under
# autocast, where lesson 13's rule is what "the same curve" can mean.
