"""``cuda.shared.array`` for the simulator, without walking the whole stack.

Numba's simulator gives every thread of a block the same NumPy array for a
given ``cuda.shared.array`` call by keying its allocations on the caller's
(file, line). It finds that caller with ``traceback.extract_stack``, which
formats every frame of the stack and reads source lines: 40-200 us per call,
paid by every thread of every block. The caller's frame is simply
``sys._getframe(1)``; same key, same arrays, same aliasing rules (two calls on
one line share one array), a small fraction of the cost.

Dynamic shared memory (``shape == 0``) and the ``alignment`` error keep numba's
own code.
"""

import sys

import numpy as np

_stock_array = None  # numba's FakeCUDAShared.array, set by patch()


def array(self, shape, dtype, alignment=None):
    if alignment is not None or shape == 0:  # numba's own test, unchanged
        return _stock_array(self, shape, dtype, alignment)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    found = self._allocations.get(key)
    if found is not None:
        return found
    from numba.cuda.simulator import kernelapi

    if isinstance(dtype, kernelapi.types.Type):
        dtype = kernelapi.numpy_support.as_dtype(dtype)
    # setdefault: if another thread allocated meanwhile, everyone gets its array
    return self._allocations.setdefault(key, np.empty(shape, dtype))


def patch(fake_shared):
    """Install array() on numba's FakeCUDAShared; return the method it replaces."""
    global _stock_array
    _stock_array = fake_shared.__dict__["array"]
    fake_shared.array = array
    return _stock_array
