"""Run every kernel once on a few awkward shapes and check it against the float64 reference.

Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck,
initcheck) in a few minutes:

    compute-sanitizer --tool racecheck python -m flashnumba.tools.selfcheck

Then the public calls (``flashnumba.tools.accuracy``'s small table: float32 and
bfloat16, with and without dropout, every algorithm), so the dtype, S_dmask
and dropout kernels are covered too. Exits non-zero if any result is off by
more than 1e-5 relative (or the half-precision rule).
"""

import sys

import numpy as np

import flashnumba  # noqa: F401  (selects gpu or sim before numba is imported)
from flashnumba import reference

TOL = 1e-5

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


def _implementations():
    """{label: fn(q, k, v, dout, causal) -> (out, lse, dq, dk, dv)}: every registry version, and
    every version's deterministic backward."""
    from flashnumba import registry

    def run(version, deterministic=False):
        def fn(q, k, v, dout, causal):
            O, L = version.module(registry.FORWARD).forward(q, k, v, causal=causal)
            backward = registry.version(version.deterministic_backward) if deterministic else version
            return (O, L, *backward.module(registry.BACKWARD).backward(
                dout, q, k, v, O, L, causal=causal, deterministic=deterministic))
        return fn

    impls = {v.name: run(v) for v in registry.VERSIONS}
    impls.update({f"{v.name} deterministic": run(v, True) for v in registry.VERSIONS
                  if v.deterministic_backward == v.name})
    return impls


def main(argv=None):
    rng = np.random.default_rng(0)
    failures = 0
    names = ("out", "lse", "dq", "dk", "dv")
    for B, Nq, Nk, Hq, Hkv, d, causal in SHAPES:
        q = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
        k = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
        v = rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32)
        dout = rng.standard_normal((B, Nq, Hq, d)).astype(np.float32)
        refs = (*reference.attention(q, k, v, causal=causal),
                *reference.attention_backward(dout, q, k, v, causal=causal))
        for name, impl in _implementations().items():
            results = impl(q, k, v, dout, causal)
            errs = {n: _rel_err(x, r) for n, x, r in zip(names, results, refs)}
            ok = all(e <= TOL for e in errs.values())
            failures += not ok
            shown = " ".join(f"{n}={e:.1e}" for n, e in errs.items())
            print(f"{'PASS' if ok else 'FAIL'} {name:<18} B={B} Nq={Nq} Nk={Nk} Hq={Hq} "
                  f"Hkv={Hkv} d={d} causal={causal}: {shown}", flush=True)
    # the public calls: dtype casts, dropout (S_dmask, Philox in every kernel), every algorithm
    from flashnumba.tools import accuracy
    _, api_failures = accuracy.table(accuracy.SIM_CASES, dtypes=("float32", "bfloat16"))
    failures += api_failures
    print(f"selfcheck: {failures} failure(s) on {flashnumba.device()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
