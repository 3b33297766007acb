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


BACKWARD_OPERANDS = ("dout", "q", "k", "v", "out", "softmax_lse")


class FlashAttnFunction(torch.autograd.Function):
    """Attention in flash layout (B, N, H, d); `call` is an ``attention.Call`` (scale, dropout, causal, ...)."""

    @staticmethod
    def forward(ctx, q, k, v, call, return_attn_probs, operands=None):
        if operands is None:             # not through run(): check them here
            operands = validate.tensors(q=q, k=k, v=v)
        out, lse, S_dmask = attention.forward(operands, call, return_attn_probs)
        ctx.set_materialize_grads(False)     # no zeros made for lse's and S_dmask's absent gradients
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        if S_dmask is not None:
            ctx.mark_non_differentiable(S_dmask)
        return out, lse, S_dmask

    @staticmethod
    def backward(ctx, dout, _dlse, _dS_dmask):
        if dout is None:                     # the loss does not depend on out
            return None, None, None, None, None, None
        # q, k, v were checked by the forward, out and lse made by it; autograd hands dout over
        # with out's shape, dtype and device
        operands = [Operand(name, x) for name, x in zip(BACKWARD_OPERANDS, (dout, *ctx.saved_tensors))]
        dq, dk, dv = attention.backward(operands, ctx.call)
        return dq, dk, dv, None, None, None

    @classmethod
    def run(cls, operands, call, return_attn_probs):
        """out, or (out, softmax_lse, S_dmask) as flash_attn_func returns them, for the q, k, v
        operands the public call checked (``validate.tensors``)."""
        q, k, v = (op.value for op in operands)
        out, lse, S_dmask = cls.apply(q, k, v, call, return_attn_probs, operands)
        return (out, lse, S_dmask) if return_attn_probs else out
