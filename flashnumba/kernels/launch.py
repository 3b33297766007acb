"""A kernel launch resolved once per shape class: small calls on torch CUDA tensors without numba's per-call work.

    run = launch.prepared(kernel, argtypes, grid, block, nbytes)   # once per shape class (cached)
    run(q, k, v, out, L, q_scale, ...)                              # per call: pack, launch

``kernel[grid, block, stream, nbytes](*args)`` does, on every call: type each
argument (``typeof``), look the overload up by those types, wrap each array in
a device-array view, make sure a CUDA context is current, build a launch
configuration, and pack the arguments (``_Kernel.launch`` and ``_prepare_args``
in numba-cuda's dispatcher). At a small shape that host work costs several
times the kernel. A ``Launch`` does the typing, the overload lookup (compiling
if needed), the launch configuration and the dynamic shared-memory attribute
once, for declared argument types, and at call time only packs the arguments
and calls cuda.core's ``launch``, as numba does.

Arguments are packed as numba-cuda 0.30's ``_prepare_args`` packs them
(``pack``; ``tests/test_launch.py`` checks the two against each other):

    Array(dtype, ndim, 'C')   meminfo 0, parent 0, size, itemsize, data pointer,
                              *shape, *strides in bytes (C order, from the shape)
    integer types             ctypes.c_<type>(value)      (c_int32, c_uint64, ...)
    float32, float64          ctypes.c_float, ctypes.c_double
    float16                   ctypes.c_uint16 of the half's bits
    boolean                   the value as it is

An array argument is anything with ``data_ptr()`` and ``shape`` (a torch CUDA
tensor), C-contiguous with the declared dtype: the caller makes sure of that
(the argument types are declared, not read from the values). Only 'C' arrays
and the scalar types above are taken; anything else is a NotImplementedError
when the launch is prepared, not per call.

Stream: numba launches ``kernel[grid, block]`` on the default stream, handle 0
(``driver._to_core_stream(0)``); so does a ``Launch``, with the same stream
object numba makes. Its kernels are therefore ordered with torch's work as
numba's are: after everything torch queued on its current stream when that is
the legacy default stream (torch's current stream unless the caller changes
it), and before torch's later work there (a block torch frees and hands out
again is reused only after these kernels). A caller on another torch stream
gets no ordering from either path.

Only on a GPU: the simulator has no compiled function to launch (``prepared``
raises there; the callers take the dispatcher path on the simulator).
"""

import ctypes
import math
import os

import numpy as np
from numba import types

from flashnumba.kernels import smem_limit

# FLASHNUMBA_FAST_LAUNCH=0: every call takes numba's dispatcher (the fast path's callers read this)
ENABLED = os.environ.get("FLASHNUMBA_FAST_LAUNCH", "1") != "0"

_SCALARS = {types.float32: ctypes.c_float, types.float64: ctypes.c_double}


def c_strides(shape, itemsize):
    """Strides in bytes of a C-contiguous array of `shape`: numba's for a contiguous array."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _array_packer(ty):
    if ty.layout != "C":
        raise NotImplementedError(f"launch packs only C-contiguous arrays, got {ty}")
    itemsize = np.dtype(str(ty.dtype)).itemsize
    ndim = ty.ndim

    def pack_array(x, out):
        shape = tuple(x.shape)
        if len(shape) != ndim:
            raise ValueError(f"expected a {ndim}-D array for {ty}, got shape {shape}")
        out += (0, 0, math.prod(shape), itemsize, x.data_ptr(), *shape, *c_strides(shape, itemsize))
    return pack_array


def _packer(ty):
    """A function (value, flat list) -> None that appends `ty`'s kernel arguments for a value."""
    if isinstance(ty, types.Array):
        return _array_packer(ty)
    if isinstance(ty, types.Boolean):
        return lambda x, out: out.append(x)
    if isinstance(ty, types.Integer):
        c_type = getattr(ctypes, f"c_{ty}")
        return lambda x, out: out.append(c_type(x))
    if ty == types.float16:
        return lambda x, out: out.append(ctypes.c_uint16(np.float16(x).view(np.uint16)))
    if ty in _SCALARS:
        c_type = _SCALARS[ty]
        return lambda x, out: out.append(c_type(x))
    raise NotImplementedError(f"launch does not pack arguments of type {ty}")


def packers(argtypes):
    """One packer per argument type: resolved once, used per call."""
    return tuple(_packer(ty) for ty in argtypes)


def pack(argtypes, values):
    """The flat kernel-argument list numba-cuda's ``_prepare_args`` makes for `values` of
    `argtypes` (the module docstring's layout)."""
    return pack_with(packers(argtypes), values)


def pack_with(packs, values):
    if len(values) != len(packs):
        raise TypeError(f"the kernel takes {len(packs)} arguments, got {len(values)}")
    out = []
    for pack_one, value in zip(packs, values):
        pack_one(value, out)
    return out


class Launch:
    """One kernel at one (argument types, grid, block, dynamic shared memory), on the current
    device: compiled, its function looked up and its launch configured once."""

    def __init__(self, dispatcher, argtypes, grid, block, nbytes=0):
        from numba.cuda import dispatcher as numba_dispatcher  # cuda.core's launch, LaunchConfig
        from numba.cuda._compat import CUDA_CORE_GE_1_0
        from numba.cuda.cudadrv import driver
        from numba.cuda.errors import normalize_kernel_dimensions

        self.argtypes = tuple(argtypes)
        self.packs = packers(self.argtypes)
        kernel = dispatcher.compile(self.argtypes)          # the overload a launch would find
        if kernel.extensions:
            raise NotImplementedError("a kernel with argument extensions needs numba's own launch")
        # a debug build reports a device-side exception after its launch: numba's launch does that
        self.debug = (kernel, grid, block, int(nbytes)) if kernel.debug else None
        smem_limit.raise_limit_for(dispatcher, self.argtypes, nbytes)
        self.function = kernel._codelibrary.get_cufunc().kernel   # numba-cuda's (private)
        cooperative = {"is_cooperative" if CUDA_CORE_GE_1_0 else "cooperative_launch": kernel.cooperative}
        grid, block = normalize_kernel_dimensions(grid, block)        # 3-tuples, as numba's
        self.config = numba_dispatcher.LaunchConfig(grid=grid, block=block, shmem_size=int(nbytes), **cooperative)
        self.stream = driver._to_core_stream(0)              # the default stream, as numba's
        self._launch = numba_dispatcher.launch                # the function numba's launch calls

    def __call__(self, *values):
        if self.debug:
            kernel, grid, block, nbytes = self.debug
            kernel.launch(values, grid, block, self.stream, nbytes)
            return
        self._launch(self.stream, self.config, self.function, *pack_with(self.packs, values))


_prepared = {}


def prepared(dispatcher, argtypes, grid, block, nbytes=0, device=0):
    """The Launch for these, made on first use and kept. `device`: the GPU it runs on (a
    compiled function belongs to one device's context)."""
    key = (dispatcher, tuple(argtypes), tuple(grid) if isinstance(grid, (tuple, list)) else grid,
           block, int(nbytes), device)
    run = _prepared.get(key)
    if run is None:
        run = _prepared[key] = Launch(dispatcher, argtypes, grid, block, nbytes)
    return run
