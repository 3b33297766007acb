"""A kernel launch resolved once per shape class: small calls on torch CUDA tensors without numba's per-call work.

    run = launch.prepared(kernel, argtypes, grid, block, nbytes)   # once per shape class (cached)
    run(q, k, v, out, L, q_scale, ...)                              # per call: write, launch

``kernel[grid, block, stream, nbytes](*args)`` does, on every call: type each
argument (``typeof``), look the overload up by those types, wrap each array in
a device-array view, make sure a CUDA context is current, build a launch
configuration, and pack the arguments (``_Kernel.launch`` and ``_prepare_args``
in numba-cuda's dispatcher), then hand them to cuda.core's ``launch``, which
converts each one again. At a small shape that host work costs several times the
kernel. A ``Launch`` does the typing, the overload lookup (compiling if needed),
the dynamic shared-memory attribute and the kernel's parameter memory once, for
declared argument types; per call it writes what changed into that memory (each
array's data pointer; its shape and strides only when they changed; the scalars)
and calls the driver's ``cuLaunchKernel`` once (``Params``).

Arguments are laid out as numba-cuda 0.30's ``_prepare_args`` packs them
(``Params``; ``tests/test_launch.py`` checks the two against each other, value
and size), one kernel parameter each:

    Array(dtype, ndim, 'C')   meminfo 0, parent 0, size, itemsize, data pointer,
                              *shape, *strides in bytes (C order, from the shape),
                              each 8 bytes
    integer types             ctypes.c_<type>(value)      (c_int32, c_uint64, ...)
    float32, float64          ctypes.c_float, ctypes.c_double
    float16                   ctypes.c_uint16 of the half's bits
    boolean                   one byte (ctypes.c_bool)

An array argument is anything with ``data_ptr()`` and ``shape`` (a torch CUDA
tensor), C-contiguous with the declared dtype: the caller makes sure of that
(the argument types are declared, not read from the values). A 1-D parameter takes an array
of any shape as its flat view (as ``x.view(-1)`` would give, without making one). Only 'C' arrays
and the scalar types above are taken; anything else is a NotImplementedError
when the launch is prepared, not per call. On a GPU whose driver reports a
kernel's parameters (``cuKernelGetParamInfo``), their count and sizes are
checked against this layout when the launch is prepared.

Stream: numba launches ``kernel[grid, block]`` on the default stream, handle 0;
so does a ``Launch`` (the NULL stream of ``cuLaunchKernel``: the legacy default
stream). Its kernels are therefore ordered with torch's work as numba's are:
after everything torch queued on its current stream when that is the legacy
default stream (torch's current stream unless the caller changes it), and
before torch's later work there (a block torch frees and hands out again is
reused only after these kernels). A caller on another torch stream gets no
ordering from either path. The context is the calling thread's current one, as
for numba's launches (torch makes the device's primary context current in its
threads, autograd's included).

Only on a GPU: the simulator has no compiled function to launch (``prepared``
raises there; the callers take the dispatcher path on the simulator).
"""

import ctypes
import math
import os
import sys
import threading

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


class Params:
    """A kernel's parameters in ctypes memory, in the module docstring's layout (one object per
    parameter), and ``pointers``, the array of their addresses that ``cuLaunchKernel`` reads. ``set(values)``
    writes one call's arguments: each array's data pointer, its size, shape and strides only when
    its shape changed since the last call, and each scalar that is not the object written last
    time (a cached launch passes the same constants every call)."""

    def __init__(self, argtypes):
        self.objects = []
        self.setters = tuple(self._setter(ty) for ty in argtypes)
        self.pointers = (ctypes.c_void_p * len(self.objects))(*map(ctypes.addressof, self.objects))

    def _add(self, *objects):
        self.objects += objects
        return objects

    def _setter(self, ty):
        if isinstance(ty, types.Array):
            return self._array_setter(ty)
        if isinstance(ty, types.Boolean):
            c_type, convert = ctypes.c_bool, bool
        elif isinstance(ty, types.Integer):
            c_type, convert = getattr(ctypes, f"c_{ty}"), int
        elif ty == types.float16:
            c_type, convert = ctypes.c_uint16, lambda x: int(np.float16(x).view(np.uint16))
        elif ty in _SCALARS:
            c_type, convert = _SCALARS[ty], float
        else:
            raise NotImplementedError(f"launch does not pack arguments of type {ty}")
        (value,) = self._add(c_type())
        last = [None]                      # the object the field holds (kept alive here)

        def set_scalar(x):
            if x is not last[0]:
                value.value = convert(x)
                last[0] = x
        return set_scalar

    def _array_setter(self, ty):
        if ty.layout != "C":
            raise NotImplementedError(f"launch packs only C-contiguous arrays, got {ty}")
        itemsize = np.dtype(str(ty.dtype)).itemsize
        ndim = ty.ndim
        meminfo, parent, size, item, data, *dims = self._add(*(ctypes.c_int64() for _ in range(5 + 2 * ndim)))
        item.value = itemsize
        shapes, strides = dims[:ndim], dims[ndim:]
        last = [None]                      # the shape the fields hold

        def set_array(x):
            shape = x.shape
            if shape != last[0]:
                shape = tuple(shape)
                dims = (math.prod(shape),) if ndim == 1 else shape   # 1-D: the flat view of any shape
                if len(dims) != ndim:
                    raise ValueError(f"expected a {ndim}-D array for {ty}, got shape {shape}")
                size.value = math.prod(dims)
                for field, n in zip(shapes, dims):
                    field.value = n
                for field, n in zip(strides, c_strides(dims, itemsize)):
                    field.value = n
                last[0] = shape
            data.value = x.data_ptr()
        return set_array

    def set(self, values):
        if len(values) != len(self.setters):
            raise TypeError(f"the kernel takes {len(self.setters)} arguments, got {len(values)}")
        for set_one, value in zip(self.setters, values):
            set_one(value)

    def values(self):
        """The parameters as written: Python ints, floats and bools (for tests)."""
        return [p.value for p in self.objects]

    def sized(self):
        """(bytes, value) of each parameter, as the kernel receives them (for tests)."""
        return [(ctypes.sizeof(p), p.value) for p in self.objects]


def _driver_library():
    """The CUDA driver library (libcuda), through ctypes."""
    name = "nvcuda" if sys.platform == "win32" else "libcuda.so.1"
    library = (ctypes.WinDLL if sys.platform == "win32" else ctypes.CDLL)(name)
    launch = library.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p,
                                                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    launch.restype = ctypes.c_int
    library.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return library


class Launch:
    """One kernel at one (argument types, grid, block, dynamic shared memory), on the current
    device: compiled, its parameter memory laid out and its launch configured once."""

    _library = None

    def __init__(self, dispatcher, argtypes, grid, block, nbytes=0):
        from numba.cuda.errors import normalize_kernel_dimensions

        self.argtypes = tuple(argtypes)
        self.params = Params(self.argtypes)
        # one call's writes and its launch at a time: threads sharing this Launch (autograd's, a
        # user's) would otherwise launch with each other's pointers
        self.lock = threading.Lock()
        kernel = dispatcher.compile(self.argtypes)          # the overload a launch would find
        if kernel.extensions:
            raise NotImplementedError("a kernel with argument extensions needs numba's own launch")
        if kernel.cooperative:
            raise NotImplementedError("a cooperative kernel needs numba's own launch")
        # a debug build reports a device-side exception after its launch: numba's launch does that
        self.debug = (kernel, grid, block, int(nbytes)) if kernel.debug else None
        smem_limit.raise_limit_for(dispatcher, self.argtypes, nbytes)
        function = kernel._codelibrary.get_cufunc().kernel   # numba-cuda's cuda.core Kernel (private)
        _check_parameters(function, self.params)
        self.handle = int(function.handle)                    # a CUkernel: cuLaunchKernel takes it
        grid, block = normalize_kernel_dimensions(grid, block)        # 3-tuples, as numba's
        self.dims = (*grid, *block, int(nbytes))
        if Launch._library is None:
            Launch._library = _driver_library()

    def __call__(self, *values):
        if self.debug:
            kernel, grid, block, nbytes = self.debug
            kernel.launch(values, grid, block, 0, nbytes)
            return
        with self.lock:                  # cuLaunchKernel copies the parameters before it returns
            self.params.set(values)
            result = self._library.cuLaunchKernel(self.handle, *self.dims, None, self.params.pointers, None)
        if result != 0:
            name = ctypes.c_char_p()
            self._library.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"cuLaunchKernel failed: {(name.value or b'?').decode()} ({result})")


def _check_parameters(function, params):
    """The kernel's own parameter sizes (the driver's, where it reports them) against Params'."""
    try:
        info = function.arguments_info
    except Exception:            # an older driver or cuda.core: nothing to compare with
        return
    theirs = [int(size) for _, size in info]
    ours = [ctypes.sizeof(p) for p in params.objects]
    if theirs != ours:
        raise RuntimeError(f"the kernel's parameters are {len(theirs)} of sizes {theirs}, but launch "
                           f"laid out {len(ours)} of sizes {ours}: numba-cuda's argument layout changed")


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
