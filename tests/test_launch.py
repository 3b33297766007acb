"""The fast launch path (flashnumba.kernels.launch): its argument packing against numba-cuda's,
without a GPU; on a GPU, the public torch calls through it against the dispatcher path, bitwise.

Packing is checked twice: against the layout written down in the module (which the tests
spell out), and against numba-cuda's own ``_Kernel._prepare_args`` run on real
DeviceNDArrays over made-up device pointers, in a process with numba's real CUDA target
(no GPU is touched: nothing is allocated or launched). A numba-cuda upgrade that changes
the layout fails the second.
"""

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import types

import flashnumba
from flashnumba.kernels import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A4 = types.Array(types.float32, 4, "C")
A1I = types.Array(types.int32, 1, "C")


class Tensor:
    """What the packing reads of a torch CUDA tensor: data_ptr() and shape."""

    def __init__(self, pointer, shape):
        self.pointer, self.shape = pointer, tuple(shape)

    def data_ptr(self):
        return self.pointer


def plain(args):
    """Packed arguments as comparable values: ints and bools as they are, ctypes as (type, value)."""
    return [(type(a).__name__, a.value) if isinstance(a, ctypes._SimpleCData) else a for a in args]


def test_an_array_packs_as_meminfo_parent_size_itemsize_pointer_shape_strides():
    x = Tensor(0x7F00_0000_1000, (2, 3, 4, 5))
    assert launch.pack((A4,), (x,)) == [0, 0, 120, 4, 0x7F00_0000_1000, 2, 3, 4, 5,
                                        240, 80, 20, 4]
    i = Tensor(0x2000, (7,))
    assert launch.pack((A1I,), (i,)) == [0, 0, 7, 4, 0x2000, 7, 4]


def test_scalars_pack_as_ctypes_of_their_type_and_booleans_as_they_are():
    argtypes = (types.int32, types.int64, types.uint64, types.float32, types.float64,
                types.boolean, types.float16)
    values = (np.int32(-3), 1 << 30, np.uint64(2 ** 63 + 5), np.float32(0.25), np.float64(0.1),
              True, 1.5)
    c = ctypes
    assert plain(launch.pack(argtypes, values)) == [
        (c.c_int32.__name__, -3), (c.c_int64.__name__, 1 << 30), (c.c_uint64.__name__, 2 ** 63 + 5),
        ("c_float", 0.25), ("c_double", 0.1), True,
        (c.c_uint16.__name__, int(np.float16(1.5).view(np.uint16)))]


def test_what_it_cannot_pack_is_refused_when_prepared_not_per_call():
    with pytest.raises(NotImplementedError, match="C-contiguous"):
        launch.packers((types.Array(types.float32, 2, "A"),))
    with pytest.raises(NotImplementedError, match="complex64"):
        launch.packers((types.complex64,))
    with pytest.raises(ValueError, match="3-D"):
        launch.pack((types.Array(types.float32, 3, "C"),), (Tensor(0x1000, (4, 4)),))
    with pytest.raises(TypeError, match="takes 1 arguments, got 2"):
        launch.pack((types.int32,), (1, 2))


# Run with numba's real CUDA target (numba.cuda imported first, no simulator): the kernels'
# argument types and values as the dispatcher path types them (typeof on DeviceNDArrays, the
# wrappers' NumPy scalars), packed by numba-cuda's _prepare_args and by launch.pack.
_AGAINST_NUMBA = r"""
import ctypes, json, sys
import numpy as np
import numba.cuda
from numba.cuda.api_util import prepare_shape_strides_dtype
from numba.cuda.cudadrv.devicearray import DeviceNDArray
from numba.cuda.dispatcher import _Kernel
from numba.cuda.typing.typeof import Purpose, typeof
import warnings
warnings.simplefilter("ignore")
from flashnumba.kernels import fa2_fast_backward, fa2_fast_forward, launch

class Memory:            # a device allocation's pointer, never dereferenced
    def __init__(self, pointer):
        self.device_ctypes_pointer = ctypes.c_void_p(pointer)

class Tensor:
    def __init__(self, pointer, shape):
        self.pointer, self.shape = pointer, shape
    def data_ptr(self):
        return self.pointer

class Kernel:            # what _prepare_args reads of its _Kernel
    extensions = []

def arrays(shape, dtype, pointer):
    shape, strides, dtype = prepare_shape_strides_dtype(shape, None, dtype, "C")
    return DeviceNDArray(shape, strides, dtype, gpu_data=Memory(pointer)), Tensor(pointer, shape)

def plain(args):
    return [[type(a).__name__, a.value] if isinstance(a, ctypes._SimpleCData) else a for a in args]

def case(argtypes, specs):
    numba_values, fast_values = [], []
    for n, spec in enumerate(specs):
        if isinstance(spec, tuple):
            devary, tensor = arrays(spec, np.float32, 0x7F0000000000 + 0x100000 * n)
            numba_values.append(devary)
            fast_values.append(tensor)
        else:
            numba_values.append(spec)
            fast_values.append(spec)
    typed = tuple(typeof(v, Purpose.argument) for v in numba_values)
    theirs = []
    for ty, value in zip(typed, numba_values):
        _Kernel._prepare_args(Kernel(), ty, value, 0, [], theirs)
    return {"types_match": typed == tuple(argtypes), "numba": plain(theirs),
            "fast": plain(launch.pack(argtypes, fast_values))}

B, Nq, Nk, H, d = 2, 19, 23, 3, 40
scalars = (np.float32(0.2), True, np.int32(-7), np.int32(5), np.float64(0.1),
           np.uint64(2 ** 64 - 1), 1 << 30, np.float32(0.0))
fwd = ((B, Nq, H, d), (B, Nk, H, d), (B, Nk, H, d), (B, Nq, H, d), (B, H, Nq)) + scalars + ((1, 1),)
bwd = ((B * Nq * H * d,), (B, Nk, H, d), (B, Nk, H, d), (B * Nq * H * d,), (B, H, Nq), (B, H, Nq),
       (B * Nq * H * d + 64,), (B, Nk, H, d), (B, Nk, H, d)) + scalars + ((B, H),)
print(json.dumps({"forward": case(fa2_fast_forward.argtypes(), fwd),
                  "backward": case(fa2_fast_backward.argtypes(), bwd)}))
"""


def test_the_packing_is_numba_cudas_for_the_fast_kernels_argument_types():
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "FLASHNUMBA_DEVICE")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", _AGAINST_NUMBA], env=env, capture_output=True,
                       text=True, check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    cases = json.loads(r.stdout.strip().splitlines()[-1])
    for name, result in cases.items():
        assert result["types_match"], f"{name}: typeof gives other argument types than argtypes()"
        assert result["fast"] == result["numba"], name
        assert len(result["fast"]) > 50, name                # every array expanded, not skipped
