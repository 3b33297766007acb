"""Storage dtypes: float32, float16 and bfloat16, by name, on every kind of array.

flashnumba stores q, k, v and the outputs in float32, float16 or bfloat16 and
computes in float32 (``flashnumba.kernels.cast`` widens and narrows on the
device). This module names the dtypes and reads them off NumPy arrays, PyTorch
tensors, Numba device arrays and ``__cuda_array_interface__`` objects without
importing any framework.

NumPy has no bfloat16: flashnumba takes ``ml_dtypes.bfloat16`` arrays (the
bfloat16 dtype JAX uses; ``x.astype(ml_dtypes.bfloat16)`` makes one). On a
device, a bfloat16 array travels as its uint16 bits; the array interface spells
bfloat16 ``"<V2"`` (PyTorch's and ml_dtypes' convention).

``round_to(x, name)`` rounds float values to the dtype and back to float32: the
"same dense attention computed in that dtype" of the accuracy rule rounds after
every operation with it (``reference.attention_in_dtype``).
"""

import ml_dtypes
import numpy as np

FLOAT32 = "float32"
FLOAT16 = "float16"
BFLOAT16 = "bfloat16"
SUPPORTED = (FLOAT32, FLOAT16, BFLOAT16)

NUMPY = {FLOAT32: np.dtype(np.float32), FLOAT16: np.dtype(np.float16),
         BFLOAT16: np.dtype(ml_dtypes.bfloat16)}
BITS = {FLOAT32: np.dtype(np.float32), FLOAT16: np.dtype(np.float16),
        BFLOAT16: np.dtype(np.uint16)}                     # what a device array of that dtype holds


def name_of(x):
    """The dtype name of an array-like: 'float32', 'float16', 'bfloat16', or another (e.g. 'int64')."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and type(x).__module__.split(".")[0] == "torch":
        return str(dtype).removeprefix("torch.")
    if dtype is not None:
        return np.dtype(dtype).name
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        typestr = cai["typestr"]
        return BFLOAT16 if typestr[1:] == "V2" else np.dtype(typestr).name
    raise TypeError(f"{type(x).__name__} has no dtype")


def round_to(x, name):
    """float64/float32 values rounded to dtype `name` (nearest, ties to even), returned as float32."""
    return np.asarray(x).astype(NUMPY[name]).astype(np.float32)
