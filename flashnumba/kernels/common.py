"""What every kernel wrapper shares: input checks, head-dim buckets, device arrays, tile configs.

A wrapper does three things (check, allocate, launch); the first two live here.

Head dims are compiled in buckets: a kernel is built for d_pad in HEAD_DIM_BUCKETS
and serves every d <= d_pad. Tiles are loaded into shared memory zero-padded from
d to d_pad, so the inner loops run over the compile-time d_pad with no bounds checks:
the padding contributes zeros to every dot product.
"""

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda

from flashnumba import geometry
from flashnumba.kernels.hardware import STATIC_SMEM_LIMIT, WARP_SIZE

HEAD_DIM_BUCKETS = (16, 32, 64, 96, 128)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]
FAST_HEAD_DIMS = (32, 64, 128, 256)      # the fast kernels' compile-time d_pad; d <= 16 runs in d_pad = 32,
                                         # 64 < d <= 96 in d_pad = 128 (a d_pad = 96 build spilled: 12-wide rows)
MAX_FAST_HEAD_DIM = FAST_HEAD_DIMS[-1]   # flash-attn's largest head dim; the readable kernels stop at MAX_HEAD_DIM


@cuda.jit(device=True)
def max_nan(a, b):
    """max(a, b) that propagates NaN as NumPy's max does (Python's and Numba's max drop it),
    so a NaN in the inputs reaches the output instead of passing for a masked score."""
    if a != a or a > b:
        return a
    return b


def head_dim_bucket(d):
    """The compile-time head dim d_pad that serves a run-time head dim d."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim d={d} is not supported: expected 1 <= d <= {MAX_HEAD_DIM}")
    return next(d_pad for d_pad in HEAD_DIM_BUCKETS if d <= d_pad)


def fast_bucket(d):
    """The compile-time head dim d_pad of the fast kernels that serves head dim d."""
    if not 1 <= d <= MAX_FAST_HEAD_DIM:
        raise ValueError(f"head dim d={d} is not supported: expected 1 <= d <= {MAX_FAST_HEAD_DIM}")
    return next(d_pad for d_pad in FAST_HEAD_DIMS if d <= d_pad)


@dataclass(frozen=True)
class TileConfig:
    """Compile-time shape of one kernel: tile sizes, bucketed head dim, warps per block."""
    Br: int
    Bc: int
    d_pad: int
    num_warps: int
    blocks_per_sm: int = 0       # launch-bound occupancy target; 0: the kernel module's own choice

    @property
    def threads(self):
        return self.num_warps * WARP_SIZE


def resolve_config(d, Br, Bc, num_warps, *, defaults, check):
    """The config for head dim d: ``defaults(d)`` with any of Br, Bc, num_warps overridden,
    checked by ``check`` before anything is launched."""
    base = defaults(d)
    config = TileConfig(Br=base.Br if Br is None else Br,
                        Bc=base.Bc if Bc is None else Bc,
                        d_pad=base.d_pad,
                        num_warps=base.num_warps if num_warps is None else num_warps)
    check(config)
    return config


class ConfigError(ValueError):
    """A tile configuration that cannot run (too much shared memory, bad divisibility, ...)."""


def require(condition, message):
    if not condition:
        raise ConfigError(message)


def check_sizes(config, who):
    """The size checks every readable kernel shares: positive integers, d_pad a head-dim
    bucket, at most 1024 threads. Each module then adds its divisibility rules and
    ``check_smem``."""
    require(isinstance(config, TileConfig), f"{who}: expected a TileConfig, got {config!r}")
    for name in ("Br", "Bc", "d_pad", "num_warps"):
        value = getattr(config, name)
        require(isinstance(value, (int, np.integer)) and value >= 1,
                f"{who}: {name} must be a positive integer, got {value!r}")
    require(config.d_pad in HEAD_DIM_BUCKETS,
            f"{who}: d_pad={config.d_pad} is not a head-dim bucket {HEAD_DIM_BUCKETS}")
    require(config.threads <= 1024,
            f"{who}: num_warps={config.num_warps} gives {config.threads} threads; "
            f"a thread block has at most 1024 (num_warps <= 32)")


def tile_offsets(sizes):
    """Tiles laid end to end in one shared array: {name: first float} for (name, floats) in
    `sizes`, in order, and "floats": the array's length."""
    offsets, at = {}, 0
    for name, size in sizes:
        offsets[name] = at
        at += size
    offsets["floats"] = at
    return offsets


def check_smem(config, smem, who):
    """`smem` bytes of static shared memory fit the 48 KB a block may have."""
    require(smem <= STATIC_SMEM_LIMIT,
            f"{who}: Br={config.Br}, Bc={config.Bc}, d_pad={config.d_pad}, num_warps={config.num_warps} "
            f"needs {smem} bytes of static shared memory, over the {STATIC_SMEM_LIMIT} bytes "
            f"(48 KB) a block may have; use smaller tiles")


def is_device_array(x):
    if isinstance(x, np.ndarray):
        return False
    if hasattr(cuda, "is_cuda_array"):
        return cuda.is_cuda_array(x)
    # The simulator has no is_cuda_array; its device arrays (FakeCUDAArray) say so.
    return bool(getattr(x, "__cuda_ndarray__", False))


def check_qkv(q, k, v, bucket=head_dim_bucket):
    """Shapes of q (B, Nq, Hq, d), k and v (B, Nk, Hkv, d); returns (B, Nq, Nk, Hq, Hkv, d).
    `bucket` (head_dim_bucket, or fast_bucket for the fast kernels) checks the head dim."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
        if np.dtype(x.dtype) != np.float32:
            raise TypeError(f"{name} must be float32, got {np.dtype(x.dtype)}")
    B, Nq, Hq, d = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Nk, Hkv, dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch {Bk}, expected q's batch {B}")
    if dk != d:
        raise ValueError(f"k has head dim {dk}, expected q's head dim {d}")
    if Nq < 1 or Nk < 1:
        raise ValueError(f"sequence lengths must be >= 1, got seqlen_q={Nq}, seqlen_k={Nk}")
    if B < 1:
        raise ValueError(f"batch must be >= 1, got {B}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"nheads_q={Hq} must be a multiple of nheads_kv={Hkv}")
    bucket(d)
    return B, Nq, Nk, Hq, Hkv, d


def resolve_scale(softmax_scale, d):
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return scale


def resolve_dropout(dropout_p, seed):
    """(p as float64, seed as uint64) for the kernels; raises ValueError naming the bad one.

    p stays float64 because the keep test ``x 2^-32 >= p`` must compare against the
    same number on the host and on the device (see ``flashnumba.philox``)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.integer, np.floating)):
        raise TypeError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed!r}")
    return np.float64(p), np.uint64(int(seed))


def resolve_offset(causal, alignment, Nq, Nk):
    """The causal diagonal's offset for the kernels (key c visible to query r when c <= r + offset):
    Nk - Nq bottom-right (flash-attn), 0 top-left (PyTorch). Without causal it is unused (0)."""
    if alignment not in (geometry.BOTTOM_RIGHT, geometry.TOP_LEFT):
        raise ValueError(f"alignment must be {geometry.BOTTOM_RIGHT!r} or {geometry.TOP_LEFT!r}, "
                         f"got {alignment!r}")
    if not causal:
        return np.int64(0)
    return np.int64(geometry.causal_offset(Nq, Nk, alignment))


def resolve_features(softcap, alibi_slopes, B, H_q, alignment):
    """(softcap as a float, ALiBi slopes as a float32 (B, H_q) device array) for the kernels.

    The kernels take a slopes array even without ALiBi (then a 1 x 1 placeholder, never read).
    ALiBi's distance |r + Nk - Nq - c| is flash-attn's, bottom-right only."""
    cap, slopes = resolve_features_host(softcap, alibi_slopes, B, H_q, alignment)
    if slopes is None:
        return cap, cuda.device_array((1, 1), dtype=np.float32)
    return cap, cuda.to_device(slopes)


def resolve_features_host(softcap, alibi_slopes, B, H_q, alignment):
    """(softcap as a float, ALiBi slopes as a C-contiguous float32 (B, H_q) host array or None),
    checked: what ``resolve_features`` copies to the device."""
    cap = float(softcap)
    if not math.isfinite(cap) or cap < 0.0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 for none), got {softcap!r}")
    if alibi_slopes is None:
        return cap, None
    if alignment != geometry.BOTTOM_RIGHT:
        raise ValueError(f"alibi_slopes need alignment={geometry.BOTTOM_RIGHT!r} (flash-attn's), "
                         f"got {alignment!r}")
    if is_device_array(alibi_slopes):
        alibi_slopes = alibi_slopes.copy_to_host()
    slopes = np.asarray(alibi_slopes, dtype=np.float32)
    if slopes.shape == (H_q,):
        slopes = np.broadcast_to(slopes, (B, H_q))
    if slopes.shape != (B, H_q):
        raise ValueError(f"alibi_slopes must have shape ({H_q},) or ({B}, {H_q}), got {slopes.shape}")
    return cap, np.array(slopes, order="C")      # a fresh array: canonical strides even where B = 1


def resolve_band(Nq, Nk, d, *, causal, alignment, softmax_scale, window_size, limit):
    """(scale, windowed, lo, hi, steps) of a fast kernel's launch, checked: the softmax scale,
    whether a band of keys applies (causal or a window), its int32 bounds
    (``geometry.window_bounds``; |lo|, |hi| <= max(Nq, Nk): one register each, not two) and the
    step limit (``resolve_limit``)."""
    scale = resolve_scale(softmax_scale, d)
    resolve_offset(causal, alignment, Nq, Nk)                 # checks alignment
    windowed = geometry.is_windowed(causal, window_size)
    lo, hi = (np.int32(x) for x in geometry.window_bounds(Nq, Nk, causal, window_size, alignment))
    return scale, windowed, lo, hi, resolve_limit(limit)


def resolve_limit(limit):
    """Step limit: stop each thread block after `limit` iterations of its loop (None: run all)."""
    if limit is None:
        return 1 << 30
    if int(limit) != limit or limit < 0:
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    return int(limit)


class Arrays:
    """Moves host inputs to the device once and brings results back to match the inputs.

    NumPy in -> NumPy out; device arrays in -> device arrays out, no copy.
    """

    def __init__(self, *inputs):
        on_device = [is_device_array(x) for x in inputs]
        if any(on_device) and not all(on_device):
            raise TypeError("inputs mix device arrays and host arrays; pass all on one side")
        self.host = not any(on_device)

    def to_device(self, x):
        if self.host:
            return cuda.to_device(np.ascontiguousarray(x))
        if not hasattr(cuda, "as_cuda_array"):
            return x                    # the simulator has no as_cuda_array; x is its device array
        if getattr(x, "__cuda_ndarray__", False):
            return x                    # already Numba's: no second wrapper (MemoryPointer, DeviceNDArray) per call
        return cuda.as_cuda_array(x)

    def empty(self, shape, fill=None):
        if fill is None:
            return cuda.device_array(shape, dtype=np.float32)
        return cuda.to_device(np.full(shape, fill, dtype=np.float32))

    def result(self, x):
        return x.copy_to_host() if self.host else x
