"""FlashAttention-2 kernels against the float64 reference.

Sized for the CPU simulator (every warp shuffle is a rendezvous of 32 Python
threads): B * H <= 2, N <= 128, d <= 64, one d = 128 case with small N. Most
cases pass tile sizes explicitly so that few rows x K/V tiles are visited; the
shipped default configurations are exercised for d = 16, 40 (bucket 64) and 128.
"""

import numpy as np
import pytest
from conftest import attention_inputs, rel_err

from flashnumba import reference
from flashnumba.kernels import common, hardware
from flashnumba.kernels import fa2_backward as bwd
from flashnumba.kernels import fa2_forward as fwd
from flashnumba.kernels.common import ConfigError, TileConfig

TOL = 1e-5




def assert_lse_close(L, L_ref):
    """Same -inf entries (fully masked rows), finite entries within TOL."""
    finite = np.isfinite(L_ref)
    assert np.array_equal(np.isneginf(L), ~finite), "-inf rows differ"
    assert not np.isnan(L).any()
    if finite.any():
        assert rel_err(L[finite], L_ref[finite]) <= TOL


# (B, Nq, Nk, Hq, Hkv, d, causal, overrides): awkward sizes first
CASES = {
    "tile-multiple":     (1, 64, 64, 1, 1, 16, False, {"Br": 32, "Bc": 32, "num_warps": 2}),
    "ragged-N-d40":      (1, 50, 45, 1, 1, 40, False, {"Br": 16, "Bc": 32, "num_warps": 2}),
    "N-below-tile":      (2, 7, 5, 1, 1, 16, False, {}),                        # default config
    "causal-Nq>Nk":      (1, 44, 24, 1, 1, 16, True, {"Br": 16, "Bc": 32, "num_warps": 2}),   # 20 rows see no key
    "causal-Nq<Nk":      (1, 20, 70, 1, 1, 32, True, {"Br": 16, "Bc": 32, "num_warps": 4}),
    "gqa-causal":        (1, 33, 33, 2, 1, 16, True, {"Br": 16, "Bc": 32, "num_warps": 2}),
    "d64-default":       (1, 48, 40, 1, 1, 64, False, {}),                        # default config
    "d128-default":      (1, 9, 12, 1, 1, 128, True, {}),                         # default config
    "N128-d64-default":  (1, 128, 128, 1, 1, 64, True, {}),                       # default config, many tiles (B = 2: N-below-tile)
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, rng):
    B, Nq, Nk, Hq, Hkv, d, causal, overrides = CASES[case]
    q, k, v, _ = attention_inputs(rng, B, Nq, Nk, Hq, Hkv, d)
    out, L, m, l = fwd.fa2_forward_state(q, k, v, causal=causal, **overrides)
    out_ref, L_ref = reference.attention(q, k, v, causal=causal)

    assert out.shape == q.shape and L.shape == (B, Hq, Nq)
    assert not np.isnan(out).any()
    assert rel_err(out, out_ref) <= TOL
    assert_lse_close(L, L_ref)
    # the running state: L = m + log l, and a row that saw no key has l = 0, m = -inf, out = 0
    masked = np.isneginf(L_ref)
    assert np.all(l[masked] == 0) and np.all(np.isneginf(m[masked]))
    assert np.all(out.transpose(0, 2, 1, 3)[masked] == 0)
    np.testing.assert_allclose(m[~masked] + np.log(l[~masked]), L[~masked], rtol=1e-6, atol=1e-6)
    if case == "causal-Nq>Nk":
        # rows 0-15 skip every tile; rows 16-19 share Q tile 1 with rows that see keys
        assert masked.sum() == 20


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_reference(case, rng):
    B, Nq, Nk, Hq, Hkv, d, causal, overrides = CASES[case]
    q, k, v, _ = attention_inputs(rng, B, Nq, Nk, Hq, Hkv, d)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out_ref, L_ref = reference.attention(q, k, v, causal=causal)
    out, L = out_ref.astype(np.float32), L_ref.astype(np.float32)   # isolate the backward
    dq, dk, dv = bwd.fa2_backward(dout, q, k, v, out, L, causal=causal, **overrides)
    dq_ref, dk_ref, dv_ref = reference.attention_backward(dout, q, k, v, causal=causal)

    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name, x, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert not np.isnan(x).any(), name
        assert rel_err(x, ref) <= TOL, name


def test_forward_then_backward_with_scale(rng):
    """The kernels chained, with a non-default softmax scale."""
    q, k, v, _ = attention_inputs(rng, 1, 24, 40, 2, 2, 16)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    kw = {"causal": True, "softmax_scale": 0.4}
    out, L = fwd.fa2_forward(q, k, v, Br=16, Bc=32, num_warps=2, **kw)
    grads = bwd.fa2_backward(dout, q, k, v, out, L, Br=16, Bc=32, num_warps=2, **kw)
    out_ref, L_ref = reference.attention(q, k, v, **kw)
    refs = reference.attention_backward(dout, q, k, v, **kw)
    assert rel_err(out, out_ref) <= TOL
    assert_lse_close(L, L_ref)
    for x, ref in zip(grads, refs):
        assert rel_err(x, ref) <= TOL


def test_backward_rows_that_saw_no_key_get_no_gradient(rng):
    """L = -inf (a row with no visible key, here every row) gives P = 0: zero gradients, no NaN."""
    q, k, v, _ = attention_inputs(rng, 1, 12, 12, 1, 1, 16)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    L = np.full((1, 1, 12), -np.inf, np.float32)
    out = np.zeros_like(q)
    for x in bwd.fa2_backward(dout, q, k, v, out, L, Br=16, Bc=32, num_warps=2):
        assert np.all(x == 0)


def test_preprocess_rowsum(rng):
    """D_i = rowsum(dO_i * O_i), d not a multiple of the 8 lanes of a row."""
    dout = rng.standard_normal((1, 21, 2, 13)).astype(np.float32)
    out = rng.standard_normal((1, 21, 2, 13)).astype(np.float32)
    D = bwd.fa2_backward_preprocess(dout, out)
    D_ref = np.einsum("bnhk,bnhk->bhn", dout.astype(np.float64), out.astype(np.float64))
    assert rel_err(D, D_ref) <= TOL


def test_deterministic_dq_is_bitwise_repeatable(rng):
    q, k, v, _ = attention_inputs(rng, 1, 40, 70, 2, 1, 16)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out_ref, L_ref = reference.attention(q, k, v, causal=True)
    out, L = out_ref.astype(np.float32), L_ref.astype(np.float32)
    kw = {"causal": True, "Br": 16, "Bc": 32, "num_warps": 2, "deterministic": True}
    first = bwd.fa2_backward(dout, q, k, v, out, L, **kw)
    second = bwd.fa2_backward(dout, q, k, v, out, L, **kw)
    for a, b in zip(first, second):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    for x, ref in zip(first, reference.attention_backward(dout, q, k, v, causal=True)):
        assert rel_err(x, ref) <= TOL


def test_forward_limit_is_attention_over_the_first_tiles(rng):
    """limit=k: each block stops after k K/V tiles: attention over keys [0, k Bc), and m, l of those keys."""
    Bc, steps = 32, 2
    q, k, v, _ = attention_inputs(rng, 1, 20, 80, 1, 1, 16)
    scale = 1 / np.sqrt(16)
    out, L, m, l = fwd.fa2_forward_state(q, k, v, Br=16, Bc=Bc, num_warps=2, limit=steps)
    seen = slice(0, steps * Bc)
    out_ref, L_ref = reference.attention(q, k[:, seen], v[:, seen])
    assert rel_err(out, out_ref) <= TOL
    assert rel_err(L, L_ref) <= TOL
    S = scale * np.einsum("nk,ck->nc", q[0, :, 0].astype(np.float64), k[0, seen, 0].astype(np.float64))
    m_ref = S.max(axis=1)
    l_ref = np.exp(S - m_ref[:, None]).sum(axis=1)
    assert rel_err(m[0, 0], m_ref) <= TOL
    assert rel_err(l[0, 0], l_ref) <= TOL
    # limit=0: no tile visited, every row as if fully masked
    out0, L0, _, l0 = fwd.fa2_forward_state(q, k, v, Br=16, Bc=Bc, num_warps=2, limit=0)
    assert np.all(out0 == 0) and np.all(np.isneginf(L0)) and np.all(l0 == 0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_limit_is_gradient_of_the_first_q_tiles(deterministic, rng):
    """limit=1 without causal: every K/V block saw Q tile 0 only, so dK, dV are the gradients of
    rows [0, Br) alone, and dQ holds rows [0, Br) in full and zeros after."""
    Br = 16
    q, k, v, _ = attention_inputs(rng, 1, 40, 36, 1, 1, 16)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    out_ref, L_ref = reference.attention(q, k, v)
    dq, dk, dv = bwd.fa2_backward(dout, q, k, v, out_ref.astype(np.float32), L_ref.astype(np.float32),
                                  Br=Br, Bc=32, num_warps=2, limit=1, deterministic=deterministic)
    rows = slice(0, Br)
    dq_ref, dk_ref, dv_ref = reference.attention_backward(dout[:, rows], q[:, rows], k, v)
    assert rel_err(dk, dk_ref) <= TOL
    assert rel_err(dv, dv_ref) <= TOL
    assert rel_err(dq[:, rows], dq_ref) <= TOL
    assert np.all(dq[:, Br:] == 0)


def test_device_arrays_stay_on_device(rng):
    """Device arrays in, device arrays out (no copy back); same numbers as host arrays."""
    from numba import cuda
    q, k, v, _ = attention_inputs(rng, 1, 10, 10, 1, 1, 16)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    kw = {"Br": 16, "Bc": 32, "num_warps": 2}
    out_h, L_h = fwd.fa2_forward(q, k, v, **kw)
    q_d, k_d, v_d, dout_d = (cuda.to_device(x) for x in (q, k, v, dout))
    out_d, L_d = fwd.fa2_forward(q_d, k_d, v_d, **kw)
    grads_d = bwd.fa2_backward(dout_d, q_d, k_d, v_d, out_d, L_d, deterministic=True, **kw)
    for x in (out_d, L_d, *grads_d):
        assert common.is_device_array(x)
    np.testing.assert_array_equal(out_d.copy_to_host(), out_h)
    grads_h = bwd.fa2_backward(dout, q, k, v, out_h, L_h, deterministic=True, **kw)
    for x_d, x_h in zip(grads_d, grads_h):
        np.testing.assert_array_equal(x_d.copy_to_host(), x_h)


@pytest.mark.parametrize("module", [fwd, bwd], ids=["forward", "backward"])
def test_shipped_configs_fit(module):
    configs = module.shipped_configs()
    assert [c.d_pad for c in configs] == list(common.HEAD_DIM_BUCKETS)
    for config in configs:
        module.check_config(config)
        assert module.smem_bytes(config) <= hardware.STATIC_SMEM_LIMIT
        assert module.default_config(config.d_pad) == config


@pytest.mark.parametrize("module", [fwd, bwd], ids=["forward", "backward"])
@pytest.mark.parametrize("config, words", [
    (TileConfig(Br=64, Bc=64, d_pad=128, num_warps=4), "shared memory"),
    (TileConfig(Br=30, Bc=32, d_pad=16, num_warps=4), "multiple of num_warps"),
    (TileConfig(Br=16, Bc=48, d_pad=16, num_warps=2), "multiple of 32"),
    (TileConfig(Br=16, Bc=32, d_pad=40, num_warps=2), "bucket"),
    (TileConfig(Br=16, Bc=32, d_pad=16, num_warps=0), "positive"),
])
def test_bad_config_is_rejected(module, config, words):
    with pytest.raises(ConfigError, match=words):
        module.check_config(config)
    with pytest.raises(ConfigError):
        module.build(config)


def test_bad_config_fails_before_launch(rng, monkeypatch):
    """The wrappers raise ConfigError before anything is built or launched."""
    q, k, v, _ = attention_inputs(rng, 1, 8, 8, 1, 1, 64)

    def no_build(config, *args, **kwargs):
        raise AssertionError("build reached with a bad config")

    monkeypatch.setattr(fwd, "build", no_build)
    monkeypatch.setattr(bwd, "build", no_build)
    with pytest.raises(ConfigError, match="shared memory"):
        fwd.fa2_forward(q, k, v, Br=64, Bc=64)
    with pytest.raises(ConfigError, match="multiple of num_warps"):
        fwd.fa2_forward(q, k, v, Br=24, num_warps=16)
    L = np.zeros((1, 1, 8), np.float32)
    with pytest.raises(ConfigError, match="shared memory"):
        bwd.fa2_backward(q, q, k, v, q, L, Br=64, Bc=64)
    with pytest.raises(ConfigError, match="multiple of 32"):
        bwd.fa2_backward(q, q, k, v, q, L, Bc=16)
