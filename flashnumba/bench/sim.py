"""``flashnumba bench --sim``: a tiny sanity pass on the CPU simulator. NOT A BENCHMARK.

Runs every flashnumba implementation once on small awkward shapes (N not a
multiple of any tile, Nq != Nk, grouped-query heads, causal with fully masked
rows) and checks it against ``flashnumba.reference`` in float64, with the same
verdict the GPU benchmark uses. Nothing is timed: the simulator runs Python
threads, its speed says nothing about a GPU.
"""

import time

import numpy as np

from flashnumba import reference, registry
from flashnumba.bench.check import verdict

# (B, Nq, Nk, Hq, Hkv, d, causal)
SIM_SHAPES = ((1, 40, 40, 2, 1, 32, False), (1, 72, 40, 2, 2, 24, True))


def sim_functions():
    """[(name, direction, fn)], fn(q, k, v, dout, causal) -> outputs: (O,) or (dq, dk, dv):
    every registry version both ways, and the naive baseline forward."""
    fns = []

    def forward(version):
        def fn(q, k, v, dout, causal):
            return version.module(registry.FORWARD).forward(q, k, v, causal=causal)[:1]
        return fn

    def backward(version):
        def fn(q, k, v, dout, causal):
            out, L = version.module(registry.FORWARD).forward(q, k, v, causal=causal)
            return version.module(registry.BACKWARD).backward(dout, q, k, v, out, L, causal=causal)
        return fn

    def naive(q, k, v, dout, causal):
        from flashnumba.kernels.naive import naive_attention
        return naive_attention(q, k, v, causal=causal)[:1]

    fns += [(f"flashnumba {v.name}", "fwd", forward(v)) for v in registry.VERSIONS]
    fns.append(("numba naive", "fwd", naive))
    fns += [(f"flashnumba {v.name}", "bwd", backward(v)) for v in registry.VERSIONS]
    return fns


def run_sim(only=None, extra=(), shapes=SIM_SHAPES, seed=0, out=print):
    """Check each function on each shape; returns the number of failures (WRONG or error)."""
    out("=" * 72)
    out("SIMULATOR SANITY PASS -- NOT A BENCHMARK: correctness only, nothing is timed")
    out("=" * 72)
    fns = [f for f in sim_functions() + list(extra) if not only or any(o in f[0] for o in only)]
    rng = np.random.default_rng(seed)
    failures = 0
    for B, Nq, Nk, H_q, H_kv, d, causal in shapes:
        q = rng.standard_normal((B, Nq, H_q, d)).astype(np.float32)
        k = rng.standard_normal((B, Nk, H_kv, d)).astype(np.float32)
        v = rng.standard_normal((B, Nk, H_kv, d)).astype(np.float32)
        dout = rng.standard_normal((B, Nq, H_q, d)).astype(np.float32)
        ref_fwd = reference.attention(q, k, v, causal=causal)[0]
        ref_bwd = reference.attention_backward(dout, q, k, v, causal=causal)
        shape = f"B{B} Nq{Nq} Nk{Nk} Hq{H_q} Hkv{H_kv} d{d}{' causal' if causal else ''}"
        for name, direction, fn in fns:
            start = time.perf_counter()
            try:
                outputs = [np.asarray(x) for x in fn(q, k, v, dout, causal)]
                refs, names = ((ref_fwd,), ("O",)) if direction == "fwd" else (ref_bwd, ("dq", "dk", "dv"))
                ok, _, text = verdict(outputs, refs, "fp32", names)
            except Exception as exc:   # reported, never hidden
                ok, text = False, f"ERROR {type(exc).__name__}: {exc}"
            failures += not ok
            out(f"{direction} {name:<22} {shape:<34} {text}  [{time.perf_counter() - start:.1f} s simulated]")
    out(f"simulator sanity pass: {'all ok' if failures == 0 else f'{failures} FAILED'} "
        "(not a benchmark)")
    return failures
