"""flash-attn's variable-length calls: sequences of different lengths packed along one axis.

    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
    flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, ...)
    flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
    flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, ...)

q is (total_q, Hq, d) and k, v (total_k, Hkv, d): sequence b is rows
cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and cu_seqlens_k[b] ..
cu_seqlens_k[b + 1] - 1 of k and v (cu_seqlens: int32, batch + 1 entries, from
0 to total, non-decreasing). Each sequence is attended to on its own, with every
option of ``flash_attn_func`` (causal and windows aligned bottom-right per
sequence, softcap, ALiBi slopes per sequence when (batch, nheads), dropout keyed
per sequence). The output (total_q, Hq, d) and the gradients come back in the
same packed layout; softmax_lse is (Hq, total_q), as flash-attn's varlen calls
return it.

How: one ``flash_attn_func`` call per sequence, on views of the packed arrays
(no copy of the inputs), then the results put back in place. PyTorch tensors
that require grad get autograd through those calls and one ``torch.cat``. One
launch per sequence costs a launch per sequence (a cu_seqlens-aware grid would
launch once); for a batch of a few long sequences it is the kernels that count.
A sequence of length 0 (equal neighbours in cu_seqlens) is refused.
"""

import sys

import numpy as np
from numba import cuda

from flashnumba import api, validate
from flashnumba.interop import Operand

VARLEN_LAYOUT = "(total, nheads, headdim)"


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

def _host_ints(name, cu):
    """cu_seqlens as a host int64 array, whatever side it is on; a clear error unless int32 1-D."""
    op = Operand(name, cu) if not isinstance(cu, (list, tuple)) else None
    if op is None:
        raise TypeError(f"{name} must be an int32 array (NumPy, PyTorch or device), got a {type(cu).__name__}")
    if op.kind == "numpy":
        host = np.asarray(cu)
    elif op.kind in ("torch", "torch-cpu"):
        host = cu.detach().cpu().numpy()
    elif op.kind == "numba":
        host = cu.copy_to_host()
    else:
        host = cuda.as_cuda_array(cu).copy_to_host()
    if host.dtype != np.int32:
        raise TypeError(f"{name} must be int32 (as flash-attn requires), got {host.dtype}")
    if host.ndim != 1 or host.size < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {host.shape}")
    return host.astype(np.int64)


def seqlens(name, cu, total, max_seqlen, max_name):
    """(starts, lengths) of the sequences cu describes, checked against the packed total."""
    cu = _host_ints(name, cu)
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {cu[0]}")
    lengths = np.diff(cu)
    if (lengths < 0).any():
        b = int(np.argmax(lengths < 0))
        raise ValueError(f"{name} must be non-decreasing; {name}[{b + 1}] = {cu[b + 1]} < "
                         f"{name}[{b}] = {cu[b]}")
    if (lengths == 0).any():
        b = int(np.argmax(lengths == 0))
        raise ValueError(f"{name}: sequence {b} has length 0 ({name}[{b}] = {name}[{b + 1}] = {cu[b]}); "
                         f"flashnumba needs every sequence to have at least one token")
    if cu[-1] != total:
        raise ValueError(f"{name}[-1] = {cu[-1]} must equal the packed length {total} "
                         f"(the tensor's first dim)")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, np.integer)):
        raise TypeError(f"{max_name} must be an integer, got {max_seqlen!r}")
    if lengths.max() > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} but {name} has a sequence of length "
                         f"{int(lengths.max())}; it must be at least the longest")
    return cu[:-1], lengths


def _packed_shapes(q, k, v):
    """(total_q, total_k, Hq, Hkv, d) of q (total_q, Hq, d), k, v (total_k, Hkv, d)."""
    for op in (q, k, v):
        validate.ndim(op, 3, VARLEN_LAYOUT)
    if v.shape != k.shape:
        raise ValueError(f"v has shape {v.shape}, expected k's shape {k.shape}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has head dim {k.shape[2]}, expected q's head dim {q.shape[2]}")
    return q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2]


# ---------------------------------------------------------------------------
# Views and joins, per kind of array
# ---------------------------------------------------------------------------

def _rows(x, kind, start, length):
    """x[start:start + length] with a batch axis of 1 in front: a view."""
    piece = x[start:start + length]
    if kind == "numba":
        return piece.reshape((1,) + tuple(piece.shape))
    return piece[None]


def _lse_rows(lse, kind, start, length):
    """softmax_lse (Hq, total_q) -> the (1, Hq, length) float32 block of one sequence, contiguous."""
    if kind == "numpy":
        return np.ascontiguousarray(lse[:, start:start + length])[None]
    if kind in ("torch", "torch-cpu"):
        return lse[:, start:start + length].contiguous()[None]
    host = lse.copy_to_host() if kind == "numba" else cuda.as_cuda_array(lse).copy_to_host()
    return cuda.to_device(np.ascontiguousarray(host[:, start:start + length])[None])


def _join(pieces, kind, axis):
    """The pieces concatenated along `axis`, as the same kind."""
    if kind == "numpy":
        return np.concatenate(pieces, axis=axis)
    if kind in ("torch", "torch-cpu"):
        return sys.modules["torch"].cat(pieces, dim=axis)
    if kind == "cupy":
        return sys.modules["cupy"].concatenate(pieces, axis=axis)
    host = [p.copy_to_host() for p in pieces]                # numba device arrays
    return cuda.to_device(np.concatenate(host, axis=axis))


def _check_kind(op):
    if op.kind == "cai":
        raise TypeError(f"{op.name}: the varlen calls take NumPy arrays, PyTorch tensors, CuPy or Numba "
                        f"device arrays; got a plain __cuda_array_interface__ object")


def _slopes_row(alibi_slopes, b):
    """The slopes of sequence b: (nheads,) slopes serve every sequence; (batch, nheads) row b."""
    if alibi_slopes is None or len(getattr(alibi_slopes, "shape", ())) != 2:
        return alibi_slopes
    return alibi_slopes[b]


# ---------------------------------------------------------------------------
# The calls
# ---------------------------------------------------------------------------

def _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    operands = validate.tensors(q=q, k=k, v=v)
    for op in operands:
        _check_kind(op)
    total_q, total_k, _, _, _ = _packed_shapes(*operands)
    starts_q, lengths_q = seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
    starts_k, lengths_k = seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")
    if len(starts_q) != len(starts_k):
        raise ValueError(f"cu_seqlens_q has {len(starts_q) + 1} entries and cu_seqlens_k "
                         f"{len(starts_k) + 1}: both must be batch + 1 long")
    return operands[0].kind, list(zip(starts_q, lengths_q, starts_k, lengths_k))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                           algorithm=None, seed=0):
    """Attention over packed sequences: q (total_q, Hq, d), k, v (total_k, Hkv, d).

    Returns out (total_q, Hq, d); with return_attn_probs=True (out, softmax_lse (Hq, total_q)
    float32, None): the probabilities of a packed batch are not returned. Options as
    ``flash_attn_func``; seed + b keys sequence b's dropout mask.
    """
    kind, sequences = _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if alibi_slopes is not None and len(getattr(alibi_slopes, "shape", ())) == 2 and \
            alibi_slopes.shape[0] != len(sequences):
        raise ValueError(f"alibi_slopes has shape {tuple(alibi_slopes.shape)}: (batch, nheads) needs "
                         f"batch = {len(sequences)} sequences")
    outs, lses = [], []
    for b, (s_q, n_q, s_k, n_k) in enumerate(sequences):
        result = api.flash_attn_func(
            _rows(q, kind, s_q, n_q), _rows(k, kind, s_k, n_k), _rows(v, kind, s_k, n_k),
            dropout_p, softmax_scale, causal, window_size, softcap, _slopes_row(alibi_slopes, b),
            deterministic, return_attn_probs, algorithm=algorithm, seed=seed + b if dropout_p else seed)
        if return_attn_probs:
            result, lse, _ = result
            lses.append(lse[0])
        outs.append(result[0])
    out = _join(outs, kind, 0)
    return (out, _join(lses, kind, 1), None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False, *, algorithm=None,
                                     seed=0):
    """flash_attn_varlen_func on qkv (total, 3, H, d), one cu_seqlens for queries and keys."""
    packed = Operand("qkv", qkv)
    validate.ndim(packed, 4, "(total, 3, nheads, headdim)")
    if packed.shape[1] != 3:
        raise ValueError(f"qkv must have 3 at dim 1 (total, 3, nheads, headdim), got shape {packed.shape}")
    q, k, v = (qkv[:, i] for i in range(3))
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, algorithm=algorithm, seed=seed)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False, *, algorithm=None, seed=0):
    """flash_attn_varlen_func on q (total_q, Hq, d) and kv (total_k, 2, Hkv, d)."""
    packed = Operand("kv", kv)
    validate.ndim(packed, 4, "(total_k, 2, nheads_kv, headdim)")
    if packed.shape[1] != 2:
        raise ValueError(f"kv must have 2 at dim 1 (total_k, 2, nheads_kv, headdim), got shape {packed.shape}")
    k, v = kv[:, 0], kv[:, 1]
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, algorithm=algorithm, seed=seed)


def flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, *, algorithm=None, seed=0):
    """(dq, dk, dv) of flash_attn_varlen_func in the packed layout, for callers without autograd.
    out and softmax_lse (Hq, total_q) are its results for the same inputs and options."""
    kind, sequences = _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    validate.like(Operand("dout", dout), Operand("q", q).shape, "like q")
    validate.like(Operand("out", out), Operand("q", q).shape, "like q")
    total_q, heads = Operand("q", q).shape[:2]
    validate.like(Operand("softmax_lse", softmax_lse), (heads, total_q), "(nheads, total_q)")
    grads = ([], [], [])
    for b, (s_q, n_q, s_k, n_k) in enumerate(sequences):
        parts = api.flash_attn_backward(
            _rows(dout, kind, s_q, n_q), _rows(q, kind, s_q, n_q), _rows(k, kind, s_k, n_k),
            _rows(v, kind, s_k, n_k), _rows(out, kind, s_q, n_q), _lse_rows(softmax_lse, kind, s_q, n_q),
            dropout_p, softmax_scale, causal, window_size, softcap, _slopes_row(alibi_slopes, b),
            deterministic, algorithm=algorithm, seed=seed + b if dropout_p else seed)
        for acc, part in zip(grads, parts):
            acc.append(part[0])
    return tuple(_join(g, kind, 0) for g in grads)
