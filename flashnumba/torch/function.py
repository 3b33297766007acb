"""flashnumba's attention as a torch.autograd.Function: loss.backward() runs flashnumba's backward kernels.

    out, softmax_lse, S_dmask = FlashAttnFunction.apply(q, k, v, call, return_attn_probs)
    out = FlashAttnFunction.run(operands, call, return_attn_probs)   # operands already checked

forward runs ``attention.forward`` on the (detached) tensors and saves q, k, v,
out and softmax_lse; backward runs ``attention.backward`` with the same options, so
dropout redraws the forward's mask from the same seed instead of storing it.
CUDA tensors are read and written in place through __cuda_array_interface__
(no copies); CPU tensors go through NumPy (on the simulator where there is no
GPU). ``flashnumba.flash_attn_func`` and ``scaled_dot_product_attention``
call this for tensors that require grad, so users never need to.
"""

import torch

from flashnumba import attention, validate
from flashnumba.interop import Operand


class FlashAttnFunction(torch.autograd.Function):
    """Attention in flash layout (B, N, H, d); `call` is an ``attention.Call`` (scale, dropout, causal, ...)."""

    @staticmethod
    def forward(ctx, q, k, v, call, return_attn_probs, operands=None):
        if operands is None:             # not through run(): check them here
            operands = validate.tensors(q=q, k=k, v=v)
        out, lse, S_dmask = attention.forward(operands, call, return_attn_probs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        if S_dmask is not None:
            ctx.mark_non_differentiable(S_dmask)
        return out, lse, S_dmask

    @staticmethod
    def backward(ctx, dout, _dlse, _dS_dmask):
        q, k, v, out, lse = ctx.saved_tensors
        operands = validate.tensors(dout=dout, q=q, k=k, v=v, out=out) + [Operand("softmax_lse", lse)]
        dq, dk, dv = attention.backward(operands, ctx.call)
        return dq, dk, dv, None, None, None

    @classmethod
    def run(cls, operands, call, return_attn_probs):
        """out, or (out, softmax_lse, S_dmask) as flash_attn_func returns them, for the q, k, v
        operands the public call checked (``validate.tensors``)."""
        q, k, v = (op.value for op in operands)
        out, lse, S_dmask = cls.apply(q, k, v, call, return_attn_probs, operands)
        return (out, lse, S_dmask) if return_attn_probs else out
