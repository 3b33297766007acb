"""PyTorch layers over flashnumba's attention: ``FlashAttention`` and ``MultiheadSelfAttention``.

Both are ordinary ``torch.nn.Module``s: ``loss.backward()`` reaches every
parameter through flashnumba's backward kernels (``flashnumba.flash_attn_func``
is autograd-aware), and any optimizer works on ``module.parameters()``.

    FlashAttention            O = softmax(scale * Q K^T [+ causal mask]) V, dropout on P,
                              in flash-attn's layout (batch, seqlen, nheads, headdim);
                              no parameters of its own
    MultiheadSelfAttention    x (batch, seqlen, embed_dim) -> x: Q = x W_q, K = x W_k,
                              V = x W_v, heads, attention, out = concat(O_h) W_o;
                              grouped-query heads (num_kv_heads), and an
                              ``attention="flashnumba" | "torch"`` switch for the core

The switch exists for comparisons: with the same weights, the two settings run
the same projections and differ only in who computes softmax(Q K^T) V, so any
difference in output, gradient or training curve is the attention's.

Dropout draws a fresh Philox seed from PyTorch's CPU generator on every call
in training mode, so ``torch.manual_seed`` makes a run reproducible; the
dropout masks themselves are flashnumba's (``flashnumba.philox``), not the
ones PyTorch's own attention would draw, so with dropout on, the two switches
agree only in distribution, not call by call.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

import flashnumba
from flashnumba import validate

ATTENTIONS = ("flashnumba", "torch")


def draw_seed():
    """A Philox seed from PyTorch's default (CPU) generator: torch.manual_seed fixes the sequence."""
    return int(torch.randint(0, 2 ** 62, (1,)))


class FlashAttention(nn.Module):
    """softmax(scale Q K^T) V over ``flashnumba.flash_attn_func``, in flash-attn's layout.

    forward(q, k, v): q (batch, seqlen_q, nheads, headdim), k, v (batch, seqlen_k,
    nheads_kv, headdim) with nheads % nheads_kv == 0; returns (batch, seqlen_q,
    nheads, headdim). ``causal`` is aligned bottom-right as in flash-attn (key c is
    hidden from query r when c > r + seqlen_k - seqlen_q; the usual mask when the
    lengths are equal). Dropout ``p`` applies to the attention probabilities in
    training mode only.
    """

    def __init__(self, causal=False, softmax_scale=None, dropout=0.0, algorithm=None,
                 deterministic=False):
        super().__init__()
        if algorithm is not None:                           # a registry version; None: chosen per
            algorithm = validate.algorithm_name(algorithm)  # call by dtype (registry.default)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.causal = bool(causal)
        self.softmax_scale = softmax_scale
        self.dropout = float(dropout)
        self.algorithm = algorithm
        self.deterministic = bool(deterministic)

    def forward(self, q, k, v):
        p = self.dropout if self.training else 0.0
        seed = draw_seed() if p > 0.0 else 0        # no draw without dropout: the RNG stream is untouched
        return flashnumba.flash_attn_func(q, k, v, dropout_p=p, softmax_scale=self.softmax_scale,
                                          causal=self.causal, deterministic=self.deterministic,
                                          algorithm=self.algorithm, seed=seed)

    def extra_repr(self):
        return (f"causal={self.causal}, softmax_scale={self.softmax_scale}, dropout={self.dropout}, "
                f"algorithm={self.algorithm!r}")


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention with projections: (batch, seqlen, embed_dim) -> the same.

    Q = x W_q (num_heads heads), K = x W_k, V = x W_v (num_kv_heads heads each,
    default num_heads; fewer is grouped-query attention, each K/V head shared by
    num_heads / num_kv_heads query heads), O_h = attention(Q_h, K_h, V_h),
    out = concat_h(O_h) W_o. Head dim = embed_dim / num_heads.

    ``attention`` picks the core, and may be changed on a built module:
    "flashnumba" (``FlashAttention``, with ``algorithm``) or "torch"
    (``torch.nn.functional.scaled_dot_product_attention``). Self-attention has
    seqlen_q = seqlen_k, where flash-attn's bottom-right and PyTorch's top-left
    causal masks are the same mask.
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, dropout=0.0, causal=False,
                 bias=True, attention="flashnumba", algorithm=None, softmax_scale=None,
                 device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.flash = FlashAttention(causal=causal, softmax_scale=softmax_scale, dropout=dropout,
                                    algorithm=algorithm)
        self.attention = attention

    # causal, softmax_scale and dropout live once, in self.flash; the torch core reads them there.
    @property
    def causal(self):
        return self.flash.causal

    @property
    def softmax_scale(self):
        return self.flash.softmax_scale

    @property
    def dropout(self):
        return self.flash.dropout

    @dropout.setter
    def dropout(self, p):
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p!r}")
        self.flash.dropout = float(p)

    @property
    def attention(self):
        return self._attention

    @attention.setter
    def attention(self, name):
        if name not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {name!r}")
        self._attention = name

    def forward(self, x):
        B, N, _ = x.shape
        H, H_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, d)                 # flash layout: (batch, seqlen, heads, d)
        k = self.k_proj(x).view(B, N, H_kv, d)
        v = self.v_proj(x).view(B, N, H_kv, d)
        if self._attention == "flashnumba":
            o = self.flash(q, k, v)
        else:
            o = self._torch_attention(q, k, v)
        return self.out_proj(o.reshape(B, N, H * d))

    def _torch_attention(self, q, k, v):
        """The same core by PyTorch: its layout is (batch, heads, seqlen, d), hence the transposes."""
        p = self.dropout if self.training else 0.0
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=p, is_causal=self.causal, scale=scale,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return o.transpose(1, 2)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, causal={self.causal}, dropout={self.dropout}, "
                f"attention={self._attention!r}")
