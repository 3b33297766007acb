"""The tensor-core version (fa2_tc) behind the public calls: the default for float16 and bfloat16
where it can run, refused with a clear error where it cannot, and its deterministic backward.
Tiny shapes: the tc kernels on the simulator run 32 Python threads per warp."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import flashnumba
from flashnumba import reference, registry, validate
from flashnumba.tools import emulation

NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TC = registry.DEFAULT_HALF


def make(rng, dtype, B=1, Nq=9, Nk=20, Hq=1, Hkv=1, d=17):
    shapes = ((B, Nq, Hq, d), (B, Nk, Hkv, d), (B, Nk, Hkv, d), (B, Nq, Hq, d))
    return [rng.standard_normal(s).astype(np.float32).astype(NP.get(dtype, np.float32)) for s in shapes]


def max_err(x, ref):
    return float(np.abs(np.asarray(x, dtype=np.float64) - ref).max())


@pytest.fixture
def tc_calls(monkeypatch):
    """The dtypes of the calls that reach the tc forward module's entry point (and run it)."""
    module = registry.version(TC).module(registry.FORWARD)
    calls, run = [], module.forward

    def spy(q, k, v, **options):
        calls.append(options["dtype"])
        return run(q, k, v, **options)
    monkeypatch.setattr(module, "forward", spy)
    return calls


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_inputs_run_the_tensor_core_kernels_by_default(dtype, rng, tc_calls):
    """algorithm=None with 16-bit inputs (GQA here) runs fa2_tc on the 16-bit data, within
    flash-attn's rule."""
    q, k, v, _ = make(rng, dtype, Hq=2)
    assert validate.algorithm(None, dtype, 17) == TC
    out, lse, _ = flashnumba.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert tc_calls == [dtype]
    assert out.dtype == NP[dtype] and lse.dtype == np.float32
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ref, _ = reference.attention(q64, k64, v64, causal=True)
    low = emulation.attention_in_dtype(q64, k64, v64, dtype, causal=True)
    assert max_err(out, ref) <= 2 * max_err(low, ref)


def test_float32_inputs_keep_the_fast_fma_kernels(rng, tc_calls):
    q, k, v, _ = make(rng, "float32")
    assert validate.algorithm(None, "float32", 17) == registry.DEFAULT
    out = flashnumba.flash_attn_func(q, k, v)
    assert out.dtype == np.float32 and tc_calls == []


def test_sdpa_with_float16_runs_the_tensor_core_kernels(rng, tc_calls):
    """The SDPA call (B, H, N, d), top-left causal, on fa2_tc, within flash-attn's rule."""
    q, k, v, _ = make(rng, "float16", Nq=12, Nk=12)
    to_sdpa = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    out = flashnumba.scaled_dot_product_attention(to_sdpa(q), to_sdpa(k), to_sdpa(v), is_causal=True)
    assert tc_calls == ["float16"] and out.dtype == np.float16
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ref, _ = reference.attention(q64, k64, v64, causal=True, alignment="top-left")
    low = emulation.attention_in_dtype(q64, k64, v64, "float16", causal=True, alignment="top-left")
    assert max_err(to_sdpa(out), ref) <= 2 * max_err(low, ref)


def test_the_default_follows_compute_capability_and_head_dim():
    assert registry.default("bfloat16", 64, None) == TC                  # the simulator
    assert registry.default("float16", 128, (8, 0)) == TC
    assert registry.default("bfloat16", 64, (9, 0)) == TC
    assert registry.default("bfloat16", 64, (7, 5)) == registry.DEFAULT  # no bf16 mma.sync before sm_80
    assert registry.default("float32", 64, (9, 0)) == registry.DEFAULT
    version = registry.version(TC)
    assert version.dtypes == ("float16", "bfloat16") and version.min_compute_capability == (8, 0)
    assert not version.takes("float32") and registry.version(registry.DEFAULT).takes("bfloat16")
    assert TC not in registry.names("float32") and TC in registry.names("bfloat16")


def test_explicit_tc_with_float32_is_refused_naming_the_argument(rng):
    q, k, v, dout = make(rng, "float32")
    with pytest.raises(ValueError, match=r"algorithm='fa2_tc' takes inputs of dtype float16 or "
                                         r"bfloat16, got float32"):
        flashnumba.flash_attn_func(q, k, v, algorithm=TC)
    out, lse, _ = flashnumba.flash_attn_func(q, k, v, return_attn_probs=True)
    with pytest.raises(ValueError, match="algorithm='fa2_tc'"):
        flashnumba.flash_attn_backward(dout, q, k, v, out, lse, algorithm=TC)


def test_unsupported_head_dim_and_old_gpu_are_refused_and_fall_back(monkeypatch, rng):
    """With a tc version that served d <= 16, d = 17 falls back to the fp32 path by default and
    is a ValueError when named; on a cc 7.5 GPU likewise."""
    small = tuple(dataclasses.replace(v, max_head_dim=16) if v.name == TC else v
                  for v in registry.VERSIONS)
    monkeypatch.setattr(registry, "VERSIONS", small)
    assert validate.algorithm(None, "bfloat16", 17) == registry.DEFAULT
    assert validate.algorithm(None, "bfloat16", 16) == TC
    q, k, v, _ = make(rng, "bfloat16")
    with pytest.raises(ValueError, match=r"algorithm='fa2_tc' serves head dims up to 16, got headdim 17"):
        flashnumba.flash_attn_func(q, k, v, algorithm=TC)
    monkeypatch.setattr(validate, "compute_capability", lambda: (7, 5))
    assert validate.algorithm(None, "bfloat16", 16) == registry.DEFAULT
    with pytest.raises(ValueError, match=r"algorithm='fa2_tc' needs a GPU of compute capability >= 8\.0"):
        validate.algorithm(TC, "bfloat16", 16)


def test_deterministic_half_backward_is_bitwise_reproducible_and_within_the_rule(rng):
    """deterministic=True on fa2_tc: the registry's deterministic_backward (FA2's separate dQ
    pass on the widened inputs) gives the same bits every run, in the input dtype, within 3x
    the dense error by flash-attn's rule. (The atomic tc backward: tests/test_tc_backward.py.)"""
    assert registry.version(registry.version(TC).deterministic_backward).reads("float32")
    q, k, v, dout = make(rng, "bfloat16")
    out, lse, _ = flashnumba.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    runs = [flashnumba.flash_attn_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
            for _ in range(2)]
    with pytest.raises(ValueError, match="deterministic=True runs fa2_backward"):
        registry.version(TC).module(registry.BACKWARD).backward(dout, q, k, v, out, lse, deterministic=True)
    q64, k64, v64, dout64 = (x.astype(np.float64) for x in (q, k, v, dout))
    refs = reference.attention_backward(dout64, q64, k64, v64, causal=True)
    lows = emulation.attention_backward_in_dtype(dout64, q64, k64, v64, "bfloat16", causal=True)
    for name, a, b, ref, low in zip(("dq", "dk", "dv"), *runs, refs, lows):
        assert a.dtype == ml_dtypes.bfloat16, name
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), name
        assert max_err(a, ref) <= 3 * max_err(low, ref), name


def test_torch_autograd_with_bfloat16_runs_the_tensor_core_kernels(rng, tc_calls):
    """Tensors that require grad: the forward is fa2_tc's, the backward within flash-attn's rule."""
    torch = pytest.importorskip("torch")
    q, k, v, dout = make(rng, "bfloat16")
    as_torch = lambda x: torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    tq, tk, tv = (as_torch(x).requires_grad_() for x in (q, k, v))
    out = flashnumba.flash_attn_func(tq, tk, tv, causal=True)
    out.backward(as_torch(dout))
    assert out.dtype == torch.bfloat16 and tc_calls == ["bfloat16"]
    q64, k64, v64, dout64 = (x.astype(np.float64) for x in (q, k, v, dout))
    refs = reference.attention_backward(dout64, q64, k64, v64, causal=True)
    lows = emulation.attention_backward_in_dtype(dout64, q64, k64, v64, "bfloat16", causal=True)
    for t, ref, low in zip((tq, tk, tv), refs, lows):
        assert max_err(t.grad.float().numpy(), ref) <= 3 * max_err(low, ref)
