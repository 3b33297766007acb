"""PyTorch tensors in, PyTorch tensors out (CPU through NumPy; CUDA without copies), with autograd;
and, on a GPU, CuPy arrays and any __cuda_array_interface__ object."""

import numpy as np
import pytest
from conftest import rel_err
from test_interop import TOL, gpu_only, make

import flashnumba
from flashnumba import reference
from flashnumba.interop import Operand, _Interface, _interface
from flashnumba.tools import emulation

# ---------------------------------------------------------------- PyTorch (CPU or CUDA)

torch = pytest.importorskip("torch")
DEVICES = ["cpu"] + ([] if flashnumba.on_simulator() else ["cuda"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_in_torch_out_with_autograd(device, dtype, rng):
    q, k, v = make(rng)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    tdtype = getattr(torch, dtype)
    tq, tk, tv = (torch.tensor(x, device=device, dtype=tdtype, requires_grad=True) for x in (q, k, v))
    out = flashnumba.flash_attn_func(tq, tk, tv, causal=True)
    assert isinstance(out, torch.Tensor) and out.device.type == device and out.dtype == tdtype
    assert out.grad_fn is not None
    out.backward(torch.tensor(dout, device=device, dtype=tdtype))

    rounded = [x.detach().to(torch.float64).cpu().numpy() for x in (tq, tk, tv)]
    dout64 = torch.tensor(dout, dtype=tdtype).to(torch.float64).numpy()
    out_ref = reference.attention(*rounded, causal=True)[0]
    grads_ref = reference.attention_backward(dout64, *rounded, causal=True)
    got = [out] + [x.grad for x in (tq, tk, tv)]
    if dtype == "float32":
        for x, ref in zip(got, [out_ref, *grads_ref]):
            assert rel_err(x.detach().cpu().numpy(), ref) <= TOL
    else:
        lows = [emulation.attention_in_dtype(*rounded, "bfloat16", causal=True),
                *emulation.attention_backward_in_dtype(dout64, *rounded, "bfloat16", causal=True)]
        for factor, x, ref, low in zip((2, 3, 3, 3), got, [out_ref, *grads_ref], lows):
            err = np.abs(x.detach().to(torch.float64).cpu().numpy() - ref).max()
            assert err <= factor * np.abs(low - ref).max()


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_matches_torch_sdpa_with_gradients(device, rng):
    """Top-left causal, grouped-query heads, PyTorch layout: the same values and gradients as
    torch.nn.functional.scaled_dot_product_attention computed in float64."""
    query, key, value = (torch.tensor(rng.standard_normal(shape), dtype=torch.float32, device=device,
                                      requires_grad=True)
                         for shape in ((1, 4, 13, 16), (1, 2, 21, 16), (1, 2, 21, 16)))
    out = flashnumba.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    out.sum().backward()
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (query, key, value))
    ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=True)
    ref.sum().backward()
    assert out.shape == ref.shape
    for x, r in ((out, ref), (query.grad, q64.grad), (key.grad, k64.grad), (value.grad, v64.grad)):
        assert rel_err(x.detach().cpu().numpy(), r.detach().numpy()) <= TOL


def test_no_grad_gives_no_graph(rng):
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in make(rng))
    with torch.no_grad():
        out = flashnumba.flash_attn_func(tq, tk, tv)
    assert out.grad_fn is None


# ---------------------------------------------------------------- GPU only: no copies

@gpu_only
def test_torch_cuda_inputs_are_not_copied(rng):
    q, _, _ = make(rng)
    tq = torch.tensor(q, device="cuda")
    view = Operand("q", tq).device_f32()
    assert view.__cuda_array_interface__["data"][0] == tq.data_ptr()


@gpu_only
def test_strided_torch_cuda_and_packed(rng):
    qkv = torch.tensor(rng.standard_normal((1, 21, 3, 2, 16)), dtype=torch.float32, device="cuda")
    out = flashnumba.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (qkv[:, :, i].cpu().numpy() for i in range(3))
    assert out.is_cuda and rel_err(out.cpu().numpy(), reference.attention(q, k, v, causal=True)[0]) <= TOL


@gpu_only
def test_cupy_in_cupy_out(rng):
    cupy = pytest.importorskip("cupy")
    q, k, v = make(rng)
    out = flashnumba.flash_attn_func(*(cupy.asarray(x) for x in (q, k, v)))
    assert isinstance(out, cupy.ndarray)
    assert rel_err(cupy.asnumpy(out), reference.attention(q, k, v)[0]) <= TOL


@gpu_only
def test_any_cuda_array_interface_and_bfloat16_interface(rng):
    q, k, v = make(rng)
    tensors = [torch.tensor(x, device="cuda", dtype=torch.bfloat16) for x in (q, k, v)]
    plain = []
    for t in tensors:                                  # bfloat16 as ml_dtypes and PyTorch spell it
        cai = _interface(t.view(torch.int16))
        cai["typestr"] = "<V2"
        plain.append(_Interface(cai, owner=t))
    out = flashnumba.flash_attn_func(*plain)
    assert out.__cuda_array_interface__["typestr"] == "<V2"
    got = torch.as_tensor(out.owner.view(np.int16), device="cuda").view(torch.bfloat16)
    expected = flashnumba.flash_attn_func(*tensors)
    assert torch.equal(got, expected)


def test_a_torch_tensor_reads_as_the_general_path_reads_it():
    """Operand reads a plain torch.Tensor directly; its kind, shape and dtype are what kind_of and
    dtypes.name_of give (a subclass, here nn.Parameter, takes the general path)."""
    torch = pytest.importorskip("torch")
    from flashnumba import dtypes
    from flashnumba.interop import kind_of
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        for x in (torch.zeros((2, 3, 1, 4), dtype=dtype), torch.nn.Parameter(torch.zeros(5, dtype=dtype),
                                                                            requires_grad=False)):
            op = Operand("q", x)
            assert (op.kind, op.shape, op.dtype) == (kind_of("q", x), tuple(int(n) for n in x.shape),
                                                     dtypes.name_of(x)), (dtype, type(x))
