"""Every public call refuses bad input before launching anything, naming the argument, what it got
and what it expects; NaN and Inf in the inputs propagate as they do in the reference."""

import numpy as np
import pytest
from numba import cuda

import flashnumba
from flashnumba import reference, registry

F = flashnumba


def t(*shape, dtype=np.float32):
    return np.ones(shape, dtype=dtype)


q0, k0, v0 = t(1, 8, 2, 16), t(1, 12, 2, 16), t(1, 12, 2, 16)
out0, lse0 = t(1, 8, 2, 16), t(1, 2, 8)

# (name, call, exception, message pattern)
BAD = [
    ("q-3d", lambda: F.flash_attn_func(t(8, 2, 16), k0, v0), ValueError,
     r"q must be 4-D \(batch, seqlen, nheads, headdim\), got shape \(8, 2, 16\)"),
    ("batch", lambda: F.flash_attn_func(q0, t(2, 12, 2, 16), t(2, 12, 2, 16)), ValueError,
     r"k has batch 2, expected q's batch 1"),
    ("seqlen-k-v", lambda: F.flash_attn_func(q0, k0, t(1, 11, 2, 16)), ValueError,
     r"v has shape \(1, 11, 2, 16\), expected k's shape \(1, 12, 2, 16\)"),
    ("heads-k-v", lambda: F.flash_attn_func(q0, k0, t(1, 12, 1, 16)), ValueError, r"v has shape"),
    ("headdim", lambda: F.flash_attn_func(q0, t(1, 12, 2, 8), t(1, 12, 2, 8)), ValueError,
     r"k has head dim 8, expected q's head dim 16"),
    ("gqa", lambda: F.flash_attn_func(t(1, 8, 3, 16), k0, v0), ValueError,
     r"nheads_q=3 must be a multiple of nheads_kv=2"),
    ("headdim-0", lambda: F.flash_attn_func(t(1, 8, 2, 0), t(1, 12, 2, 0), t(1, 12, 2, 0)), ValueError,
     r"head dim 0 is not supported; expected 1 <= headdim <= 256"),
    ("headdim-too-big", lambda: F.flash_attn_func(t(1, 8, 2, 257), t(1, 12, 2, 257), t(1, 12, 2, 257)),
     ValueError, r"head dim 257 is not supported; expected 1 <= headdim <= 256"),
    ("headdim-readable", lambda: F.flash_attn_func(t(1, 8, 2, 160), t(1, 12, 2, 160), t(1, 12, 2, 160),
                                                   algorithm="fa2"),
     ValueError, r"algorithm='fa2' serves head dims up to 128, got headdim 160"),
    ("headdim-deterministic", lambda: F.flash_attn_func(t(1, 8, 2, 160), t(1, 12, 2, 160), t(1, 12, 2, 160),
                                                        deterministic=True),
     ValueError, (r"deterministic=True runs the backward of algorithm='fa2', which serves head dims up "
                  r"to 128, got headdim 160")),
    ("empty-q", lambda: F.flash_attn_func(t(1, 0, 2, 16), k0, v0), ValueError,
     r"sequence lengths must be at least 1; got seqlen_q=0, seqlen_k=12"),
    ("empty-k", lambda: F.flash_attn_func(q0, t(1, 0, 2, 16), t(1, 0, 2, 16)), ValueError,
     r"seqlen_k=0"),
    ("empty-batch", lambda: F.flash_attn_func(t(0, 8, 2, 16), t(0, 12, 2, 16), t(0, 12, 2, 16)),
     ValueError, r"q has batch 0; expected at least 1"),
    ("mixed-dtypes", lambda: F.flash_attn_func(t(1, 8, 2, 16, dtype=np.float16), k0, v0), TypeError,
     r"q is float16 but k is float32: q, k, v must share one dtype"),
    ("int-dtype", lambda: F.flash_attn_func(t(1, 8, 2, 16, dtype=np.int32), k0, v0), TypeError,
     r"q has dtype int32; expected one of float32, float16, bfloat16"),
    ("float64", lambda: F.flash_attn_func(*(x.astype(np.float64) for x in (q0, k0, v0))), TypeError,
     r"q has dtype float64"),
    ("not-an-array", lambda: F.flash_attn_func(q0.tolist(), k0, v0), TypeError,
     r"q must be a NumPy array, a PyTorch tensor, .* got list"),
    ("dropout-1", lambda: F.flash_attn_func(q0, k0, v0, dropout_p=1.0), ValueError,
     r"dropout_p must be in \[0, 1\), got 1.0"),
    ("dropout-negative", lambda: F.flash_attn_func(q0, k0, v0, dropout_p=-0.1), ValueError,
     r"dropout_p must be in \[0, 1\), got -0.1"),
    ("dropout-string", lambda: F.flash_attn_func(q0, k0, v0, dropout_p="0.1"), TypeError,
     r"dropout_p must be a number in \[0, 1\), got '0.1'"),
    ("seed", lambda: F.flash_attn_func(q0, k0, v0, seed=-1), ValueError, r"seed must be in \[0, 2\^64\)"),
    ("scale-inf", lambda: F.flash_attn_func(q0, k0, v0, softmax_scale=float("inf")), ValueError,
     r"softmax_scale must be a finite number or None, got inf"),
    ("scale-nan", lambda: F.flash_attn_func(q0, k0, v0, softmax_scale=float("nan")), ValueError,
     r"softmax_scale must be a finite number or None, got nan"),
    ("scale-string", lambda: F.flash_attn_func(q0, k0, v0, softmax_scale="0.1"), TypeError,
     r"softmax_scale must be a finite number or None, got '0.1'"),
    ("causal-not-bool", lambda: F.flash_attn_func(q0, k0, v0, causal="yes"), TypeError,
     r"causal must be True or False, got 'yes'"),
    ("algorithm", lambda: F.flash_attn_func(q0, k0, v0, algorithm="fa3"), ValueError,
     "algorithm must be one of " + ", ".join(map(repr, registry.names())) + ", got 'fa3'"),
    ("host-and-device", lambda: F.flash_attn_func(q0, cuda.to_device(k0), v0), TypeError,
     r"q is on the host \(numpy\) but k is on the device \(numba\); pass all tensors on one side"),
    # flash_attn_backward
    ("bwd-lse-dtype", lambda: F.flash_attn_backward(out0, q0, k0, v0, out0, lse0.astype(np.float16)),
     TypeError, r"softmax_lse must be float32"),
    ("bwd-lse-shape", lambda: F.flash_attn_backward(out0, q0, k0, v0, out0, t(1, 8, 2)), ValueError,
     r"softmax_lse must have shape \(1, 2, 8\) \(\(batch, nheads, seqlen_q\)\), got \(1, 8, 2\)"),
    ("bwd-dout-shape", lambda: F.flash_attn_backward(t(1, 8, 2, 8), q0, k0, v0, out0, lse0), ValueError,
     r"dout must have shape \(1, 8, 2, 16\) \(like q\), got \(1, 8, 2, 8\)"),
    ("bwd-out-dtype", lambda: F.flash_attn_backward(out0, q0, k0, v0, out0.astype(np.float16), lse0),
     TypeError, r"dout is float32 but out is float16"),
    ("bwd-lse-device", lambda: F.flash_attn_backward(out0, q0, k0, v0, out0, cuda.to_device(lse0)),
     TypeError, r"softmax_lse is on the device"),
    # packed calls
    ("qkv-not-3", lambda: F.flash_attn_qkvpacked_func(t(1, 8, 2, 2, 16)), ValueError,
     r"qkv must have 3 at dim 2 \(batch, seqlen, 3, nheads, headdim\), got shape \(1, 8, 2, 2, 16\)"),
    ("qkv-4d", lambda: F.flash_attn_qkvpacked_func(q0), ValueError,
     r"qkv must be 5-D \(batch, seqlen, 3, nheads, headdim\)"),
    ("kv-not-2", lambda: F.flash_attn_kvpacked_func(q0, t(1, 12, 3, 2, 16)), ValueError,
     r"kv must have 2 at dim 2"),
    # PyTorch's call
    ("sdpa-mask", lambda: F.scaled_dot_product_attention(q0, q0, q0, attn_mask=t(8, 8)), ValueError,
     r"attn_mask is not supported"),
    ("sdpa-heads", lambda: F.scaled_dot_product_attention(t(1, 4, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16)),
     ValueError, r"query has 4 heads and key 2: different head counts need enable_gqa=True"),
    ("sdpa-3d", lambda: F.scaled_dot_product_attention(t(4, 8, 16), k0, v0), ValueError,
     r"query must be 4-D \(batch, nheads, seqlen, headdim\)"),
    ("sdpa-seqlen", lambda: F.scaled_dot_product_attention(t(1, 2, 8, 16), t(1, 2, 9, 16), t(1, 2, 8, 16)),
     ValueError, r"value has shape \(1, 2, 8, 16\), expected key's shape \(1, 2, 9, 16\)"),
    ("sdpa-scale", lambda: F.scaled_dot_product_attention(q0, q0, q0, scale=float("nan")), ValueError,
     r"scale must be a finite number or None, got nan"),
    ("sdpa-causal", lambda: F.scaled_dot_product_attention(q0, q0, q0, is_causal=1), TypeError,
     r"is_causal must be True or False, got 1"),
]


@pytest.mark.parametrize("name, call, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_a_clear_message(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- NaN and Inf

ALGORITHMS = registry.names("float32")     # the versions that take float32 inputs


def _same_pattern(x, ref):
    """NaN exactly where the reference has NaN; elsewhere the same values (1e-5 relative)."""
    x = np.asarray(x, dtype=np.float64)
    assert np.array_equal(np.isnan(x), np.isnan(ref)), "NaN in different places"
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(x[ok], ref[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("where", ["nan-in-q", "nan-in-k", "inf-in-v"])
def test_nan_and_inf_propagate_as_in_the_reference(where, algorithm, rng):
    q, k, v = (rng.standard_normal((1, n, 2, 16)).astype(np.float32) for n in (20, 26, 26))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    if where == "nan-in-q":
        q[0, 5, 1, 3] = np.nan
    elif where == "nan-in-k":
        k[0, 7, 0, 0] = np.nan
    else:
        v[0, 2, 1, 9] = np.inf
    out, lse, _ = F.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, algorithm=algorithm)
    out_ref, lse_ref = reference.attention(q, k, v, causal=True)
    assert np.isnan(out_ref).any() or np.isinf(out_ref).any()     # the case really poisons something
    _same_pattern(np.where(np.isinf(out), np.nan, out), np.where(np.isinf(out_ref), np.nan, out_ref))
    _same_pattern(lse, lse_ref)
    grads = F.flash_attn_backward(dout, q, k, v, out, lse, causal=True, algorithm=algorithm)
    with np.errstate(invalid="ignore"):
        refs = reference.attention_backward(dout, q, k, v, causal=True)
    for x, ref in zip(grads, refs):
        _same_pattern(np.where(np.isinf(x), np.nan, x), np.where(np.isinf(ref), np.nan, ref))
