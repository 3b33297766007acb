"""float16 and bfloat16 storage, fp32 accumulation: the official library's accuracy rule.

A kernel's largest error against the float64 reference (computed on the same
rounded inputs) may be at most 2x the largest error of the same dense attention
computed in that dtype, every intermediate rounded to it (3x for gradients).
The outputs come back in the input dtype; softmax_lse in float32.
"""

import ml_dtypes
import numpy as np
import pytest
from conftest import rel_err

import flashnumba
from flashnumba import dtypes, philox, reference, registry
from flashnumba.tools import emulation

NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
ALGORITHMS = registry.names()


def max_err(x, ref):
    return float(np.abs(np.asarray(x, dtype=np.float64) - ref).max())


# Every version without dropout; with dropout the two defaults (fp32 kernels on widened inputs,
# tensor cores on 16-bit ones): the other fp32 versions reach the same widening code.
CASES = ([(0.0, a) for a in ALGORITHMS]
         + [(0.2, a) for a in ALGORITHMS if a in (registry.DEFAULT, registry.DEFAULT_HALF)])


@pytest.mark.parametrize("dropout_p, algorithm", CASES, ids=[f"{p}-{a}" for p, a in CASES])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_within_the_official_rule(dtype, algorithm, dropout_p, rng):
    B, Nq, Nk, Hq, Hkv, d, causal = 1, 27, 35, 1, 1, 24, True       # GQA: test_api.py, kernel tests
    q, k, v, dout = (rng.standard_normal(shape).astype(NP[dtype]) for shape in
                     ((B, Nq, Hq, d), (B, Nk, Hkv, d), (B, Nk, Hkv, d), (B, Nq, Hq, d)))
    out, lse, S_dmask = flashnumba.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal,
                                                   return_attn_probs=True, algorithm=algorithm, seed=4)
    assert out.dtype == NP[dtype] and out.shape == q.shape and lse.dtype == np.float32
    keep = philox.keep_mask(4, dropout_p, B, Hq, Nq, Nk) if dropout_p else None
    if dropout_p:
        assert S_dmask.dtype == NP[dtype]
        assert np.array_equal(~np.signbit(S_dmask), keep)

    # the reference sees exactly the rounded inputs the kernels saw
    q64, k64, v64, dout64 = (x.astype(np.float64) for x in (q, k, v, dout))
    options = dict(causal=causal, dropout_p=dropout_p, dropout_mask=keep)
    out_ref, lse_ref = reference.attention(q64, k64, v64, **options)
    out_low = emulation.attention_in_dtype(q64, k64, v64, dtype, **options)
    assert max_err(out, out_ref) <= 2 * max_err(out_low, out_ref)
    assert rel_err(lse, lse_ref) <= 1e-5                            # lse is computed in fp32 throughout

    grads = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, dropout_p=dropout_p, causal=causal,
                                           algorithm=algorithm, seed=4)
    refs = reference.attention_backward(dout64, q64, k64, v64, **options)
    lows = emulation.attention_backward_in_dtype(dout64, q64, k64, v64, dtype, **options)
    for name, x, ref, low in zip(("dq", "dk", "dv"), grads, refs, lows):
        assert x.dtype == NP[dtype], name
        assert max_err(x, ref) <= 3 * max_err(low, ref), name


def test_the_rule_has_teeth(rng):
    """The yardstick is tight enough to catch a kernel that computed in half precision: the
    dense half-precision attention itself is far worse than fp32 rounded once at the end."""
    q, k, v = (rng.standard_normal((1, 64, 1, 32)) for _ in range(3))
    q, k, v = (dtypes.round_to(x, "bfloat16").astype(np.float64) for x in (q, k, v))
    out_ref, _ = reference.attention(q, k, v)
    rounded_once = dtypes.round_to(out_ref, "bfloat16")
    low = emulation.attention_in_dtype(q, k, v, "bfloat16")
    assert max_err(rounded_once, out_ref) < 0.5 * max_err(low, out_ref)


def test_sdpa_takes_float16(rng):
    q, k, v = (rng.standard_normal((1, 2, 18, 16)).astype(np.float16) for _ in range(3))
    out = flashnumba.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == np.float16
    ref = reference.attention(*(x.transpose(0, 2, 1, 3).astype(np.float64) for x in (q, k, v)),
                              causal=True, alignment="top-left")[0].transpose(0, 2, 1, 3)
    low = emulation.attention_in_dtype(*(x.transpose(0, 2, 1, 3).astype(np.float64) for x in (q, k, v)),
                                       "float16", causal=True, alignment="top-left").transpose(0, 2, 1, 3)
    assert max_err(out, ref) <= 2 * max_err(low, ref)
