"""The public calls (flashnumba.api) against the float64 reference, fp32, every algorithm.

Sized for the simulator: B * H <= 4, N <= 64, a few tiles each.
"""

import numpy as np
import pytest
from conftest import rel_err

import flashnumba
from flashnumba import philox, reference, registry
from flashnumba.geometry import TOP_LEFT

TOL = 1e-5
ALGORITHMS = registry.names("float32")     # the versions that take float32 inputs

# (B, Nq, Nk, Hq, Hkv, d, causal): N not a tile multiple, Nq != Nk, an odd d, grouped-query
# heads, fully masked rows (causal, Nq > Nk: the first 18 queries see no key)
CASES = {
    "ragged-gqa-d17": (1, 37, 29, 2, 1, 17, False),
    "causal-masked-rows": (1, 30, 12, 1, 1, 16, True),
    "causal-Nq<Nk": (2, 9, 20, 1, 1, 32, True),
}


def make(rng, B, Nq, Nk, Hq, Hkv, d, dtype=np.float32):
    q = rng.standard_normal((B, Nq, Hq, d)).astype(dtype)
    k = rng.standard_normal((B, Nk, Hkv, d)).astype(dtype)
    v = rng.standard_normal((B, Nk, Hkv, d)).astype(dtype)
    return q, k, v


def assert_lse(lse, ref):
    assert lse.dtype == np.float32
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert rel_err(lse[finite], ref[finite]) <= TOL


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_reference(case, algorithm, rng):
    B, Nq, Nk, Hq, Hkv, d, causal = CASES[case]
    q, k, v = make(rng, B, Nq, Nk, Hq, Hkv, d)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse, S_dmask = flashnumba.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True,
                                                   algorithm=algorithm)
    out_ref, lse_ref = reference.attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == np.float32 and S_dmask is None
    assert rel_err(out, out_ref) <= TOL
    assert_lse(lse, lse_ref)

    dq, dk, dv = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, causal=causal,
                                                algorithm=algorithm)
    refs = reference.attention_backward(dout, q, k, v, causal=causal)
    for x, ref, like in zip((dq, dk, dv), refs, (q, k, v)):
        assert x.shape == like.shape and x.dtype == np.float32
        assert rel_err(x, ref) <= TOL


def test_softmax_scale_is_used(rng):
    q, k, v = make(rng, 1, 20, 20, 1, 1, 16)
    out = flashnumba.flash_attn_func(q, k, v, softmax_scale=np.float32(0.3), causal=np.False_)
    assert rel_err(out, reference.attention(q, k, v, softmax_scale=np.float32(0.3))[0]) <= TOL
    assert rel_err(out, reference.attention(q, k, v)[0]) > 1e-2


def test_deterministic_backward_is_bitwise_reproducible(rng):
    q, k, v = make(rng, 1, 40, 40, 1, 1, 16)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse, _ = flashnumba.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    first = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    second = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for a, b, ref in zip(first, second, reference.attention_backward(dout, q, k, v, causal=True)):
        assert np.array_equal(a, b)
        assert rel_err(a, ref) <= TOL


# The packed calls' unpacking on FA1's kernels, the cheapest on the simulator (the unpacked call
# runs every version in test_forward_and_backward_match_reference)
PACKED = {"causal": True, "algorithm": "fa1"}


def test_qkvpacked_and_kvpacked_equal_the_unpacked_call(rng):
    qkv = rng.standard_normal((1, 26, 3, 2, 16)).astype(np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    expected = flashnumba.flash_attn_func(q, k, v, **PACKED)
    assert rel_err(expected, reference.attention(q, k, v, causal=True)[0]) <= TOL
    assert np.array_equal(flashnumba.flash_attn_qkvpacked_func(qkv, **PACKED), expected)
    kv = np.ascontiguousarray(qkv[:, :, 1:])
    assert np.array_equal(flashnumba.flash_attn_kvpacked_func(q, kv, **PACKED), expected)


def test_kvpacked_with_grouped_query_heads(rng):
    q = rng.standard_normal((1, 12, 4, 16)).astype(np.float32)
    kv = rng.standard_normal((1, 20, 2, 2, 16)).astype(np.float32)
    out = flashnumba.flash_attn_kvpacked_func(q, kv, **PACKED)
    ref = reference.attention(q, kv[:, :, 0], kv[:, :, 1], causal=True)[0]
    assert rel_err(out, ref) <= TOL


# ---------------------------------------------------------------- PyTorch's call

@pytest.mark.parametrize("Nq, Nk", [(20, 33), (33, 20)])
def test_sdpa_is_top_left_causal_in_pytorch_layout(Nq, Nk, rng):
    q, k, v = make(rng, 1, Nq, Nk, 2, 1, 16)
    query, key, value = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    out = flashnumba.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    ref = reference.attention(q, k, v, causal=True, alignment=TOP_LEFT)[0].transpose(0, 2, 1, 3)
    assert out.shape == query.shape
    assert rel_err(out, ref) <= TOL
    bottom_right = reference.attention(q, k, v, causal=True)[0].transpose(0, 2, 1, 3)
    assert rel_err(out, bottom_right) > 1e-2            # the alignments really differ here


def test_sdpa_scale_and_no_mask(rng):
    q, k, v = make(rng, 2, 17, 17, 1, 1, 32)
    query, key, value = (x.transpose(0, 2, 1, 3) for x in (q, k, v))     # strided views
    out = flashnumba.scaled_dot_product_attention(query, key, value, scale=0.2)
    ref = reference.attention(q, k, v, softmax_scale=0.2)[0].transpose(0, 2, 1, 3)
    assert rel_err(out, ref) <= TOL


# ---------------------------------------------------------------- dropout

P_DROP = 0.17


def mask_of(S_dmask):
    """The keep-mask flash-attn's S_dmask encodes: negative (sign bit set) = dropped."""
    return ~np.signbit(S_dmask)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dropout_mask_is_philox_and_gradients_match_the_reference(algorithm, rng):
    """The public calls pass (seed, p) through: S_dmask is philox.keep_mask(seed, ...) (seed 7 here,
    3 in test_S_dmask_holds_the_probabilities). GQA, awkward sizes and same seed / other seed are
    tested on the kernels (test_kernels_dropout.py, test_fast_dropout.py)."""
    B, Nq, Nk, Hq, Hkv, d, causal = 1, 12, 20, 1, 1, 16, True
    q, k, v = make(rng, B, Nq, Nk, Hq, Hkv, d)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out, lse, S_dmask = flashnumba.flash_attn_func(q, k, v, dropout_p=P_DROP, causal=causal,
                                                   return_attn_probs=True, algorithm=algorithm, seed=7)
    keep = mask_of(S_dmask)
    assert S_dmask.shape == (B, Hq, Nq, Nk)
    assert np.array_equal(keep, philox.keep_mask(7, P_DROP, B, Hq, Nq, Nk))
    out_ref, lse_ref = reference.attention(q, k, v, causal=causal, dropout_p=P_DROP, dropout_mask=keep)
    assert rel_err(out, out_ref) <= TOL
    assert_lse(lse, lse_ref)

    grads = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, dropout_p=P_DROP, causal=causal,
                                           algorithm=algorithm, seed=7)
    refs = reference.attention_backward(dout, q, k, v, causal=causal, dropout_p=P_DROP,
                                        dropout_mask=keep)
    for x, ref in zip(grads, refs):
        assert rel_err(x, ref) <= TOL


def test_S_dmask_holds_the_probabilities(rng):
    q, k, v = make(rng, 1, 19, 23, 1, 1, 16)
    _, _, S_dmask = flashnumba.flash_attn_func(q, k, v, dropout_p=0.5, causal=True,
                                               return_attn_probs=True, seed=3)
    Q, K = q[0, :, 0].astype(np.float64), k[0, :, 0].astype(np.float64)
    S = Q @ K.T / np.sqrt(16)
    S[np.triu(np.ones_like(S, dtype=bool), k=23 - 19 + 1)] = -np.inf
    P = np.exp(S - S.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    assert rel_err(np.abs(S_dmask[0, 0]), P) <= TOL
    assert (S_dmask < 0).any() and (S_dmask > 0).any()
    assert np.array_equal(mask_of(S_dmask), philox.keep_mask(3, 0.5, 1, 1, 19, 23))


def test_options_seen_before_are_checked_again_when_their_types_differ(rng):
    """The public call keeps the checked options of each call (``api._call``): the same options
    again reuse them, but values equal to an accepted one in another type (1 == True, 1.0 ==
    1) are still refused, and new seeds (dropout) do not grow the store past its bound."""
    from flashnumba import api
    q, k, v = make(rng, 1, 8, 8, 1, 1, 16)
    first = flashnumba.flash_attn_func(q, k, v, causal=True)
    assert np.array_equal(flashnumba.flash_attn_func(q, k, v, causal=True), first)
    assert api._call(16, 0.0, None, True, False, None, 0, "bottom-right") is \
        api._call(16, 0.0, None, True, False, None, 0, "bottom-right")
    with pytest.raises(TypeError, match="causal must be True or False, got 1"):
        flashnumba.flash_attn_func(q, k, v, causal=1)
    flashnumba.flash_attn_func(q, k, v, window_size=(2, 0))
    with pytest.raises(TypeError, match="window_size left must be an integer"):
        flashnumba.flash_attn_func(q, k, v, window_size=(2.0, 0))
    for seed in range(api._CALLS_KEPT + 5):
        api._call(16, 0.1, None, False, False, None, seed, "bottom-right")
    assert 0 < len(api._CALLS) <= api._CALLS_KEPT
