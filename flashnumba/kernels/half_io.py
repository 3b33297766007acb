"""16-bit inputs at the tensor-core kernels' door: dtype, shapes, bits padded to the head-dim bucket.

Shared by ``fa2_tc_forward`` and ``fa2_tc_backward`` (a kernel module does not import another).
The kernels read raw 16-bit data: the uint16 bits of float16 or bfloat16 arrays
(NumPy: ``ml_dtypes.bfloat16``; on the device, Numba arrays of the bits with
``dtype='bfloat16' | 'float16'``). cp.async moves whole 16-byte chunks, so rows
are padded with zeros from d to the bucket d_pad (a copy only when d < d_pad).

    resolve_kind(x, dtype) -> 'bf16' | 'f16'      check_qkv16(q, k, v) -> (B, Nq, Nk, Hq, Hkv, d)
    bits_of(x)             -> uint16 view          padded_bits(x, d_pad, arrays) -> device (B, N, H, d_pad)
    as_dtype(bits, kind, like) -> the result in the caller's kind of array
    f32_like(x, shape)     -> a float32 torch tensor beside torch tensor x (the fast paths)
    fast_takes, fast_shape_class, fast_band             the fast paths' shared steps
"""

import numpy as np
from numba import cuda, uint16

from flashnumba import dtypes, geometry
from flashnumba.kernels import common

KINDS = {dtypes.BFLOAT16: "bf16", dtypes.FLOAT16: "f16"}


@cuda.jit
def pad_head_dim(src, dst):
    """dst[b, n, h, x] = src[b, n, h, x] for x < d, 0 for d <= x < d_pad (uint16 bits)."""
    idx = cuda.grid(1)
    B, N, H, d_pad = dst.shape
    if idx < B * N * H * d_pad:
        x = idx % d_pad
        rest = idx // d_pad
        hh = rest % H
        rest //= H
        n = rest % N
        b = rest // N
        dst[b, n, hh, x] = src[b, n, hh, x] if x < src.shape[3] else uint16(0)


def resolve_kind(x, dtype=None):
    """'bf16' or 'f16' for an input: its own dtype, or `dtype` when it holds raw uint16 bits."""
    name = dtypes.name_of(x)
    if name == "uint16":
        if dtype not in KINDS:
            raise TypeError(f"q holds uint16 bits: pass dtype='bfloat16' or 'float16' to say which, "
                            f"got dtype={dtype!r}")
        name = dtype
    elif dtype is not None and dtype != name:
        raise TypeError(f"dtype={dtype!r} does not match the inputs' dtype {name}")
    if name not in KINDS:
        raise TypeError(f"fa2_tc_forward takes float16 or bfloat16 inputs (or their uint16 bits), "
                        f"got {name}")
    return KINDS[name]


def fast_takes(dtype, d):
    """True where the tensor-core kernels' fast paths (``fast_forward`` / ``fast_backward``) serve
    a call: float16 or bfloat16 inputs whose head dim is its bucket's own (d_pad = d: the
    kernels read the tensors as they are, no padded copy)."""
    return dtype in KINDS and d <= common.HEAD_DIM_BUCKETS[-1] and common.head_dim_bucket(d) == d


def fast_shape_class(q, k, *, causal, alignment, softmax_scale, dropout_p, window_size, softcap,
                     alibi_slopes):
    """(kind, key) of a fast-path call on torch tensors q, k: the kernels' 'bf16' | 'f16' and the
    key of its shape class (shapes, kind, device, options) under which its launches are kept."""
    kind = KINDS[str(q.dtype).rpartition(".")[2]]           # torch.bfloat16 -> 'bfloat16'
    return kind, (q.shape, k.shape, kind, q.get_device(), causal, alignment, softmax_scale,
                  dropout_p > 0.0, tuple(window_size), softcap, alibi_slopes is None)


def fast_band(q, k, *, causal, alignment, softmax_scale, window_size, softcap):
    """(scale, windowed, lo, hi, steps, cap) as the launchers resolve them (``common.resolve_band``,
    the softcap checked), for the first call of a shape class."""
    B, Nq, H_q, d = q.shape
    band = common.resolve_band(Nq, k.shape[1], d, causal=causal, alignment=alignment,
                               softmax_scale=softmax_scale, window_size=window_size, limit=None)
    return (*band, common.resolve_features_host(softcap, None, B, H_q, alignment)[0])


def fast_slopes(q, placeholder, *, softcap, alibi_slopes, alignment):
    """The ALiBi slopes a fast-path call passes: (B, H_q) float32 on q's device, or, without
    alibi_slopes, `placeholder` (a tensor the kernel never reads, kept with the shape class)."""
    if alibi_slopes is None:
        return placeholder
    B, H_q = q.shape[0], q.shape[2]
    return f32_like(q, (B, H_q), common.resolve_features_host(softcap, alibi_slopes, B, H_q, alignment)[1])


def f32_like(x, shape, host=None):
    """A float32 torch tensor on torch tensor x's device: empty, of `shape`, or (`host` given) a
    copy of that host array (the fast launch paths' L, D_i, dQ's accumulator and ALiBi slopes)."""
    import torch  # only the fast paths call this, on torch tensors
    if host is None:
        return x.new_empty(shape, dtype=torch.float32)
    return x.new_tensor(host, dtype=torch.float32)


def bits_of(x):
    """The uint16 bit patterns of a float16/bfloat16/uint16 array, without a copy."""
    if isinstance(x, np.ndarray):
        return x.view(np.uint16)
    if np.dtype(x.dtype) == np.uint16:
        return x
    return x.view(np.uint16)


def check_qkv16(q, k, v):
    """Shapes of q (B, Nq, Hq, d), k, v (B, Nk, Hkv, d), 16-bit, all of one dtype."""
    names = {dtypes.name_of(x) for x in (q, k, v)}
    if len(names) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {sorted(names)}")
    B, Nq, Hq, d = q.shape
    for name, x in (("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    if len(q.shape) != 4:
        raise ValueError(f"q must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(q.shape)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Nk, Hkv, dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch {Bk}, expected q's batch {B}")
    if dk != d:
        raise ValueError(f"k has head dim {dk}, expected q's head dim {d}")
    if Nq < 1 or Nk < 1 or B < 1:
        raise ValueError(f"batch and sequence lengths must be >= 1, got B={B}, seqlen_q={Nq}, seqlen_k={Nk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"nheads_q={Hq} must be a multiple of nheads_kv={Hkv}")
    common.head_dim_bucket(d)
    return B, Nq, Nk, Hq, Hkv, d


def padded_bits(x, d_pad, arrays):
    """x's uint16 bits on the device, C-contiguous, head dim zero-padded to d_pad (a copy only when needed)."""
    bits = bits_of(x)
    if arrays.host:
        if bits.shape[3] == d_pad:
            return cuda.to_device(np.ascontiguousarray(bits))
        padded = np.zeros((*bits.shape[:3], d_pad), np.uint16)
        padded[..., :bits.shape[3]] = bits
        return cuda.to_device(padded)
    bits = arrays.to_device(bits)
    if bits.shape[3] == d_pad and bits.is_c_contiguous():
        return bits
    padded = cuda.device_array((*bits.shape[:3], d_pad), dtype=np.uint16)
    n = padded.size
    pad_head_dim[geometry.num_tiles(n, 256), 256](bits, padded)
    return padded


def as_dtype(bits, kind, like):
    """Kernel output bits as the inputs' kind: NumPy float16/bfloat16 for NumPy inputs, else the
    device array (uint16 bits; float16 viewed for f16)."""
    numpy_dtype = dtypes.NUMPY[dtypes.BFLOAT16 if kind == "bf16" else dtypes.FLOAT16]
    if isinstance(like, np.ndarray):
        return bits.copy_to_host().view(numpy_dtype)
    return bits if kind == "bf16" else bits.view(np.float16)
