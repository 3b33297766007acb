"""More than 48 KB of shared memory for one block: raising a kernel's dynamic limit.

A block may use up to 227 KB of shared memory on an H100/H200 (163 KB on an
A100), but only 48 KB of it statically (``cuda.shared.array`` with a fixed
shape) and, by default, only 48 KB dynamically as well. The driver raises the
dynamic limit per kernel with the function attribute
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES. numba-cuda 0.30 sets one
attribute of that kind itself (the shared-memory carveout, through
``cuKernelSetAttribute`` on the compiled kernel's handle) but offers no call
for this one, so ``raise_dynamic_limit`` does the same thing for it.

How a kernel uses it: one ``cuda.shared.array(0, float32, alignment=16)``
(the dynamic array, 1-D), its tiles at compile-time offsets indexed by hand,
``tile_offset + row * row_length + column`` (a slice or a reshape of the
dynamic array would hide the 16-byte alignment from the compiler, and its
``ld.shared.v4`` loads would become scalar loads), launched as
``kernel[grid, block, stream, nbytes]``.

On the simulator there is no limit to raise (it enforces none): the call does
nothing there.
"""

from numba import config as numba_config
from numba import cuda

STATIC_LIMIT = 48 * 1024          # bytes a block may use without raising anything
MAX_BLOCK_BYTES = 227 * 1024      # the most any GPU here gives a block (compute capability 9.0)
# Per block, with the limit raised (CUDA programming guide, compute capabilities table):
# 7.0 96 KB, 8.0 163 KB, 8.6/8.9 99 KB, 9.0 227 KB, 12.0 99 KB.
OPT_IN_LIMIT = {(7, 0): 96 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024,
                (8, 9): 99 * 1024, (9, 0): 227 * 1024, (12, 0): 99 * 1024}


def opt_in_limit(cc):
    """Most shared memory per block with the limit raised, for compute capability cc."""
    return OPT_IN_LIMIT.get(tuple(cc), STATIC_LIMIT)


_raised = set()   # (dispatcher, argument types, nbytes, device id) already allowed


def raise_dynamic_limit(dispatcher, args, nbytes):
    """Compile `dispatcher` for `args` (as a launch would) and allow it `nbytes` of dynamic
    shared memory per block. Call before the first launch; raises ValueError if this GPU
    gives a block less than that. Once per kernel, argument types, size and device: the
    attribute stays set, and a call that sets it again pays for a driver call."""
    if numba_config.ENABLE_CUDASIM or int(nbytes) <= STATIC_LIMIT:   # every GPU gives a block 48 KB
        return
    raise_limit_for(dispatcher, tuple(dispatcher.typeof_pyval(a) for a in args), nbytes)


def raise_limit_for(dispatcher, argtypes, nbytes):
    """raise_dynamic_limit for the overload of argument types `argtypes` (a tuple of numba types)."""
    nbytes = int(nbytes)
    if numba_config.ENABLE_CUDASIM or nbytes <= STATIC_LIMIT:
        return
    device = cuda.get_current_device()
    key = (id(dispatcher), argtypes, nbytes, device.id)
    if key in _raised:
        return
    limit = opt_in_limit(device.compute_capability)
    if nbytes > limit:
        raise ValueError(f"the kernel needs {nbytes} bytes of shared memory per block; a GPU of "
                         f"compute capability {device.compute_capability} gives at most {limit}")
    from numba.cuda.cudadrv.driver import binding, driver
    kernel = dispatcher.compile(argtypes)
    cufunc = kernel._codelibrary.get_cufunc()     # numba-cuda's compiled function (private)
    attribute = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attribute, nbytes, cufunc.handle, device.id)
    _raised.add(key)
