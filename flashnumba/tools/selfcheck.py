"""Run every kernel once on a few awkward shapes and check it against the float64 reference.

Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck,
initcheck) in a few minutes:

    compute-sanitizer --tool racecheck python -m flashnumba.tools.selfcheck

A version whose kernels read only 16-bit inputs (fa2_tc) runs on the same
inputs rounded to bfloat16 and is held to flash-attn's rule (max error <= 2x
that of dense attention computed in bfloat16 for out, 3x for the gradients;
lse 1e-5 relative). Then decoding from a KV cache (``flash_attn_with_kvcache``:
the split-KV kernels and their merge, GQA, a window with softcap, an empty
cache row), and the public calls (``flashnumba.tools.accuracy``'s
small table: float32 and bfloat16, with and without dropout, every algorithm
that takes the dtype), so the dtype, S_dmask and dropout kernels are covered
too. Exits non-zero if any result is off by more than 1e-5 relative (or the
half-precision rule).
"""

import sys

import numpy as np

import flashnumba  # first: it selects gpu or sim before numba is imported
from flashnumba import dtypes, reference

TOL = 1e-5
HALF_LIMITS = {"out": 2.0, "lse": 1e-5, "dq": 3.0, "dk": 3.0, "dv": 3.0}   # flash-attn's rule

# (B, Nq, Nk, Hq, Hkv, d, causal): N not a multiple of a tile, N < a tile,
# Nq > Nk with fully masked rows, grouped-query heads, an odd head dim.
SHAPES = [
    (1, 70, 70, 2, 1, 64, False),
    (1, 37, 19, 2, 2, 40, True),
    (2, 9, 100, 2, 1, 17, True),
]


def _rel_err(x, ref):
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(x)):
        return float("inf")
    denom = np.linalg.norm(ref[finite])
    diff = np.linalg.norm(x[finite] - ref[finite])
    return diff / denom if denom > 0 else diff


def _max_ratio(x, ref, low):
    """max |x - ref| / max |low - ref| over finite reference entries (inf where x is not finite)."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(ref)
    if not np.all(np.isfinite(x[finite])):
        return float("inf")
    worst = lambda y: float(np.abs(y[finite] - ref[finite]).max()) if finite.any() else 0.0
    return worst(x) / max(worst(np.asarray(low, dtype=np.float64)), 1e-30)


def _implementations():
    """{label: (dtype, fn(q, k, v, dout, causal) -> (out, lse, dq, dk, dv))}: every registry
    version (in the dtype it reads: float32, or bfloat16 for a 16-bit-only version), and every
    version's deterministic backward."""
    from flashnumba import registry

    def run(version, deterministic=False):
        def fn(q, k, v, dout, causal):
            O, L = version.module(registry.FORWARD).forward(q, k, v, causal=causal)
            backward = registry.version(version.deterministic_backward) if deterministic else version
            return (O, L, *backward.module(registry.BACKWARD).backward(
                dout, q, k, v, O, L, causal=causal, deterministic=deterministic))
        return version.input_dtype(dtypes.FLOAT32), fn

    impls = {v.name: run(v) for v in registry.VERSIONS}
    impls.update({f"{v.name} deterministic": run(v, True) for v in registry.VERSIONS
                  if v.deterministic_backward == v.name})
    return impls


def _errors(dtype, results, q, k, v, dout, causal):
    """({name: error}, passed) of one implementation's results on inputs rounded to `dtype`."""
    from flashnumba.tools.emulation import attention_backward_in_dtype, attention_in_dtype
    names = ("out", "lse", "dq", "dk", "dv")
    q, k, v, dout = (dtypes.round_to(x, dtype).astype(np.float64) for x in (q, k, v, dout))
    refs = (*reference.attention(q, k, v, causal=causal),
            *reference.attention_backward(dout, q, k, v, causal=causal))
    if dtype == dtypes.FLOAT32:
        errs = {n: _rel_err(x, r) for n, x, r in zip(names, results, refs)}
        return errs, all(e <= TOL for e in errs.values())
    lows = (attention_in_dtype(q, k, v, dtype, causal=causal), None,
            *attention_backward_in_dtype(dout, q, k, v, dtype, causal=causal))
    errs = {n: _rel_err(x, r) if n == "lse" else _max_ratio(x, r, low)
            for n, x, r, low in zip(names, results, refs, lows)}
    return errs, all(errs[n] <= HALF_LIMITS[n] for n in names)


# (B, Nq, Hq, Hkv, d, cache rows, cache_seqlens, num_splits, options) for flash_attn_with_kvcache
DECODE = [
    (2, 1, 4, 2, 64, 300, (0, 237), 3, {"causal": True}),
    (2, 3, 4, 1, 40, 160, (150, 9), 0, {"window_size": (20, 0), "softcap": 5.0}),
    (2, 2, 8, 2, 128, 200, (77, 130), 0, {}),
    (1, 1, 2, 1, 256, 100, (60,), 2, {"causal": True}),
]


def _decode_failures(rng):
    """Appends one new token per sequence, attends, and compares with the reference per sequence."""
    failures = 0
    for B, Nq, Hq, Hkv, d, S, seqlens, splits, options in DECODE:
        q = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
        k_cache, v_cache = (rng.standard_normal((B, S, Hkv, d)).astype(np.float32) for _ in range(2))
        k, v = (rng.standard_normal((B, 1, Hkv, d)).astype(np.float32) for _ in range(2))
        seqlens = np.array(seqlens, np.int32)
        out, lse = flashnumba.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                      num_splits=splits, return_softmax_lse=True, **options)
        errs = []
        for b in range(B):
            n = int(seqlens[b]) + 1
            o, l = reference.attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], **options)
            errs += [_rel_err(out[b:b + 1], o), _rel_err(lse[b:b + 1], l)]
        ok = max(errs) <= TOL
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {'kvcache':<18} float32  B={B} Nq={Nq} Hq={Hq} Hkv={Hkv} d={d} "
              f"cache={S} seqlens={tuple(int(x) for x in seqlens)} splits={splits} {options}: "
              f"max rel err {max(errs):.1e}", flush=True)
    return failures


def main(argv=None):
    rng = np.random.default_rng(0)
    failures = 0
    for B, Nq, Nk, Hq, Hkv, d, causal in SHAPES:
        q = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
        k = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
        v = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
        dout = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
        for name, (dtype, impl) in _implementations().items():
            inputs = (x.astype(dtypes.NUMPY[dtype]) for x in (q, k, v, dout))
            results = impl(*inputs, causal)
            errs, ok = _errors(dtype, results, q, k, v, dout, causal)
            failures += not ok
            shown = " ".join(f"{n}={e:.1e}" if dtype == dtypes.FLOAT32 or n == "lse" else f"{n}={e:.2f}x"
                             for n, e in errs.items())
            print(f"{'PASS' if ok else 'FAIL'} {name:<18} {dtype:<8} B={B} Nq={Nq} Nk={Nk} Hq={Hq} "
                  f"Hkv={Hkv} d={d} causal={causal}: {shown}", flush=True)
    failures += _decode_failures(rng)
    # the public calls: dtype casts, dropout (S_dmask, Philox in every kernel), every algorithm
    from flashnumba.tools import accuracy
    _, api_failures = accuracy.table(accuracy.SIM_CASES, dtypes=("float32", "bfloat16"))
    failures += api_failures
    print(f"selfcheck: {failures} failure(s) on {flashnumba.device()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
