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


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (absolute error when ref is all zeros)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(x - ref)
    return diff / denom if denom > 0 else diff
