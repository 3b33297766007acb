"""Storage dtypes at the kernels' door: float16 and bfloat16 in, float32 inside, the input dtype out.

Every attention kernel reads, computes and accumulates in float32. A float16 or
bfloat16 tensor is *widened* once, on the device, into a C-contiguous float32
copy (exact: every float16 and bfloat16 value is a float32 value), and each
result is *narrowed* back to the input's dtype as it leaves, rounding to
nearest, ties to even. The same widening pass turns a strided input (a
transposed view, one slice of a packed qkv) into the contiguous array the
kernels expect, so every input is copied at most once.

    widen(src, dst)                  dst = float32(src), src float32 or float16, any strides
    widen_bf16(src_bits, dst_bits)   dst = float32(src) for bfloat16 stored as uint16 bits
    narrow(src, dst)                 dst = float16(src) (or a float32 copy), flat arrays
    narrow_bf16(src_bits, dst_bits)  dst = bfloat16(src), flat arrays of bits

bfloat16 is the top half of a float32: the same sign, the same 8 exponent bits,
the first 7 of the 23 mantissa bits. Numba has no bfloat16 type, so a bfloat16
array travels as its uint16 bit patterns and the float32 side is viewed as
uint32 (``DeviceNDArray.view``):

    widen:   bits32 = bits16 << 16                       exact
    narrow:  bits16 = (bits32 + 0x7FFF + lsb) >> 16      lsb = bit 16 of bits32: ties to even
             NaN:    bits16 = (bits32 >> 16) | 0x0040    stays a (quiet) NaN, never rounds to inf

All integer arithmetic is in uint64 (np.uint64 on both sides of every operator:
Numba turns uint64 mixed with int64 into float64).
"""

import numpy as np
from numba import cuda, types

from flashnumba.geometry import num_tiles

THREADS = 256


def blocks(n):
    """Blocks of THREADS threads covering n elements."""
    return num_tiles(n, THREADS)


@cuda.jit(device=True)
def element(idx, shape):
    """(b, n, h, k) of flat index idx in a C-contiguous array of this 4-D shape."""
    _, N, H, d = shape
    return idx // (d * H * N), (idx // (d * H)) % N, (idx // d) % H, idx % d


@cuda.jit
def widen(src, dst):
    """dst[b, n, h, k] = float32(src[b, n, h, k]); src float32 or float16 with any strides, dst C-contiguous."""
    idx = cuda.grid(1)
    if idx < dst.size:
        b, n, h, k = element(idx, dst.shape)
        dst[b, n, h, k] = src[b, n, h, k]


@cuda.jit
def widen_bf16(src_bits, dst_bits):
    """dst_bits[b, n, h, k] = src_bits[b, n, h, k] << 16: bfloat16 bits (uint16, any strides) to float32 bits."""
    idx = cuda.grid(1)
    if idx < dst_bits.size:
        b, n, h, k = element(idx, dst_bits.shape)
        dst_bits[b, n, h, k] = np.uint64(src_bits[b, n, h, k]) << np.uint64(16)


@cuda.jit
def narrow(src, dst):
    """dst[i] = src[i] for flat arrays: float32 to float16 rounds to nearest even (cvt.rn)."""
    i = cuda.grid(1)
    if i < dst.size:
        dst[i] = src[i]


@cuda.jit
def narrow_bf16(src_bits, dst_bits):
    """dst_bits[i] = bfloat16 bits of the float32 whose bits are src_bits[i], ties to even; NaN stays NaN."""
    i = cuda.grid(1)
    if i < dst_bits.size:
        u = np.uint64(src_bits[i])
        if (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000):          # NaN: keep it quiet, never inf
            dst_bits[i] = (u >> np.uint64(16)) | np.uint64(0x0040)
        else:
            lsb = (u >> np.uint64(16)) & np.uint64(1)                      # ties go to the even neighbour
            dst_bits[i] = (u + np.uint64(0x7FFF) + lsb) >> np.uint64(16)


def targets():
    """(label, dispatcher, argtypes) for the resource check, as the API launches them."""
    a4 = types.Array(types.float32, 4, "C")
    f16_any = types.Array(types.float16, 4, "A")
    f32_any = types.Array(types.float32, 4, "A")
    u16_any = types.Array(types.uint16, 4, "A")
    u32_4 = types.Array(types.uint32, 4, "C")
    return [
        ("widen_f32", widen, (f32_any, a4)),
        ("widen_f16", widen, (f16_any, a4)),
        ("widen_bf16", widen_bf16, (u16_any, u32_4)),
        ("narrow_f16", narrow, (types.Array(types.float32, 1, "C"), types.Array(types.float16, 1, "C"))),
        ("narrow_bf16", narrow_bf16, (types.Array(types.uint32, 1, "C"), types.Array(types.uint16, 1, "C"))),
    ]
