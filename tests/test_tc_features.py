"""flash-attn's window_size, softcap and alibi_slopes on the tensor-core kernels (fa2_tc_forward,
fa2_tc_backward), against the float64 reference by flash-attn's half-precision rule (max error
<= 2x that of dense attention in the same dtype for O, 3x for the gradients), and the public call
running fa2_tc, not the fp32 fallback, with them. Simulator sizes are tiny."""

import numpy as np
import pytest
from tc_helpers import inputs, lse_rel, ratio

import flashnumba
from flashnumba import reference, registry
from flashnumba.kernels import fa2_tc_backward as tcb
from flashnumba.kernels import fa2_tc_forward as tcf
from flashnumba.tools import emulation

ON_GPU = not flashnumba.on_simulator()

# (B, Nq, Nk, Hq, Hkv, d, causal, window, softcap, slopes: None, "heads" (Hq,) or "batch" (B, Hq),
#  tiles: Br = Bc = 16 on the simulator (a window of a few keys is narrower than a tile, and several
#  tiles run), None: the shipped defaults)
CASES = [
    pytest.param(1, 20, 33, 1, 1, 16, False, (3, 2), 0.0, None, 16, id="window narrower than a tile, Nq<Nk"),
    pytest.param(1, 33, 20, 2, 1, 16, True, (5, -1), 0.0, None, 16, id="causal window, Nq>Nk, GQA"),
    pytest.param(1, 20, 33, 2, 2, 32, False, (-1, -1), 1.5, "heads", 16, id="softcap, ALiBi (Hq,)"),
    pytest.param(1, 33, 20, 1, 1, 16, False, (7, 0), 0.8, "batch", 16, id="window, softcap, ALiBi (B, Hq)"),
    pytest.param(1, 40, 45, 2, 1, 100, False, (20, 6), 2.0, "heads", None,
                 id="two warps for each 16 keys (d_pad 128): window, softcap, ALiBi"),
]
GPU_CASES = [
    pytest.param(2, 700, 1100, 4, 2, 64, True, (256, -1), 0.0, None, None, id="gpu: causal window 256"),
    pytest.param(1, 1000, 1000, 4, 4, 128, False, (100, 50), 30.0, "batch", None, id="gpu: all three, d=128"),
    pytest.param(1, 300, 257, 2, 1, 40, False, (-1, -1), 5.0, "heads", None, id="gpu: softcap, ALiBi, d=40"),
]
PARAMS = "B, Nq, Nk, Hq, Hkv, d, causal, window, softcap, slopes, tiles"


def _cases():
    return CASES + (GPU_CASES if ON_GPU else [])


def _options(rng, B, Hq, causal, window, softcap, slopes):
    alibi = None
    if slopes is not None:
        alibi = (rng.random((B, Hq) if slopes == "batch" else Hq) * 0.5).astype(np.float32)
    return {"causal": causal, "window_size": window, "softcap": softcap, "alibi_slopes": alibi}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(PARAMS, _cases())
def test_forward_within_twice_the_dense_error(rng, dtype, B, Nq, Nk, Hq, Hkv, d, causal, window,
                                              softcap, slopes, tiles):
    q, k, v, _ = inputs(rng, dtype, B, Nq, Nk, Hq, Hkv, d)
    opts = _options(rng, B, Hq, causal, window, softcap, slopes)
    O, L = tcf.fa2_tc_forward(q, k, v, Br=tiles, Bc=tiles, **opts)
    assert O.dtype == q.dtype and O.shape == q.shape
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ref, lse = reference.attention(q64, k64, v64, **opts)
    low = emulation.attention_in_dtype(q64, k64, v64, dtype, **opts)
    assert ratio(O, ref, low) <= 2.0
    assert lse_rel(L, lse) <= 1e-5
    plain, _ = reference.attention(q64, k64, v64, causal=causal)
    assert np.abs(O.astype(np.float64) - plain).max() > 0.05     # the options changed the result


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize(PARAMS, _cases())
def test_backward_within_three_times_the_dense_error(rng, dtype, B, Nq, Nk, Hq, Hkv, d, causal, window,
                                                     softcap, slopes, tiles):
    q, k, v, dout = inputs(rng, dtype, B, Nq, Nk, Hq, Hkv, d)
    opts = _options(rng, B, Hq, causal, window, softcap, slopes)
    out, L = tcf.fa2_tc_forward(q, k, v, Br=tiles, Bc=tiles, **opts)
    grads = tcb.fa2_tc_backward(dout, q, k, v, out, L, Bc=tiles, **opts)
    a = [x.astype(np.float64) for x in (dout, q, k, v)]
    refs = reference.attention_backward(*a, **opts)
    lows = emulation.attention_backward_in_dtype(*a, dtype, **opts)
    plains = reference.attention_backward(*a, causal=causal)
    for name, x, ref, low, plain in zip(("dq", "dk", "dv"), grads, refs, lows, plains):
        assert x.dtype == q.dtype
        assert ratio(x, ref, low) <= 3.0, name
        assert np.abs(x.astype(np.float64) - plain).max() > 0.05, name    # the options mattered


@pytest.fixture
def tc_calls(monkeypatch):
    """The directions whose fa2_tc entry point a public call reached (and ran)."""
    calls = []
    version = registry.version(registry.DEFAULT_HALF)
    forward, backward = (version.module(direction) for direction in registry.DIRECTIONS)
    run_forward, run_backward = forward.forward, backward.backward

    def spy_forward(*args, **options):
        calls.append(registry.FORWARD)
        return run_forward(*args, **options)

    def spy_backward(*args, **options):
        calls.append(registry.BACKWARD)
        return run_backward(*args, **options)
    monkeypatch.setattr(forward, "forward", spy_forward)
    monkeypatch.setattr(backward, "backward", spy_backward)
    return calls


def test_public_calls_with_the_options_run_the_tensor_core_kernels(rng, tc_calls):
    """bf16 inputs with window_size, softcap and alibi_slopes: flash_attn_func and
    flash_attn_backward run fa2_tc (not the fp32 fallback), within flash-attn's rule."""
    assert registry.DEFAULT_HALF == "fa2_tc"
    q, k, v, dout = inputs(rng, "bfloat16", 1, 20, 33, 2, 1, 16)
    opts = _options(rng, 1, 2, False, (4, 1), 1.2, "heads")
    out, lse, _ = flashnumba.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    grads = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, **opts)
    assert tc_calls == [registry.FORWARD, registry.BACKWARD]
    a = [x.astype(np.float64) for x in (dout, q, k, v)]
    ref, _ = reference.attention(*a[1:], **opts)
    assert out.dtype == q.dtype and ratio(out, ref, emulation.attention_in_dtype(*a[1:], "bfloat16", **opts)) <= 2.0
    lows = emulation.attention_backward_in_dtype(*a, "bfloat16", **opts)
    for x, r, low in zip(grads, reference.attention_backward(*a, **opts), lows):
        assert x.dtype == q.dtype and ratio(x, r, low) <= 3.0
