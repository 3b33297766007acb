"""Arrays in, arrays out: NumPy, PyTorch, CuPy, Numba, or anything with ``__cuda_array_interface__``.

A public call takes its tensors in whatever its caller holds and gives results
of the same kind, without importing any framework itself:

    kind        input                                   results
    numpy       numpy.ndarray (ml_dtypes.bfloat16 too)  copied to the device, computed, copied back: NumPy
    torch-cpu   a PyTorch CPU tensor                    the same, through NumPy: PyTorch CPU tensors
    torch       a PyTorch CUDA tensor                   no copy in; PyTorch CUDA tensors (zero-copy wrap)
    cupy        a CuPy array                            no copy in; CuPy arrays
    numba       a Numba device array                    no copy in; Numba device arrays
    cai         any other __cuda_array_interface__      no copy in; Numba device arrays

On the simulator there is no device memory to share: NumPy (and PyTorch CPU)
in and out. Inputs of one call must all be on the host or all on the device.

``Operand`` reads an input's kind, shape and dtype without moving it (so every
check runs before anything is launched); ``device_f32`` then gives the float32,
C-contiguous device array the kernels read: the input itself when it already is
one, else one widening copy (``kernels.cast``). ``Results`` narrows float32
device results to the inputs' dtype and hands them back as the inputs' kind.
With torch CUDA tensors, numba's device memory comes from torch's caching
allocator (``flashnumba.torch_allocator``): no cuMemAlloc or cuMemFree per call.
"""

import sys

import numpy as np
from numba import cuda

from flashnumba import dtypes, torch_allocator
from flashnumba.kernels import cast

HOST_KINDS = ("numpy", "torch-cpu")


def _framework(x):
    return type(x).__module__.split(".")[0]


def _is_numba_array(x):
    return bool(getattr(x, "__cuda_ndarray__", False)) or type(x).__name__ in ("DeviceNDArray",
                                                                               "FakeCUDAArray")


def kind_of(name, x):
    """Which kind of array x is (see the module docstring); TypeError for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if _framework(x) == "torch" and hasattr(x, "is_cuda"):
        return "torch" if x.is_cuda else "torch-cpu"
    if _is_numba_array(x):
        return "numba"
    if hasattr(type(x), "__cuda_array_interface__") or hasattr(x, "__cuda_array_interface__"):
        return "cupy" if _framework(x) == "cupy" else "cai"
    raise TypeError(f"{name} must be a NumPy array, a PyTorch tensor, a CuPy or Numba device array, "
                    f"or an object with __cuda_array_interface__; got {type(x).__name__}")


class _Interface:
    """Another array's memory described anew (typestr, shape, strides, offset); keeps `owner` alive."""

    def __init__(self, cai, owner):
        self.__cuda_array_interface__ = cai
        self.owner = owner
        self.shape = tuple(cai["shape"])


def _interface(x):
    """x's __cuda_array_interface__ with explicit strides (C-contiguous ones filled in)."""
    cai = dict(x.__cuda_array_interface__)
    itemsize = 2 if cai["typestr"][1:] == "V2" else np.dtype(cai["typestr"]).itemsize
    if cai.get("strides") is None:
        strides, step = [], itemsize
        for n in reversed(cai["shape"]):
            strides.insert(0, step)
            step *= n
        cai["strides"] = tuple(strides)
    return cai


def _device_view(x, cai):
    """A Numba device array over `cai` (x's memory), or the interface itself for bfloat16,
    which Numba cannot type."""
    view = _Interface(cai, owner=x)
    if cai["typestr"][1:] == "V2":
        return view
    return cuda.as_cuda_array(view)


def swap_seq_heads(op):
    """op's tensor with axes 1 and 2 swapped, (B, H, N, d) <-> (B, N, H, d): a view, no copy."""
    x = op.value
    if op.kind == "numpy":
        return np.swapaxes(x, 1, 2)
    if op.kind in ("torch", "torch-cpu"):
        return x.transpose(1, 2)
    if op.kind == "cupy":
        return x.swapaxes(1, 2)
    if not hasattr(x, "__cuda_array_interface__"):       # the simulator's device arrays
        return x.transpose((0, 2, 1, 3))
    cai = _interface(x)
    order = (0, 2, 1, 3)
    cai["shape"] = tuple(cai["shape"][a] for a in order)
    cai["strides"] = tuple(cai["strides"][a] for a in order)
    return _device_view(x, cai)


def take(x, kind, index):
    """x[:, :, index] of a packed (B, S, n, H, d) tensor: a view, no copy."""
    if kind != "cai":
        return x[:, :, index]
    cai = _interface(x)
    pointer, readonly = cai["data"]
    cai["data"] = (pointer + index * cai["strides"][2], readonly)
    cai["shape"] = cai["shape"][:2] + cai["shape"][3:]
    cai["strides"] = cai["strides"][:2] + cai["strides"][3:]
    return _device_view(x, cai)


def c_order(x):
    """A host array as C-ordered with the strides of a fresh array. NumPy and PyTorch call an array
    contiguous whatever the stride of an axis of length 1 (x[:, 3:4] of a (2, 8) array keeps the
    stride 32 there); numba's device arrays do not, and the kernels' wrappers need contiguous."""
    x = np.ascontiguousarray(x)
    strides, step = [], x.itemsize
    for n in reversed(x.shape):
        strides.append(step)
        step *= n
    return x if x.strides == tuple(reversed(strides)) or x.size == 0 else x.copy()


_TORCH_DTYPE_NAMES = {}      # torch dtype -> dtypes.name_of's name for it, on first sight


class Operand:
    """One input tensor, read but not moved: its name, kind, shape and storage dtype."""

    def __init__(self, name, x):
        self.name = name
        self.value = x
        torch = sys.modules.get("torch")
        if torch is not None and type(x) is torch.Tensor:     # the common case, read directly
            self.kind = "torch" if x.is_cuda else "torch-cpu"
            self.shape = tuple(x.shape)
            self.dtype = _TORCH_DTYPE_NAMES.get(x.dtype)
            if self.dtype is None:
                self.dtype = _TORCH_DTYPE_NAMES[x.dtype] = dtypes.name_of(x)
        else:
            self.kind = kind_of(name, x)
            self.shape = tuple(int(n) for n in x.shape) if hasattr(x, "shape") else \
                tuple(x.__cuda_array_interface__["shape"])
            self.dtype = dtypes.name_of(x)
        if self.kind == "torch":
            # before anything asks numba for the device (validate.algorithm does), which makes
            # numba's context and fixes its memory manager: see torch_allocator
            torch_allocator.install()

    @property
    def on_host(self):
        return self.kind in HOST_KINDS

    @property
    def ndim(self):
        return len(self.shape)

    def describe(self):
        return f"{self.name} of shape {self.shape} and dtype {self.dtype}"

    # ------------------------------------------------------------- to the device

    def device_bits(self):
        """The data as a Numba device array of its storage bits (uint16 for bfloat16), any strides."""
        x, bits = self.value, dtypes.BITS[self.dtype]
        if self.kind == "numpy":
            return cuda.to_device(c_order(x).view(bits))
        if self.kind == "torch-cpu":
            t = x.detach().contiguous()
            if self.dtype == dtypes.BFLOAT16:
                t = t.view(sys.modules["torch"].int16)
            return cuda.to_device(c_order(t.numpy()).view(bits))
        if self.kind == "numba":
            return x
        if self.kind == "torch":
            torch_allocator.install()             # before numba's first context: see that module
            x = x.detach()
            _check_torch_device(self.name, x)
            if 0 in x.stride():                           # a broadcast (expanded) tensor: make it real
                x = x.contiguous()
            if self.dtype == dtypes.BFLOAT16:           # "<V2" means nothing to Numba: read the bits
                return cuda.as_cuda_array(x.view(sys.modules["torch"].int16)).view(bits)
            return cuda.as_cuda_array(x)
        if self.dtype == dtypes.BFLOAT16:
            cai = _interface(x)
            cai["typestr"] = "<u2"
            return cuda.as_cuda_array(_Interface(cai, owner=x))
        return cuda.as_cuda_array(x)

    def device_f32(self):
        """The float32, C-contiguous device array the kernels read: no copy when it already is one."""
        src = self.device_bits()
        if self.dtype == dtypes.FLOAT32 and src.is_c_contiguous():
            return src
        if src.ndim != 4:
            raise ValueError(f"{self.describe()}: expected a C-contiguous float32 array")
        dst = cuda.device_array(self.shape, dtype=np.float32)
        grid = cast.blocks(dst.size), cast.THREADS
        if self.dtype == dtypes.BFLOAT16:
            cast.widen_bf16[grid](src, dst.view(np.uint32))
        else:
            cast.widen[grid](src, dst)
        return dst


def torch_tensors(operands):
    """The tensors of torch CUDA operands as the fast launches read them: C-contiguous (a
    copy where not, as ``device_f32`` makes one), each checked to be on the GPU Numba computes on
    (one query of Numba's current device for all of them)."""
    lead = operands[0].value
    _check_torch_device(operands[0].name, lead)
    device = lead.get_device()                            # an int: no torch.device made
    tensors = []
    for op in operands:
        x = op.value
        if x.get_device() != device:
            _check_torch_device(op.name, x)               # raises: not numba's device
        if not x.is_contiguous():                         # broadcast (stride 0) or strided
            x = x.detach().contiguous()
        tensors.append(x)
    return tensors


def current_device_id():
    """The id of the GPU Numba computes on in this thread. Numba works in the CUDA context current
    in the thread (a primary context) and makes device 0's when none is: the driver is asked
    directly, and Numba's own query (its context bookkeeping on every call) runs only when no
    context is current yet."""
    from numba.cuda.cudadrv.driver import driver
    if int(driver.cuCtxGetCurrent()) != 0:
        return int(driver.cuCtxGetDevice())
    return cuda.get_current_device().id


def _check_torch_device(name, t):
    """A CUDA tensor on the device Numba computes on (the current one)."""
    index = t.device.index if t.device.index is not None else 0
    current = current_device_id()
    if index != current:
        raise ValueError(f"{name} is on cuda:{index}, but flashnumba computes on cuda:{current}; "
                         f"move it there or select that device with numba.cuda.select_device")


class Results:
    """Hands float32 device results back in the kind and dtype of the inputs."""

    def __init__(self, lead):
        self.kind = lead.kind
        self.dtype = lead.dtype
        self.device = getattr(lead.value, "device", None)

    def narrow(self, x32, dtype=None):
        """x32 (float32, C-contiguous device) rounded to `dtype` (default: the inputs'), still on the device."""
        dtype = self.dtype if dtype is None else dtype
        if dtype == dtypes.FLOAT32:
            return x32
        dst = cuda.device_array(x32.shape, dtype=dtypes.BITS[dtype])
        grid = cast.blocks(x32.size), cast.THREADS
        flat_src, flat_dst = x32.reshape(x32.size), dst.reshape(dst.size)
        if dtype == dtypes.BFLOAT16:
            cast.narrow_bf16[grid](flat_src.view(np.uint32), flat_dst)
        else:
            cast.narrow[grid](flat_src, flat_dst)
        return dst

    def give(self, x32, dtype=None):
        """x32 as the caller's kind, in `dtype` (default: the inputs'); float32 stays float32 for lse."""
        dtype = self.dtype if dtype is None else dtype
        return self.give_bits(self.narrow(x32, dtype), dtype)

    def give_bits(self, bits, dtype=None):
        """A C-contiguous device array already in `dtype` (default: the inputs'; bfloat16 as its
        uint16 bits, float16 as float16 or its bits) as the caller's kind, with no rounding."""
        dtype = self.dtype if dtype is None else dtype
        if np.dtype(bits.dtype) != dtypes.BITS[dtype]:
            bits = bits.view(dtypes.BITS[dtype])
        if self.kind in HOST_KINDS:
            host = bits.copy_to_host().view(dtypes.NUMPY[dtype])
            if self.kind == "numpy":
                return host
            torch = sys.modules["torch"]
            if dtype == dtypes.BFLOAT16:
                return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(host)
        if self.kind == "torch":
            torch = sys.modules["torch"]
            if dtype == dtypes.BFLOAT16:
                return torch.as_tensor(bits.view(np.int16), device=self.device).view(torch.bfloat16)
            return torch.as_tensor(bits, device=self.device)
        if self.kind == "cupy":
            return sys.modules["cupy"].asarray(bits)
        if dtype == dtypes.BFLOAT16:                     # Numba has no bfloat16: an interface that says "<V2"
            cai = _interface(bits)
            cai["typestr"] = "<V2"
            return _Interface(cai, owner=bits)
        return bits
