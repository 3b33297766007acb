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
import math
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


def written(argtypes, values):
    """What Params writes for one call of `values`: the parameters as Python numbers."""
    params = launch.Params(argtypes)
    params.set(values)
    return params.values()


def test_an_array_is_meminfo_parent_size_itemsize_pointer_shape_strides():
    x = Tensor(0x7F00_0000_1000, (2, 3, 4, 5))
    assert written((A4,), (x,)) == [0, 0, 120, 4, 0x7F00_0000_1000, 2, 3, 4, 5, 240, 80, 20, 4]
    i = Tensor(0x2000, (7,))
    assert written((A1I,), (i,)) == [0, 0, 7, 4, 0x2000, 7, 4]


def test_a_1d_parameter_takes_any_shape_as_its_flat_view():
    """What x.view(-1) would be, written without making the view; the shape is re-read when it
    changes (and a 1-D array of the same size writes the same)."""
    params = launch.Params((A1I,))
    params.set((Tensor(0x4000, (2, 3, 4)),))
    assert params.values() == [0, 0, 24, 4, 0x4000, 24, 4]
    params.set((Tensor(0x5000, (5, 2)),))
    assert params.values() == [0, 0, 10, 4, 0x5000, 10, 4]
    assert written((A1I,), (Tensor(0x5000, (10,)),)) == params.values()


def test_scalars_take_their_types_size_and_booleans_one_byte():
    argtypes = (types.int32, types.int64, types.uint64, types.float32, types.float64,
                types.boolean, types.float16)
    values = (np.int32(-3), 1 << 30, np.uint64(2 ** 63 + 5), np.float32(0.25), np.float64(0.1),
              True, 1.5)
    params = launch.Params(argtypes)
    params.set(values)
    assert params.sized() == [(4, -3), (8, 1 << 30), (8, 2 ** 63 + 5), (4, 0.25), (8, 0.1), (1, True),
                              (2, int(np.float16(1.5).view(np.uint16)))]


def test_the_parameter_memory_follows_a_new_shape_and_holds_the_pointers_it_hands_over():
    argtypes = (A4, types.int32, A1I)
    params = launch.Params(argtypes)
    params.set((Tensor(0x7F00_0000_1000, (2, 3, 4, 5)), np.int32(-3), Tensor(0x2000, (7,))))
    # the next call: new pointers, another shape for the first array, another scalar
    params.set((Tensor(0x7F00_0000_9000, (1, 8, 2, 3)), 7, Tensor(0x3000, (7,))))
    assert params.values() == [0, 0, 48, 4, 0x7F00_0000_9000, 1, 8, 2, 3, 192, 24, 12, 4, 7,
                               0, 0, 7, 4, 0x3000, 7, 4]
    assert [params.pointers[i] for i in range(len(params.objects))] == [
        ctypes.addressof(p) for p in params.objects]


def test_the_parameter_memory_refuses_what_it_cannot_lay_out():
    with pytest.raises(NotImplementedError, match="C-contiguous"):
        launch.Params((types.Array(types.float32, 2, "A"),))
    with pytest.raises(NotImplementedError, match="complex64"):
        launch.Params((types.complex64,))
    params = launch.Params((types.Array(types.float32, 3, "C"),))
    with pytest.raises(ValueError, match="3-D"):
        params.set((Tensor(0x1000, (4, 4)),))
    with pytest.raises(TypeError, match="takes 1 arguments, got 2"):
        launch.Params((types.int32,)).set((1, 2))


# Run with numba's real CUDA target (numba.cuda imported first, no simulator): the kernels'
# argument types and values as the dispatcher path types them (typeof on DeviceNDArrays, the
# wrappers' NumPy scalars), packed by numba-cuda's _prepare_args and written by launch.Params,
# each compared as (bytes, value): what the kernel receives.
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

def sized(args):        # numba's list: ctypes scalars, Python ints (8 bytes) and bools (1 byte)
    out = []
    for a in args:
        if isinstance(a, ctypes._SimpleCData):
            out.append([ctypes.sizeof(a), a.value])
        else:
            out.append([1 if isinstance(a, bool) else 8, a])
    return out

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
    params = launch.Params(argtypes)
    params.set(fast_values)
    return {"types_match": typed == tuple(argtypes), "numba": sized(theirs),
            "fast": [list(x) for x in params.sized()]}

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


# ---------------------------------------------------------------------------
# Without a GPU: the fast path hands its launch the launcher's kernel and arguments
# ---------------------------------------------------------------------------

def _compare_arguments(theirs, ours, argtypes):
    """The launcher's arguments (numba arrays, NumPy scalars) against the fast path's (torch
    tensors, scalars): arrays by shape (a 1-D parameter by the shape of the flat view the launch
    writes), scalars by value (the fast launch writes each as the kernel's argument type says:
    ``launch.Params``), a float32 scale as the same float32."""
    assert len(theirs) == len(ours) == len(argtypes)
    for n, (a, b, ty) in enumerate(zip(theirs, ours, argtypes)):
        if hasattr(a, "shape") and np.ndim(a) > 0:
            shape = (math.prod(b.shape),) if ty.ndim == 1 else tuple(b.shape)
            assert tuple(a.shape) == shape, f"argument {n}"
        else:
            assert not hasattr(b, "shape") or np.ndim(b) == 0, f"argument {n}: {b!r} is an array"
            assert a == b, f"argument {n}: {a!r} != {b!r}"
            if isinstance(a, np.float32):
                assert isinstance(b, np.float32), f"argument {n}: {b!r} is not float32"


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=False, dropout_p=0.2, seed=9),
                                     dict(causal=True, softcap=3.0, window_size=(8, 0))],
                         ids=["causal", "dropout", "softcap-window"])
def test_the_fast_path_launches_the_launchers_kernel_with_its_arguments(monkeypatch, rng, options):
    torch = pytest.importorskip("torch")
    from flashnumba.kernels import fa2_fast_backward, fa2_fast_forward, smem_limit
    B, Nq, Nk, Hq, Hkv, d = 1, 37, 45, 4, 2, 33
    q, dout = (rng.standard_normal((B, Nq, Hq, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32) for _ in range(2))
    out, L = (rng.standard_normal(s).astype(np.float32) for s in ((B, Nq, Hq, d), (B, Hq, Nq)))
    launched, prepared = [], []
    monkeypatch.setattr(smem_limit, "raise_dynamic_limit",
                        lambda kernel, args, nbytes: launched.append((kernel, nbytes, args)))

    class Prepared:           # what launch.prepared would make, recording its call
        def __init__(self, kernel, argtypes, grid, block, nbytes=0, device=0):
            self.what = (kernel, nbytes, argtypes)
            launch.Params(argtypes)           # every argument type can be laid out

        def __call__(self, *args):
            prepared.append((*self.what, args))
            assert len(args) == len(self.what[2])
    for module in (fa2_fast_forward, fa2_fast_backward):
        monkeypatch.setattr(module, "prepared", Prepared)
        monkeypatch.setattr(module, "_fast", {})
    fa2_fast_forward.launcher(q, k, v, **options)
    fa2_fast_backward.launcher(dout, q, k, v, out, L, **options)
    t = [torch.from_numpy(x) for x in (dout, q, k, v, out, L)]
    fa2_fast_forward.fast_forward(*t[1:4], **options)
    fa2_fast_backward.fast_backward(*t, **options)
    main_launches = [p for p in prepared if p[0] is not fa2_fast_backward.preprocess_zero_dq]
    assert len(launched) == 2 and len(main_launches) == 2 + (Hq != Hkv) * 2
    for (kernel, nbytes, theirs), (fast_kernel, fast_nbytes, argtypes, ours) in zip(launched, main_launches):
        assert fast_kernel is kernel and fast_nbytes == nbytes
        _compare_arguments(theirs, ours, argtypes)


# ---------------------------------------------------------------------------
# On a GPU: the public torch calls through the fast path against the dispatcher path
# ---------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(flashnumba.on_simulator(),
                              reason="torch CUDA tensors and compiled kernels need a GPU")

# B, Nq, Nk, Hq, Hkv, d, causal: causal; GQA with N not a multiple of the tiles; Nq != Nk with
# an odd head dim; one K/V tile (dQ from one block's atomics: bitwise reproducible)
SHAPES = [(2, 128, 128, 4, 4, 64, True), (1, 77, 77, 4, 2, 64, True),
          (2, 50, 90, 2, 1, 33, False), (1, 40, 40, 2, 2, 64, True)]


def _calls(torch, B, Nq, Nk, Hq, Hkv, d, causal, **options):
    """() -> (out, lse, dq, dk, dv) of flash_attn_func and its autograd backward, on fixed inputs."""
    gen = torch.Generator(device="cuda").manual_seed(Nq * 1000 + d)
    q = torch.randn((B, Nq, Hq, d), device="cuda", generator=gen)
    k, v = (torch.randn((B, Nk, Hkv, d), device="cuda", generator=gen) for _ in range(2))
    dout = torch.randn((B, Nq, Hq, d), device="cuda", generator=gen)

    def run():
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse, _ = flashnumba.flash_attn_func(qg, kg, vg, causal=causal, return_attn_probs=True,
                                                 **options)
        out.backward(dout)
        return out.detach(), lse, qg.grad, kg.grad, vg.grad
    return run


def _bits(torch, x):
    """x's float32 values as their int32 bit patterns: equal only when bitwise equal."""
    return x.contiguous().view(torch.int32)


OPTIONS = {"plain": {}, "dropout": {"dropout_p": 0.1, "seed": 3},
           "softcap-alibi-window": {"softcap": 5.0, "alibi_slopes": [0.5, 0.25, 0.125, 0.0625],
                                    "window_size": (16, 0)}}


@gpu_only
@pytest.mark.parametrize("shape, options", [(s, "plain") for s in SHAPES]
                         + [(SHAPES[1], "dropout"), (SHAPES[1], "softcap-alibi-window")],
                         ids=lambda x: x if isinstance(x, str) else "B{}-Nq{}-Nk{}-H{}:{}-d{}-{}".format(
                             *x[:6], "causal" if x[6] else "full"))
def test_the_fast_path_gives_the_dispatcher_paths_results_bitwise(monkeypatch, fast_launches, shape, options):
    torch = pytest.importorskip("torch")
    from flashnumba.kernels import fa2_fast_backward, fa2_fast_forward
    options = dict(OPTIONS[options])
    if "alibi_slopes" in options:
        options["alibi_slopes"] = torch.tensor(options["alibi_slopes"], device="cuda")
    run = _calls(torch, *shape, **options)
    monkeypatch.setattr(launch, "ENABLED", False)
    slow = run()
    variant = dict(dropout="dropout_p" in options, softcap="softcap" in options,
                   alibi="alibi_slopes" in options)
    kernels = (fa2_fast_forward.build(fa2_fast_forward.resolve_config(shape[5]), **variant),
               fa2_fast_backward.build(fa2_fast_backward.resolve_config(shape[5]), **variant))
    overloads = [set(kernel.overloads) for kernel in kernels]
    monkeypatch.setattr(launch, "ENABLED", True)
    launches = fast_launches
    fast = run()
    torch.cuda.synchronize()
    assert launches, "the fast path was not taken"
    # the fast path's declared argument types are the ones the dispatcher typed: no new overload
    assert [set(kernel.overloads) for kernel in kernels] == overloads
    one_kv_tile = shape[2] <= fa2_fast_backward.resolve_config(shape[5]).Bc
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), slow, fast):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name == "dq" and not one_kv_tile:
            # dQ is added by atomics from several K/V tiles: their order, so the last bits, vary
            # from run to run on either path
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        else:
            assert torch.equal(_bits(torch, a), _bits(torch, b)), f"{name} differs"


@gpu_only
def test_a_strided_input_is_copied_to_contiguous_and_gives_the_same_bits(monkeypatch):
    torch = pytest.importorskip("torch")
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn((2, 3, 70, 64), device="cuda", generator=gen) for _ in range(3))
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(launch, "ENABLED", enabled)
        results.append(flashnumba.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(_bits(torch, results[0]), _bits(torch, results[1]))


@gpu_only
def test_the_fast_path_makes_no_numba_allocation_view_or_dispatcher_launch(monkeypatch):
    torch = pytest.importorskip("torch")
    from numba import cuda
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv import driver
    run = _calls(torch, 2, 96, 96, 4, 2, 64, True)
    run()                                            # prepares the launches for this shape
    counts = {"memalloc": 0, "as_cuda_array": 0, "dispatcher call": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(driver.Context, "memalloc", counting("memalloc", driver.Context.memalloc))
    monkeypatch.setattr(cuda, "as_cuda_array", counting("as_cuda_array", cuda.as_cuda_array))
    monkeypatch.setattr(dispatcher.CUDADispatcher, "call",
                        counting("dispatcher call", dispatcher.CUDADispatcher.call))
    run()
    torch.cuda.synchronize()
    assert counts == {"memalloc": 0, "as_cuda_array": 0, "dispatcher call": 0}
    monkeypatch.setattr(launch, "ENABLED", False)  # the counters do see the dispatcher path's
    run()
    assert counts["memalloc"] > 0 and counts["as_cuda_array"] > 0 and counts["dispatcher call"] > 0


def test_threads_sharing_a_launch_each_launch_with_their_own_arguments(monkeypatch):
    """Two threads call one Launch with their own tensors (both arguments the same pointer in a
    call): every launch must see a matching pair, never one thread's pointer beside the other's.
    The driver is a fake that records the parameter memory at launch time; reading a pointer
    yields the GIL and thread switches are forced often, so without the Launch's lock the pairs
    mix."""
    import threading
    import time

    run = launch.Launch.__new__(launch.Launch)          # what __init__ makes, without a GPU
    run.params, run.debug, run.handle, run.dims = launch.Params((A1I, A1I)), None, 1, (1,) * 7
    run.lock = threading.Lock()
    seen = []

    class Driver:
        def cuLaunchKernel(self, handle, *rest):
            values = run.params.values()
            time.sleep(0)                                 # let the other thread in
            seen.append((values[4], values[11]))          # the two data pointers
            return 0
    monkeypatch.setattr(run, "_library", Driver(), raising=False)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        class Yielding(Tensor):               # hands the GIL over while its pointer is read
            def data_ptr(self):
                time.sleep(0)
                return self.pointer

        def hammer(pointer):
            x = Yielding(pointer, (7,))
            for _ in range(2000):
                run(x, x)
        threads = [threading.Thread(target=hammer, args=(p,)) for p in (0x1000, 0x2000)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert len(seen) == 4000
    assert all(a == b for a, b in seen), [pair for pair in seen if pair[0] != pair[1]][:3]
