"""PyTorch integration, an optional extra (``pip install flashnumba[torch]``): the core never imports torch.

    FlashAttnFunction        torch.autograd.Function over flashnumba's forward and backward
    FlashAttention           nn.Module: attention in flash layout, dropout while training
    MultiheadSelfAttention   nn.Module: q/k/v/out projections around either attention

``flashnumba.flash_attn_func`` and ``flashnumba.scaled_dot_product_attention``
already go through FlashAttnFunction when given tensors that require grad.
"""

from flashnumba.torch.function import FlashAttnFunction
from flashnumba.torch.modules import FlashAttention, MultiheadSelfAttention

__all__ = ["FlashAttention", "FlashAttnFunction", "MultiheadSelfAttention"]
