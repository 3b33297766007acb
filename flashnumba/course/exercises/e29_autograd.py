"""Lesson 15: a torch.autograd.Function around a forward and a backward that keep only out and lse."""

import numpy as np

from flashnumba import reference
from flashnumba.course.grading import Mismatch, call, grade, same_array

ID = "autograd"
LESSON = 15
TITLE = "attention as a torch.autograd.Function"
SPEC = ("attention_autograd(forward, backward) -> attend(q, k, v): torch tensors (B, N, H, d) -> out, "
        "differentiable; forward(q, k, v) -> (out, lse), backward(dout, q, k, v, out, lse) -> (dq, dk, dv) "
        "take and return NumPy arrays")
NAME = "attention_autograd"


def stub(forward, backward):
    raise NotImplementedError("FILL ME IN: a torch.autograd.Function whose forward calls forward() and "
                              "saves q, k, v, out, lse; its backward calls backward(); return its .apply")


def solution(forward, backward):
    import torch

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = forward(*(t.detach().cpu().numpy() for t in (q, k, v)))
            out = torch.as_tensor(out, dtype=q.dtype, device=q.device)
            lse = torch.as_tensor(lse, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)       # O(N) per head: never P
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            grads = backward(*(t.detach().cpu().numpy() for t in (dout, q, k, v, out, lse)))
            return tuple(torch.as_tensor(g, dtype=t.dtype, device=t.device)
                         for g, t in zip(grads, (q, k, v)))

    return Attention.apply


def perturbed(forward, backward):
    import torch

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = forward(*(t.detach().cpu().numpy() for t in (q, k, v)))
            out = torch.as_tensor(out, dtype=q.dtype, device=q.device)
            lse = torch.as_tensor(lse, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            ones = torch.ones_like(dout)                    # forgot the incoming gradient dout
            grads = backward(*(t.detach().cpu().numpy() for t in (ones, q, k, v, out, lse)))
            return tuple(torch.as_tensor(g, dtype=t.dtype, device=t.device)
                         for g, t in zip(grads, (q, k, v)))

    return Attention.apply


def fa2_backward_from_lse(dout, q, k, v, out, lse):
    """FA2's backward in float64 NumPy from the saved out and lse (P recomputed, never stored)."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    Q, K, V, dO, O = (np.moveaxis(np.asarray(t, np.float64), 2, 1) for t in (q, k, v, dout, out))
    P = np.exp(scale * Q @ np.swapaxes(K, -1, -2) - np.asarray(lse, np.float64)[..., None])
    D = (dO * O).sum(axis=-1, keepdims=True)               # D_i = rowsum(dO_i o O_i)
    dV = np.swapaxes(P, -1, -2) @ dO
    dS = P * (dO @ np.swapaxes(V, -1, -2) - D)
    dQ, dK = scale * dS @ K, scale * np.swapaxes(dS, -1, -2) @ Q
    return tuple(np.moveaxis(g, 1, 2) for g in (dQ, dK, dV))


def _forward(q, k, v):
    return reference.attention(q, k, v)


CASES = ((1, 5, 7, 2, 3, "float64"), (2, 9, 4, 1, 5, "float64"), (1, 6, 6, 2, 4, "float32"))


def check(implementation):
    import torch

    def run():
        calls = []

        def forward(q, k, v):
            calls.append("forward")
            return _forward(q, k, v)

        def backward(dout, q, k, v, out, lse):
            calls.append("backward")
            return fa2_backward_from_lse(dout, q, k, v, out, lse)

        for B, Nq, Nk, H, d, dtype in CASES:
            case = f"B={B}, Nq={Nq}, Nk={Nk}, H={H}, d={d}, {dtype}"
            rng = np.random.default_rng(Nq * Nk + d)
            arrays = [rng.standard_normal(s) for s in ((B, Nq, H, d), (B, Nk, H, d), (B, Nk, H, d))]
            W = rng.standard_normal((B, Nq, H, d))          # loss = sum(out * W): dout = W
            torch_dtype = getattr(torch, dtype)
            q, k, v = (torch.tensor(a, dtype=torch_dtype, requires_grad=True) for a in arrays)
            calls.clear()
            attend = call(implementation, forward, backward)
            if not callable(attend):
                raise Mismatch(f"return a function attend(q, k, v) (Attention.apply), got {attend!r}")
            out = call(attend, q, k, v)
            if not isinstance(out, torch.Tensor):
                raise Mismatch(f"{case}: attend returned {type(out).__name__}, expected a torch.Tensor")
            if out.dtype != torch_dtype:
                raise Mismatch(f"{case}: out is {out.dtype}, expected {torch_dtype} (the inputs' dtype)")
            tol = 1e-9 if dtype == "float64" else 1e-5
            want_out, _ = reference.attention(*arrays)
            same_array("out", out.detach().numpy(), want_out, tol=tol, case=case)
            if out.grad_fn is None:
                raise Mismatch(f"{case}: out has no grad_fn: call your Function's .apply, "
                               f"not its forward, so autograd records it")
            call((out * torch.tensor(W, dtype=torch_dtype)).sum().backward)
            if calls != ["forward", "backward"]:
                raise Mismatch(f"{case}: forward and backward were called {calls}, expected each once, "
                               f"forward first (autograd calls your backward once per backward pass)")
            wants = reference.attention_backward(W, *arrays)
            for name, t, want in zip(("dq", "dk", "dv"), (q, k, v), wants):
                if t.grad is None:
                    raise Mismatch(f"{case}: {name[1]}.grad is None after loss.backward(): return "
                                   f"(dq, dk, dv) from backward, in that order", variable=name)
                same_array(name, t.grad.numpy(), want, tol=tol,
                           case=f"{case}, loss = sum(out * W), compared with the float64 reference")
        return "out and the three gradients match the float64 reference, float32 and float64"
    return grade(ID, run)
