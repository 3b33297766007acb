"""Every kernel at every head dim the brief names (16, 32, 40, 64, 80, 96, 128), forward and backward.

Small N (not a multiple of any tile) keeps the simulator quick; causal with
Nq > Nk adds fully masked rows. Each head dim lands in a different bucket or
padding: 40 and 80 are zero-padded, 96 and 128 take the larger buckets.
"""

import numpy as np
import pytest
from conftest import rel_err

from flashnumba import reference, registry
from flashnumba.kernels.common import MAX_FAST_HEAD_DIM
from flashnumba.kernels.fa1_backward import fa1_backward
from flashnumba.kernels.fa1_forward import fa1_forward
from flashnumba.kernels.fa2_backward import fa2_backward
from flashnumba.kernels.fa2_fast_backward import fa2_fast_backward
from flashnumba.kernels.fa2_fast_forward import fa2_fast_forward
from flashnumba.kernels.fa2_forward import fa2_forward

TOL = 1e-5
HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128)


def _fa1(q, k, v, dout):
    O, l, m = fa1_forward(q, k, v, causal=True)
    with np.errstate(divide="ignore"):
        lse = m + np.log(l)
    return (O, lse, *fa1_backward(dout, q, k, v, O, l, m, causal=True))


def _fa2(q, k, v, dout):
    O, L = fa2_forward(q, k, v, causal=True)
    return (O, L, *fa2_backward(dout, q, k, v, O, L, causal=True))


def _fa2_fast(q, k, v, dout):
    O, L = fa2_fast_forward(q, k, v, causal=True)
    return (O, L, *fa2_fast_backward(dout, q, k, v, O, L, causal=True))


def test_registry_head_dim_limits_are_the_kernels_buckets():
    """fa2_fast compiles d_pad up to 256 (flash-attn's largest), the others up to 128; a d above
    128 runs fa2_fast by default, for every dtype and device (half inputs widened)."""
    for version in registry.VERSIONS:
        module = version.module(registry.FORWARD)
        largest = max(config.d_pad for config in module.shipped_configs())
        assert version.max_head_dim == largest, version.name
    assert registry.MAX_HEAD_DIM == MAX_FAST_HEAD_DIM == 256
    assert registry.version(registry.DEFAULT).max_head_dim == 256
    for dtype in ("float32", "float16", "bfloat16"):
        for cc in (None, (8, 0), (9, 0)):
            assert registry.default(dtype, 129, cc) == registry.default(dtype, 256, cc) == registry.DEFAULT


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("algorithm", [_fa1, _fa2, _fa2_fast], ids=["fa1", "fa2", "fa2_fast"])
def test_every_head_dim(rng, algorithm, d):
    Nq, Nk = 21, 13                      # Nq > Nk, causal: rows 0..7 see no key (GQA: other files)
    q = rng.standard_normal((1, Nq, 1, d)).astype(np.float32)
    k = rng.standard_normal((1, Nk, 1, d)).astype(np.float32)
    v = rng.standard_normal((1, Nk, 1, d)).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    refs = (*reference.attention(q, k, v, causal=True),
            *reference.attention_backward(dout, q, k, v, causal=True))
    got = algorithm(q, k, v, dout)
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), got, refs):
        assert x.shape == r.shape, name
        finite = np.isfinite(r)
        assert np.array_equal(np.isfinite(x), finite), f"{name}: non-finite entries differ"
        assert not np.isnan(x).any(), name
        assert rel_err(x[finite], r[finite]) <= TOL, f"{name}: {rel_err(x[finite], r[finite]):.2e}"
    assert np.all(got[0][:, :Nq - Nk] == 0), "fully masked rows give output 0"
