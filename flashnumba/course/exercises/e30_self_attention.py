"""Lesson 15: a causal multi-head self-attention layer wired around any attention core."""

import numpy as np

from flashnumba.course.grading import Mismatch, call, grade, same_array

ID = "self_attention"
LESSON = 15
TITLE = "multi-head self-attention around an attention core"
SPEC = ("self_attention(x, W_q, W_k, W_v, W_o, heads, attend) -> (B, N, E): q = x W_q etc. split into "
        "heads in flash layout (B, N, heads, E / heads), o = attend(q, k, v), concat heads, times W_o")
NAME = "self_attention"


def stub(x, W_q, W_k, W_v, W_o, heads, attend):
    raise NotImplementedError("FILL ME IN: project, .view(B, N, heads, d) (flash layout), attend, "
                              ".reshape(B, N, heads * d), project with W_o")


def solution(x, W_q, W_k, W_v, W_o, heads, attend):
    B, N, E = x.shape
    d = E // heads
    q, k, v = ((x @ W).view(B, N, heads, d) for W in (W_q, W_k, W_v))   # head h: columns h d .. h d + d
    o = attend(q, k, v)                                                  # (B, N, heads, d)
    return o.reshape(B, N, heads * d) @ W_o


def perturbed(x, W_q, W_k, W_v, W_o, heads, attend):
    B, N, E = x.shape
    d = E // heads
    q, k, v = ((x @ W).view(B, heads, N, d).transpose(1, 2) for W in (W_q, W_k, W_v))  # wrong split
    o = attend(q, k, v)
    return o.reshape(B, N, heads * d) @ W_o


def _attend(q, k, v):
    """Causal attention in flash layout with PyTorch's own ops (differentiable, any dtype)."""
    import torch
    S = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    N = q.shape[1]
    S = S.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(S, dim=-1), v)


def _want(x, Ws, heads):
    """The float64 answer and its gradients, by PyTorch's scaled_dot_product_attention."""
    import torch
    from torch.nn import functional as F
    x = torch.tensor(x)
    Ws = [torch.tensor(W, requires_grad=True) for W in Ws]
    B, N, E = x.shape
    q, k, v = ((x @ W).view(B, N, heads, E // heads).transpose(1, 2) for W in Ws[:3])
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, E)
    y = o @ Ws[3]
    return y, Ws


CASES = ((1, 5, 6, 2), (2, 7, 12, 3), (1, 4, 8, 1))      # (B, N, E, heads)


def check(implementation):
    import torch

    def run():
        for B, N, E, heads in CASES:
            case = f"B={B}, N={N}, E={E}, heads={heads} (d={E // heads}), causal"
            rng = np.random.default_rng(B * N * E + heads)
            x = rng.standard_normal((B, N, E))
            Ws = [rng.standard_normal((E, E)) / np.sqrt(E) for _ in range(4)]
            y_want, W_want = _want(x, Ws, heads)
            G = rng.standard_normal((B, N, E))
            (y_want * torch.tensor(G)).sum().backward()
            W_got = [torch.tensor(W, requires_grad=True) for W in Ws]
            y = call(implementation, torch.tensor(x), *W_got, heads, _attend)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != (B, N, E):
                raise Mismatch(f"{case}: return a tensor of shape {(B, N, E)}, got "
                               f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
            same_array("y", y.detach().numpy(), y_want.detach().numpy(), case=case)
            call((y * torch.tensor(G)).sum().backward)
            for name, got, want in zip(("W_q", "W_k", "W_v", "W_o"), W_got, W_want):
                if got.grad is None:
                    raise Mismatch(f"{case}: {name}.grad is None: use the weights with torch ops so "
                                   f"autograd reaches them", variable=name)
                same_array(f"d loss / d {name}", got.grad.numpy(), want.grad.numpy(), case=case)
        return "the layer and its weight gradients match PyTorch's, for 1 to 3 heads"
    return grade(ID, run)
