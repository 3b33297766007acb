"""Shared by the tensor-core tests: 16-bit inputs, flash-attn's accuracy rule, and a compile of
kernels for sm_80 / sm_90 in a process without the simulator."""

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np

from flashnumba import philox

NP = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def inputs(rng, dtype, B, Nq, Nk, Hq, Hkv, d):
    """q, k, v, dout in `dtype` (standard normal before rounding)."""
    shapes = ((B, Nq, Hq, d), (B, Nk, Hkv, d), (B, Nk, Hkv, d), (B, Nq, Hq, d))
    return [rng.standard_normal(s).astype(np.float32).astype(NP[dtype]) for s in shapes]


def options(B, Hq, Nq, Nk, causal, alignment, dropout_p, seed):
    """Keyword arguments for the reference: the keep-mask the kernels draw with Philox."""
    mask = philox.keep_mask(seed, dropout_p, B, Hq, Nq, Nk) if dropout_p > 0 else None
    return {"causal": causal, "alignment": alignment, "dropout_p": dropout_p, "dropout_mask": mask}


def max_err(x, ref):
    """max |x - ref| over finite reference entries; inf when x is not finite there."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return np.inf
    return float(np.abs(x - ref).max()) if ref.size else 0.0


def ratio(x, ref, low):
    """flash-attn's rule: the kernel's error over the error of the dense attention in the dtype."""
    return max_err(x, ref) / max(max_err(low, ref), 1e-30)


def lse_rel(L, ref):
    """Relative error of L, -inf entries required exactly where the reference has them."""
    L = np.asarray(L, np.float64)
    ref = np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(L)) and np.all(L[~finite] == ref[~finite])
    if not finite.any():
        return 0.0
    return float(np.linalg.norm(L[finite] - ref[finite]) / np.linalg.norm(ref[finite]))


def compile_report(body):
    """Run `body` (Python using `build_and_link(dispatcher, argtypes, cc)`) in a process with the
    real CUDA target (no simulator); it must print one JSON line, which is returned."""
    prelude = textwrap.dedent("""
        import json, sys
        import numba.cuda                        # the real target: import before flashnumba
        from numba import cuda, types
        from flashnumba.tools import resources

        _built = {}

        def build_and_link(dispatcher, argtypes, cc):
            # built once (numba's IR does not depend on cc >= 6.0), linked for each cc
            key = (id(dispatcher), tuple(argtypes))
            if key not in _built:
                _built[key] = resources.build(dispatcher, argtypes, cc)
            library = _built[key]
            with resources._building_for(cc):
                ptx = library.get_asm_str(cc=cc)
            log = resources.link(library, cc)
            return {"ptx": ptx, **resources.read_log(log)}
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "FLASHNUMBA_DEVICE")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], env=env,
                          check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
