"""Test set-up: flashnumba must be imported before numba so it can pick GPU or simulator."""

import zlib

import numpy as np
import pytest

import flashnumba  # noqa: F401  (selects gpu or sim before anything imports numba)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def fast_launches(monkeypatch):
    """The prepared launches (``kernels.launch.Launch``) run during the test, in order: how a test
    sees that a public call took the fast path."""
    from flashnumba.kernels import launch
    launches = []
    real_call = launch.Launch.__call__
    monkeypatch.setattr(launch.Launch, "__call__",
                        lambda self, *a: (launches.append(self), real_call(self, *a))[1])
    return launches


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (absolute error when ref is all zeros)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(x - ref)
    return diff / denom if denom > 0 else diff


def attention_inputs(rng, B, Nq, Nk, Hq, Hkv, d):
    """q, dout (B, Nq, Hq, d) and k, v (B, Nk, Hkv, d), standard normal float32: flash-attn's layout."""
    q = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
    k = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
    v = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    return q, k, v, dout


def check_forward(out, L, ref_out, ref_L, tol=1e-5):
    """A forward's (O, L) against the reference: relative error <= tol, and a row with no visible
    key has L = -inf and O = 0 exactly."""
    assert out.shape == ref_out.shape and L.shape == ref_L.shape
    assert not np.isnan(out).any() and not np.isnan(L).any()
    assert rel_err(out, ref_out) <= tol, f"O: relative error {rel_err(out, ref_out):.2e}"
    masked = np.isneginf(ref_L)
    assert np.array_equal(np.isneginf(L), masked), "rows with no visible key must have L = -inf"
    assert np.all(out[np.moveaxis(masked, 1, 2)] == 0.0), "rows with no visible key must be 0"
    if (~masked).any():
        assert np.max(np.abs(L[~masked] - ref_L[~masked])) <= tol * np.max(np.abs(ref_L[~masked])) + 1e-5
