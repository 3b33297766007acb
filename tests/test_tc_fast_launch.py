"""The tensor-core kernels' fast launch path (``fast_forward`` / ``fast_backward`` on torch
tensors, ``kernels.launch``) against their launchers: the same kernels, grids and arguments.

On the simulator the prepared launch is stood in for by the dispatcher (each torch tensor handed
over as a NumPy view of its memory, a 1-D parameter as the flat view), so the fast path's own
work (its config, constants, grids, allocations and argument order) runs and its results are
compared bitwise with ``fa2_tc_forward`` / ``fa2_tc_backward``'s. On a GPU the public torch calls
go through it (tests/test_launch.py has the float32 path's GPU tests; the last test here is the
half-precision one)."""

import numpy as np
import pytest
from tc_helpers import inputs

import flashnumba
from flashnumba import attention, dtypes, registry
from flashnumba.kernels import fa2_tc_backward as tcb
from flashnumba.kernels import fa2_tc_forward as tcf
from flashnumba.kernels import launch

torch = pytest.importorskip("torch")
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _numpy_view(x):
    """A NumPy view of a CPU torch tensor's memory (16-bit floats as their uint16 bits)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


class DispatcherLaunch:
    """What ``launch.prepared`` makes, on the simulator: the dispatcher at the same grid, block
    and dynamic shared memory, with the declared argument types' shapes."""

    made = []

    def __init__(self, kernel, argtypes, grid, block, nbytes=0, device=0):
        self.kernel, self.argtypes, self.grid, self.block, self.nbytes = kernel, argtypes, grid, block, nbytes
        DispatcherLaunch.made.append(self)

    def __call__(self, *args):
        assert len(args) == len(self.argtypes)
        values = []
        for x, ty in zip(args, self.argtypes):
            if isinstance(x, torch.Tensor):
                assert x.is_contiguous()
                x = _numpy_view(x)
                assert x.dtype == np.dtype(str(ty.dtype)) and (ty.ndim == 1 or x.ndim == ty.ndim)
                x = x.reshape(-1) if ty.ndim == 1 else x
            values.append(x)
        self.kernel[self.grid, self.block, 0, self.nbytes](*values)


@pytest.fixture
def dispatcher_launches(monkeypatch):
    DispatcherLaunch.made = []
    for module in (tcf, tcb):
        monkeypatch.setattr(module, "prepared", DispatcherLaunch)
        monkeypatch.setattr(module, "_fast", {})
    return DispatcherLaunch.made


def _torch(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16).view(np.int16)).view(TORCH[dtype])


@pytest.mark.skipif(not flashnumba.on_simulator(), reason="the dispatcher stand-in is the simulator's")
@pytest.mark.parametrize("dtype, shape, options", [
    ("bfloat16", (1, 37, 45, 4, 2, 32), dict(causal=True)),
    ("float16", (2, 20, 33, 2, 2, 16), dict(dropout_p=0.2, seed=9)),
    ("bfloat16", (1, 24, 24, 2, 1, 32), dict(causal=True, softcap=3.0, window_size=(8, 0),
                                             alibi_slopes=np.array([[0.5, 0.25]], np.float32))),
], ids=["causal-gqa", "dropout-f16", "softcap-window-alibi"])
def test_the_fast_path_gives_the_launchers_results_bitwise(rng, dispatcher_launches, dtype, shape, options):
    B, Nq, Nk, Hq, Hkv, d = shape
    q, k, v, dout = inputs(rng, dtype, B, Nq, Nk, Hq, Hkv, d)
    out, L = tcf.fa2_tc_forward(q, k, v, **options)
    grads = tcb.fa2_tc_backward(dout, q, k, v, out, L, **options)
    t = [_torch(x, dtype) for x in (dout, q, k, v)]
    fast_out, fast_L = tcf.fast_forward(*t[1:], **options)
    assert fast_out.dtype == TORCH[dtype] and fast_L.dtype == torch.float32
    assert np.array_equal(_numpy_view(fast_out), np.asarray(out).view(np.uint16))
    assert np.array_equal(fast_L.numpy(), L, equal_nan=True)
    fast_grads = tcb.fast_backward(*t, fast_out, fast_L, **options)
    for name, a, b in zip(("dq", "dk", "dv"), grads, fast_grads):
        assert b.dtype == TORCH[dtype] and tuple(b.shape) == a.shape, name
        assert np.array_equal(_numpy_view(b), np.asarray(a).view(np.uint16)), name
    assert len(dispatcher_launches) == 4       # the forward's kernel, the backward's three
    tcf.fast_forward(*t[1:], **options)         # a second call: the launches made once
    assert len(dispatcher_launches) == 4


def test_the_fast_path_takes_16_bit_torch_tensors_at_a_buckets_own_head_dim(monkeypatch):
    """attention.fast_kernels: the tensor-core modules' fast path for float16/bfloat16 torch
    tensors with d a head-dim bucket (no padded copy), the float32 path for float32 only, and
    the dispatcher path for anything else."""
    from flashnumba.interop import Operand
    monkeypatch.setattr(attention.numba_config, "ENABLE_CUDASIM", 0)
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(Operand, "__init__", lambda self, *a: None)

    def operand(dtype, shape, kind="torch"):
        op = Operand()
        op.kind, op.dtype, op.shape = kind, dtype, shape
        return op

    def fwd(dtype, d, kind="torch"):
        return [operand(dtype, (1, 8, 2, d), kind) for _ in range(3)]

    def bwd(dtype, d, lse=dtypes.FLOAT32):
        return [operand(dtype, (1, 8, 2, d)) for _ in range(5)] + [operand(lse, (1, 2, 8))]
    F, Bw = registry.FORWARD, registry.BACKWARD
    assert attention.fast_kernels(tcf, F, fwd("bfloat16", 64)) is tcf.fast_forward
    assert attention.fast_kernels(tcf, F, fwd("float16", 128)) is tcf.fast_forward
    assert attention.fast_kernels(tcb, Bw, bwd("bfloat16", 96)) is tcb.fast_backward
    assert attention.fast_kernels(tcf, F, fwd("bfloat16", 40)) is None           # padded to 64
    assert attention.fast_kernels(tcb, Bw, bwd("float16", 17)) is None
    assert attention.fast_kernels(tcf, F, fwd("bfloat16", 64, "numpy")) is None
    assert attention.fast_kernels(tcb, Bw, bwd("bfloat16", 64, lse="bfloat16")) is None
    mixed = fwd("bfloat16", 64)
    mixed[2] = operand("float32", (1, 8, 2, 64))
    assert attention.fast_kernels(tcf, F, mixed) is None
    fast_fwd = registry.version("fa2_fast").module(F)
    assert attention.fast_kernels(fast_fwd, F, fwd("float32", 40)) is fast_fwd.fast_forward
    assert attention.fast_kernels(fast_fwd, F, fwd("bfloat16", 64)) is None       # widened first
    monkeypatch.setattr(launch, "ENABLED", False)
    assert attention.fast_kernels(tcf, F, fwd("bfloat16", 64)) is None


@pytest.mark.skipif(flashnumba.on_simulator(), reason="torch CUDA tensors and compiled kernels need a GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_public_half_call_takes_the_fast_path_with_the_dispatcher_paths_results(monkeypatch, fast_launches, dtype):
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn((2, 77, 4, 64), device="cuda", generator=gen, dtype=TORCH[dtype])
    k, v = (torch.randn((2, 77, 2, 64), device="cuda", generator=gen, dtype=TORCH[dtype]) for _ in range(2))
    dout = torch.randn_like(q)

    def run():
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse, _ = flashnumba.flash_attn_func(qg, kg, vg, causal=True, return_attn_probs=True)
        out.backward(dout)
        return out.detach(), lse, qg.grad, kg.grad, vg.grad
    monkeypatch.setattr(launch, "ENABLED", False)
    slow = run()
    monkeypatch.setattr(launch, "ENABLED", True)
    launches = fast_launches
    fast = run()
    torch.cuda.synchronize()
    assert len(launches) == 4, "the fast path was not taken"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), slow, fast):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name == "dq":            # added by atomics from several K/V tiles: the order varies
            assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2), name
        else:
            assert torch.equal(a, b), f"{name} differs"
