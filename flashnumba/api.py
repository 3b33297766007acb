"""The public calls: flash-attn's and PyTorch's attention functions, on flashnumba's kernels.

    flash_attn_func(q, k, v, ...)                 q (batch, seqlen_q, nheads, headdim), causal bottom-right
    flash_attn_qkvpacked_func(qkv, ...)           qkv (batch, seqlen, 3, nheads, headdim)
    flash_attn_kvpacked_func(q, kv, ...)          kv (batch, seqlen_k, 2, nheads_kv, headdim)
    flash_attn_backward(dout, q, k, v, out, softmax_lse, ...) -> (dq, dk, dv)
    scaled_dot_product_attention(query, key, value, ...)   query (batch, nheads, seqlen_q, headdim),
                                                           causal top-left, as torch.nn.functional's

Each call checks everything first (``flashnumba.validate``), widens the inputs
to float32 on the device if they are float16 or bfloat16 (``kernels.cast``),
runs the kernels of the chosen algorithm, and gives the results back in the
inputs' kind and dtype (``flashnumba.interop``). PyTorch tensors that require
grad go through ``flashnumba.torch.function.FlashAttnFunction``, so
``loss.backward()`` runs flashnumba's backward kernels.

The two causal alignments
-------------------------
Key c is hidden from query r when c > r + offset:

    flash-attn (flash_attn_func):   offset = Nk - Nq   bottom-right: the last query sees every key
    PyTorch (is_causal=True):       offset = 0         top-left: query r sees keys 0 .. r

    Nq = Nk   the same lower triangle either way
    Nq < Nk   bottom-right: query r sees keys 0 .. r + Nk - Nq (decoding with a KV cache);
              top-left: the last Nk - Nq keys are seen by no query
    Nq > Nk   bottom-right: the first Nq - Nk queries see no key (out 0, lse -inf);
              top-left: every query sees key 0

Algorithms (``algorithm=``)
---------------------------
A kernel version named in ``flashnumba.registry`` (``registry.names()``). None
(the default) runs ``registry.default(dtype, headdim, device)``: for float16 and
bfloat16 inputs the tensor-core kernels where they run (the simulator, or a GPU
of compute capability 8.0 or newer), else the fast FA2 kernels on the inputs
widened to float32. A version that cannot take the inputs' dtype or head dim, or
cannot run on the GPU, is a ValueError naming ``algorithm``.
deterministic=True makes the backward's dQ bitwise reproducible: it runs the
version's ``deterministic_backward`` (FA2's separate dQ pass instead of atomics).

Dropout: the keep-mask of element (r, c) of head h, batch b is drawn by
Philox4x32-10 from (seed, b, h, r, c) (``flashnumba.philox``): the forward,
the backward and ``flashnumba.philox.keep_mask`` draw the same mask, and the
same seed gives the same result. Kept values are scaled by 1 / (1 - p).
"""

import dataclasses
import functools
import sys

from flashnumba import registry, validate
from flashnumba.attention import Call, backward, forward, lacks_features
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT
from flashnumba.interop import Operand, swap_seq_heads, take
from flashnumba.kernels.common import resolve_dropout


_CALLS = {}     # the Call of each argument tuple already checked (none with alibi_slopes: an array)
_CALLS_KEPT = 256


def _call(d, dropout_p, softmax_scale, causal, deterministic, algorithm, seed, alignment,
          scale_name="softmax_scale", causal_name="causal", dtype="float32", window_size=(-1, -1),
          softcap=0.0, alibi_slopes=None, B=1, Hq=1):
    """The checked Call of one public call's options; the same options again (of the same types:
    1, 1.0 and True are equal keys, and only some of them pass) return it without checking."""
    if alibi_slopes is not None:
        return _checked_call(d, dropout_p, softmax_scale, causal, deterministic, algorithm, seed,
                             alignment, scale_name, causal_name, dtype, window_size, softcap,
                             alibi_slopes, B, Hq)
    key = (d, dropout_p, softmax_scale, causal, deterministic, algorithm, seed, alignment, scale_name,
           causal_name, dtype, window_size, softcap, validate.compute_capability())
    try:
        key += (*map(type, key), *map(type, window_size))
        call = _CALLS.get(key)
    except TypeError:            # window_size unhashable or not a pair: check it every time
        key, call = None, None
    if call is None:
        call = _checked_call(d, dropout_p, softmax_scale, causal, deterministic, algorithm, seed,
                             alignment, scale_name, causal_name, dtype, window_size, softcap,
                             None, B, Hq)
        if key is not None:
            if len(_CALLS) >= _CALLS_KEPT:      # a new seed each call (dropout) must not grow it
                _CALLS.clear()
            _CALLS[key] = call
    return call


def _checked_call(d, dropout_p, softmax_scale, causal, deterministic, algorithm, seed, alignment,
                  scale_name, causal_name, dtype, window_size, softcap, alibi_slopes, B, Hq):
    p, seed = resolve_dropout(dropout_p, seed)           # p in [0, 1), seed in [0, 2^64)
    name = validate.algorithm(algorithm, dtype, d)
    call = Call(scale=validate.scale(softmax_scale, d, scale_name), dropout_p=float(p), seed=int(seed),
                causal=validate.flag(causal_name, causal), alignment=alignment,
                algorithm=name, deterministic=validate.deterministic(deterministic, name, d),
                window_size=validate.window_size(window_size), softcap=validate.softcap(softcap),
                alibi_slopes=validate.alibi_slopes(alibi_slopes, B, Hq))
    if algorithm is None and call.features and lacks_features(call, registry.version(call.algorithm)):
        # a default whose kernels lack these options: the fp32 kernels take them, widened
        call = dataclasses.replace(call, algorithm=registry.DEFAULT)
    return call


@functools.cache
def _autograd_function():
    """flashnumba.torch.function's FlashAttnFunction (imported when first needed: torch is optional)."""
    from flashnumba.torch.function import FlashAttnFunction
    return FlashAttnFunction


def _needs_autograd(operands):
    if not any(op.kind in ("torch", "torch-cpu") for op in operands):
        return False
    torch = sys.modules["torch"]
    return torch.is_grad_enabled() and any(getattr(op.value, "requires_grad", False) for op in operands)


def _attention(q, k, v, call_args, return_attn_probs, alignment):
    operands = validate.tensors(q=q, k=k, v=v)
    B, _, _, Hq, _, d = validate.attention_shapes(*operands)
    call = _call(d, alignment=alignment, dtype=operands[0].dtype, B=B, Hq=Hq, **call_args)
    return_attn_probs = validate.flag("return_attn_probs", return_attn_probs)
    if _needs_autograd(operands):
        return _autograd_function().run(operands, call, return_attn_probs)
    out, lse, S_dmask = forward(operands, call, return_attn_probs)
    return (out, lse, S_dmask) if return_attn_probs else out


# ---------------------------------------------------------------------------
# flash-attn's calls
# ---------------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    algorithm=None, seed=0):
    """Attention in flash-attn's layout: q (B, Nq, Hq, d), k and v (B, Nk, Hkv, d), Hq % Hkv == 0.

    Returns out (B, Nq, Hq, d) in q's dtype; with return_attn_probs=True,
    (out, softmax_lse (B, Hq, Nq) float32, S_dmask (B, Hq, Nq, Nk) in q's dtype:
    the probabilities with dropped entries negated; None without dropout).
    causal=True hides key c from query r when c > r + Nk - Nq (bottom-right).
    window_size=(left, right): query r sees key c when r + Nk - Nq - left <= c <= r + Nk - Nq +
    right, -1 unbounded (causal sets right = 0); tiles outside the band are skipped.
    softcap > 0: scores S become softcap tanh(S / softcap). alibi_slopes (Hq,) or (B, Hq) float32:
    -slope |r + Nk - Nq - c| added to the scores (after the softcap).
    softmax_scale defaults to 1/sqrt(d); deterministic=True makes the backward's dQ
    bitwise reproducible; seed keys the dropout mask.
    """
    return _attention(q, k, v, dict(dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                    deterministic=deterministic, algorithm=algorithm, seed=seed,
                                    window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes),
                      return_attn_probs, BOTTOM_RIGHT)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False,
                              return_attn_probs=False, *, algorithm=None, seed=0):
    """flash_attn_func on qkv (B, S, 3, H, d): q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]."""
    packed = Operand("qkv", qkv)
    validate.ndim(packed, 5, "(batch, seqlen, 3, nheads, headdim)")
    if packed.shape[2] != 3:
        raise ValueError(f"qkv must have 3 at dim 2 (batch, seqlen, 3, nheads, headdim), got shape {packed.shape}")
    q, k, v = (take(qkv, packed.kind, i) for i in range(3))
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, algorithm=algorithm, seed=seed)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False,
                             return_attn_probs=False, *, algorithm=None, seed=0):
    """flash_attn_func on q (B, Nq, Hq, d) and kv (B, Nk, 2, Hkv, d): k, v = kv[:, :, 0], kv[:, :, 1]."""
    packed = Operand("kv", kv)
    validate.ndim(packed, 5, "(batch, seqlen_k, 2, nheads_kv, headdim)")
    if packed.shape[2] != 2:
        raise ValueError(f"kv must have 2 at dim 2 (batch, seqlen_k, 2, nheads_kv, headdim), "
                         f"got shape {packed.shape}")
    k, v = (take(kv, packed.kind, i) for i in range(2))
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, algorithm=algorithm, seed=seed)


def flash_attn_backward(dout, q, k, v, out, softmax_lse, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, *,
                        algorithm=None, seed=0):
    """The gradients (dq, dk, dv) of flash_attn_func, for callers without an autograd framework.

    out and softmax_lse are flash_attn_func's results for the same q, k, v and
    options (dropout_p and seed too: the backward redraws the same mask).
    dq, dk, dv come back shaped like q, k, v, in their dtype (dk, dv summed over
    each group of query heads under grouped-query attention).
    """
    operands = validate.tensors(dout=dout, q=q, k=k, v=v, out=out)
    B, Nq, _, H_q, _, d = validate.attention_shapes(*operands[1:4])
    validate.like(operands[0], operands[1].shape, "like q")
    validate.like(operands[4], operands[1].shape, "like q")
    lse = Operand("softmax_lse", softmax_lse)
    if lse.dtype != "float32":
        raise TypeError(f"softmax_lse must be float32 (as flash_attn_func returns it), got {lse.dtype}")
    if lse.on_host != operands[1].on_host:
        raise TypeError(f"softmax_lse is {'on the host' if lse.on_host else 'on the device'} "
                        f"({lse.kind}) but q is not ({operands[1].kind}); pass all tensors on one side")
    validate.like(lse, (B, H_q, Nq), "(batch, nheads, seqlen_q)")
    call = _call(d, dropout_p, softmax_scale, causal, deterministic, algorithm, seed, BOTTOM_RIGHT,
                 dtype=operands[1].dtype, window_size=window_size, softcap=softcap,
                 alibi_slopes=alibi_slopes, B=B, Hq=H_q)
    return backward(operands + [lse], call)


# ---------------------------------------------------------------------------
# PyTorch's call
# ---------------------------------------------------------------------------

def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, seed=0):
    """torch.nn.functional.scaled_dot_product_attention's call and layout on flashnumba's default kernels.

    query (B, Hq, Nq, d), key and value (B, Hkv, Nk, d); returns (B, Hq, Nq, d).
    is_causal=True hides key c from query r when c > r (top-left, PyTorch's
    alignment; flash_attn_func aligns bottom-right). Hq != Hkv needs enable_gqa=True.
    attn_mask is not supported (pass None; use is_causal for the causal mask).
    """
    enable_gqa = validate.flag("enable_gqa", enable_gqa)
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported by flashnumba: pass attn_mask=None "
                         "(is_causal=True gives the causal mask)")
    operands = validate.tensors(query=query, key=key, value=value)
    _, _, _, H_q, H_kv, d = validate.attention_shapes(*operands, layout=validate.SDPA_LAYOUT)
    if H_q != H_kv and not enable_gqa:
        raise ValueError(f"query has {H_q} heads and key {H_kv}: different head counts need "
                         f"enable_gqa=True")
    call = _call(d, dropout_p, scale, is_causal, False, None, seed, TOP_LEFT,
                 scale_name="scale", causal_name="is_causal", dtype=operands[0].dtype)
    q, k, v = (swap_seq_heads(op) for op in operands)            # to (B, N, H, d), no copy
    inner = validate.tensors(query=q, key=k, value=v)
    if _needs_autograd(inner):
        out = _autograd_function().run(inner, call, False)
    else:
        out = forward(inner, call, False)[0]
    return swap_seq_heads(Operand("out", out))                   # back to (B, H, N, d)
