"""Top-left causal alignment and Philox dropout in the four readable kernels, against the float64 reference.

The reference is told the same things the kernels are:

    reference.attention(q, k, v, causal=..., alignment=..., dropout_p=p,
                        dropout_mask=philox.keep_mask(seed, p, B, Hq, Nq, Nk))

and each kernel regenerates the mask on chip from (seed, p) with the device
``philox.keep``. Every case runs FA1 and FA2 (and FA2's deterministic dQ) at
awkward sizes: N not a multiple of the tiles, Nq != Nk both ways, odd head dims,
GQA (the mask is keyed by the *query* head), rows that see no key.

Sized for the CPU simulator: B * H <= 2, N <= 40, d <= 40, tiles Br=16, Bc=32
and 2 warps, so a case takes a few seconds. The backward tests are isolated from
the forward kernels: they get the reference's out and lse as float32 (FA1's
backward takes the forward's l and m instead of lse: those come from fa1_forward,
whose l and m the forward test checks).
"""

import functools

import numpy as np
import pytest
from conftest import attention_inputs, rel_err

import flashnumba
from flashnumba import philox, reference
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT
from flashnumba.kernels import fa1_backward as fa1_bwd
from flashnumba.kernels import fa1_forward as fa1_fwd
from flashnumba.kernels import fa2_backward as fa2_bwd
from flashnumba.kernels import fa2_forward as fa2_fwd

TOL = 1e-5
P = 0.17
SEED = 20240917
TILES = {"Br": 16, "Bc": 32, "num_warps": 2}

# name: (B, Nq, Nk, Hq, Hkv, d, causal, alignment, dropout_p)
# Each N is at most a few tiles and not a multiple of them (a simulated launch costs about
# (tile pairs visited) x B x Hq); B = 2 in one case tests the batch indexing.
CASES = {
    "top-left, Nq < Nk": (1, 20, 40, 1, 1, 24, True, TOP_LEFT, 0.0),       # keys 20.. seen by no query
    "top-left, Nq > Nk": (1, 36, 20, 1, 1, 16, True, TOP_LEFT, 0.0),       # rows 20.. see every key
    "dropout": (1, 20, 36, 1, 1, 40, False, BOTTOM_RIGHT, P),
    "dropout, causal, GQA, d=17": (1, 20, 40, 2, 1, 17, True, BOTTOM_RIGHT, P),
    "dropout, top-left, Nq > Nk": (2, 20, 12, 1, 1, 16, True, TOP_LEFT, P),
    # rows 0..17 see no key: the whole first Q tile (Br = 16) and two rows of the second
    "dropout, fully masked rows": (1, 24, 6, 1, 1, 16, True, BOTTOM_RIGHT, P),
}


def make_inputs(name):
    B, Nq, Nk, Hq, Hkv, d, *_ = CASES[name]
    return attention_inputs(np.random.default_rng(sum(map(ord, name))), B, Nq, Nk, Hq, Hkv, d)


def kernel_keywords(name, seed=SEED):
    *_, causal, alignment, p = CASES[name]
    return {"causal": causal, "alignment": alignment, "dropout_p": p, "seed": seed}


def reference_keywords(name, seed=SEED):
    """The reference's keywords for a case: the same alignment, and the mask the kernels regenerate."""
    B, Nq, Nk, Hq, _, _, causal, alignment, p = CASES[name]
    kw = {"causal": causal, "alignment": alignment}
    if p > 0:
        kw.update(dropout_p=p, dropout_mask=philox.keep_mask(seed, p, B, Hq, Nq, Nk))
    return kw


@functools.cache
def reference_case(name):
    """(inputs, (out, lse), (dq, dk, dv)) of the float64 reference, once per case."""
    q, k, v, dout = make_inputs(name)
    kw = reference_keywords(name)
    return (q, k, v, dout), reference.attention(q, k, v, **kw), \
        reference.attention_backward(dout, q, k, v, **kw)


@functools.cache
def fa1_forward_case(name):
    q, k, v, _ = make_inputs(name)
    return fa1_fwd.fa1_forward(q, k, v, **kernel_keywords(name), **TILES)


def lse_of(l, m):
    with np.errstate(divide="ignore"):
        return m + np.log(l)


def assert_lse_close(lse, lse_ref):
    """Same -inf rows (no visible key), finite rows within TOL."""
    masked = np.isneginf(lse_ref)
    np.testing.assert_array_equal(np.isneginf(lse), masked)
    assert not np.isnan(lse).any()
    if (~masked).any():
        assert rel_err(lse[~masked], lse_ref[~masked]) <= TOL


def run_forward(algorithm, name):
    """(O, lse) of one forward kernel for a case."""
    if algorithm == "fa1":
        O, l, m = fa1_forward_case(name)
        return O, lse_of(l, m)
    q, k, v, _ = make_inputs(name)
    return fa2_fwd.fa2_forward(q, k, v, **kernel_keywords(name), **TILES)


def run_backward(algorithm, name, seed=SEED):
    """(dq, dk, dv) of one backward kernel, fed the reference's out (and lse) as float32."""
    (q, k, v, dout), (out_ref, lse_ref), _ = reference_case(name)
    out = out_ref.astype(np.float32)
    kw = dict(kernel_keywords(name, seed), **TILES)
    if algorithm == "fa1":
        _, l, m = fa1_forward_case(name)
        return fa1_bwd.fa1_backward(dout, q, k, v, out, l, m, **kw)
    L = lse_ref.astype(np.float32)
    return fa2_bwd.fa2_backward(dout, q, k, v, out, L, deterministic=algorithm == "fa2-deterministic",
                                **kw)


# ---------------------------------------------------------------------------------------------
# Against the reference

@pytest.mark.parametrize("algorithm", ["fa1", "fa2"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(algorithm, name):
    (q, k, v, _), (out_ref, lse_ref), _ = reference_case(name)
    O, lse = run_forward(algorithm, name)

    assert O.shape == q.shape and not np.isnan(O).any()
    assert rel_err(O, out_ref) <= TOL
    # lse is the undropped softmax's (the reference's lse ignores the mask), -inf where no key is seen
    assert_lse_close(lse, lse_ref)
    masked = np.isneginf(lse_ref)
    assert np.all(np.moveaxis(O, 2, 1)[masked] == 0)
    if name == "dropout, fully masked rows":
        assert masked.sum() == 18
    if CASES[name][-1] > 0:
        # the test can fail: without the mask the answer is far off
        out_undropped, _ = reference.attention(q, k, v, causal=CASES[name][6], alignment=CASES[name][7])
        assert rel_err(O, out_undropped) > 0.05


@pytest.mark.parametrize("algorithm", ["fa1", "fa2", "fa2-deterministic"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(algorithm, name):
    (q, k, v, _), _, grads_ref = reference_case(name)
    grads = run_backward(algorithm, name)

    for label, x, ref, like in zip(("dq", "dk", "dv"), grads, grads_ref, (q, k, v)):
        assert x.shape == like.shape, label
        assert not np.isnan(x).any(), label
        assert rel_err(x, ref) <= TOL, label


def test_top_left_equals_bottom_right_when_square():
    """Nq = Nk: the two diagonals coincide, so the kernels give bitwise the same answer."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 40, 1, 16)).astype(np.float32) for _ in range(3))
    for fn in (fa1_fwd.fa1_forward, fa2_fwd.fa2_forward):
        top = fn(q, k, v, causal=True, alignment=TOP_LEFT, **TILES)[0]
        bottom = fn(q, k, v, causal=True, alignment=BOTTOM_RIGHT, **TILES)[0]
        np.testing.assert_array_equal(top, bottom)


# ---------------------------------------------------------------------------------------------
# Reproducible: the mask is a function of the seed

NAME = "dropout, causal, GQA, d=17"


@pytest.mark.parametrize("algorithm", ["fa1", "fa2"])
def test_forward_same_seed_same_bits_other_seed_other_output(algorithm):
    q, k, v, _ = make_inputs(NAME)
    fn = fa1_fwd.fa1_forward if algorithm == "fa1" else fa2_fwd.fa2_forward
    first = fn(q, k, v, **kernel_keywords(NAME), **TILES)[0]
    again = fn(q, k, v, **kernel_keywords(NAME), **TILES)[0]
    other = fn(q, k, v, **kernel_keywords(NAME, seed=SEED + 1), **TILES)[0]
    assert np.array_equal(first.view(np.uint32), again.view(np.uint32))
    assert rel_err(other, first) > 0.05
    out_other, _ = reference.attention(q, k, v, **reference_keywords(NAME, seed=SEED + 1))
    assert rel_err(other, out_other) <= TOL


@pytest.mark.parametrize("algorithm", ["fa1", "fa2-deterministic"])
def test_backward_same_seed_same_bits_other_seed_other_gradients(algorithm):
    """Bitwise repeatable where no atomics add in arrival order (FA1; FA2 with deterministic=True)."""
    first = run_backward(algorithm, NAME)
    again = run_backward(algorithm, NAME)
    other = run_backward(algorithm, NAME, seed=SEED + 1)
    for a, b, c in zip(first, again, other):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        assert rel_err(c, a) > 0.05


# ---------------------------------------------------------------------------------------------
# Without dropout, no Philox; bad keywords refused before any launch

@pytest.mark.skipif(not flashnumba.on_simulator(), reason="replaces a device function, simulator only")
@pytest.mark.parametrize("module", [fa1_fwd, fa1_bwd, fa2_fwd, fa2_bwd], ids=lambda m: m.__name__.split(".")[-1])
def test_no_philox_call_without_dropout(module, monkeypatch):
    """p = 0 never reaches Philox; p > 0 does (the simulator looks the kernel's globals up at run time)."""
    calls = []

    def counting_keep(seed, b, h, r, c, p):
        calls.append((r, c))
        return philox.keep(seed, b, h, r, c, p)

    monkeypatch.setattr(module, "keep", counting_keep)
    rng = np.random.default_rng(3)
    q, k, v, dout = (rng.standard_normal((1, 9, 1, 16)).astype(np.float32) for _ in range(4))
    out, lse = reference.attention(q, k, v)
    for p in (0.0, P):
        kw = dict(causal=True, dropout_p=p, seed=SEED, **TILES)
        if module is fa1_fwd:
            fa1_fwd.fa1_forward(q, k, v, **kw)
        elif module is fa2_fwd:
            fa2_fwd.fa2_forward(q, k, v, **kw)
        elif module is fa1_bwd:
            ones, m = np.ones_like(lse, dtype=np.float32), lse.astype(np.float32)   # P = exp(S - lse)
            fa1_bwd.fa1_backward(dout, q, k, v, out.astype(np.float32), ones, m, **kw)
        else:
            fa2_bwd.fa2_backward(dout, q, k, v, out.astype(np.float32), lse.astype(np.float32),
                                 deterministic=True, **kw)
        if p == 0.0:
            assert calls == [], "Philox called without dropout"
    assert calls, "Philox never called with dropout"


def _call(fn, q, **kw):
    if fn is fa1_bwd.fa1_backward:
        l = np.ones((1, 1, q.shape[1]), np.float32)
        return fn(q, q, q, q, q, l, l, **kw)
    if fn is fa2_bwd.fa2_backward:
        return fn(q, q, q, q, q, np.zeros((1, 1, q.shape[1]), np.float32), **kw)
    return fn(q, q, q, **kw)


@pytest.mark.parametrize("fn", [fa1_fwd.fa1_forward, fa1_bwd.fa1_backward, fa2_fwd.fa2_forward,
                                fa2_bwd.fa2_backward], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kw, error, words", [
    ({"causal": True, "alignment": "top-right"}, ValueError, "alignment must be"),
    ({"alignment": "diagonal"}, ValueError, "alignment must be"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p must be in"),
    ({"dropout_p": "0.1"}, TypeError, "dropout_p must be a number"),
    ({"dropout_p": 0.1, "seed": -1}, ValueError, "seed must be in"),
    ({"dropout_p": 0.1, "seed": 1.5}, TypeError, "seed must be an integer"),
])
def test_bad_alignment_or_dropout_is_refused_before_launch(fn, kw, error, words, monkeypatch):
    module = {fa1_fwd.fa1_forward: fa1_fwd, fa1_bwd.fa1_backward: fa1_bwd,
              fa2_fwd.fa2_forward: fa2_fwd, fa2_bwd.fa2_backward: fa2_bwd}[fn]

    def no_build(config, *args, **kwargs):
        raise AssertionError("build reached with bad keywords")

    monkeypatch.setattr(module, "build", no_build)
    q = np.zeros((1, 8, 1, 16), np.float32)
    with pytest.raises(error, match=words):
        _call(fn, q, **kw)
