"""``flashnumba bench --sim``: a tiny sanity pass on the CPU simulator. NOT A BENCHMARK.

Runs every flashnumba implementation once on small awkward shapes (N not a
multiple of any tile, Nq != Nk, grouped-query heads, causal with fully masked
rows) and checks it against ``flashnumba.reference`` in float64, with the same
verdict the GPU benchmark uses. Nothing is timed: the simulator runs Python
threads, its speed says nothing about a GPU.
"""

import importlib
import time

import numpy as np

from flashnumba import reference
from flashnumba.bench.check import verdict

# (B, Nq, Nk, Hq, Hkv, d, causal)
SIM_SHAPES = ((1, 40, 40, 2, 1, 32, False), (1, 72, 40, 2, 2, 24, True))


def _kernels(name):
    return importlib.import_module(f"flashnumba.kernels.{name}")


def sim_functions():
    """[(name, direction, fn)], fn(q, k, v, dout, causal) -> outputs: (O,) or (dq, dk, dv)."""
    fns = []

    def fwd(module, attr, picks=1):
        def fn(q, k, v, dout, causal):
            return getattr(_kernels(module), attr)(q, k, v, causal=causal)[:picks]
        return fn

    fns.append(("flashnumba fa2_fast", "fwd", fwd("fa2_fast_forward", "fa2_fast_forward")))
    fns.append(("flashnumba fa2", "fwd", fwd("fa2_forward", "fa2_forward")))
    fns.append(("flashnumba fa1", "fwd", fwd("fa1_forward", "fa1_forward")))
    fns.append(("numba naive", "fwd", fwd("naive", "naive_attention")))

    def fast_bwd(q, k, v, dout, causal):
        out, L = _kernels("fa2_fast_forward").fa2_fast_forward(q, k, v, causal=causal)
        return _kernels("fa2_fast_backward").fa2_fast_backward(dout, q, k, v, out, L, causal=causal)

    def readable_bwd(algorithm):
        def fn(q, k, v, dout, causal):
            saved = getattr(_kernels(f"{algorithm}_forward"), f"{algorithm}_forward")(q, k, v, causal=causal)
            bwd = getattr(_kernels(f"{algorithm}_backward"), f"{algorithm}_backward")
            return bwd(dout, q, k, v, *saved, causal=causal)
        return fn

    try:
        _kernels("fa2_fast_backward")
        fns.append(("flashnumba fa2_fast", "bwd", fast_bwd))
    except ImportError:
        pass
    fns.append(("flashnumba fa2", "bwd", readable_bwd("fa2")))
    fns.append(("flashnumba fa1", "bwd", readable_bwd("fa1")))
    return fns


def run_sim(only=None, extra=(), shapes=SIM_SHAPES, seed=0, out=print):
    """Check each function on each shape; returns the number of failures (WRONG or error)."""
    out("=" * 72)
    out("SIMULATOR SANITY PASS -- NOT A BENCHMARK: correctness only, nothing is timed")
    out("=" * 72)
    fns = [f for f in sim_functions() + list(extra) if not only or any(o in f[0] for o in only)]
    rng = np.random.default_rng(seed)
    failures = 0
    for B, N_q, N_k, H_q, H_kv, d, causal in shapes:
        q = rng.standard_normal((B, N_q, H_q, d)).astype(np.float32)
        k = rng.standard_normal((B, N_k, H_kv, d)).astype(np.float32)
        v = rng.standard_normal((B, N_k, H_kv, d)).astype(np.float32)
        dout = rng.standard_normal((B, N_q, H_q, d)).astype(np.float32)
        ref_fwd = reference.attention(q, k, v, causal=causal)[0]
        ref_bwd = reference.attention_backward(dout, q, k, v, causal=causal)
        shape = f"B{B} Nq{N_q} Nk{N_k} Hq{H_q} Hkv{H_kv} d{d}{' causal' if causal else ''}"
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
