"""FlashAttention-1 kernels (Algorithms 1 and 2) against the float64 reference.

Sizes are chosen for the CPU simulator (each barrier of a block costs
milliseconds there): B*H <= 4, N <= 128, d <= 64, and one d = 128 case with
small N. Each case runs the forward once (cached) and checks out and lse; the
backward test of the same case reuses those outputs.
"""

import functools
import inspect
import math

import numpy as np
import pytest
from conftest import rel_err

from flashnumba import reference
from flashnumba.kernels import common, hardware
from flashnumba.kernels import fa1_backward as bwd_module
from flashnumba.kernels import fa1_forward as fwd_module
from flashnumba.kernels.fa1_backward import fa1_backward
from flashnumba.kernels.fa1_forward import fa1_forward

TOL = 1e-5

# name: (B, Nq, Nk, Hq, Hkv, d, causal, tiles); tiles = dict of Br/Bc/num_warps overrides.
CASES = {
    "N=128, multiple of the tiles, d=16": (2, 128, 128, 1, 1, 16, False, {}),
    "N=100, not a multiple, causal, d=40": (1, 100, 100, 1, 1, 40, True, {}),
    "N=5, smaller than one tile, d=16": (1, 5, 5, 2, 2, 16, False, {}),
    "Nq=48 < Nk=80, causal, d=64": (1, 48, 80, 1, 1, 64, True, {}),
    "Nq=70 > Nk=48, causal, fully masked rows": (1, 70, 48, 1, 1, 16, True, {}),
    "Nq=9 > Nk=4, causal, one tile": (1, 9, 4, 1, 1, 16, True, {}),
    "GQA Hq=4, Hkv=2, causal, d=32": (1, 40, 40, 4, 2, 32, True, {}),
    "d=128, N=24": (1, 24, 24, 1, 1, 128, False, {}),
    # Br > Bc, causal: Q tile 0 meets K tile 1 with rows 0..15 fully masked there, m_i finite.
    "Br=32 > Bc=16, 2 warps, N=50, d=20, causal": (1, 50, 50, 1, 1, 20, True,
                                                   {"Br": 32, "Bc": 16, "num_warps": 2}),
}


def make_inputs(seed, B, Nq, Nk, Hq, Hkv, d):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
    k = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
    v = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
    dout = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
    return q, k, v, dout


@functools.cache
def forward_case(name):
    """Inputs and fa1_forward's (O, l, m) for CASES[name], computed once per session."""
    B, Nq, Nk, Hq, Hkv, d, causal, tiles = CASES[name]
    q, k, v, dout = make_inputs(sum(map(ord, name)), B, Nq, Nk, Hq, Hkv, d)
    O, l, m = fa1_forward(q, k, v, causal=causal, **tiles)
    return (q, k, v, dout), (O, l, m)


def lse_of(l, m):
    with np.errstate(divide="ignore"):
        return m + np.log(l)


def assert_lse_close(lse, ref_lse):
    masked = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), masked)
    assert rel_err(lse[~masked], ref_lse[~masked]) <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(name):
    B, Nq, _, Hq, _, d, causal, _ = CASES[name]
    (q, k, v, _), (O, l, m) = forward_case(name)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal)

    assert O.shape == (B, Nq, Hq, d) and O.dtype == np.float32
    assert l.shape == m.shape == (B, Hq, Nq)
    assert not np.isnan(O).any() and not np.isnan(l).any() and not np.isnan(m).any()
    assert rel_err(O, ref_out) <= TOL
    assert_lse_close(lse_of(l, m), ref_lse)
    # Rows that see no key: O = 0, m = -inf, l = 0 (Algorithm 1's initial state).
    masked = np.isneginf(ref_lse)                          # (B, Hq, Nq)
    assert np.all(l[masked] == 0) and np.all(np.isneginf(m[masked]))
    assert np.all(np.moveaxis(O, 2, 1)[masked] == 0)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(name):
    *_, causal, tiles = CASES[name]
    (q, k, v, dout), (O, l, m) = forward_case(name)
    dq, dk, dv = fa1_backward(dout, q, k, v, O, l, m, causal=causal, **tiles)
    ref_dq, ref_dk, ref_dv = reference.attention_backward(dout, q, k, v, causal=causal)

    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name_, x in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not np.isnan(x).any(), name_
    assert rel_err(dq, ref_dq) <= TOL
    assert rel_err(dk, ref_dk) <= TOL
    assert rel_err(dv, ref_dv) <= TOL


def test_softmax_scale_and_device_arrays(rng):
    """A non-default softmax_scale; device arrays in give device arrays out."""
    from numba import cuda
    q, k, v, dout = (rng.standard_normal((1, 20, 1, 16)).astype(np.float32) for _ in range(4))
    scale = 0.7
    O, l, m = fa1_forward(*(cuda.to_device(x) for x in (q, k, v)), softmax_scale=scale)
    assert all(common.is_device_array(x) for x in (O, l, m))
    O, l, m = O.copy_to_host(), l.copy_to_host(), m.copy_to_host()
    ref_out, ref_lse = reference.attention(q, k, v, softmax_scale=scale)
    assert rel_err(O, ref_out) <= TOL
    assert_lse_close(lse_of(l, m), ref_lse)
    dq, dk, dv = fa1_backward(dout, q, k, v, O, l, m, softmax_scale=scale)
    for x, ref in zip((dq, dk, dv), reference.attention_backward(dout, q, k, v,
                                                                  softmax_scale=scale)):
        assert rel_err(x, ref) <= TOL


def test_skipped_tiles_are_never_loaded(rng):
    """Causal, Nq = Nk = 64, Br = Bc = 16: only Q tile 3 visits K/V tile 3 (keys 48..63).

    Poison V_3 with NaN. Rows 48..63 legitimately read it (and turn NaN); rows
    0..47 stay exact only if no Q tile i < 3 loads V_3 or multiplies by it
    (a skipped tile computed with P = 0 would give 0 * NaN = NaN).
    """
    q, k, v, dout = (rng.standard_normal((1, 64, 1, 16)).astype(np.float32) for _ in range(4))
    v[:, 48:] = np.nan
    tiles = {"Br": 16, "Bc": 16, "num_warps": 2}
    O, l, m = fa1_forward(q, k, v, causal=True, **tiles)
    ref_out, _ = reference.attention(q[:, :48], k[:, :48], v[:, :48], causal=True)
    assert rel_err(O[:, :48], ref_out) <= TOL
    assert np.isnan(O[:, 48:]).all()
    dq, _, _ = fa1_backward(dout, q, k, v, O, l, m, causal=True, **tiles)
    ref_dq, _, _ = reference.attention_backward(dout[:, :48], q[:, :48], k[:, :48], v[:, :48],
                                                causal=True)
    assert rel_err(dq[:, :48], ref_dq) <= TOL


# ---------------------------------------------------------------------------------------------
# limit=k: the state after k outer steps, against a float64 truncation.

def truncated_forward(q, k, v, causal, keys):
    """Algorithm 1's (O, l, m) once the outer loop has covered keys [0, keys), in float64."""
    B, Nq, Hq, d = q.shape
    Nk = k.shape[1]
    group = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(d)
    if keys == 0:
        return np.zeros(q.shape), np.zeros((B, Hq, Nq)), np.full((B, Hq, Nq), -np.inf)
    Q = np.moveaxis(q.astype(np.float64), 2, 1)
    K = np.repeat(np.moveaxis(k.astype(np.float64), 2, 1), group, axis=1)[:, :, :keys]
    V = np.repeat(np.moveaxis(v.astype(np.float64), 2, 1), group, axis=1)[:, :, :keys]
    S = scale * Q @ np.swapaxes(K, -1, -2)
    if causal:
        S = np.where(reference.causal_mask(Nq, Nk)[:, :keys], S, -np.inf)
    m = S.max(axis=-1)
    m_safe = np.where(np.isneginf(m), 0.0, m)
    P = np.exp(S - m_safe[..., None])
    l = P.sum(axis=-1)
    O = (P @ V) / np.where(l > 0, l, 1.0)[..., None]
    return np.moveaxis(O, 1, 2), l, m


@pytest.mark.parametrize("causal", [False, True])
def test_forward_limit_leaves_algorithm1_state(rng, causal):
    # Bc = 16: Tc = 3 outer steps over Nk = 40 keys (16, 16, 8); causal offset Nk - Nq = 16.
    q = rng.standard_normal((1, 24, 2, 16)).astype(np.float32)
    k = rng.standard_normal((1, 40, 1, 16)).astype(np.float32)
    v = rng.standard_normal((1, 40, 1, 16)).astype(np.float32)
    tiles = {"Br": 16, "Bc": 16, "num_warps": 2}
    for steps in (0, 1, 2, 3, 7):
        O, l, m = fa1_forward(q, k, v, causal=causal, limit=steps, **tiles)
        ref_O, ref_l, ref_m = truncated_forward(q, k, v, causal, min(steps * 16, 40))
        np.testing.assert_array_equal(np.isneginf(m), np.isneginf(ref_m), err_msg=f"limit={steps}")
        seen = ~np.isneginf(ref_m)
        assert rel_err(m[seen], ref_m[seen]) <= TOL, steps
        assert rel_err(l, ref_l) <= TOL, steps
        assert rel_err(O, ref_O) <= TOL, steps
        assert not np.isnan(O).any()


def test_backward_limit_leaves_algorithm2_state(rng):
    """After one outer step (keys 0..15): dQ = scale dS[:, :16] K[:16]; dK, dV rows 0..15 done, 0 after."""
    Nq, Nk, d = 24, 40, 16
    q, dout = (rng.standard_normal((1, Nq, 1, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, Nk, 1, d)).astype(np.float32) for _ in range(2))
    tiles = {"Br": 16, "Bc": 16, "num_warps": 2}
    O, l, m = fa1_forward(q, k, v, causal=True, **tiles)
    dq, dk, dv = fa1_backward(dout, q, k, v, O, l, m, causal=True, limit=1, **tiles)

    # float64: dS = P o (dP - D) on the whole problem, then keep the first 16 keys.
    Q, K, V, dO = (x[0, :, 0].astype(np.float64) for x in (q, k, v, dout))
    scale = 1.0 / math.sqrt(d)
    S = np.where(reference.causal_mask(Nq, Nk), scale * Q @ K.T, -np.inf)
    P = np.exp(S - S.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    dP = dO @ V.T
    dS = P * (dP - (dO * (P @ V)).sum(axis=1, keepdims=True))
    ref_dq = scale * dS[:, :16] @ K[:16]
    _, ref_dk, ref_dv = reference.attention_backward(dout, q, k, v, causal=True)

    assert rel_err(dq[0, :, 0], ref_dq) <= TOL
    assert rel_err(dk[:, :16], ref_dk[:, :16]) <= TOL
    assert rel_err(dv[:, :16], ref_dv[:, :16]) <= TOL
    assert np.all(dk[:, 16:] == 0) and np.all(dv[:, 16:] == 0)


# ---------------------------------------------------------------------------------------------
# Configurations: what ships fits; what cannot fit is refused before any launch.

@pytest.mark.parametrize("module", [fwd_module, bwd_module], ids=["forward", "backward"])
def test_shipped_configs_fit(module):
    configs = module.shipped_configs()
    assert [c.d_pad for c in configs] == list(common.HEAD_DIM_BUCKETS)
    for config in configs:
        module.check_config(config)
        assert module.smem_bytes(config) <= hardware.STATIC_SMEM_LIMIT
        assert module.default_config(config.d_pad) == config
        for label, dispatcher, argtypes in module.compile_targets(config):
            params = inspect.signature(dispatcher.py_func).parameters
            assert len(argtypes) == len(params), label


def test_smem_bytes_match_ptxas():
    """Static shared memory as ptxas reported it for sm_80 (numba-cuda 0.30.4)."""
    assert fwd_module.smem_bytes(common.TileConfig(16, 32, 64, 4)) == 40000
    assert bwd_module.smem_bytes(common.TileConfig(16, 32, 64, 4)) == 45632


@pytest.fixture
def no_launch(monkeypatch):
    """Make any kernel build fail loudly: a ConfigError must come first."""
    def refuse(config):
        raise AssertionError(f"kernel built for {config} although the config is invalid")
    monkeypatch.setattr(fwd_module, "build", refuse)
    monkeypatch.setattr(bwd_module, "build", refuse)


@pytest.mark.parametrize("tiles, message", [
    ({"Br": 64, "Bc": 64}, "shared memory"),
    ({"Bc": 30, "num_warps": 4}, "not a multiple of num_warps"),
    ({"num_warps": 40}, "at most 1024"),
    ({"Br": 0}, "Br must be a positive integer"),
])
def test_forward_config_errors_before_launch(no_launch, tiles, message):
    q = np.zeros((1, 8, 1, 128), np.float32)
    with pytest.raises(common.ConfigError, match=message):
        fa1_forward(q, q, q, **tiles)


@pytest.mark.parametrize("tiles, message", [
    ({"Br": 32, "Bc": 32}, "shared memory"),
    ({"num_warps": 33}, "at most 1024"),
    ({"Bc": -1}, "Bc must be a positive integer"),
])
def test_backward_config_errors_before_launch(no_launch, tiles, message):
    q = np.zeros((1, 8, 1, 128), np.float32)
    l = np.ones((1, 1, 8), np.float32)
    with pytest.raises(common.ConfigError, match=message):
        fa1_backward(q, q, q, q, q, l, l, **tiles)
