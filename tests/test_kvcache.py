"""flash_attn_with_kvcache: in-place append (NumPy and device arrays), cache_seqlens (0 included),
cache_batch_idx, rotary, split-KV partials merged by log-sum-exp, num_splits, bad input."""

import numpy as np
import pytest
from conftest import rel_err
from numba import cuda

import flashnumba
from flashnumba import merge, reference
from flashnumba.kernels import split_kv

TOL = 1e-5


def cache_problem(rng, B=2, Nq=1, Hq=2, Hkv=1, d=8, S=40, B_cache=None, Nnew=1):
    f = np.float32
    q = rng.standard_normal((B, Nq, Hq, d)).astype(f)
    k_cache = rng.standard_normal((B_cache or B, S, Hkv, d)).astype(f)
    v_cache = rng.standard_normal(k_cache.shape).astype(f)
    k = rng.standard_normal((B, Nnew, Hkv, d)).astype(f)
    v = rng.standard_normal((B, Nnew, Hkv, d)).astype(f)
    return q, k_cache, v_cache, k, v


def expected(q, k_cache, v_cache, rows, seqlens_k, **options):
    """The reference per batch entry, over the first seqlens_k[b] keys of cache row rows[b]."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        n, r = int(seqlens_k[b]), int(rows[b])
        if n == 0:
            outs.append(np.zeros(q.shape[1:]))
            lses.append(np.full((q.shape[2], q.shape[1]), -np.inf))
            continue
        slopes = options.get("alibi_slopes")
        opts = {**options, "alibi_slopes": None if slopes is None else slopes}
        o, l = reference.attention(q[b:b + 1], k_cache[r:r + 1, :n], v_cache[r:r + 1, :n], **opts)
        outs.append(o[0])
        lses.append(l[0])
    return np.stack(outs), np.stack(lses)


@pytest.mark.parametrize("options, num_splits", [
    ({"causal": True}, 3),
    ({"window_size": (6, 0), "softcap": 2.0}, 0),
])
def test_append_then_attend_matches_reference(rng, options, num_splits):
    q, k_cache, v_cache, k, v = cache_problem(rng, B=3, Nq=2, Hq=4, Hkv=2, d=20, S=50, B_cache=4, Nnew=2)
    before = k_cache.copy()
    seqlens = np.array([0, 17, 48], np.int32)            # 0: only the new tokens; 48 + 2 = S: full
    rows = np.array([3, 0, 1], np.int32)
    out, lse = flashnumba.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                  cache_batch_idx=rows, num_splits=num_splits,
                                                  return_softmax_lse=True, **options)
    for b in range(3):                                  # appended in place, nothing else touched
        assert np.array_equal(k_cache[rows[b], seqlens[b]:seqlens[b] + 2], k[b])
    untouched = np.ones(k_cache.shape[:2], bool)
    for b in range(3):
        untouched[rows[b], seqlens[b]:seqlens[b] + 2] = False
    assert np.array_equal(k_cache[untouched], before[untouched])
    ref_out, ref_lse = expected(q, k_cache, v_cache, rows, seqlens + 2, **options)
    assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL


def test_cache_seqlens_zero_without_new_tokens_gives_zero(rng):
    q, k_cache, v_cache, _, _ = cache_problem(rng)
    out, lse = flashnumba.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0,
                                                  return_softmax_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_device_caches_are_written_in_place(rng):
    q, k_cache, v_cache, k, v = cache_problem(rng, S=36)
    kc, vc = cuda.to_device(k_cache), cuda.to_device(v_cache)
    seqlens = np.array([5, 30], np.int32)
    out = flashnumba.flash_attn_with_kvcache(cuda.to_device(q), kc, vc, cuda.to_device(k), cuda.to_device(v),
                                             cache_seqlens=cuda.to_device(seqlens), alibi_slopes=
                                             np.array([0.3, 0.1], np.float32))
    k_host = kc.copy_to_host()
    assert np.array_equal(k_host[1, 30], k[1, 0]) and np.array_equal(k_host[0, 5], k[0, 0])
    ref_out, _ = expected(q, k_host, vc.copy_to_host(), [0, 1], seqlens + 1,
                          alibi_slopes=np.array([0.3, 0.1], np.float32))
    assert rel_err(out.copy_to_host(), ref_out) <= TOL


def rotate_complex(x, positions, base=10000.0, rotary_dim=None):
    """Rotary by complex multiplication of pairs (2i, 2i + 1): flash-attn's interleaved layout."""
    rotary_dim = rotary_dim or x.shape[-1]
    theta = positions[..., None] / base ** (np.arange(0, rotary_dim, 2) / rotary_dim)   # (B, N, r/2)
    z = x[..., 0:rotary_dim:2] + 1j * x[..., 1:rotary_dim:2]
    z = z * np.exp(1j * theta)[:, :, None, :]
    y = x.astype(np.float64)
    y[..., 0:rotary_dim:2], y[..., 1:rotary_dim:2] = z.real, z.imag
    return y


def test_rotary_rotates_q_and_new_k_at_their_positions(rng):
    q, k_cache, v_cache, k, v = cache_problem(rng, Nq=2, Nnew=2, d=8, S=20)
    seqlens = np.array([3, 9], np.int32)
    rotary_dim = 6
    theta = np.arange(20)[:, None] / 10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    out = flashnumba.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                             cache_seqlens=seqlens, causal=True)
    positions = seqlens[:, None] + np.arange(2)[None, :]
    k_rot = rotate_complex(k, positions, rotary_dim=rotary_dim)
    assert np.allclose(k_cache[0, 3:5], k_rot[0], atol=1e-6)
    ref_out, _ = expected(rotate_complex(q, positions, rotary_dim=rotary_dim), k_cache, v_cache, [0, 1],
                          seqlens + 2, causal=True)
    assert rel_err(out, ref_out) <= TOL


def test_combine_kernel_is_merge(rng):
    """The device combine equals flashnumba.merge on the same partials, an empty split included."""
    O_part = rng.standard_normal((3, 1, 2, 2, 5)).astype(np.float32)
    L_part = rng.standard_normal((3, 1, 2, 2)).astype(np.float32)
    L_part[1, 0, 0, 0] = -np.inf
    L_part[:, 0, 1, 1] = -np.inf                        # a row no split saw
    out, L = split_kv.merged(cuda.to_device(O_part), cuda.to_device(L_part))
    ref_O, ref_L = merge.merge([np.moveaxis(O_part[s], 2, 1) for s in range(3)], list(L_part))
    assert np.allclose(out.copy_to_host(), np.moveaxis(ref_O, 1, 2), atol=1e-6)
    assert np.allclose(L.copy_to_host(), ref_L, atol=1e-6)


def test_num_splits_heuristic():
    # the smallest split count giving BLOCKS_PER_SM (16) blocks per SM: B * Hkv = 64 blocks on
    # 132 SMs need ceil(2112 / 64) = 33 splits; 200 blocks need 11; 3000 already fill the GPU
    assert split_kv.num_splits_heuristic(blocks=64, num_sms=132, num_key_blocks=512) == 33
    assert split_kv.num_splits_heuristic(blocks=200, num_sms=132, num_key_blocks=512) == 11
    assert split_kv.num_splits_heuristic(blocks=3000, num_sms=132, num_key_blocks=512) == 1
    # capped by MAX_SPLITS (128), and by one split per 4 key blocks
    assert split_kv.num_splits_heuristic(blocks=1, num_sms=132, num_key_blocks=10_000) == 128
    assert split_kv.num_splits_heuristic(blocks=8, num_sms=132, num_key_blocks=12) == 3
    assert split_kv.num_splits_heuristic(blocks=8, num_sms=132, num_key_blocks=1) == 1


def assert_lse_matches(lse, ref_lse):
    """-inf exactly where the reference has it (rows that see no key), else within TOL."""
    hidden = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), hidden)
    assert rel_err(lse[~hidden], ref_lse[~hidden]) <= TOL


@pytest.mark.parametrize("Nq, d, options", [
    (5, 20, {"window_size": (2, 1)}),                                # d_pad 32
    (2, 40, {"causal": True, "softcap": 1.5,                         # d_pad 64, softcap and ALiBi
             "alibi_slopes": np.array([0.5, 0.2, 0.1, 0.05], np.float32)}),
    (3, 96, {"causal": True}),                                       # d_pad 128
    (1, 130, {"window_size": (20, -1)}),                             # d_pad 256
])
def test_gqa_row_groups_and_splits_match_reference(rng, Nq, d, options):
    """One block serves G = 2 query heads x Nq queries (Nq = 5: 10 rows, in groups of R = 4);
    3 splits of 16 keys; seqlens 0 (no key), 1 (rows whose band misses key 0) and 45. The four
    head-dim buckets take 8, 4, 1 and 1 keys per warp step (32 / (d_pad / split_kv.LAYOUTS[d_pad]))."""
    assert 5 > split_kv.R and 45 > 2 * split_kv.SPLIT_KEYS
    q, k_cache, v_cache, _, _ = cache_problem(rng, B=3, Nq=Nq, Hq=4, Hkv=2, d=d, S=48)
    seqlens = np.array([0, 1, 45], np.int32)
    out, lse = flashnumba.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=3,
                                                  return_softmax_lse=True, **options)
    ref_out, ref_lse = expected(q, k_cache, v_cache, [0, 1, 2], seqlens, **options)
    assert rel_err(out, ref_out) <= TOL
    assert_lse_matches(lse, ref_lse)
    assert np.isneginf(lse[0]).all() and np.isfinite(lse[2]).all()
    if Nq > 1:
        assert np.isneginf(lse[1]).any()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"cache_seqlens": np.array([39, 3], np.int32)}, ValueError, "the cache is too short: batch 0"),
    ({"cache_seqlens": np.array([1, 3], np.int64)}, TypeError, "cache_seqlens must be int32"),
    ({"cache_batch_idx": np.array([0, 5], np.int32)}, ValueError, "cache_batch_idx must index"),
    ({"block_table": np.zeros((2, 1), np.int32)}, ValueError, "block_table"),
    ({"num_splits": -1}, ValueError, "num_splits must be an integer >= 0"),
])
def test_bad_input_is_refused(rng, kwargs, error, match):
    q, k_cache, v_cache, k, v = cache_problem(rng, Nnew=2)
    with pytest.raises(error, match=match):
        flashnumba.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kwargs)
